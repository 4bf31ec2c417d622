"""The researcher's Python client: generation and container jobs on a mesh, sync (this module)
and async (:class:`permamesh.client.aio.AsyncClient`).

>>> from permamesh import Client
>>> with Client(join="tcp://VALIDATOR:PORT?key=HEX") as client:   # workers from the committee's directory
...     result = client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=32)
...     print(result.text)
...     job = client.run("bb", ["/bin/echo", "hello"])   # an image from `permamesh image add`
...     print(job.exit_code, job.stdout)

``Client(anonymous=True)`` sends every job through the anonymous overlay (S-IDA cloves over
onion paths, as ``permamesh submit`` does): the answer streams back in chunks over reply
blocks (``docs/paths.md`` section 9), so ``on_text`` sees each chunk in order as it is
rebuilt, and the pieces always join to the checked result's text. Otherwise jobs go straight
to a worker and answers stream token by token.

:meth:`Client.generate` blocks and returns a :class:`GenerateResult`; pass ``on_text`` to
see the answer as it streams. :meth:`Client.events` yields every message of one job
(``Accepted``, ``TokenChunk``..., then the result). Each client signs with a fresh
ephemeral identity, so workers cannot link its jobs to a long-term key.

Failures: a worker that does not accept within ``accept_timeout_s``, or answers
``queue_full``/``shutting_down``, is skipped and the job goes to the next worker. Workers send
a :class:`Progress` keep-alive about once a second for every job they hold, so silence for
``timeout_s`` means the job was lost (its worker died): the job is resubmitted elsewhere when
that cannot change what the caller already saw (nothing streamed yet, or the answer is
deterministic: temperature 0 or a seed, in which case chunks already shown are skipped).
Anything else raises :class:`ClientError` with the worker's code and reason. A Client is not
thread-safe: use one per thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from permamesh.errors import PermameshError
from permamesh.identity import NodeIdentity
from permamesh.directory.workers import WorkerRecord, default_data_dir
from permamesh.transport import DealerClient
from permamesh.wire import (
    Accepted,
    ChatMessage,
    ErrorReply,
    GenerateRequest,
    GenerateResult,
    Message,
    Progress,
    StatusReply,
    StatusRequest,
    TokenChunk,
    WireError,
    decode,
    encode,
)

log = logging.getLogger(__name__)

RETRYABLE = ("queue_full", "shutting_down", "no_answer", "lost")


class ClientError(PermameshError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


SUSPECT_S = 30.0  # seconds a worker that did not answer is passed over
OVERLAY_RESUBMITS = 2  # a request whose cloves were not acknowledged is sent again, this many times at most


class Client:
    def __init__(self, endpoints: Sequence[str] | None = None, *, data_dir: Path | str | None = None,
                 timeout_s: float = 30.0, accept_timeout_s: float = 10.0, anonymous: bool = False,
                 join: Sequence[str] | str | None = None, pins: Mapping[str, bytes] | None = None) -> None:
        """``endpoints``: worker addresses (tcp://host:port[?key=HEX]); default: the committee's
        directory, read through ``join`` (a validator's address, or several; default
        ``$PERMAMESH_JOIN``, else ``<data_dir>/join`` written by ``permamesh demo --serve``):
        its running workers and relays, each link encrypted to the key the directory names.
        ``timeout_s``: seconds of silence (no token, result or keep-alive) after which an
        accepted job counts as lost.
        ``accept_timeout_s``: seconds a worker has to accept a job before we try another.
        ``anonymous``: send jobs through the overlay (relays from the directory).
        ``pins``: endpoint -> the Ed25519 key its replies must be signed with (the directory
        pins the workers it names; replies signed by any other key are dropped)."""
        self._pins: dict[str, bytes] = dict(pins or {})
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.anonymous = anonymous
        self._overlay = None
        self.directory = None
        if endpoints is None or join or anonymous:
            from permamesh.directory.committee import CommitteeDirectory
            from permamesh.directory.join import resolve_join

            need = "a client without worker endpoints" if endpoints is None else "an anonymous client"
            try:
                committee = resolve_join(join, self.data_dir, required=need)
            except PermameshError as exc:
                raise ClientError("no_committee", str(exc)) from None
            self.directory = CommitteeDirectory(committee, self.data_dir / "directory" / "client.json")
        self._from_directory = endpoints is None and self.directory is not None
        self._suspect: dict[str, float] = {}  # endpoint -> when it last failed to answer (local evidence)
        if endpoints is None:
            records: list[WorkerRecord] = self._workers()
            endpoints = [r.endpoint for r in records]
            self._pins.update({r.endpoint: bytes.fromhex(r.sign_key) for r in records})
        if not endpoints:
            raise ClientError("no_workers", "no worker endpoints given and none running in the committee's "
                              "directory; start `permamesh worker --join ...` or `permamesh demo --serve`")
        self.endpoints = list(endpoints)
        self.timeout_s = timeout_s
        self.accept_timeout_s = accept_timeout_s
        self.identity = NodeIdentity.generate()
        self._sockets: dict[str, DealerClient] = {}
        self._next = itertools.cycle(range(len(self.endpoints)))

    def _workers(self) -> list[WorkerRecord]:
        """Running workers from the committee's directory."""
        return self.directory.workers() if self.directory is not None else []

    # -------------------------------------------------------------- public API
    def generate(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str] | ChatMessage] = (),
                 on_text: Callable[[str], None] | None = None, **params) -> GenerateResult:
        """Run one job to completion. ``params``: max_tokens, temperature, top_p, seed, stop,
        logprobs, top_logprobs, presence_penalty, frequency_penalty, grammar_kind and grammar
        (a JSON schema or Lark grammar the answer is decoded under), model (see
        :class:`GenerateRequest`)."""
        if self.anonymous:
            return self._generate_anonymously(prompt, messages, on_text, params)
        for msg in self.events(prompt, messages=messages, stream=on_text is not None, **params):
            if isinstance(msg, TokenChunk) and on_text is not None and msg.text:
                on_text(msg.text)
            elif isinstance(msg, GenerateResult):
                return msg
        raise ClientError("no_result", "the job ended without a result")  # events() never gets here

    def events(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str] | ChatMessage] = (),
               **params) -> Iterator[Message]:
        chat = tuple(m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"]) for m in messages)
        if "stop" in params:
            params["stop"] = tuple(params["stop"] or ())
        request = GenerateRequest(request_id=uuid.uuid4().hex, prompt=prompt, messages=chat, **params)
        deterministic = request.temperature == 0.0 or request.seed is not None
        shown = 0  # token chunks the caller has already seen
        last_error: ClientError | None = None
        self._refresh_endpoints()
        for attempt in range(2 * len(self.endpoints)):
            endpoint = self._pick()
            if attempt:
                request = dataclasses.replace(request, request_id=uuid.uuid4().hex)
            seen = 0
            try:
                for msg in self._run_on(endpoint, request):
                    if isinstance(msg, TokenChunk):
                        seen += 1
                        if seen <= shown:
                            continue  # a deterministic rerun repeats what was already shown
                        shown = seen
                    elif isinstance(msg, Accepted) and attempt:
                        continue
                    yield msg
                return
            except ClientError as exc:
                if exc.code not in RETRYABLE or (shown and not deterministic):
                    raise
                log.warning("worker %s: %s; resubmitting elsewhere", endpoint, exc)
                self._suspect[endpoint] = time.monotonic()
                last_error = exc
        raise last_error or ClientError("no_workers", "no worker accepted the job")

    def _refresh_endpoints(self) -> None:
        """With ``join`` and no fixed endpoints: the workers the directory says are running now
        (a worker that left the running set gets no new job), pinned to their keys."""
        if not self._from_directory:
            return
        records = self._workers()
        if records:
            self.endpoints = [r.endpoint for r in records]
            self._pins.update({r.endpoint: bytes.fromhex(r.sign_key) for r in records})

    def _pick(self) -> str:
        """The next endpoint in turn, passing over those that failed to answer in the last
        SUSPECT_S seconds while any other is left (fast local evidence of a dead worker)."""
        now = time.monotonic()
        self._suspect = {e: t for e, t in self._suspect.items() if now - t < SUSPECT_S}
        n = len(self.endpoints)
        start = next(self._next)
        for k in range(n):
            endpoint = self.endpoints[(start + k) % n]
            if endpoint not in self._suspect:
                return endpoint
        return self.endpoints[start % n]

    def status(self) -> list[StatusReply]:
        """Ask every worker for its status; workers that do not answer are left out."""
        replies = []
        for endpoint in self.endpoints:
            rid = uuid.uuid4().hex
            self._socket(endpoint).send(encode(StatusRequest(rid), self.identity))
            try:
                msg = self._next_message(endpoint, rid, self.accept_timeout_s, "no_answer")
            except ClientError:
                continue
            if isinstance(msg, StatusReply):
                replies.append(msg)
        return replies

    def run(self, image: str, argv: Sequence[str] = (), *, timeout_s: float = 30.0, memory_mb: int = 256,
            cpus: float = 1.0, on_output: Callable[[bytes, bytes], None] | None = None):
        """Run a container job: ``image`` by name from ``DATA_DIR/images`` (``permamesh image
        add``), ``argv`` (default: the image's command). Returns its
        :class:`~permamesh.containers.messages.RunResult` (exit code, stdout, stderr, timed
        out or not); :class:`ClientError` when it could not run. ``on_output(stdout, stderr)``
        gets the job's output as it is written (directly, or in chunks through the overlay),
        the pieces joining to the result's. The image's layers are seeded from this machine
        while the job runs; workers already holding them don't ask."""
        from permamesh.containers.errors import ContainerError
        from permamesh.containers.images import load_layout
        from permamesh.containers.jobs import ImageSeed, container_entries, run_over_overlay, run_request

        try:
            img, blobs = load_layout(self.data_dir / "images", image)
        except ContainerError as exc:
            raise ClientError("bad_image", str(exc)) from None
        try:
            with ImageSeed(blobs, img) as seed:
                req = run_request(blobs, img, argv, [seed.endpoint], timeout_s, memory_mb, cpus)
                if self.anonymous:
                    return run_over_overlay(self._overlay_client(timeout_s + 180.0), req, on_output=on_output)
                req = dataclasses.replace(req, stream=on_output is not None)
                entries = container_entries(self._workers())
                if not entries:
                    raise ClientError("no_workers", "no worker runs containers (start `permamesh worker --containers`)")
                entry = entries[next(self._next) % len(entries)]
                self._pins.setdefault(entry.endpoint, bytes.fromhex(entry.sign_key))
                self._socket(entry.endpoint).send(encode(req, self.identity))
                first = self._next_message(entry.endpoint, req.request_id, self.accept_timeout_s, "no_answer")
                if not isinstance(first, Accepted):
                    raise ClientError("protocol", f"expected accepted, got {first.TAG}")
                return self._run_output(entry.endpoint, req.request_id, timeout_s + 180.0, on_output)
        except ContainerError as exc:
            raise ClientError("run_failed", str(exc)) from None
        finally:
            blobs.close()

    def _run_output(self, endpoint: str, request_id: str, timeout_s: float,
                    on_output: Callable[[bytes, bytes], None] | None):
        """A direct container job's output pieces to ``on_output``, then its result, which
        must begin with them (the rest of its output goes to ``on_output`` too)."""
        from permamesh.containers.messages import RunOutput, RunResult

        out, err = bytearray(), bytearray()
        while True:
            msg = self._next_message(endpoint, request_id, timeout_s, "lost")
            if isinstance(msg, RunOutput) and on_output is not None:
                out, err = out + msg.stdout, err + msg.stderr
                on_output(msg.stdout, msg.stderr)
            elif isinstance(msg, RunResult):
                if not (msg.stdout.startswith(out) and msg.stderr.startswith(err)):
                    raise ClientError("protocol", "the job's result contradicts the output it streamed")
                if on_output is not None and (len(msg.stdout) > len(out) or len(msg.stderr) > len(err)):
                    on_output(msg.stdout[len(out):], msg.stderr[len(err):])
                return msg
            elif not isinstance(msg, RunOutput):
                raise ClientError("protocol", f"expected the job's output or result, got {msg.TAG}")

    def _overlay_client(self, timeout_s: float):
        if self._overlay is None:
            from permamesh.overlay.sender import OverlayClient, OverlayConfig

            relays = self.directory.relays() if self.directory is not None else []
            config = OverlayConfig(answer_timeout_s=max(timeout_s, 300.0))
            if len(relays) < config.n * config.hops:
                raise ClientError("no_relays", f"the overlay needs {config.n * config.hops} relays; "
                                               f"{len(relays)} are running in the committee's directory")
            self._overlay = OverlayClient(relays, self._workers(), config)
        return self._overlay

    def _generate_anonymously(self, prompt, messages, on_text, params) -> GenerateResult:
        from permamesh.overlay.errors import NotDelivered, OverlayError

        chat = tuple(m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"]) for m in messages)
        if "stop" in params:
            params["stop"] = tuple(params["stop"] or ())
        asked = bool(params.pop("logprobs", False))
        # every field travels in the request (penalties, top log-probs, a grammar); log-probs are
        # always asked of the worker, so this request looks like a committee challenge
        req = GenerateRequest(uuid.uuid4().hex, prompt=prompt, messages=chat, logprobs=asked,
                              **{k: v for k, v in params.items() if k != "model"})  # checked as asked
        req = dataclasses.replace(req, logprobs=True)
        for attempt in range(1 + OVERLAY_RESUBMITS):
            try:
                result = self._overlay_client(self.timeout_s).submit(req, None, on_text=on_text)
                if not asked:
                    result = dataclasses.replace(result, logprobs=(), tokens=(), top_logprobs=())
                break
            except NotDelivered as exc:  # never after text streamed: only before the job started
                if attempt == OVERLAY_RESUBMITS:
                    raise ClientError("not_delivered", str(exc)) from None
                log.warning("overlay: %s; sending it again over fresh paths", exc)
            except OverlayError as exc:
                raise ClientError("not_delivered", str(exc)) from None
        return result

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        if self._overlay is not None:
            self._overlay.close()
            self._overlay = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- internals
    def _socket(self, endpoint: str) -> DealerClient:
        if endpoint not in self._sockets:
            self._sockets[endpoint] = DealerClient(endpoint)
        return self._sockets[endpoint]

    def _run_on(self, endpoint: str, request: GenerateRequest) -> Iterator[Message]:
        self._socket(endpoint).send(encode(request, self.identity))
        first = self._next_message(endpoint, request.request_id, self.accept_timeout_s, "no_answer")
        if not isinstance(first, Accepted):
            raise ClientError("protocol", f"expected accepted, got {first.TAG}")
        yield first
        while True:
            msg = self._next_message(endpoint, request.request_id, self.timeout_s, "lost")
            yield msg
            if isinstance(msg, GenerateResult):
                return

    def _next_message(self, endpoint: str, request_id: str, timeout_s: float, timeout_code: str) -> Message:
        """The next message about ``request_id`` from ``endpoint``; ErrorReply becomes ClientError."""
        deadline = time.monotonic() + timeout_s
        sock = self._socket(endpoint)
        while True:
            frame = sock.recv(max(0.0, deadline - time.monotonic()))
            if frame is None:
                raise ClientError(timeout_code, f"no answer from {endpoint} within {timeout_s:g} s")
            try:
                received = decode(frame)
            except WireError as exc:
                log.warning("dropping bad frame from %s: %s", endpoint, exc)
                continue
            pin = self._pins.setdefault(endpoint, received.sender or b"")
            if received.sender != pin:
                log.warning("dropping frame from %s signed by an unexpected key", endpoint)
                continue
            msg = received.msg
            if getattr(msg, "request_id", None) not in (request_id, ""):
                continue  # a late answer to an earlier, abandoned job
            if isinstance(msg, ErrorReply):
                raise ClientError(msg.code, msg.message)
            if isinstance(msg, Progress):  # the job is alive: wait another full timeout
                deadline = time.monotonic() + timeout_s
                continue
            return msg
