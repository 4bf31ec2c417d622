"""Child processes of an embedded mesh or devnet: start, wait for READY, kill, stop.

Each child runs in its own session (a terminal's Ctrl-C reaches only the parent, which then
stops them in order), is asked by the kernel to SIGTERM itself if the parent dies
(``PR_SET_PDEATHSIG``), and writes stderr to a log file. :func:`wait_ready` waits for each
child's ``READY <endpoint> <node_id>`` line on stdout rather than sleeping; :func:`stop_all`
sends SIGTERM, waits, then SIGKILLs stragglers, so no process outlives its owner.

Who calls it: :class:`permamesh.demo.mesh.EmbeddedMesh` and
:class:`permamesh.committee.devnet.cluster.Devnet`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import selectors
import signal
import subprocess
import time
from pathlib import Path

from permamesh.errors import PermameshError

log = logging.getLogger(__name__)


class ProcessError(PermameshError):
    """A child process could not start or stop."""


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM us when the parent process dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclasses.dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    endpoint: str | None = None
    node_id: str | None = None
    cmd: tuple[str, ...] = ()  # what started it (restart runs it again)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL (failure drills and tests)."""
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def spawn(name: str, cmd: list[str], log_dir: Path) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent)
    return Child(name, proc, log_path, cmd=tuple(cmd))


def wait_ready(children: list[Child], timeout_s: float, error: type[Exception] = ProcessError) -> None:
    """Wait until every child printed ``READY <endpoint> <node_id>``; ``error`` otherwise."""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        for child in children:
            sel.register(child.proc.stdout, selectors.EVENT_READ, child)
        waiting = len(children)
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = [c.name for c in children if c.endpoint is None]
                raise error(f"{', '.join(names)} not ready after {timeout_s:g} s; logs in "
                            f"{children[0].log_path.parent}")
            for key, _ in sel.select(min(remaining, 1.0)):
                child = key.data
                line = child.proc.stdout.readline().decode(errors="replace").split()
                if len(line) == 3 and line[0] == "READY":
                    child.endpoint, child.node_id = line[1], line[2]
                    sel.unregister(child.proc.stdout)
                    waiting -= 1
                elif not line:
                    raise error(f"{child.name} exited before it was ready:\n{child.log_tail()}")
            for child in children:
                if child.endpoint is None and child.proc.poll() is not None:
                    raise error(f"{child.name} exited with code {child.proc.returncode}:\n{child.log_tail()}")


def stop_all(children: list[Child], grace_s: float = 15.0) -> None:
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %g s; killing it", child.name, grace_s)
            child.proc.kill()
            child.proc.wait()
        if child.proc.stdout and not child.proc.stdout.closed:
            child.proc.stdout.close()
