"""The wire messages of container jobs: a job in, its exit code and output back.

Who sends what:

- client -> entry worker (through the anonymous overlay, or directly): :class:`RunRequest`.
  It carries the image's manifest and config blobs (the worker computes the manifest digest
  and checks the config against it), the command, the limits the client asks for, and the
  endpoints of layer servers that hold the image (``sources``: the job's source; peers that
  hold the layers are tried first).
- entry worker -> the container worker the layer router chose: :class:`ForwardedRun`.
- whoever ran it -> back the same way: for a request with ``stream`` set, :class:`RunOutput`
  pieces while the job runs (stdout and stderr as they are read, in order, within the same
  cap), then :class:`RunResult`, or an ``error`` reply (:class:`permamesh.wire.ErrorReply`)
  when the job could not run at all. The overlay's inbox sets ``stream`` when the request's
  envelopes carry chunk blocks and sends the pieces as chunks (``docs/paths.md`` section 9).

Everything is checked at decode time (sizes, ranges, endpoint form): an answer must fit the
overlay's cells, so output crossing the network is capped at :data:`MAX_OUTPUT_BYTES` per
stream, and a request at a few hundred KiB.
"""

from __future__ import annotations

import math
import re

from permamesh.wire.codec import Message, WireError, message

MAX_BLOB_BYTES = 64 * 1024  # manifest or config carried in a request
MAX_ARGS, MAX_ARG_BYTES = 256, 64 * 1024
MAX_SOURCES = 8
MAX_OUTPUT_BYTES = 64 * 1024  # per stream, in a RunResult
MAX_TIMEOUT_S = 3600.0
ENDPOINT_RE = re.compile(r"tcp://[A-Za-z0-9.\-\[\]:]{1,190}:[0-9]{1,5}(\?key=[0-9a-f]{64})?")  # key: CurveZMQ server key


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise WireError(what)


@message("containers.run", max_bytes=2 * MAX_BLOB_BYTES + MAX_ARG_BYTES + 8192)
class RunRequest(Message):
    request_id: str
    manifest: bytes  # the image manifest blob (its sha256 is the image's digest)
    config: bytes  # the image config blob (checked against the manifest's descriptor)
    argv: tuple[str, ...] = ()  # () = the image's own command
    timeout_s: float = 30.0  # wall-clock limit of the run
    memory_mb: int = 256  # memory ceiling where the host enforces it
    cpus: float = 1.0
    sources: tuple[str, ...] = ()  # layer-server endpoints holding the image (tcp://host:port)
    stream: bool = False  # send RunOutput pieces as the job writes them, before the RunResult

    def __post_init__(self) -> None:
        _require(0 < len(self.request_id) <= 64, "request_id must be 1-64 characters")
        _require(0 < len(self.manifest) <= MAX_BLOB_BYTES, f"manifest must be 1..{MAX_BLOB_BYTES} bytes")
        _require(0 < len(self.config) <= MAX_BLOB_BYTES, f"config must be 1..{MAX_BLOB_BYTES} bytes")
        _require(len(self.argv) <= MAX_ARGS, f"at most {MAX_ARGS} arguments")
        _require(sum(len(a) for a in self.argv) <= MAX_ARG_BYTES, f"arguments exceed {MAX_ARG_BYTES} characters")
        _require(all("\x00" not in a for a in self.argv), "arguments cannot contain NUL")
        _require(math.isfinite(self.timeout_s) and 0 < self.timeout_s <= MAX_TIMEOUT_S,
                 f"timeout_s must be in (0, {MAX_TIMEOUT_S:g}]")
        _require(4 <= self.memory_mb <= 1 << 20, "memory_mb must be in 4..1048576")
        _require(math.isfinite(self.cpus) and 0 < self.cpus <= 1024, "cpus must be in (0, 1024]")
        _require(len(self.sources) <= MAX_SOURCES, f"at most {MAX_SOURCES} sources")
        _require(all(ENDPOINT_RE.fullmatch(s) for s in self.sources), "sources must be tcp://host:port endpoints (with ?key=HEX for an encrypted link)")


@message("containers.result", max_bytes=2 * MAX_OUTPUT_BYTES + 16384)
class RunResult(Message):
    request_id: str
    exit_code: int  # the container's; 128+N when killed by signal N
    stdout: bytes
    stderr: bytes
    timed_out: bool = False  # killed at the wall-clock limit
    truncated: bool = False  # output past the cap was discarded
    runtime: str = ""  # runc or bwrap
    limits_enforced: bool = False  # cgroup memory/cpu/pids limits really applied
    notes: tuple[str, ...] = ()  # what the runtime could not do, and the like
    worker_id: str = ""  # who ran it
    warm: bool = False  # its rootfs was already prepared there
    from_peers: int = 0  # layers fetched from other workers
    from_source: int = 0  # layers fetched from the job's sources
    prepare_s: float = 0.0  # fetching and unpacking
    total_s: float = 0.0
    why: str = ""  # why the router chose that worker

    def __post_init__(self) -> None:
        _require(0 < len(self.request_id) <= 64, "request_id must be 1-64 characters")
        _require(-(2**31) <= self.exit_code < 2**31, "exit_code out of range")
        _require(len(self.stdout) <= MAX_OUTPUT_BYTES and len(self.stderr) <= MAX_OUTPUT_BYTES,
                 f"output is capped at {MAX_OUTPUT_BYTES} bytes per stream")
        _require(len(self.notes) <= 16 and all(len(n) <= 512 for n in self.notes), "too many or too long notes")
        _require(len(self.why) <= 1024 and len(self.runtime) <= 16 and len(self.worker_id) <= 64, "field too long")


@message("containers.output", max_bytes=2 * MAX_OUTPUT_BYTES + 1024)
class RunOutput(Message):
    """Output a running job wrote since the last piece (stdout and stderr are separate pipes:
    their relative order is not kept). The pieces of one job join to its RunResult's output."""

    request_id: str
    stdout: bytes = b""
    stderr: bytes = b""

    def __post_init__(self) -> None:
        _require(0 < len(self.request_id) <= 64, "request_id must be 1-64 characters")
        _require(len(self.stdout) <= MAX_OUTPUT_BYTES and len(self.stderr) <= MAX_OUTPUT_BYTES,
                 f"output is capped at {MAX_OUTPUT_BYTES} bytes per stream")


@message("containers.forward", max_bytes=2 * MAX_BLOB_BYTES + MAX_ARG_BYTES + 16384)
class ForwardedRun(Message):
    """The entry worker hands a job to the container worker the router chose; that worker
    runs it (never forwards again) and answers the entry worker, which answers the client."""

    request: RunRequest
    entry: str  # node id of the entry worker
    why: str = ""

    def __post_init__(self) -> None:
        _require(len(self.entry) <= 64 and len(self.why) <= 1024, "field too long")
