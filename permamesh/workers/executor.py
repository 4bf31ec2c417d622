"""The engine thread and the local job queue of one worker.

:class:`Executor` owns the engine. Requests are scheduled per step with continuous batching (as
in Orca, vLLM and llama.cpp's server): between two engine steps, waiting jobs are admitted while
fewer than ``max_active`` are active (the engine looks up their cached prefix), and each step is
one batched forward over every active job: the next token of each decoding job plus chunks of
the prompts still prefilling. Jobs leave as soon as their answer is done. So a request's time to
first token is its own (chunked) prefill, shared with the steps of the others, never another
request's whole answer; jobs beyond ``max_active`` wait in arrival order.

Everything it produces (token chunks, results, errors) leaves through ``post(peer, msg)``,
which the server makes thread-safe (it hops onto the event loop). It also keeps the figures
routing needs: how many jobs it holds, the seconds before a new job's prefill would start
(``backlog_s``: prefills queued ahead, one step, and the wait for a free slot when all are
taken), and measured rates: ``prefill_rate`` (uncached prompt tokens per second of the steps
that prefilled them) and ``decode_rate`` (answer tokens per second one job sees, at the batch
sizes it ran with: a job's decode time on this worker), plus ``throughput`` (tokens per
second of all jobs together, over the last steps).

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

from permamesh.wire import ErrorReply, GenerateRequest, GenerateResult, Message, TokenChunk, TopLogprobs
from permamesh.workers.decoding import Decoding
from permamesh.workers.engine import Completion, Engine, SamplingParams, Step, StepReport
from permamesh.workers.errors import ContextLengthError, WorkerError

log = logging.getLogger(__name__)

DEFAULT_PREFILL_TOK_PER_S = 300.0  # a priori rates until the first request is measured
DEFAULT_DECODE_TOK_PER_S = 20.0
MIN_RATE_SAMPLE_TOKENS = 32  # prefills shorter than this do not update the prefill rate
DEFAULT_MAX_ACTIVE = 8  # jobs in the batch at once (1 = first come, first served)

Post = Callable[[bytes, Message], None]


@dataclasses.dataclass(frozen=True)
class Job:
    peer: bytes  # who gets the answer (a client, or the entry worker that forwarded it)
    request: GenerateRequest
    prompt_ids: tuple[int, ...]
    queued_at: float  # time.monotonic()
    prefill_s: float  # estimated seconds of its (uncached) prefill


class _Cancelled(Exception):
    pass


class Executor:
    def __init__(self, engine: Engine, worker_id: str, max_active: int = DEFAULT_MAX_ACTIVE) -> None:
        if max_active < 1:
            raise ValueError("max_active must be >= 1")
        self.engine = engine
        self.worker_id = worker_id
        self.max_active = max_active
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._holding: dict[str, tuple[bytes, int]] = {}  # request_id -> (peer, order), queued or active
        self._active: set[str] = set()  # request ids admitted (prefilled or decoding)
        self._started_at: dict[str, float] = {}
        self._order = 0
        self._pending_prefill_s = 0.0  # estimated prefill seconds of jobs not yet admitted
        self.served = 0
        self.prefill_rate = 0.0  # tokens/s, moving average; 0 = not measured yet
        self.decode_rate = 0.0  # tokens/s one job sees while it decodes (at the batch sizes it ran with)
        self.throughput = 0.0  # tokens/s of every job together over recent steps (prefill and decode)
        self.steps = 0  # engine steps taken
        self._slot_wait_s = 0.0  # seconds until an active job is expected to end, when all slots are taken
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._post: Post = lambda peer, msg: None
        self.on_done: Callable[[Job, Completion], None] | None = None  # engine thread, after each job

    # ---------------------------------------------------------------- event-loop side
    def start(self, post: Post) -> None:
        self._post = post
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def estimate_prefill_s(self, prompt_tokens: int, cached_tokens: int) -> float:
        return max(0, prompt_tokens - cached_tokens) / (self.prefill_rate or DEFAULT_PREFILL_TOK_PER_S)

    def submit(self, job: Job) -> int:
        """Queue ``job``; return how many jobs are ahead of it (active ones included)."""
        with self._lock:
            position = len(self._holding)
            self._order += 1
            self._holding[job.request.request_id] = (job.peer, self._order)
            self._pending_prefill_s += job.prefill_s
        self._jobs.put(job)
        return position

    @property
    def queue_length(self) -> int:
        """Jobs waiting to be admitted."""
        with self._lock:
            return len(self._holding) - len(self._active)

    @property
    def active(self) -> int:
        """Jobs admitted: prefilling or decoding."""
        with self._lock:
            return len(self._active)

    @property
    def busy(self) -> bool:
        return self.active > 0

    @property
    def load(self) -> int:
        """Every job held: waiting plus active."""
        with self._lock:
            return len(self._holding)

    @property
    def backlog_s(self) -> float:
        """Seconds before a job submitted now would start its prefill: the prefills queued ahead
        of it, plus one step if something is running (admission waits for the step), plus the
        expected wait for a free slot when every slot is taken."""
        with self._lock:
            step = 1.0 / (self.decode_rate or DEFAULT_DECODE_TOK_PER_S) if self._active else 0.0
            full = len(self._active) >= self.max_active
            return max(0.0, self._pending_prefill_s) + step + (self._slot_wait_s if full else 0.0)

    def holding(self) -> list[tuple[str, bytes, int]]:
        """(request_id, peer, position) of every job queued or active, in order."""
        with self._lock:
            ordered = sorted(self._holding.items(), key=lambda kv: kv[1][1])
        return [(rid, peer, pos) for pos, (rid, (peer, _)) in enumerate(ordered)]

    def stop(self, timeout_s: float = 30.0) -> list[Job]:
        """Stop after the active jobs are cancelled; return the jobs never started."""
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
        """Admit waiting jobs while there is room, then one batched step over the active ones."""
        active: list[tuple[Job, Decoding]] = []
        while True:
            while len(active) < self.max_active:
                try:
                    job = self._jobs.get(block=not active)
                except queue.Empty:
                    break
                if job is None or self._stopping.is_set():
                    self._shut(job, active)
                    return
                self._admit(job, active)
            if not active:
                continue
            if self._stopping.is_set():
                self._shut(None, active)
                return
            self._step(active)

    def _admit(self, job: Job, active: list[tuple[Job, Decoding]]) -> None:
        rid = job.request.request_id
        with self._lock:
            self._active.add(rid)
            self._pending_prefill_s -= job.prefill_s
            self._started_at[rid] = time.monotonic()
        try:
            run = self.engine.start(job.prompt_ids, SamplingParams.of(job.request), self._streamer(job))
        except Exception as exc:  # noqa: BLE001 - reported to the client by _fail
            self._fail(job, None, exc)
            return
        active.append((job, run))

    def _step(self, active: list[tuple[Job, Decoding]]) -> None:
        """One engine step over ``active``; answer the jobs it ended, keep the rest."""
        try:
            report = self.engine.step([run for _, run in active])
        except Exception as exc:  # noqa: BLE001 - a failed forward ends every job it carried
            for job, run in active:
                self._fail(job, run, exc)
            active.clear()
            return
        self._observe_step(report)
        failed = {id(run): exc for run, exc in report.failed}
        still = []
        for job, run in active:
            if id(run) in failed:
                self._fail(job, run, failed[id(run)])
            elif run.done:
                try:
                    reply: Message = self._result(job, self.engine.finish(run))
                except Exception as exc:  # noqa: BLE001 - e.g. cancelled while its tail streamed
                    self._fail(job, run, exc)
                    continue
                self._finish(job, reply)
            else:
                still.append((job, run))
        active[:] = still
        self._note_slots(still)

    def _fail(self, job: Job, run: Decoding | None, exc: Exception) -> None:
        if run is not None:
            self.engine.abandon(run)
        rid = job.request.request_id
        if isinstance(exc, _Cancelled):
            reply: Message = ErrorReply(rid, "shutting_down", "worker stopped mid-request; resubmit")
        elif isinstance(exc, ContextLengthError):
            reply = ErrorReply(rid, "context_length_exceeded", str(exc))
        elif isinstance(exc, WorkerError):
            reply = ErrorReply(rid, "bad_request", str(exc))
        else:  # a bug or a torch failure must not kill the worker
            log.error("request %s failed", rid, exc_info=exc)
            reply = ErrorReply(rid, "internal", f"{exc.__class__.__name__}: {exc}")
        self._finish(job, reply)

    def _shut(self, job: Job | None, active: list[tuple[Job, Decoding]]) -> None:
        """Stopping: the active jobs and ``job`` get shutting_down; queued ones stay for stop()."""
        for running, run in active:
            self._fail(running, run, _Cancelled())
        active.clear()
        if job is not None:
            self._finish(job, ErrorReply(job.request.request_id, "shutting_down", "worker is stopping; resubmit"))

    def _finish(self, job: Job, reply: Message) -> None:
        rid = job.request.request_id
        with self._lock:
            if rid not in self._active:  # never admitted: its prefill was still pending
                self._pending_prefill_s -= job.prefill_s
            self._holding.pop(rid, None)
            self._active.discard(rid)
            self._started_at.pop(rid, None)
        self._post(job.peer, reply)

    def _streamer(self, job: Job) -> Callable[[Step], None]:
        req = job.request

        def on_step(step: Step) -> None:
            if self._stopping.is_set():
                raise _Cancelled
            if req.stream and (step.text or step.token_id >= 0):
                token_ids = (step.token_id,) if step.token_id >= 0 else ()
                lps = (step.logprob,) if step.logprob is not None and token_ids else ()
                tops = (TopLogprobs(tuple(t for t, _ in step.top), tuple(lp for _, lp in step.top)),) if step.top else ()
                self._post(job.peer, TokenChunk(req.request_id, step.index, step.text, token_ids, lps,
                                                (step.token,) if lps else (), tops))

        return on_step

    def _result(self, job: Job, done: Completion) -> GenerateResult:
        req = job.request
        started = self._started_at.get(req.request_id, job.queued_at)
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
            cached_tokens=done.cached_tokens,
            tokens=done.tokens,
            top_logprobs=tuple(TopLogprobs(tuple(t for t, _ in top), tuple(lp for _, lp in top))
                               for top in done.top_logprobs),
        )

    def _observe_step(self, report: StepReport) -> None:
        self.steps += 1
        if report.seconds > 0:
            rate = (report.prefill_tokens + report.decode_tokens) / report.seconds
            self.throughput = rate if self.throughput == 0.0 else 0.9 * self.throughput + 0.1 * rate

    def _note_slots(self, active: list[tuple[Job, Decoding]]) -> None:
        """Expected seconds until the first active job ends (its tokens left at the decode rate)."""
        left = min((run.params.max_tokens - len(run.ids) for _, run in active), default=0)
        with self._lock:
            self._slot_wait_s = max(left, 0) / (self.decode_rate or DEFAULT_DECODE_TOK_PER_S)

    def _observe(self, done: Completion) -> None:
        def ema(old: float, new: float) -> float:
            return new if old == 0.0 else 0.8 * old + 0.2 * new

        uncached = done.prompt_tokens - done.cached_tokens
        if done.prefill_s > 0 and uncached >= MIN_RATE_SAMPLE_TOKENS:  # short ones measure overhead
            self.prefill_rate = ema(self.prefill_rate, uncached / done.prefill_s)
        if done.decode_s > 0 and len(done.token_ids) > 1:
            self.decode_rate = ema(self.decode_rate, (len(done.token_ids) - 1) / done.decode_s)
