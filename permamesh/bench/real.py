"""Real-mode routing benchmark: replay a trace against real worker processes on loopback.

For each policy a fresh :class:`~permamesh.demo.mesh.EmbeddedMesh` starts (same model, same
prefix-cache budget, the group told to use that policy), so every policy begins with cold
caches. With ``in_process`` (``--quick``) the workers are real :class:`WorkerServer` s with
real sockets and group links, but run as threads of this process sharing one loaded model:
no process start-up per policy, so a smoke run fits in a minute (timings then share one GIL). Each conversation of the trace is a user: its first turn is sent at its trace time,
each next turn a think time (the trace's gap between the two turns) after the previous answer
arrived, as a person would. Each request goes to an entry worker drawn with a seeded
generator (as the overlay would deliver them), streaming; time to first token and end-to-end
latency are measured by the client from the moment the request is sent. Optionally one worker is
SIGKILLed mid-run to show that no request is lost (entries re-route forwarded jobs; clients
resubmit jobs whose entry died).

Who calls it: :mod:`permamesh.bench.routing` (``permamesh bench routing --mode real``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from permamesh.bench.stats import RequestRecord
from permamesh.bench.traces import TraceRequest
from permamesh.client.blocking import Client, ClientError
from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
from permamesh.wire import GenerateResult, StatusReply, TokenChunk

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RealConfig:
    data_dir: Path
    workers: int = 2  # worker processes
    model: str = "smollm2-135m"
    model_path: str | None = None
    threads_per_worker: int = 1  # CPU threads of each worker's engine (llama.cpp or torch)
    prefix_cache_mb: int = 1024  # per worker
    kill_at_s: float | None = None  # SIGKILL worker 0 this many seconds into each run
    seed: int = 0  # entry choice
    client_timeout_s: float = 10.0  # silence after which a client resubmits a job
    in_process: bool = False  # workers as threads of this process (quick runs)
    max_active: int = 4  # requests each worker decodes at once (1 = one at a time)


@dataclasses.dataclass(frozen=True)
class RealRun:
    policy: str
    records: list[RequestRecord]
    statuses: list[StatusReply]  # of the workers alive at the end
    workers: list[str]  # node ids of all workers started
    wall_s: float


def run_policy(trace: list[TraceRequest], policy: str, cfg: RealConfig,
               progress: Callable[[str], None] = lambda line: None) -> RealRun:
    group = f"bench-{policy}-{uuid.uuid4().hex[:6]}"
    mesh = (_InProcessGroup(cfg, policy, group) if cfg.in_process else EmbeddedMesh(MeshConfig(
        cfg.data_dir, cfg.workers, cfg.model, cfg.model_path, "cpu", cfg.threads_per_worker,
        worker_args=("--policy", policy, "--group", group, "--prefix-cache-mb", str(cfg.prefix_cache_mb), "--measure-sync",
                     "--max-active", str(cfg.max_active)),
    )))
    started = time.monotonic()
    try:
        endpoints = mesh.start()
        node_ids = [c.node_id or "" for c in mesh.children]
        _wait_for_group(endpoints, cfg.workers - 1)
        rng = random.Random(cfg.seed)
        entries = [rng.randrange(len(endpoints)) for _ in trace]
        records: list[RequestRecord | None] = [None] * len(trace)
        killer = None
        if cfg.kill_at_s is not None:
            killer = threading.Timer(cfg.kill_at_s, lambda: (mesh.kill(0), progress(f"  killed worker {node_ids[0]}")))
            killer.start()
        t0 = time.monotonic()
        sessions: dict[str, list[int]] = {}
        for i in sorted(range(len(trace)), key=lambda i: (trace[i].t, i)):
            sessions.setdefault(trace[i].session, []).append(i)

        def conversation(turns: list[int]) -> None:
            """A user: the first turn at its trace time, each next one a think time (the trace's
            gap between the turns) after the previous answer arrived."""
            send_at = t0 + trace[turns[0]].t
            for k, i in enumerate(turns):
                delay = send_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # the user is thinking
                ring = endpoints[entries[i]:] + endpoints[:entries[i]]
                _one(i, trace[i], ring, time.monotonic(), t0, cfg.client_timeout_s, records)
                if k + 1 < len(turns):
                    send_at = time.monotonic() + trace[turns[k + 1]].t - trace[i].t

        with ThreadPoolExecutor(max_workers=max(1, len(sessions))) as pool:
            list(pool.map(conversation, sessions.values()))
        if killer is not None:
            killer.cancel()
        alive = [e for c, e in zip(mesh.children, endpoints) if c.alive()]
        with Client(alive, accept_timeout_s=5.0) as client:
            statuses = client.status()
        done = [r for r in records if r is not None]
        failed = sum(not r.ok for r in done)
        progress(f"  {policy}: {len(done)} requests, {failed} failed, {time.monotonic() - t0:.1f} s")
        return RealRun(policy, done, statuses, node_ids, time.monotonic() - started)
    finally:
        mesh.stop()


class _Member:
    def __init__(self, node_id: str, alive) -> None:
        self.node_id, self.alive = node_id, alive


class _InProcessGroup:
    """The workers of one policy run as threads (see the module docstring); mesh-like API."""

    _loaded: dict = {}  # (model, path) -> LoadedModel, shared by every policy's workers

    def __init__(self, cfg: RealConfig, policy: str, group: str) -> None:
        self.cfg, self.policy, self.group = cfg, policy, group
        self.threads: list = []
        self.children: list[_Member] = []

    def start(self) -> list[str]:
        from permamesh.identity import NodeIdentity
        from permamesh.routing.blocks import BlockHasher
        from permamesh.workers import models
        from permamesh.workers.engine import Engine
        from permamesh.workers.group import GroupConfig, GroupLink, Peer
        from permamesh.workers.prefix_cache import PrefixKVCache
        from permamesh.workers.server import ServerConfig, ServerThread, WorkerServer

        key = (self.cfg.model, self.cfg.model_path)
        if key not in self._loaded:
            self._loaded[key] = models.load(self.cfg.model, self.cfg.model_path, self.cfg.data_dir, "cpu", 0)
        salt, peers = uuid.uuid4().bytes * 2, []
        config = GroupConfig(self.group, salt, 16, self.policy, measure_full_tree=True)
        servers = []
        for _ in range(self.cfg.workers):
            cache = PrefixKVCache(BlockHasher(16, salt), self.cfg.prefix_cache_mb * 2**20)
            server = WorkerServer(Engine(self._loaded[key], prefix_cache=cache), NodeIdentity.generate(),
                                  ServerConfig(max_active=self.cfg.max_active))
            server.group = GroupLink(server, config, lambda: list(peers))
            servers.append(server)
            self.threads.append(ServerThread(server))
        endpoints = [t.start() for t in self.threads]
        peers += [Peer(s.worker_id, e, s.identity.public.sign_key) for s, e in zip(servers, endpoints)]
        self.children = [_Member(s.worker_id, t.alive) for s, t in zip(servers, self.threads)]
        return endpoints

    def kill(self, index: int) -> None:
        self.threads[index].stop()

    def stop(self) -> None:
        for thread in self.threads:
            thread.stop()
        self.threads.clear()


def _wait_for_group(endpoints: list[str], peers: int, timeout_s: float = 30.0) -> None:
    """Wait until every worker reports hearing from all the others (state polled over zmq)."""
    deadline = time.monotonic() + timeout_s
    with Client(endpoints, accept_timeout_s=2.0) as client:
        while True:
            statuses = client.status()
            if len(statuses) == len(endpoints) and all(s.members >= peers for s in statuses):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker group did not form within {timeout_s:g} s")
            time.sleep(0.1)


def _one(i: int, req: TraceRequest, ring: list[str], arrival: float, t0: float, timeout_s: float,
         out: list[RequestRecord | None]) -> None:
    messages = [{"role": r, "content": c} for r, c in req.messages]
    first = None
    try:
        with Client(ring, accept_timeout_s=5.0, timeout_s=timeout_s) as client:
            for msg in client.events(req.prompt, messages=messages, max_tokens=req.max_tokens,
                                     session=req.session, stream=True):
                if isinstance(msg, TokenChunk) and first is None:
                    first = time.monotonic()
                elif isinstance(msg, GenerateResult):
                    end = time.monotonic()
                    first = first or end
                    out[i] = RequestRecord(msg.request_id, req.session, msg.worker_id, arrival - t0, first - arrival,
                                           end - arrival, msg.prompt_tokens, msg.cached_tokens)
    except (ClientError, OSError) as exc:
        out[i] = RequestRecord(f"req-{i}", req.session, "", arrival - t0, 0.0, time.monotonic() - arrival, 0, 0,
                               ok=False, error=str(exc))
