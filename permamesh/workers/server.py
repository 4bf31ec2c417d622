"""The worker's network face: a ROUTER socket, a request queue, and one engine thread.

Threads and ownership:

- the event-loop thread owns the ROUTER socket (:class:`permamesh.transport.RouterServer`):
  it decodes every frame, answers status requests at once, queues generation jobs (replying
  :class:`Accepted` with the queue position) and sends whatever the engine produces;
- the engine thread owns the model: it takes jobs in arrival order, runs
  :meth:`Engine.generate`, and hands replies back to the loop with ``call_soon_threadsafe``.

A frame that does not decode (garbage, oversized, forged, unknown type) is answered with
``ErrorReply(code="bad_frame")`` and counted; the worker keeps serving. On shutdown, queued
and running requests are answered ``shutting_down`` so clients can resubmit elsewhere:
no request is left without an answer.

Who calls it: :mod:`permamesh.workers.process` (``permamesh worker``) and tests, through
:meth:`WorkerServer.serve` or :func:`start_in_thread`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

from permamesh.identity import NodeIdentity
from permamesh.transport import RouterServer
from permamesh.wire import (
    Accepted,
    ErrorReply,
    GenerateRequest,
    GenerateResult,
    Message,
    StatusReply,
    StatusRequest,
    TokenChunk,
    WireError,
    decode,
    encode,
)
from permamesh.workers.engine import Engine, SamplingParams, Step
from permamesh.workers.errors import WorkerError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    max_queue: int = 256  # requests waiting at most; more are refused with queue_full


@dataclasses.dataclass(frozen=True)
class _Job:
    peer: bytes
    request: GenerateRequest
    queued_at: float  # time.monotonic()


class _Cancelled(Exception):
    pass


class WorkerServer:
    def __init__(self, engine: Engine, identity: NodeIdentity, config: ServerConfig = ServerConfig()) -> None:
        self.engine = engine
        self.identity = identity
        self.config = config
        self.worker_id = identity.node_id
        self.endpoint: str | None = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._busy = False
        self._accepted = 0  # jobs queued since start (event-loop thread writes)
        self._finished = 0  # jobs the engine thread has finished with (engine thread writes)
        self._served = 0
        self._rejected = 0
        self._prefill_rate = 0.0  # tokens/s, moving average
        self._decode_rate = 0.0
        self._started = time.monotonic()
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ event-loop side
    async def serve(self, stop: asyncio.Event, on_ready: Callable[[str], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[tuple[bytes, Message]] = asyncio.Queue()
        router = RouterServer(self.config.host, self.config.port)
        self.endpoint = router.endpoint
        engine_thread = threading.Thread(
            target=self._engine_loop, args=(loop, outbox), name="engine", daemon=True
        )
        engine_thread.start()
        tasks = [asyncio.create_task(self._recv_loop(router, outbox)), asyncio.create_task(self._send_loop(router, outbox))]
        log.info("worker %s serving %s on %s", self.worker_id, self.engine.loaded.name, self.endpoint)
        try:
            if on_ready is not None:
                on_ready(self.endpoint)
            await stop.wait()
        finally:
            self._stopping.set()
            tasks[0].cancel()
            self._jobs.put(None)
            await asyncio.to_thread(engine_thread.join)
            while not self._jobs.empty():  # answer everything still queued
                job = self._jobs.get_nowait()
                if job is not None:
                    outbox.put_nowait((job.peer, ErrorReply(job.request.request_id, "shutting_down", "worker is stopping; resubmit")))
            await outbox.join()
            tasks[1].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            router.close()
            log.info("worker %s stopped after %d requests", self.worker_id, self._served)

    async def _recv_loop(self, router: RouterServer, outbox: asyncio.Queue) -> None:
        while True:
            peer, frame = await router.recv()
            reply = self._handle(peer, frame)
            if reply is not None:
                outbox.put_nowait((peer, reply))

    def _handle(self, peer: bytes, frame: bytes | None) -> Message | None:
        try:
            if frame is None:
                raise WireError("expected exactly one frame part")
            msg = decode(frame).msg
        except WireError as exc:
            self._rejected += 1
            log.warning("rejected frame from %s: %s", peer.hex()[:16], exc)
            return ErrorReply("", "bad_frame", str(exc))
        if isinstance(msg, StatusRequest):
            return self.status(msg.request_id)
        if not isinstance(msg, GenerateRequest):
            return ErrorReply(getattr(msg, "request_id", ""), "bad_request", f"a worker does not take {msg.TAG!r}")
        if msg.model and msg.model != self.engine.loaded.name:
            return ErrorReply(msg.request_id, "model_mismatch", f"this worker serves {self.engine.loaded.name!r}, not {msg.model!r}")
        if self._stopping.is_set():
            return ErrorReply(msg.request_id, "shutting_down", "worker is stopping; resubmit")
        waiting = self._jobs.qsize()
        if waiting >= self.config.max_queue:
            return ErrorReply(msg.request_id, "queue_full", f"{waiting} requests already queued; try another worker")
        position = self._accepted - self._finished  # jobs ahead of this one, running included
        self._accepted += 1
        self._jobs.put(_Job(peer, msg, time.monotonic()))
        return Accepted(msg.request_id, position, self.worker_id)

    async def _send_loop(self, router: RouterServer, outbox: asyncio.Queue) -> None:
        while True:
            peer, msg = await outbox.get()
            try:
                await router.send(peer, encode(msg, self.identity))
            except WireError as exc:  # e.g. an answer larger than the frame limit
                log.error("cannot encode reply %s: %s", msg.TAG, exc)
                await router.send(peer, encode(ErrorReply(getattr(msg, "request_id", ""), "internal", str(exc)), self.identity))
            finally:
                outbox.task_done()

    def status(self, request_id: str = "") -> StatusReply:
        return StatusReply(
            request_id=request_id,
            worker_id=self.worker_id,
            model=self.engine.loaded.name,
            device=self.engine.loaded.device,
            queue_length=self._jobs.qsize(),
            busy=self._busy,
            served=self._served,
            rejected_frames=self._rejected,
            prefill_tok_per_s=round(self._prefill_rate, 3),
            decode_tok_per_s=round(self._decode_rate, 3),
            uptime_s=round(time.monotonic() - self._started, 3),
        )

    # ------------------------------------------------------------------ engine side
    def _engine_loop(self, loop: asyncio.AbstractEventLoop, outbox: asyncio.Queue) -> None:
        def post(peer: bytes, msg: Message) -> None:
            loop.call_soon_threadsafe(outbox.put_nowait, (peer, msg))

        while True:
            job = self._jobs.get()
            if job is None or self._stopping.is_set():
                if job is not None:
                    post(job.peer, ErrorReply(job.request.request_id, "shutting_down", "worker is stopping; resubmit"))
                return
            self._busy = True
            try:
                post(job.peer, self._run(job, post))
            except _Cancelled:
                post(job.peer, ErrorReply(job.request.request_id, "shutting_down", "worker stopped mid-request; resubmit"))
            except WorkerError as exc:
                post(job.peer, ErrorReply(job.request.request_id, "bad_request", str(exc)))
            except Exception as exc:  # a bug or a torch failure must not kill the worker
                log.exception("request %s failed", job.request.request_id)
                post(job.peer, ErrorReply(job.request.request_id, "internal", f"{exc.__class__.__name__}: {exc}"))
            finally:
                self._busy = False
                self._finished += 1

    def _run(self, job: _Job, post: Callable[[bytes, Message], None]) -> GenerateResult:
        req = job.request
        started = time.monotonic()
        ids = self.engine.prompt_ids(req)

        def on_step(step: Step) -> None:
            if self._stopping.is_set():
                raise _Cancelled
            if req.stream and (step.text or step.token_id >= 0):
                token_ids = (step.token_id,) if step.token_id >= 0 else ()
                lps = (step.logprob,) if step.logprob is not None else ()
                post(job.peer, TokenChunk(req.request_id, step.index, step.text, token_ids, lps))

        done = self.engine.generate(ids, SamplingParams.of(req), on_step)
        self._served += 1
        self._observe(done.prompt_tokens, done.prefill_s, len(done.token_ids), done.total_s - done.prefill_s)
        return GenerateResult(
            request_id=req.request_id,
            text=done.text,
            finish_reason=done.finish_reason,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=len(done.token_ids),
            token_ids=done.token_ids,
            logprobs=done.logprobs,
            worker_id=self.worker_id,
            model=self.engine.loaded.name,
            queue_wait_s=round(started - job.queued_at, 6),
            ttft_s=round(done.ttft_s, 6),
            total_s=round(done.total_s, 6),
        )

    def _observe(self, prompt_tokens: int, prefill_s: float, new_tokens: int, decode_s: float) -> None:
        def ema(old: float, new: float) -> float:
            return new if old == 0.0 else 0.8 * old + 0.2 * new

        if prefill_s > 0:
            self._prefill_rate = ema(self._prefill_rate, prompt_tokens / prefill_s)
        if decode_s > 0 and new_tokens > 1:
            self._decode_rate = ema(self._decode_rate, (new_tokens - 1) / decode_s)


class ServerThread:
    """Run a :class:`WorkerServer` on its own event loop in a background thread (tests, embedding)."""

    def __init__(self, server: WorkerServer) -> None:
        self.server = server
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="worker-server", daemon=True)

    def start(self, timeout_s: float = 30.0) -> str:
        self._thread.start()
        if not self._ready.wait(timeout_s) or self.server.endpoint is None:
            raise WorkerError(f"worker server did not start: {self._error!r}")
        return self.server.endpoint

    def _main(self) -> None:
        async def run() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await self.server.serve(self._stop, on_ready=lambda _: self._ready.set())

        try:
            asyncio.run(run())
        except BaseException as exc:  # surfaced through start()
            self._error = exc
            self._ready.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise WorkerError("worker server did not stop in time")
