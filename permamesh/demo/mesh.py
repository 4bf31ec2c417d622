"""The embedded mesh: real worker and relay processes on loopback, owned by one parent process.

:class:`EmbeddedMesh` starts each worker as ``python -m permamesh worker`` (and each relay as
``python -m permamesh relay``, spread over made-up ISPs, grids and locations so paths can obey
the diversity rules of ``docs/paths.md``) in its own session
(so a terminal's Ctrl-C reaches only the parent, which then stops them in order), asks the
kernel to SIGTERM each child if the parent dies (``PR_SET_PDEATHSIG``), and waits for each
worker's ``READY`` line rather than sleeping. :meth:`EmbeddedMesh.stop` sends SIGTERM, waits,
then SIGKILLs stragglers, so no process outlives the mesh.

Who calls it: ``permamesh demo``, the benchmarks and the end-to-end tests. A later issue adds
validators here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from permamesh.errors import PermameshError
from permamesh.ops.procs import Child, spawn, stop_all, wait_ready

log = logging.getLogger(__name__)


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


def relay_placement(i: int) -> tuple[str, str, str]:
    """(isp, grid, location) of the i-th embedded relay: 8 ISPs, 4 grids, every relay its own
    location, so any 3 consecutive relays differ in all three."""
    return f"isp-{i % 8}", f"grid-{i % 4}", f"loc-{i}"


class EmbeddedMesh:
    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.children: list[Child] = []  # workers
        self.relay_children: list[Child] = []
        self.log_dir = Path(config.data_dir) / "run" / "logs"

    @property
    def endpoints(self) -> list[str]:
        return [c.endpoint for c in self.children if c.endpoint]

    def start(self) -> list[str]:
        cfg = self.config
        self.log_dir.mkdir(parents=True, exist_ok=True)
        threads = cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, cfg.workers))
        try:
            for i in range(cfg.relays):
                self._spawn_relay(i)
            for i in range(cfg.workers):
                self._spawn(f"worker-{i}", threads)
            self._wait_ready(time.monotonic() + cfg.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def _spawn(self, name: str, threads: int) -> None:
        cfg = self.config
        cmd = [sys.executable, "-m", "permamesh", "worker", "--data-dir", str(cfg.data_dir), "--name", f"mesh-{name}",
               "--model", cfg.model, "--device", cfg.device, "--threads", str(threads)]
        if cfg.model_path:
            cmd += ["--model-path", cfg.model_path]
        cmd += list(cfg.worker_args)
        self.children.append(self._popen(name, cmd))

    def _spawn_relay(self, i: int) -> None:
        cfg = self.config
        isp, grid, location = relay_placement(i)
        cmd = [sys.executable, "-m", "permamesh", "relay", "--data-dir", str(cfg.data_dir), "--name", f"mesh-relay-{i}",
               "--isp", isp, "--grid", grid, "--location", location, *cfg.relay_args]
        self.relay_children.append(self._popen(f"relay-{i}", cmd))

    def _popen(self, name: str, cmd: list[str]) -> Child:
        return spawn(name, cmd, self.log_dir)

    def _wait_ready(self, deadline: float) -> None:
        wait_ready(self.children + self.relay_children, max(0.0, deadline - time.monotonic()), MeshError)

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
        stop_all(self.children + self.relay_children, grace_s)
        self.children.clear()
        self.relay_children.clear()

    def __enter__(self) -> EmbeddedMesh:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
