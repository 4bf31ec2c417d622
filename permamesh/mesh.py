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

import ctypes
import dataclasses
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from permamesh.errors import PermameshError

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


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM us when the parent process dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclasses.dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    endpoint: str | None = None
    node_id: str | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None


class EmbeddedMesh:
    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.children: list[_Child] = []  # workers
        self.relay_children: list[_Child] = []
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

    def _popen(self, name: str, cmd: list[str]) -> _Child:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        return _Child(name, proc, log_path)

    def _wait_ready(self, deadline: float) -> None:
        everyone = self.children + self.relay_children
        with selectors.DefaultSelector() as sel:
            for child in everyone:
                sel.register(child.proc.stdout, selectors.EVENT_READ, child)
            waiting = len(everyone)
            while waiting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MeshError(f"workers or relays not ready after {self.config.start_timeout_s:g} s; logs in {self.log_dir}")
                for key, _ in sel.select(min(remaining, 1.0)):
                    child = key.data
                    line = child.proc.stdout.readline().decode(errors="replace").split()
                    if len(line) == 3 and line[0] == "READY":
                        child.endpoint, child.node_id = line[1], line[2]
                        sel.unregister(child.proc.stdout)
                        waiting -= 1
                    elif not line:
                        raise MeshError(f"{child.name} exited before it was ready:\n{self.log_tail(child)}")
                for child in everyone:
                    if child.endpoint is None and child.proc.poll() is not None:
                        raise MeshError(f"{child.name} exited with code {child.proc.returncode}:\n{self.log_tail(child)}")

    def log_tail(self, child: _Child, lines: int = 20) -> str:
        try:
            return "\n".join(child.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self, index: int) -> None:
        """SIGKILL one worker (failure drills and tests)."""
        self.children[index].proc.kill()
        self.children[index].proc.wait()

    def kill_relay(self, index: int) -> None:
        """SIGKILL one relay (delivery drills and the overlay benchmark)."""
        self.relay_children[index].proc.kill()
        self.relay_children[index].proc.wait()

    def stop(self, grace_s: float = 15.0) -> None:
        everyone = self.children + self.relay_children
        for child in everyone:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in everyone:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %g s; killing it", child.name, grace_s)
                child.proc.kill()
                child.proc.wait()
            if child.proc.stdout:
                child.proc.stdout.close()
        self.children.clear()
        self.relay_children.clear()

    def __enter__(self) -> EmbeddedMesh:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
