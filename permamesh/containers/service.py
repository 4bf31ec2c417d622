"""The container side of a worker process: jobs from the network, routed by layers, run isolated.

A worker started with ``--containers`` gets a :class:`ContainerService`: its own layer store
and rootfs cache (:class:`~permamesh.containers.host.ContainerWorker`), a layer server on a
second socket (peers fetch blobs and ask holdings there), and a small pool of threads that
fetch, unpack and run jobs, so the event loop and the model's engine thread never wait on a
container.

A :class:`RunRequest` reaching this worker (from a client directly, or rebuilt by the
:class:`~permamesh.workers.inbox.Inbox` from overlay cloves) is routed like a prompt:

1. the image is parsed from the manifest and config the request carries (digest computed,
   config checked; a bad image is refused at once with the reason);
2. every container peer (from ``peers()``: the local registry's records that name a layer
   server) is asked how many leading layers of the image it holds and how many jobs it has;
   the answers fill a :class:`~permamesh.containers.placement.LayerRouter` tree, which picks
   the worker that starts soonest (missing bytes against load), with a why;
3. this worker runs it, or hands it on as a :class:`ForwardedRun` and relays the answer; a
   peer that refuses or does not answer in time is not waited on: the job runs here.

Missing layers come from peers holding them, else from the request's ``sources``; each copy
is verified against its digest as it is written. The :class:`RunResult` (exit code, output
capped at :data:`MAX_OUTPUT_BYTES` per stream, whether it timed out, where the layers came
from) goes back to the peer that asked, which is the inbox for overlay jobs: the answer
returns as cloves over reply blocks, like a model's. A request with ``stream`` set gets its
output first, as :class:`RunOutput` pieces while the job runs
(:class:`~permamesh.containers.output.OutputPump`); a forwarded job's pieces come back to the
entry worker, which passes them on (at most the output cap's worth, from the worker it chose).

Who calls it: :class:`~permamesh.workers.server.WorkerServer` calls :meth:`dispatch` and
:meth:`on_forwarded` on its event loop and :meth:`close` when it stops;
:mod:`permamesh.workers.process` builds it and calls :meth:`start`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from permamesh.containers.errors import ContainerError
from permamesh.containers.host import ContainerWorker, RemotePeer
from permamesh.containers.images import Image, parse_image
from permamesh.containers.limits import Limits
from permamesh.containers.messages import MAX_OUTPUT_BYTES, ForwardedRun, RunOutput, RunRequest, RunResult
from permamesh.containers.output import OutputPump
from permamesh.containers.placement import Candidate, Choice, LayerRouter
from permamesh.containers.transfer import LayerServer, LayerServerThread, ask_holdings
from permamesh.transport import AsyncDealer
from permamesh.wire import Accepted, ErrorReply, Message, WireError, decode, encode

if TYPE_CHECKING:
    from permamesh.workers.server import WorkerServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContainerPeer:
    node_id: str
    endpoint: str  # the peer's worker socket (jobs are forwarded there)
    layers: str  # its layer server (blobs and holdings)
    sign_key: bytes  # pinned: its answers must be signed with this key


@dataclass(frozen=True)
class ServiceConfig:
    root: Path  # layer store and rootfs cache of this worker
    budget_mb: int = 2048  # layer store byte budget (LRU beyond it)
    max_jobs: int = 2  # containers running at once
    max_queue: int = 32  # jobs held at most (running or waiting); more are refused queue_full
    max_rootfs: int = 16  # unpacked root filesystems kept
    runtime: str = "auto"  # auto, runc or bwrap
    uid: int = 0  # user the job runs as inside its container
    job_s: float = 1.0  # a running job's expected duration, for the router's load term
    holdings_timeout_s: float = 0.5  # a peer that does not say what it holds within this is skipped
    prepare_allowance_s: float = 120.0  # beyond the job's own timeout, for fetching and unpacking


class ContainerService:
    def __init__(self, server: WorkerServer, config: ServiceConfig,
                 peers: Callable[[], Sequence[ContainerPeer]] = lambda: ()) -> None:
        self.server, self.config, self.peers = server, config, peers
        self.name = server.worker_id
        self.worker = ContainerWorker(self.name, config.root, config.budget_mb * 2**20, config.max_rootfs)
        self.pool = concurrent.futures.ThreadPoolExecutor(config.max_jobs, thread_name_prefix="container")
        self.jobs = 0  # held here: queued or running (read by the layer server's thread)
        self.ran = self.forwarded = self.failed = 0
        self._layers: LayerServerThread | None = None
        self._dealers: dict[str, tuple[AsyncDealer, asyncio.Task]] = {}
        self._waiting: dict[str, asyncio.Future] = {}  # forwarded request id -> its answer
        self._relaying: dict[str, list] = {}  # forwarded request id -> [its peer, output bytes passed on]
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        """Start the layer server; returns its endpoint (for the registry record)."""
        server = LayerServer(self.worker.store, self.server.identity, self.server.config.host, lambda: self.jobs)
        self._layers = LayerServerThread(server, name="layer-server")
        self.worker.endpoint = self._layers.start()
        return self.worker.endpoint

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for dealer, task in self._dealers.values():
            task.cancel()
            dealer.close()
        self._dealers.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._layers is not None:
            self._layers.stop()
            self._layers = None

    # ------------------------------------------------------------------ jobs in
    def dispatch(self, peer: bytes, req: RunRequest) -> Message:
        """A job for ``peer`` entering here: route it among container workers (event loop)."""
        image = self._image(req)
        if isinstance(image, ErrorReply):
            return image
        if self.jobs >= self.config.max_queue:
            return ErrorReply(req.request_id, "queue_full", f"{self.jobs} container jobs already held; try another worker")
        self._spawn(peer, req.request_id, self._route(peer, req, image))
        return Accepted(req.request_id, self.jobs, self.name)

    def on_forwarded(self, peer: bytes, fwd: ForwardedRun) -> Message | None:
        """A job another worker's router sent here: run it, never forward again."""
        image = self._image(fwd.request)
        if isinstance(image, ErrorReply):
            return image
        if self.jobs >= self.config.max_queue:
            return ErrorReply(fwd.request.request_id, "queue_full", "container queue full")
        self._spawn(peer, fwd.request.request_id, self._run_here(peer, fwd.request, image, fwd.why))
        return None

    def _image(self, req: RunRequest) -> Image | ErrorReply:
        try:
            return parse_image(req.manifest, req.config)
        except ContainerError as exc:
            return ErrorReply(req.request_id, "bad_request", f"bad image: {exc}")

    def _spawn(self, peer: bytes, request_id: str, coro) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every job gets an answer
                log.exception("container job %s failed inside the worker", request_id[:8])
                self.server.send(peer, ErrorReply(request_id, "internal", f"{type(exc).__name__}: {exc}"[:2000]))

        task = asyncio.ensure_future(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ routing
    async def _route(self, peer: bytes, req: RunRequest, image: Image) -> None:
        peers = {p.node_id: p for p in self.peers() if p.node_id != self.name}
        choice, holders = await asyncio.to_thread(self._choose, image, list(peers.values()))
        log.info("container job %s -> %s: %s", req.request_id[:8], choice.worker, choice.why)
        target = peers.get(choice.worker)
        if target is not None:
            answer = await self._forward(peer, target, req, choice)
            if answer is not None:
                self.forwarded += 1
                self.server.send(peer, answer)
                return
        await self._run_here(peer, req, image, choice.why if target is None else
                             f"{choice.worker} did not take it; ran at the entry worker", holders, peers)

    def _ask(self, image: Image, endpoints: list[str]) -> list:
        """Each layer server's holdings of ``image`` (None for a silent or lying one), asked
        concurrently (worker thread)."""
        digests = [d.digest for d in image.layers]
        timeout = self.config.holdings_timeout_s
        with concurrent.futures.ThreadPoolExecutor(max(1, min(8, len(endpoints)))) as ask:
            return list(ask.map(lambda e: ask_holdings(e, digests, timeout), endpoints))

    def _choose(self, image: Image, peers: list[ContainerPeer]) -> tuple[Choice, dict[str, int]]:
        """Ask every peer what it holds, fill a tree, pick (worker thread)."""
        replies = self._ask(image, [p.layers for p in peers])
        router = LayerRouter(self.config.job_s)
        candidates = [Candidate(self.name, self.jobs)]
        holders = {}
        router.holds(self.name, image, self.worker.held_prefix(image), 1.0)
        for p, reply in zip(peers, replies):
            if reply is None:
                continue  # silent or lying: not a candidate
            router.holds(p.node_id, image, reply.held, 1.0)
            holders[p.node_id] = reply.held
            candidates.append(Candidate(p.node_id, reply.jobs))
        return router.choose(image, candidates), holders

    async def _forward(self, peer: bytes, target: ContainerPeer, req: RunRequest, choice: Choice) -> Message | None:
        dealer = self._dealer(target)
        future = asyncio.get_running_loop().create_future()
        self._waiting[req.request_id] = future
        if req.stream:
            self._relaying[req.request_id] = [peer, 0]
        try:
            await dealer.send(encode(ForwardedRun(req, self.name, choice.why), self.server.identity))
            answer = await asyncio.wait_for(future, req.timeout_s + self.config.prepare_allowance_s)
        except asyncio.TimeoutError:
            log.warning("container worker %s did not answer job %s in time", target.node_id, req.request_id[:8])
            answer = None
        finally:
            self._waiting.pop(req.request_id, None)
            relayed = self._relaying.pop(req.request_id, [peer, 0])[1]
        if answer is None or (isinstance(answer, ErrorReply) and answer.code in ("queue_full", "shutting_down")):
            if relayed:  # its output has begun to stream: a rerun here would repeat it
                return ErrorReply(req.request_id, "run_failed",
                                  f"container worker {target.node_id} stopped answering mid-job")
            return None
        return answer

    def _dealer(self, target: ContainerPeer) -> AsyncDealer:
        entry = self._dealers.get(target.endpoint)
        if entry is None:
            dealer = AsyncDealer(target.endpoint)
            entry = self._dealers[target.endpoint] = (dealer, asyncio.ensure_future(self._answers(dealer, target)))
        return entry[0]

    async def _answers(self, dealer: AsyncDealer, target: ContainerPeer) -> None:
        while True:
            frame = await dealer.recv()
            try:
                received = decode(frame, (RunResult, ErrorReply, RunOutput))
            except WireError as exc:
                log.info("dropped a bad frame from %s: %s", target.node_id, exc)
                continue
            if received.sender != target.sign_key:
                log.warning("dropped an answer from %s signed by another key", target.node_id)
                continue
            if isinstance(received.msg, RunOutput):
                self._relay(received.msg, target)
                continue
            future = self._waiting.get(received.msg.request_id)
            if future is not None and not future.done():
                future.set_result(received.msg)

    def _relay(self, piece: RunOutput, target: ContainerPeer) -> None:
        """A forwarded job's output piece: on to the job's peer, within the output cap."""
        relaying = self._relaying.get(piece.request_id)
        size = len(piece.stdout) + len(piece.stderr)
        if relaying is None or relaying[1] + size > 2 * MAX_OUTPUT_BYTES:
            log.info("dropped output of job %s from %s: %s", piece.request_id[:8], target.node_id,
                     "no such job forwarded there" if relaying is None else "more than the output cap")
            return
        relaying[1] += size
        self.server.send(relaying[0], piece)

    # ------------------------------------------------------------------ running
    async def _run_here(self, peer: bytes, req: RunRequest, image: Image, why: str,
                        holders: dict[str, int] | None = None, peers: dict[str, ContainerPeer] | None = None) -> None:
        if peers is None:
            peers = {p.node_id: p for p in self.peers() if p.node_id != self.name}
        remote = [RemotePeer(p.node_id, p.layers) for p in peers.values()]
        loop = asyncio.get_running_loop()
        pump = OutputPump(loop, req.request_id, lambda msg: self.server.send(peer, msg)) if req.stream else None
        self.jobs += 1
        try:
            answer = await loop.run_in_executor(self.pool, self._run, req, image, why, remote, holders, pump)
        except RuntimeError as exc:  # the pool is shut down: the worker is stopping
            answer = ErrorReply(req.request_id, "shutting_down", str(exc))
        finally:
            self.jobs -= 1
        if pump is not None:
            pump.flush()  # the output first: the pieces join to the result's
        self.server.send(peer, answer)

    def _run(self, req: RunRequest, image: Image, why: str, remote: list[RemotePeer],
             holders: dict[str, int] | None, pump: OutputPump | None = None) -> Message:
        limits = Limits(memory_mb=req.memory_mb, cpus=req.cpus, timeout_s=req.timeout_s,
                        max_output_bytes=MAX_OUTPUT_BYTES, uid=self.config.uid, gid=self.config.uid)
        if holders is None:  # a forwarded job: ask the peers now who holds what
            replies = self._ask(image, [p.endpoint for p in remote])
            holders = {p.name: r.held for p, r in zip(remote, replies) if r is not None}
        try:
            result, from_peers, from_source, warm, prepare_s, total_s = self.worker.run_job(
                image, req.argv, remote, req.sources, limits, self.config.runtime, holders,
                pump.feed if pump is not None else None)
        except ContainerError as exc:  # RunError included: the job could not run at all
            self.failed += 1
            log.warning("container job %s failed: %s", req.request_id[:8], exc)
            return ErrorReply(req.request_id, "run_failed", str(exc)[:2000])
        self.ran += 1
        if self.server.telemetry is not None:
            self.server.telemetry.observe_container(total_s)
        return RunResult(req.request_id, result.exit_code, result.stdout, result.stderr, result.timed_out,
                         result.truncated, result.runtime, result.limits_enforced,
                         tuple(n[:512] for n in result.notes[:16]), self.name, warm, from_peers, from_source,
                         round(prepare_s, 6), round(total_s, 6), why[:1024])
