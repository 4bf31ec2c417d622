"""Wire messages of tree sync: how a worker group keeps its hash-radix tree replicas in step.

Every worker of a group runs a :class:`~permamesh.routing.sync.DeltaPublisher` for its own
prefix cache and a :class:`~permamesh.routing.replica.GroupReplica` of the group's tree.

Who sends what (all signed by the sending worker's long-term key):

- publisher -> group: :class:`TreeDelta` after each request (or as a load-only heartbeat):
  the blocks it gained as anchored runs (:class:`Insert`), the chains it evicted, its
  :class:`Load`, and its *holdings digest* after the change, so a replica that missed or
  misapplied a delta notices.
- replica -> publisher: :class:`TreeSyncRequest` when a replica found it has diverged.
- publisher -> replica: :class:`TreeSnapshot`, everything the publisher held as of its last
  delta ``seq``, encoded as anchored runs so shared prefixes travel once.

The codec checks field types on decode; ``__post_init__`` checks values (digest lengths,
counts, ranges) and raises :class:`WireError`, so a malformed message is refused before any
replica state changes.
"""

from __future__ import annotations

import math

from permamesh.routing.blocks import DIGEST_SIZE
from permamesh.wire.codec import MAX_FRAME_BYTES, Message, WireError, message, struct

HOLDINGS_SIZE = 32
"""Bytes in a holdings digest (see :func:`permamesh.routing.holdings.holdings_element`)."""

MAX_NAME = 128  # characters in a group or worker id
MAX_SEQ = 2**63  # epochs and sequence numbers are in [0, MAX_SEQ)
MAX_RUN = 16384  # digests in one Insert: a 256k-token chain at 16 tokens per block
MAX_DELTA_BLOCKS = 4096  # digests in all inserts of one delta
MAX_DELTA_RUNS = 1024  # Insert records in one delta
MAX_DELTA_EVICTS = 1024  # evicted chains in one delta
MAX_SNAPSHOT_BLOCKS = 131072  # digests in one snapshot (about 2.4 MB of digests)
MAX_SNAPSHOT_RUNS = 16384  # Insert records in one snapshot


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise WireError(what)


def _check_name(value: str, what: str) -> None:
    _require(0 < len(value) <= MAX_NAME, f"{what} must be 1-{MAX_NAME} characters")


def _check_digest(value: bytes, what: str) -> None:
    _require(len(value) == DIGEST_SIZE, f"{what} must be {DIGEST_SIZE} bytes, not {len(value)}")


def _check_runs(runs: tuple[Insert, ...], max_runs: int, max_blocks: int, what: str) -> None:
    _require(len(runs) <= max_runs, f"{what}: {len(runs)} runs exceed the limit of {max_runs}")
    blocks = sum(len(run.digests) for run in runs)
    _require(blocks <= max_blocks, f"{what}: {blocks} blocks exceed the limit of {max_blocks}")


@struct
class Load:
    """A worker's load as it reports it; routing weighs it against prefix matches."""

    queue_length: int  # waiting + running requests
    backlog_s: float  # the worker's own estimate of seconds of queued work
    prefill_tok_per_s: float
    decode_tok_per_s: float
    cached_blocks: int  # blocks in its prefix KV cache

    def __post_init__(self) -> None:
        _require(0 <= self.queue_length < 2**31, "queue_length must be in [0, 2**31)")
        _require(0 <= self.cached_blocks < 2**40, "cached_blocks must be in [0, 2**40)")
        for name in ("backlog_s", "prefill_tok_per_s", "decode_tok_per_s"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0.0, f"{name} must be finite and >= 0")


@struct
class Insert:
    """A run of new blocks hanging below ``anchor``: the digest of the last block the sender
    already held on this chain (``b""`` for the root). ``digests[0]``'s parent is ``anchor``,
    each later digest's parent is the one before it."""

    anchor: bytes
    digests: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if self.anchor:
            _check_digest(self.anchor, "insert anchor")
        _require(0 < len(self.digests) <= MAX_RUN, f"an insert holds 1-{MAX_RUN} digests")
        for digest in self.digests:
            _check_digest(digest, "insert digest")


@message("tree.delta", max_bytes=256 * 1024)
class TreeDelta(Message):
    """What ``worker`` changed since its delta ``seq - 1`` of this ``epoch``.

    A replica removes each evicted chain (named by its last digest) first, then adds the
    inserts in order; afterwards the publisher's holdings digest must equal ``holdings``.
    """

    group: str
    worker: str
    epoch: int  # new at each start of the publisher; every epoch starts empty at seq 0
    seq: int  # 1 for the first delta of an epoch, +1 per delta (heartbeats included)
    inserts: tuple[Insert, ...]
    evicts: tuple[bytes, ...]  # last digest of each evicted chain
    load: Load
    holdings: bytes  # the publisher's holdings digest after this delta

    def __post_init__(self) -> None:
        _check_name(self.group, "group")
        _check_name(self.worker, "worker")
        _require(0 <= self.epoch < MAX_SEQ, "epoch must be in [0, 2**63)")
        _require(1 <= self.seq < MAX_SEQ, "delta seq must be in [1, 2**63)")
        _check_runs(self.inserts, MAX_DELTA_RUNS, MAX_DELTA_BLOCKS, "tree.delta")
        _require(len(self.evicts) <= MAX_DELTA_EVICTS, f"at most {MAX_DELTA_EVICTS} evicts")
        for digest in self.evicts:
            _check_digest(digest, "evicted digest")
        _require(len(self.holdings) == HOLDINGS_SIZE, f"holdings must be {HOLDINGS_SIZE} bytes")

    @property
    def changes(self) -> bool:
        """False for a load-only heartbeat."""
        return bool(self.inserts or self.evicts)


@message("tree.sync?")
class TreeSyncRequest(Message):
    """``requester`` asks ``worker`` for a :class:`TreeSnapshot` of its holdings."""

    group: str
    worker: str  # whose state is wanted
    requester: str

    def __post_init__(self) -> None:
        _check_name(self.group, "group")
        _check_name(self.worker, "worker")
        _check_name(self.requester, "requester")


@message("tree.snapshot", max_bytes=MAX_FRAME_BYTES - 4096)
class TreeSnapshot(Message):
    """Everything ``worker`` held as of its delta ``seq`` (0: nothing published yet)."""

    group: str
    worker: str
    epoch: int
    seq: int
    chains: tuple[Insert, ...]  # anchored runs, parents before children
    load: Load
    holdings: bytes

    def __post_init__(self) -> None:
        _check_name(self.group, "group")
        _check_name(self.worker, "worker")
        _require(0 <= self.epoch < MAX_SEQ, "epoch must be in [0, 2**63)")
        _require(0 <= self.seq < MAX_SEQ, "snapshot seq must be in [0, 2**63)")
        _check_runs(self.chains, MAX_SNAPSHOT_RUNS, MAX_SNAPSHOT_BLOCKS, "tree.snapshot")
        _require(len(self.holdings) == HOLDINGS_SIZE, f"holdings must be {HOLDINGS_SIZE} bytes")
