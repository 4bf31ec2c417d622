"""The engine thread and the local job queue of one worker.

:class:`Executor` owns the model: jobs run one at a time in arrival order on its thread.
Everything it produces (token chunks, results, errors) leaves through ``post(peer, msg)``,
which the server makes thread-safe (it hops onto the event loop). It also keeps the figures
routing needs: queue length, the estimated seconds of queued work (``backlog_s``) and
measured prefill/decode rates.

Who calls it: :class:`permamesh.workers.server.WorkerServer` (``submit`` from the event-loop
thread; ``start``/``stop`` around serving).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

from permamesh.wire import ErrorReply, GenerateRequest, GenerateResult, Message, TokenChunk
from permamesh.workers.engine import Completion, Engine, SamplingParams, Step
from permamesh.workers.errors import WorkerError

log = logging.getLogger(__name__)

DEFAULT_PREFILL_TOK_PER_S = 300.0  # a priori rates until the first request is measured
DEFAULT_DECODE_TOK_PER_S = 20.0

Post = Callable[[bytes, Message], None]


@dataclasses.dataclass(frozen=True)
class Job:
    peer: bytes  # who gets the answer (a client, or the entry worker that forwarded it)
    request: GenerateRequest
    prompt_ids: tuple[int, ...]
    queued_at: float  # time.monotonic()
    work_s: float  # estimated seconds this job adds to the backlog


class _Cancelled(Exception):
    pass


class Executor:
    def __init__(self, engine: Engine, worker_id: str) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._holding: dict[str, tuple[bytes, int]] = {}  # request_id -> (peer, order), queued or running
        self._order = 0
        self._running: str | None = None
        self._backlog_s = 0.0
        self.served = 0
        self.prefill_rate = 0.0  # tokens/s, moving average; 0 = not measured yet
        self.decode_rate = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._post: Post = lambda peer, msg: None
        self.on_done: Callable[[Job, Completion], None] | None = None  # engine thread, after each job

    # ---------------------------------------------------------------- event-loop side
    def start(self, post: Post) -> None:
        self._post = post
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def estimate_work_s(self, prompt_tokens: int, cached_tokens: int, max_tokens: int) -> float:
        prefill = self.prefill_rate or DEFAULT_PREFILL_TOK_PER_S
        decode = self.decode_rate or DEFAULT_DECODE_TOK_PER_S
        return max(0, prompt_tokens - cached_tokens) / prefill + max_tokens / decode

    def submit(self, job: Job) -> int:
        """Queue ``job``; return how many jobs are ahead of it (running one included)."""
        with self._lock:
            position = len(self._holding)
            self._order += 1
            self._holding[job.request.request_id] = (job.peer, self._order)
            self._backlog_s += job.work_s
        self._jobs.put(job)
        return position

    @property
    def queue_length(self) -> int:
        """Jobs waiting, not counting the running one."""
        with self._lock:
            return len(self._holding) - (self._running is not None)

    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def backlog_s(self) -> float:
        with self._lock:
            return max(0.0, self._backlog_s)

    def holding(self) -> list[tuple[str, bytes, int]]:
        """(request_id, peer, position) of every job queued or running, in order."""
        with self._lock:
            ordered = sorted(self._holding.items(), key=lambda kv: kv[1][1])
        return [(rid, peer, pos) for pos, (rid, (peer, _)) in enumerate(ordered)]

    def stop(self, timeout_s: float = 30.0) -> list[Job]:
        """Stop after the running job is cancelled; return the jobs never started."""
        self._stopping.set()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
        left = []
        while not self._jobs.empty():
            job = self._jobs.get_nowait()
            if job is not None:
                left.append(job)
        return left

    # ---------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stopping.is_set():
                if job is not None:
                    self._finish(job, ErrorReply(job.request.request_id, "shutting_down", "worker is stopping; resubmit"))
                return
            self._running = job.request.request_id
            try:
                reply: Message = self._run(job)
            except _Cancelled:
                reply = ErrorReply(job.request.request_id, "shutting_down", "worker stopped mid-request; resubmit")
            except WorkerError as exc:
                reply = ErrorReply(job.request.request_id, "bad_request", str(exc))
            except Exception as exc:  # a bug or a torch failure must not kill the worker
                log.exception("request %s failed", job.request.request_id)
                reply = ErrorReply(job.request.request_id, "internal", f"{exc.__class__.__name__}: {exc}")
            self._finish(job, reply)

    def _finish(self, job: Job, reply: Message) -> None:
        with self._lock:
            self._holding.pop(job.request.request_id, None)
            self._backlog_s -= job.work_s
            self._running = None
        self._post(job.peer, reply)

    def _run(self, job: Job) -> GenerateResult:
        req = job.request
        started = time.monotonic()

        def on_step(step: Step) -> None:
            if self._stopping.is_set():
                raise _Cancelled
            if req.stream and (step.text or step.token_id >= 0):
                token_ids = (step.token_id,) if step.token_id >= 0 else ()
                lps = (step.logprob,) if step.logprob is not None else ()
                self._post(job.peer, TokenChunk(req.request_id, step.index, step.text, token_ids, lps))

        done = self.engine.generate(job.prompt_ids, SamplingParams.of(req), on_step)
        self.served += 1
        self._observe(done)
        if self.on_done is not None:
            self.on_done(job, done)
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
            cached_tokens=getattr(done, "cached_tokens", 0),
        )

    def _observe(self, done: Completion) -> None:
        def ema(old: float, new: float) -> float:
            return new if old == 0.0 else 0.8 * old + 0.2 * new

        uncached = done.prompt_tokens - getattr(done, "cached_tokens", 0)
        if done.prefill_s > 0 and uncached > 0:
            self.prefill_rate = ema(self.prefill_rate, uncached / done.prefill_s)
        decode_s = done.total_s - done.prefill_s
        if decode_s > 0 and len(done.token_ids) > 1:
            self.decode_rate = ema(self.decode_rate, (len(done.token_ids) - 1) / decode_s)
