"""The embedded mesh: real worker and relay processes on loopback, joined through a committee.

:class:`EmbeddedMesh` runs a mesh on one machine the way a multi-host mesh runs: every node
finds every other node in the committee's directory, and nothing reads a shared file or a
PID. It takes a started committee (:class:`~permamesh.committee.cometbft.network.CometNet`
or the devnet) or starts a one-validator devnet of its own, enrolls its nodes there
(:mod:`permamesh.demo.enroll`: the seed partner registers them, the members are published,
each member's liveness prober starts), then starts each worker as ``python -m permamesh
worker --join ...`` and each relay as ``python -m permamesh relay --join ...`` in its own
session (a terminal's Ctrl-C reaches only the parent, which then stops them in order; the
kernel SIGTERMs each child if the parent dies), waits for each ``READY`` line and then for
the committee to count every node running. :meth:`EmbeddedMesh.stop` sends SIGTERM, waits,
then SIGKILLs stragglers, so no process outlives the mesh.

Readers take the mesh's view the way any client does: :meth:`EmbeddedMesh.directory` (a
:class:`~permamesh.directory.committee.CommitteeDirectory` on the mesh's committee),
:meth:`relays` and :meth:`workers` (the running ones, read fresh).

Who calls it: ``permamesh demo``, the benchmarks and the end-to-end tests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from permamesh.committee.client import CommitteeClient
from permamesh.demo import enroll
from permamesh.directory.committee import CommitteeDirectory
from permamesh.errors import PermameshError
from permamesh.ops.metrics import unregister_metrics
from permamesh.ops.procs import Child, spawn, stop_all, wait_ready

log = logging.getLogger(__name__)

RELAY_WAVE = 16  # relays started at once, each wave once the one before is ready


class MeshError(PermameshError):
    """The embedded mesh could not start or stop."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data_dir: Path
    workers: int = 2  # worker processes
    model: str = "smollm2-135m"
    model_path: str | None = None
    device: str = "auto"
    threads_per_worker: int = 0  # torch threads per worker, 0 = cores / workers
    start_timeout_s: float = 300.0  # seconds to wait for all workers to be ready
    worker_args: tuple[str, ...] = ()  # extra `permamesh worker` options (policy, group, cache)
    relays: int = 0  # relay processes (the overlay needs at least n * hops of them)
    relay_args: tuple[str, ...] = ()  # extra `permamesh relay` options
    committee: object = None  # a started CometNet or Devnet; None = a 1-validator devnet of the mesh's own
    probe_timeout_s: float = 0.5  # how long the members' probes wait for a node's answer


class EmbeddedMesh:
    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.children: list[Child] = []  # workers
        self.relay_children: list[Child] = []
        self.probers: list[Child] = []
        self.log_dir = Path(config.data_dir) / "run" / "logs"
        self.net = config.committee
        self._own_net = None
        self._client: CommitteeClient | None = None
        self._directory: CommitteeDirectory | None = None

    @property
    def endpoints(self) -> list[str]:
        return [c.endpoint for c in self.children if c.endpoint]

    @property
    def join(self) -> tuple[str, ...]:
        """The committee's validator addresses, as nodes and clients pass them to ``--join``."""
        return tuple(self.net.endpoints)

    @property
    def committee(self) -> CommitteeClient:
        if self._client is None:
            self._client = CommitteeClient(list(self.join), timeout_s=10.0)
        return self._client

    def directory(self) -> CommitteeDirectory:
        """The mesh's directory, as a client on this machine reads it (one copy on disk)."""
        if self._directory is None:
            self._directory = CommitteeDirectory(list(self.join), Path(self.config.data_dir) / "client" / "directory.json")
        return self._directory

    def relays(self) -> list:
        """The relays the committee counts running now (RelayRecords)."""
        return [e.relay_record() for e in self.directory().snapshot(0.0).running("relay")]

    def workers(self) -> list:
        """The workers the committee counts running now (WorkerRecords)."""
        return [e.worker_record() for e in self.directory().snapshot(0.0).running("worker")]

    def start(self) -> list[str]:
        cfg = self.config
        self.log_dir.mkdir(parents=True, exist_ok=True)
        threads = cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, cfg.workers))
        try:
            self._committee()
            model = Path(cfg.model_path).stem if cfg.model_path else cfg.model
            enroll.register_nodes(self.net, self.committee, cfg.data_dir, [f"mesh-worker-{i}" for i in range(cfg.workers)],
                                  [f"mesh-relay-{i}" for i in range(cfg.relays)], model)
            enroll.publish_validators(self.net, self.committee)
            deadline = time.monotonic() + cfg.start_timeout_s
            for first in range(0, cfg.relays, RELAY_WAVE):  # a hundred at once would miss their first directory read
                for i in range(first, min(cfg.relays, first + RELAY_WAVE)):
                    self._spawn_relay(i)
                if first + RELAY_WAVE < cfg.relays:
                    self._wait_ready(deadline)
            for i in range(cfg.workers):
                self._spawn(f"worker-{i}", threads)
            self._wait_ready(deadline)
            self.probers = enroll.start_probers(self.net, self.log_dir, cfg.probe_timeout_s)
            self.wait_running(cfg.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def _committee(self) -> None:
        if self.net is not None:
            return
        from permamesh.committee.devnet.cluster import Devnet, DevnetConfig
        from permamesh.committee.genesis import LedgerRules

        self._own_net = self.net = Devnet(DevnetConfig(Path(self.config.data_dir) / "committee", validators=1,
                                                       rules=LedgerRules(probe_blocks=4)))
        self.net.start()

    def wait_running(self, timeout_s: float = 60.0, gone: tuple[str, ...] = (), also: tuple[str, ...] = ()) -> float:
        """Wait until the committee counts every live node of the mesh running, and the node ids
        in ``also`` (nodes the caller runs itself), but not those in ``gone``; then until every
        live node's own copy of the directory is at least that recent (each node keeps its last
        checked copy in its data directory: the launcher reads its children's copies, as it
        reads their READY lines, so nothing is left to a node's next refresh). Returns the
        seconds it took."""
        started = time.monotonic()
        while True:
            live = [c for c in self.children + self.relay_children if c.node_id and c.alive()]
            want = {c.node_id for c in live} | set(also)
            answer = self.committee.query("/directory")
            running = {row["node_id"] for row in answer["nodes"] if row["running"]}
            if want <= running and not running & set(gone):
                break
            self._check_deadline(started, timeout_s, f"the committee counts {len(want & running)} of the mesh's "
                                 f"{len(want)} nodes running" + (f" and {len(running & set(gone))} gone ones still"
                                                                 if gone else ""))
            time.sleep(0.1)  # polling the committee's committed state; bounded by timeout_s
        height = answer["height"]
        while (behind := [c.name for c in live if c.alive() and self._copy_height(c) < height]):
            self._check_deadline(started, timeout_s, f"{', '.join(behind)} still read a directory older than "
                                 f"height {height}")
            time.sleep(0.1)  # each node refreshes its copy every few seconds; bounded by timeout_s
        return time.monotonic() - started

    @staticmethod
    def _check_deadline(started: float, timeout_s: float, what: str) -> None:
        if time.monotonic() - started > timeout_s:
            raise MeshError(f"after {timeout_s:g} s {what}")

    def _copy_height(self, child: Child) -> int:
        """The height of the directory copy ``child`` keeps on disk (-1 if none yet)."""
        path = Path(self.config.data_dir) / "directory" / f"mesh-{child.name}.json"
        try:
            return int(json.loads(path.read_text())["snapshot"]["height"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    def _spawn(self, name: str, threads: int) -> None:
        cfg = self.config
        cmd = [sys.executable, "-m", "permamesh", "worker", "--data-dir", str(cfg.data_dir), "--name", f"mesh-{name}",
               "--model", cfg.model, "--device", cfg.device, "--threads", str(threads), "--join", ",".join(self.join)]
        if cfg.model_path:
            cmd += ["--model-path", cfg.model_path]
        cmd += list(cfg.worker_args)
        self.children.append(self._popen(name, cmd))

    def _spawn_relay(self, i: int) -> None:
        cfg = self.config
        cmd = [sys.executable, "-m", "permamesh", "relay", "--data-dir", str(cfg.data_dir), "--name", f"mesh-relay-{i}",
               "--join", ",".join(self.join), *cfg.relay_args]
        self.relay_children.append(self._popen(f"relay-{i}", cmd))

    def _popen(self, name: str, cmd: list[str]) -> Child:
        return spawn(name, cmd, self.log_dir)

    def _wait_ready(self, deadline: float) -> None:
        """Wait for the READY line of every child that has not printed it yet."""
        waiting = [c for c in self.children + self.relay_children if c.endpoint is None]
        wait_ready(waiting, max(0.0, deadline - time.monotonic()), MeshError)

    def log_tail(self, child: Child, lines: int = 20) -> str:
        return child.log_tail(lines)

    def kill(self, index: int) -> None:
        """SIGKILL one worker (failure drills and tests)."""
        self.children[index].kill()

    def restart(self, index: int, timeout_s: float = 120.0) -> str:
        """Start worker ``index`` again (same name, keys and options) after a kill; returns
        its new endpoint once it is ready."""
        old = self.children[index]
        if old.alive():
            raise MeshError(f"{old.name} is still running")
        child = spawn(old.name, list(old.cmd), self.log_dir)
        self.children[index] = child
        wait_ready([child], timeout_s, MeshError)
        return child.endpoint

    def kill_relay(self, index: int) -> None:
        """SIGKILL one relay (delivery drills and the overlay benchmark)."""
        self.relay_children[index].kill()

    def stop(self, grace_s: float = 15.0) -> None:
        nodes = self.children + self.relay_children
        stop_all(nodes + self.probers, grace_s)
        for child in nodes:  # a child killed in a drill could not remove its own metrics record
            if child.node_id:
                unregister_metrics(self.config.data_dir, child.node_id)
        self.children.clear()
        self.relay_children.clear()
        self.probers.clear()
        if self._directory is not None:
            self._directory.close()
            self._directory = None
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._own_net is not None:
            self._own_net.stop()
            self._own_net = None
            self.net = None

    def __enter__(self) -> EmbeddedMesh:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
