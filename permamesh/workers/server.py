"""The worker's network face: a ROUTER socket in front of an :class:`Executor`.

Threads and ownership:

- the event-loop thread owns the ROUTER socket (:class:`permamesh.transport.RouterServer`):
  it decodes every frame, answers status requests at once, queues generation jobs (replying
  :class:`Accepted` with the queue position), sends a :class:`Progress` keep-alive for every
  held job once per ``progress_interval_s``, and sends whatever the engine produces;
- the engine thread (:class:`~permamesh.workers.executor.Executor`) owns the model and hands
  replies back to the loop with ``call_soon_threadsafe``.

Container jobs: a :class:`RunRequest` (or a :class:`ForwardedRun` from another worker's router)
goes to the :class:`~permamesh.containers.service.ContainerService` when the worker runs
containers (``--containers``); otherwise it is refused ``bad_request``.

Overlay traffic: a :class:`CloveDrop` from a proxy goes to the :class:`~permamesh.workers.inbox.Inbox`
(when the worker has one), which rebuilds requests from cloves and runs them under local
peer ids (:meth:`WorkerServer.add_sink`): their messages go to the inbox, not to a socket.

A frame that does not decode (garbage, oversized, forged, unknown type) is answered with
``ErrorReply(code="bad_frame")`` and counted; the worker keeps serving. The send loop outlives
any one message it cannot encode or send: it answers ``internal`` instead where it can, logs
and counts the rest (``dropped_replies``), and goes on. On shutdown, queued
and running requests are answered ``shutting_down`` so clients can resubmit elsewhere:
no request is left without an answer.

Who calls it: :mod:`permamesh.workers.process` (``permamesh worker``) and tests, through
:meth:`WorkerServer.serve` or :func:`start_in_thread`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from typing import Callable, Sequence

from permamesh.containers.messages import ForwardedRun, RunRequest
from permamesh.identity import NodeIdentity
from permamesh.overlay.messages import CloveDrop
from permamesh.transport import RouterServer, ServingThread
from permamesh.wire import (
    Accepted,
    ErrorReply,
    GenerateRequest,
    Message,
    Progress,
    StatusReply,
    StatusRequest,
    WireError,
    decode,
    encode,
)
from permamesh.wire.codec import MAX_REQUEST_ID_CHARS
from permamesh.workers.engine import Engine
from permamesh.workers.errors import WorkerError
from permamesh.workers.executor import DEFAULT_MAX_ACTIVE, Executor, Job
from permamesh.workers.group import GROUP_MESSAGES, GroupLink
from permamesh.workers.inbox import Inbox

log = logging.getLogger(__name__)

REJECT_LOG_S = 10.0  # seconds between log lines about rejected frames

REPLAY_WINDOW = 65_536  # recent (signer, request id) pairs remembered: a replayed request is refused


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    max_queue: int = 256  # requests waiting at most; more are refused with queue_full
    progress_interval_s: float = 1.0  # keep-alive period for held jobs
    max_active: int = DEFAULT_MAX_ACTIVE  # jobs decoding at once (steps interleaved); 1 = one at a time


class WorkerServer:
    def __init__(self, engine: Engine, identity: NodeIdentity, config: ServerConfig = ServerConfig()) -> None:
        self.engine = engine
        self.identity = identity
        self.config = config
        self.worker_id = identity.node_id
        self.endpoint: str | None = None
        self.executor = Executor(engine, self.worker_id, config.max_active)
        self.group: GroupLink | None = None  # set by the worker process when it joins a group
        self.inbox: Inbox | None = None  # set when the worker takes requests from the overlay
        self.containers = None  # a ContainerService when the worker runs containers
        self.telemetry = None  # a WorkerTelemetry when the process exports metrics
        self._sinks: dict[bytes, Callable[[Message], None]] = {}  # local peers (overlay jobs)
        self._seen_requests: OrderedDict[tuple[bytes | None, str], None] = OrderedDict()  # replay window
        self._rejected = 0
        self._reject_logged_at, self._reject_unlogged = float("-inf"), 0
        self.dropped_replies = 0  # messages the send loop could not encode or send
        self._started = time.monotonic()
        self._stopping = False
        self._prompt_tokens = 0
        self._cached_tokens = 0

    # ------------------------------------------------------------------ lifecycle
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the serving loop (from any thread, once :meth:`serve` started)."""
        self._loop.call_soon_threadsafe(fn)

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[str], None] | None = None) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._outbox: asyncio.Queue[tuple[bytes, Message]] = asyncio.Queue()
        router = RouterServer(self.config.host, self.config.port, self.identity.transport.private_bytes())
        self.endpoint = router.endpoint
        self.executor.start(lambda peer, msg: loop.call_soon_threadsafe(self._outbox.put_nowait, (peer, msg)))
        self.executor.on_done = lambda job, done: loop.call_soon_threadsafe(self._after_job, done)
        if self.group is not None:
            self.group.start()
        tasks = [
            asyncio.create_task(self._recv_loop(router)),
            asyncio.create_task(self._progress_loop()),
            asyncio.create_task(self._send_loop(router)),
        ]
        log.info("worker %s serving %s on %s", self.worker_id, self.engine.loaded.name, self.endpoint)
        try:
            if on_ready is not None:
                on_ready(self.endpoint)
            await stop.wait()
        finally:
            self._stopping = True
            for task in tasks[:2]:
                task.cancel()
            if self.group is not None:
                await self.group.close()
            if self.inbox is not None:
                self.inbox.close()
            if self.containers is not None:
                self.containers.close()
            for job in await asyncio.to_thread(self.executor.stop):  # answer everything still queued
                self.send(job.peer, ErrorReply(job.request.request_id, "shutting_down", "worker is stopping; resubmit"))
            await self._outbox.join()
            tasks[2].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            router.close()
            log.info("worker %s stopped after %d requests", self.worker_id, self.executor.served)

    def send(self, peer: bytes, msg: Message) -> None:
        """Queue ``msg`` for ``peer`` (event-loop thread only)."""
        self._outbox.put_nowait((peer, msg))

    # ------------------------------------------------------------------ receiving
    async def _recv_loop(self, router: RouterServer) -> None:
        while True:
            peer, frame = await router.recv()
            try:
                reply = self._handle(peer, frame)
            except Exception as exc:  # a bug handling one frame must not stop the receive loop
                log.exception("failed to handle a frame from %s", peer.hex()[:16])
                reply = ErrorReply("", "internal", f"{exc.__class__.__name__}: {exc}")
            if reply is not None:
                self.send(peer, reply)

    def _log_rejected(self, peer: bytes, exc: Exception) -> None:
        """At most one log line per REJECT_LOG_S for rejected frames (a peer sending junk must
        not grow the log without bound); the count is in the status and the metrics."""
        now = time.monotonic()
        if now - self._reject_logged_at < REJECT_LOG_S:
            self._reject_unlogged += 1
            return
        more = f" ({self._reject_unlogged} more rejected since the last line)" if self._reject_unlogged else ""
        log.warning("rejected frame from %s: %s%s", peer.hex()[:16], exc, more)
        self._reject_logged_at, self._reject_unlogged = now, 0

    def _handle(self, peer: bytes, frame: bytes | None) -> Message | None:
        try:
            if frame is None:
                raise WireError("expected exactly one frame part")
            received = decode(frame)
        except WireError as exc:
            self._rejected += 1
            self._log_rejected(peer, exc)
            return ErrorReply("", "bad_frame", str(exc))
        msg = received.msg
        if isinstance(msg, StatusRequest):
            return self.status(msg.request_id)
        if isinstance(msg, (GenerateRequest, RunRequest)):
            if not self._first_time(received.sender, msg.request_id):
                return ErrorReply(msg.request_id, "duplicate", "this request was already received; a replay does not run")
            return self.dispatch(peer, msg)
        if isinstance(msg, ForwardedRun):
            if self.containers is None or self._stopping:
                return ErrorReply(msg.request.request_id, "shutting_down" if self._stopping else "bad_request",
                                  "this worker runs no containers" if not self._stopping else "worker is stopping")
            return self.containers.on_forwarded(peer, msg)
        if isinstance(msg, CloveDrop):
            if self.inbox is None:
                return ErrorReply("", "bad_request", "this worker takes no overlay traffic")
            self.inbox.on_clove(msg.envelope)
            return None
        if isinstance(msg, GROUP_MESSAGES):
            if self.group is None:
                return ErrorReply(_echo_id(msg), "bad_request", "this worker is in no group")
            return self.group.on_peer_message(peer, received)
        return ErrorReply(_echo_id(msg), "bad_request", f"a worker does not take {msg.TAG!r}")

    def _first_time(self, sender: bytes | None, request_id: str) -> bool:
        """Whether this (signer, request id) is new; a bounded window of the last
        ``REPLAY_WINDOW`` requests (clients give every attempt a fresh id, so only a replay of
        the same signed frame repeats one)."""
        key = (sender, request_id)
        if key in self._seen_requests:
            return False
        self._seen_requests[key] = None
        if len(self._seen_requests) > REPLAY_WINDOW:
            self._seen_requests.popitem(last=False)
        return True

    def dispatch(self, peer: bytes, req: GenerateRequest | RunRequest) -> Message | None:
        """A job for ``peer``: route it inside the group (a container job: among container
        workers), or run it here."""
        if isinstance(req, RunRequest):
            if self._stopping:
                return ErrorReply(req.request_id, "shutting_down", "worker is stopping; resubmit")
            if self.containers is None:
                return ErrorReply(req.request_id, "bad_request", "this worker runs no containers")
            return self.containers.dispatch(peer, req)
        if self.group is not None and not self._stopping:
            return self.group.route(peer, req)
        return self.accept(peer, req)

    def add_sink(self, peer: bytes, sink: Callable[[Message], None]) -> None:
        """Messages for ``peer`` go to ``sink`` (event-loop thread) instead of a socket."""
        self._sinks[peer] = sink

    def remove_sink(self, peer: bytes) -> None:
        self._sinks.pop(peer, None)

    def accept(self, peer: bytes, req: GenerateRequest, prompt_ids: Sequence[int] | None = None,
               cached_tokens: int = 0) -> Message:
        """Run ``req`` here: check it, queue it, answer Accepted (or why not)."""
        if req.model and req.model != self.engine.loaded.name:
            return ErrorReply(req.request_id, "model_mismatch", f"this worker serves {self.engine.loaded.name!r}, not {req.model!r}")
        if self._stopping:
            return ErrorReply(req.request_id, "shutting_down", "worker is stopping; resubmit")
        waiting = self.executor.queue_length
        if waiting >= self.config.max_queue:
            return ErrorReply(req.request_id, "queue_full", f"{waiting} requests already queued; try another worker")
        ids = tuple(prompt_ids) if prompt_ids is not None else tuple(self.engine.prompt_ids(req))
        prefill_s = self.executor.estimate_prefill_s(len(ids), cached_tokens)
        position = self.executor.submit(Job(peer, req, ids, time.monotonic(), prefill_s))
        return Accepted(req.request_id, position, self.worker_id)

    # ------------------------------------------------------------------ sending
    async def _send_loop(self, router: RouterServer) -> None:
        """Deliver the outbox in order. Nothing one message does may end this loop: everything
        the worker says (answers, keep-alives, shutdown notices) goes through it."""
        while True:
            peer, msg = await self._outbox.get()
            try:
                await self._deliver(router, peer, msg)
            except Exception:  # noqa: BLE001 - a bug with one message must not silence the worker
                self.dropped_replies += 1
                log.exception("dropped a %s reply to %s", msg.TAG, peer.hex()[:16])
            finally:
                self._outbox.task_done()

    async def _deliver(self, router: RouterServer, peer: bytes, msg: Message) -> None:
        sink = self._sinks.get(peer)
        if sink is not None:
            sink(msg)
            return
        try:
            frame = encode(msg, self.identity)
        except WireError as exc:  # e.g. an answer larger than the frame limit
            log.error("cannot encode reply %s: %s", msg.TAG, exc)
            self.dropped_replies += 1
            frame = encode(ErrorReply(_echo_id(msg), "internal", f"cannot encode the {msg.TAG} reply: {exc}"),
                           self.identity)
        await router.send(peer, frame)

    async def _progress_loop(self) -> None:
        """Tell every submitter whose job we hold that it is alive, once per interval."""
        while True:
            await asyncio.sleep(self.config.progress_interval_s)
            for request_id, peer, position in self.executor.holding():
                self.send(peer, Progress(request_id, position, self.worker_id))

    def _after_job(self, done) -> None:
        """Event-loop side of a finished job: count tokens, publish cache changes to the group."""
        self._prompt_tokens += done.prompt_tokens
        self._cached_tokens += getattr(done, "cached_tokens", 0)
        if self.telemetry is not None:
            self.telemetry.observe_generate(done.total_s, done.ttft_s)
        cache = getattr(self.engine, "prefix_cache", None)
        if cache is not None:
            inserted, evicted = cache.drain_events()
            if self.group is not None:
                self.group.on_cache_events(inserted, evicted)

    def status(self, request_id: str = "") -> StatusReply:
        ex = self.executor
        group = self.group
        stats = group.publisher.stats if group is not None else None
        return StatusReply(
            request_id=request_id,
            worker_id=self.worker_id,
            model=self.engine.loaded.name,
            device=self.engine.loaded.device,
            queue_length=ex.queue_length,
            busy=ex.busy,
            served=ex.served,
            rejected_frames=self._rejected,
            prefill_tok_per_s=round(ex.prefill_rate, 3),
            decode_tok_per_s=round(ex.decode_rate, 3),
            uptime_s=round(time.monotonic() - self._started, 3),
            group=group.config.name if group is not None else "",
            members=len(group.links) if group is not None else 0,
            forwarded=group.forwarded if group is not None else 0,
            sync_delta_bytes=stats.delta_bytes if stats else 0,
            sync_full_tree_bytes=stats.full_tree_bytes if stats else 0,
            sync_snapshot_bytes=stats.snapshot_bytes if stats else 0,
            prompt_tokens_total=self._prompt_tokens,
            cached_tokens_total=self._cached_tokens,
            dropped_replies=self.dropped_replies,
        )


def _echo_id(msg: Message) -> str:
    """The request id to echo back in a reply about ``msg``; "" when it has none fit to send."""
    rid = getattr(msg, "request_id", "")
    if not isinstance(rid, str) or len(rid) > MAX_REQUEST_ID_CHARS:
        return ""
    return rid


class ServerThread(ServingThread):
    """Run a :class:`WorkerServer` on its own event loop in a background thread (tests, embedding)."""

    error, what = WorkerError, "worker server"

    def __init__(self, server: WorkerServer) -> None:
        super().__init__(server, name="worker-server")
