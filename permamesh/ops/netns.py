"""Simulated hosts on one machine: Linux network namespaces joined by a bridge.

:class:`Hosts` builds ``{prefix}-br`` (a namespace holding the Linux bridge ``br0``) and
``{prefix}-h0`` .. ``{prefix}-h{N-1}``, each joined to the bridge by a veth pair (``eth0`` in
the host, ``h{i}`` in the bridge namespace), with its own address in a private subnet, ``lo``
up and a default route that exists only inside it. Every ``ip``/``tc`` command names its
target namespace (``ip -n``, ``tc -n``); the veth pairs are born inside the bridge namespace
with one end placed straight into the host's. Nothing is created, changed or routed in the
root namespace: it has no path to the subnet at all.

A host's one-way delay (``delays_ms``) is a netem qdisc on its ``eth0`` where the kernel has
netem, else a :mod:`~permamesh.ops.delayline` child in the bridge namespace that sits between
``h{i}`` and the bridge port ``p{i}`` (``HostsConfig.delay_via``; :attr:`Hosts.delay_via`
says which one a run got).

Who calls it: multi-host tests (``tests/ops/test_netns.py`` and the transport's), the
benchmark harness, and :class:`permamesh.ops.capture.Capture` (which runs its recorder in the
bridge namespace). Callers start their nodes with :meth:`Hosts.spawn` (through
:func:`permamesh.ops.procs.spawn`: own session, parent-death signal, log file, READY line)
and short commands with :meth:`Hosts.run`.

Cleanup: :meth:`Hosts.close` stops the children it spawned, then kills whatever else still
runs in its namespaces (``ip netns pids``), then deletes them (which deletes their veths).
It is idempotent, and SIGINT/SIGTERM arriving while it runs are held back until it is done.
To clean up when the process is told to stop, wrap the run in :func:`cleanup_on_signals`,
which turns SIGTERM into ``SystemExit`` (SIGINT already raises ``KeyboardInterrupt``) so
``with Hosts(...)`` unwinds; after a SIGKILL or a crash, :meth:`Hosts.cleanup_stale` removes
what a run with that prefix left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from permamesh.errors import PermameshError
from permamesh.ops import procs

log = logging.getLogger(__name__)

BRIDGE_DEV = "br0"  # the bridge, inside {prefix}-br
HOST_DEV = "eth0"  # each host's end of its veth pair, inside {prefix}-h{i}
_PREFIX = re.compile(r"[A-Za-z0-9_]{1,32}")


class NetnsError(PermameshError):
    """A namespace could not be built, used or removed (the message names the step)."""


@dataclasses.dataclass(frozen=True)
class HostsConfig:
    hosts: int  # simulated hosts, {prefix}-h0 .. {prefix}-h{hosts-1}
    prefix: str = "pm"  # every namespace we create is named "{prefix}-..."; letters, digits, _
    subnet: str = "10.231.0.0/24"  # private IPv4 range; exists only inside our namespaces
    delays_ms: tuple[float, ...] = ()  # one-way egress delay per host (ms); () for none
    delay_via: str = "auto"  # "netem" (tc), "delayline" (a userspace relay), "auto": netem if any
    log_dir: str | None = None  # logs of our delay lines; None: a temp dir, removed by close()
    step_timeout_s: float = 10.0  # each ip/tc command
    stop_grace_s: float = 5.0  # SIGTERM -> SIGKILL, for spawned children and strays alike

    def __post_init__(self) -> None:
        if self.hosts < 1:
            raise ValueError("hosts must be >= 1")
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: 1-32 letters, digits or _")
        net = ipaddress.ip_network(self.subnet)
        if net.version != 4 or not net.is_private:
            raise ValueError(f"subnet {self.subnet}: must be a private IPv4 network")
        if self.hosts > net.num_addresses - 2:
            raise ValueError(f"subnet {self.subnet} has no room for {self.hosts} hosts")
        if self.delays_ms and len(self.delays_ms) != self.hosts:
            raise ValueError(f"delays_ms needs one entry per host ({self.hosts}), or none")
        if any(d < 0 for d in self.delays_ms):
            raise ValueError("delays_ms must be >= 0")
        if self.delay_via not in ("auto", "netem", "delayline"):
            raise ValueError(f"delay_via {self.delay_via!r}: auto, netem or delayline")


class Hosts:
    """N simulated hosts on one bridge. ``with Hosts(cfg) as hosts:`` starts and closes them."""

    def __init__(self, config: HostsConfig):
        self.config = config
        self.delay_via: str | None = None  # "netem" or "delayline" once started with delays
        self._net = ipaddress.ip_network(config.subnet)
        self._created: list[str] = []  # namespaces this object made, in order
        self._children: list[procs.Child] = []  # in the hosts
        self._helpers: list[procs.Child] = []  # in the bridge: delay lines, capture recorders
        self._state = "new"  # new -> started -> closing -> closed
        self._temp_logs: str | None = None

    @property
    def bridge_ns(self) -> str:
        return f"{self.config.prefix}-br"

    def namespace(self, i: int) -> str:
        if not 0 <= i < self.config.hosts:
            raise IndexError(f"host {i} (have {self.config.hosts})")
        return f"{self.config.prefix}-h{i}"

    def addr(self, i: int) -> str:
        """Host ``i``'s IPv4 address (the subnet's (i+1)-th address)."""
        self.namespace(i)
        return str(self._net.network_address + i + 1)

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Hosts:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Hosts:
        """Build the bridge and the hosts. On any failure, removes what it made and raises."""
        if self._state != "new":
            raise NetnsError(f"Hosts({self.config.prefix}) is {self._state}; make a new one")
        require_privileges(tc=self.config.delay_via == "netem" and any(self.config.delays_ms))
        if taken := namespaces(self.config.prefix):
            raise NetnsError(f"namespaces {', '.join(taken)} already exist: a live run uses prefix "
                             f"{self.config.prefix!r}, or a crashed one left them "
                             f"(Hosts.cleanup_stale({self.config.prefix!r}) removes them)")
        self._state = "started"
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        log.info("hosts up: %d in %s on %s", self.config.hosts, self.config.subnet, self.bridge_ns)
        return self

    def _build(self) -> None:
        br, delays = self.bridge_ns, self.config.delays_ms
        self._add_namespace(br)
        self._ip(br, "create the bridge", "link", "add", BRIDGE_DEV, "type", "bridge")
        self._ip(br, "bring the bridge up", "link", "set", BRIDGE_DEV, "up")
        if any(delays):
            self.delay_via = self.config.delay_via if self.config.delay_via != "auto" else (
                "netem" if self._netem_works() else "delayline")
        lines = []
        for i in range(self.config.hosts):
            ns, port = self.namespace(i), f"h{i}"
            line = self.delay_via == "delayline" and delays[i] > 0
            self._add_namespace(ns)
            self._ip(br, f"veth pair for h{i}", "link", "add", port, "type", "veth", "peer", "name",
                     HOST_DEV, "netns", ns)
            if line:  # h{i} <- delay line -> d{i} ~ veth ~ p{i}, the bridge port
                self._ip(br, f"delay-line veths for h{i}", "link", "add", f"d{i}", "type", "veth",
                         "peer", "name", f"p{i}")
                self._ip(br, f"bring up d{i}", "link", "set", f"d{i}", "up")
                self._ip(br, f"bring up h{i}", "link", "set", port, "up")
                port = f"p{i}"
            self._ip(br, f"attach h{i} to the bridge", "link", "set", port, "master", BRIDGE_DEV, "up")
            self._ip(ns, f"address h{i}", "addr", "add", f"{self.addr(i)}/{self._net.prefixlen}",
                     "dev", HOST_DEV)
            self._ip(ns, f"bring h{i} up", "link", "set", HOST_DEV, "up")
            self._ip(ns, f"loopback of h{i}", "link", "set", "lo", "up")
            self._ip(ns, f"default route of h{i}", "route", "add", "default", "dev", HOST_DEV)
            if line:
                argv = [sys.executable, "-m", "permamesh.ops.delayline", f"h{i}", f"d{i}", f"{delays[i]:g}"]
                if not (logs := self.config.log_dir or self._temp_logs):
                    logs = self._temp_logs = tempfile.mkdtemp(prefix=f"{self.config.prefix}-logs-")
                lines.append(self.spawn_bridge(f"delayline-h{i}", argv, Path(logs)))
            elif delays and delays[i] > 0:
                _step(f"delay h{i} (tc netem)", ["tc", "-n", ns, "qdisc", "add", "dev", HOST_DEV, "root",
                                                 "netem", "delay", f"{delays[i]:g}ms"],
                      self.config.step_timeout_s)
        procs.wait_ready(lines, self.config.step_timeout_s, error=NetnsError)

    def _netem_works(self) -> bool:
        """Probe: a netem qdisc on the bridge namespace's own (unused) ``lo``."""
        try:
            _step("probe netem", ["tc", "-n", self.bridge_ns, "qdisc", "add", "dev", "lo", "root", "netem",
                                  "delay", "1ms"], self.config.step_timeout_s)
            return True
        except NetnsError as e:
            log.info("no netem here, delays go through delay lines (%s)", e)
            return False

    def _add_namespace(self, name: str) -> None:
        _step(f"create namespace {name}", ["ip", "netns", "add", name], self.config.step_timeout_s)
        self._created.append(name)

    def _ip(self, ns: str, what: str, *args: str) -> None:
        _step(what, ["ip", "-n", ns, *args], self.config.step_timeout_s)

    def close(self) -> None:
        """Stop every process in our namespaces, then delete them. Idempotent; raises
        :class:`NetnsError` (after trying everything) only if something could not be removed."""
        if self._state != "started":  # new, closed, or a signal handler called us mid-close
            self._state = "closed" if self._state == "new" else self._state
            return
        self._state = "closing"
        with _signals_deferred():
            try:
                procs.stop_all(self._children, grace_s=self.config.stop_grace_s)
                procs.stop_all(self._helpers, grace_s=self.config.stop_grace_s)  # the wire last
            finally:
                problems = _remove(self._created, self.config.stop_grace_s, self.config.step_timeout_s)
                self._state = "closed"
        if problems:
            raise NetnsError("cleanup incomplete: " + "; ".join(problems))
        if self._temp_logs:
            shutil.rmtree(self._temp_logs, ignore_errors=True)
        log.info("hosts down: %s", ", ".join(self._created))

    @staticmethod
    def cleanup_stale(prefix: str, grace_s: float = 2.0) -> list[str]:
        """Kill the processes in, and delete, every namespace a run with ``prefix`` left
        behind; returns their names. Call it only when no live run uses ``prefix``."""
        require_privileges()
        stale = namespaces(prefix)
        if problems := _remove(stale, grace_s, 10.0):
            raise NetnsError("stale cleanup incomplete: " + "; ".join(problems))
        if stale:
            log.warning("removed stale namespaces: %s", ", ".join(stale))
        return stale

    # -- processes ------------------------------------------------------------------------

    def command(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` as run inside host ``i`` (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self._live(self.namespace(i)), *argv]

    def bridge_command(self, argv: list[str]) -> list[str]:
        """``argv`` as run inside the bridge namespace (capture recorders, delay lines)."""
        return ["ip", "netns", "exec", self._live(self.bridge_ns), *argv]

    def spawn(self, i: int, name: str, argv: list[str], log_dir: Path) -> procs.Child:
        """A long-lived child inside host ``i`` (see :func:`procs.spawn`); close() stops it."""
        child = procs.spawn(name, self.command(i, argv), log_dir)
        self._children.append(child)
        return child

    def spawn_bridge(self, name: str, argv: list[str], log_dir: Path) -> procs.Child:
        """A long-lived child inside the bridge namespace; close() stops it."""
        child = procs.spawn(name, self.bridge_command(argv), log_dir)
        self._helpers.append(child)
        return child

    def run(self, i: int, argv: list[str], timeout_s: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a short command inside host ``i``; its exit status is the caller's to check."""
        try:
            return subprocess.run(self.command(i, argv), input=input, capture_output=True,
                                  text=True, errors="replace", timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise NetnsError(f"{argv[0]} on h{i} did not finish in {timeout_s:g} s") from e

    def pids(self) -> dict[str, list[int]]:
        """Processes now running in each of our namespaces (``ip netns pids``)."""
        return {name: _pids(name) for name in self._created}

    def _live(self, ns: str) -> str:
        if self._state != "started":
            raise NetnsError(f"Hosts({self.config.prefix}) is {self._state}, not started")
        return ns


def require_privileges(tc: bool = False) -> None:
    """Raise :class:`NetnsError` unless we are root and ``ip`` (and ``tc``) are installed."""
    if os.geteuid() != 0:
        raise NetnsError(f"network namespaces need root (running as uid {os.geteuid()})")
    for tool in ("ip", "tc") if tc else ("ip",):
        if shutil.which(tool) is None:
            raise NetnsError(f"`{tool}` not found on PATH (install iproute2)")


def namespaces(prefix: str) -> list[str]:
    """The existing namespaces that a run with ``prefix`` makes, sorted."""
    mine = re.compile(re.escape(prefix) + r"-(br|h\d+)")
    listed = _step("list namespaces", ["ip", "netns", "list"], 10.0).split("\n")
    return sorted(n for n in (line.split(" ")[0] for line in listed) if mine.fullmatch(n))


def unavailable(netem: bool = False) -> str | None:
    """Why namespaces (with ``netem``: and netem delays) can't be used here, or None; tests
    and benchmarks skip with it. Probes by building one host, ``pmprobe{pid}-h0``."""
    config = HostsConfig(1, prefix=f"pmprobe{os.getpid()}", delays_ms=(1.0,) if netem else (),
                         delay_via="netem")
    try:
        Hosts(config).start().close()
    except NetnsError as e:
        return str(e)
    return None


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """Within this block, SIGTERM raises ``SystemExit(143)`` (SIGINT keeps raising
    ``KeyboardInterrupt``) so ``with Hosts(...)`` blocks inside it unwind and close. For entry
    points, in the main thread: ``with cleanup_on_signals(), Hosts(cfg) as hosts: ...``."""
    def to_exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, h) for s, h in
                ((signal.SIGTERM, to_exit), (signal.SIGINT, signal.default_int_handler))}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver them (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _f: held.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        for s in held:
            signal.raise_signal(s)


def _remove(names: list[str], grace_s: float, timeout_s: float) -> list[str]:
    """SIGTERM what runs in the namespaces, SIGKILL what is left after ``grace_s``, delete
    them; returns what went wrong."""
    problems, left = [], []
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        left = _signal_all(names, sig)
        deadline = time.monotonic() + wait_s
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [p for name in names for p in _pids(name)]
        if not left:
            break
    if left:
        problems.append(f"processes {left} still run in {', '.join(names)}")
    for name in reversed(names):
        try:
            _step(f"delete namespace {name}", ["ip", "netns", "del", name], timeout_s)
        except NetnsError as e:
            problems.append(str(e))
    return problems


def _signal_all(names: list[str], sig: int) -> list[int]:
    sent = []
    for pid in (p for name in names for p in _pids(name) if p != os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            sent.append(pid)
    if sent:
        log.info("sent %s to %s", signal.Signals(sig).name, sent)
    return sent


def _pids(name: str) -> list[int]:
    try:
        out = _step(f"list processes in {name}", ["ip", "netns", "pids", name], 10.0)
    except NetnsError:
        return []  # the namespace is gone, and so is everything that ran in it
    return [int(p) for p in out.split()]


def _step(what: str, argv: list[str], timeout_s: float) -> str:
    """Run one ip/tc command: its stdout, or :class:`NetnsError` naming the step, with stderr."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError as e:
        raise NetnsError(f"{what}: `{argv[0]}` not found") from e
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"{what}: `{' '.join(argv)}` took over {timeout_s:g} s") from e
    if done.returncode != 0:
        raise NetnsError(f"{what}: `{' '.join(argv)}` exited {done.returncode}: "
                         f"{done.stderr.strip() or '(no stderr)'}")
    return done.stdout
