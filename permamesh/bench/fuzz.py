"""Port fuzzing: attacks on the ports of a running mesh, and the checks made after each one.

A :class:`Port` is plain data: a name, an endpoint (``tcp://H:P?key=HEX`` for a CurveZMQ
ROUTER, ``http://H:P/path`` for HTTP, ``https://H:P?key=HEX`` for CometBFT's RPC, ``tcp://H:P``
for the ABCI socket and CometBFT's p2p port), the pids of the processes behind it, factories of
valid frames, and ``serves``, a real request that must still succeed. An attack is a function
``(port, rng) -> frames sent`` (or ``(frames sent, what it found)``); it raises
:class:`FuzzViolation` when the port does something it must never do (answers a plaintext
peer, a replayed job runs twice, a 5xx on bad input).
:func:`run_attack` runs one attack and then checks every process of the mesh alive, the port
still serving, and the resident memory of the port's processes grown by at most
:data:`RSS_BUDGET_MIB`, giving one :class:`Row`. Every count and wait is bounded; all traffic
goes to the endpoints given (loopback in the tests); randomness comes only from ``rng``.

The attacks themselves: :mod:`~permamesh.bench.fuzzzmq`, :mod:`~permamesh.bench.fuzzhttp`,
:mod:`~permamesh.bench.fuzzcomet` (the ABCI socket, CometBFT's RPC and p2p ports).

Who calls it: ``tests/test_fuzz_ports.py`` and ``tests/test_fuzz_comet.py`` (in ``make test``),
which start the mesh and the CometBFT network.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence

import psutil


log = logging.getLogger(__name__)

RSS_BUDGET_MIB = 64  # MiB of resident memory a port's processes may gain in one attack
FRAMES = 200  # frames per random or mutated attack
RESIGNED = 120  # re-signed mutants per port, at most
REPLAYS = 50  # copies of one valid frame
FLOOD = 200  # DEALER connections, each its own identity
SLOW_FRAMES = 1000  # requests a slow reader sends and never reads the answers of
HTTP_CONCURRENT = 32  # concurrent HTTP requests (a metrics port serves 4 at once)
HALF_OPEN = 16  # stalled HTTP connections (each costs a metrics port up to 1 s of admission)
DRAIN_S = 2.0  # seconds an attack waits for a port's answers, at most
MIB = 1 << 20


class FuzzViolation(Exception):
    """A port did something it must never do (the message says what)."""


@dataclasses.dataclass(frozen=True)
class Port:
    name: str  # worker, relay, validator, layers, gateway, metrics:<node>
    endpoint: str  # tcp://H:P?key=HEX (CurveZMQ ROUTER) or http://H:P/path
    pids: tuple[int, ...]  # processes behind the port (RSS is measured over these)
    serves: Callable[[], bool]  # a real request; True when it was answered correctly
    valid: Callable[[random.Random], bytes] | None = None  # a valid frame (zmq ports)
    chatty: Callable[[random.Random], bytes] | None = None  # a frame the port answers (zmq ports)
    once_tag: str = ""  # reply tag a replayed `valid` frame may get at most once ("" = no check)


@dataclasses.dataclass(frozen=True)
class Row:
    port: str
    attack: str
    frames: int
    alive: bool
    serves: bool
    rss_growth_mib: float
    note: str = ""  # the violation or the attack's own error
    seconds: float = 0.0  # wall time of the attack and its checks
    found: str = ""  # what the attack observed (answers seen, refusals), for the table

    @property
    def ok(self) -> bool:
        return self.alive and self.serves and self.rss_growth_mib <= RSS_BUDGET_MIB and not self.note


# ------------------------------------------------------------------------ frames


# ------------------------------------------------------------------------ checks


def rss_mib(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total / MIB


def alive(pids: Sequence[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            return False
    return True


Attack = Callable[[Port, random.Random], "int | tuple[int, str]"]


def run_attack(port: Port, attack: str, fn: Attack, rng: random.Random, mesh_pids: Sequence[int]) -> Row:
    """Run one attack on ``port``, then check the mesh (``mesh_pids``) and the port."""
    before, started = rss_mib(port.pids), time.monotonic()
    note, frames, found = "", 0, ""
    try:
        got = fn(port, rng)
        frames, found = got if isinstance(got, tuple) else (got, "")
    except FuzzViolation as exc:
        note = str(exc)[:200]
    except Exception as exc:  # the attack itself broke: say so in the row rather than hide it
        note = f"attack error: {exc.__class__.__name__}: {exc}"[:200]
    is_alive = alive(mesh_pids)
    try:
        serves = bool(port.serves())
    except Exception as exc:
        log.warning("%s no longer serves after %s: %s", port.name, attack, exc)
        serves = False
    growth = rss_mib(port.pids) - before
    return Row(port.name, attack, frames, is_alive, serves, round(growth, 1), note,
               round(time.monotonic() - started, 1), found)


def log_errors(log_dir, markers: Sequence[str] = ("Traceback", "panic:")) -> int:
    """Occurrences of ``markers`` in the ``*.log`` files under ``log_dir``; by default the
    starts of tracebacks and Go panics: bad input from a peer must be an expected outcome
    (refused, counted), never an exception a node only survives because a catch-all logged it."""
    from pathlib import Path

    count = 0
    for path in sorted(Path(log_dir).glob("*.log")):
        text = path.read_text(errors="replace")
        count += sum(text.count(marker) for marker in markers)
    return count


def format_table(rows: Sequence[Row]) -> str:
    lines = [f"{'port':<24} {'attack':<17} {'frames':>6} {'alive':>5} {'serves':>6} {'rss_mib':>8} "
             f"{'secs':>5}  found / note"]
    for r in rows:
        lines.append(f"{r.port:<24} {r.attack:<17} {r.frames:>6} {str(r.alive):>5} {str(r.serves):>6} "
                     f"{r.rss_growth_mib:>8.1f} {r.seconds:>5.1f}  {r.found}{' | ' if r.found and r.note else ''}"
                     f"{r.note}")
    return "\n".join(lines)
