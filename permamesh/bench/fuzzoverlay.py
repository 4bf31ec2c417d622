"""Overlay attacks with real content: valid onion cells and valid cloves, built with the
overlay's own builders (:func:`~permamesh.overlay.onion.build_forward`,
:func:`~permamesh.overlay.envelope.encode_envelope`, :func:`~permamesh.overlay.sida.split`),
whose payloads are then mutated, replayed or duplicated.

- ``onion_mutated`` (relay): valid 3-hop cells to the worker with bit flips in the header or
  the layered payload: the first relay must drop each (forged, bad key, ...), never forward it.
- ``onion_replay`` (relay): one valid cell sent :data:`~permamesh.bench.fuzz.REPLAYS` times: it
  goes through once; the first relay drops every copy as ``replayed``.
- ``onion_junk_inside`` (relay): valid onions all the way to the worker whose envelope is junk
  or a mutated clove: the relays forward them (they cannot tell), the worker's inbox drops them.
- ``clove_mutated`` (worker): CloveDrops of cloves whose shares were changed (with and without a
  recomputed fingerprint), and k valid cloves of a junk or re-signed mutant request.
- ``clove_duplicates`` (worker): one valid clove dropped :data:`~permamesh.bench.fuzz.REPLAYS`
  times: the inbox takes it once and counts the rest ``duplicate``.

Each attack reads the node's counters from its ``/metrics`` before and after, reports what
moved in the row's ``found`` column, and raises :class:`~permamesh.bench.fuzz.FuzzViolation`
when a mutant or replay was forwarded or taken.

Who calls it: ``tests/test_fuzz_ports.py`` through :func:`overlay_attacks`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import time
import urllib.request
from collections.abc import Callable

from permamesh.bench.fuzz import REPLAYS, FuzzViolation, Port
from permamesh.bench.fuzzzmq import mutate, resigned_mutants
from permamesh.directory.relays import RelayRecord
from permamesh.directory.workers import WorkerRecord
from permamesh.identity import NodeIdentity
from permamesh.overlay.clove import Clove
from permamesh.overlay.envelope import encode_envelope
from permamesh.overlay.messages import CloveDrop, RelayCell
from permamesh.overlay.onion import build_forward
from permamesh.overlay.relay import current_epoch
from permamesh.overlay.sida import split
from permamesh.transport import DealerClient
from permamesh.wire.codec import encode
from permamesh.wire.messages import GenerateRequest

log = logging.getLogger(__name__)

MUTANTS = 40  # mutated cells or cloves per attack
SETTLE_S = 1.5  # seconds for the last frame to cross the path before counters are read
WAIT_S = 10.0  # seconds, at most, for counters to reach what an attack expects (a busy CI host)
_LINE = re.compile(r'^(\w+)(?:\{(\w+)="([^"]*)"[^}]*\})? ([0-9.eE+-]+)$', re.M)


@dataclasses.dataclass(frozen=True)
class OverlayTarget:
    relays: tuple[RelayRecord, ...]  # the path, first hop first (the relay port is relays[0])
    worker: WorkerRecord  # the exit's entry worker
    relay_metrics: str  # http://H:P/metrics of relays[0]
    worker_metrics: str  # http://H:P/metrics of the worker


def counters(url: str, name: str) -> dict[str, float]:
    """``name``'s samples at ``url`` by their first label's value ("" when unlabelled)."""
    with urllib.request.urlopen(url, timeout=5.0) as resp:
        text = resp.read().decode()
    return {label or "": float(value) for metric, _, label, value in _LINE.findall(text) if metric == name}


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {k: int(after[k] - before.get(k, 0)) for k in sorted(after) if after[k] != before.get(k, 0)}


def _request_frame(rng: random.Random) -> bytes:
    return encode(GenerateRequest(rng.randbytes(8).hex(), prompt="overlay fuzz", max_tokens=1),
                  NodeIdentity.generate())


def _envelope(clove: Clove) -> bytes:
    return encode_envelope(clove, None, None)  # no reply blocks: the worker answers nobody


def _cell(t: OverlayTarget, payload: bytes, rng: random.Random) -> bytes:
    _, cell = build_forward([r.hop() for r in t.relays], t.worker.node_id.encode("ascii"), payload,
                            epoch=current_epoch(), rng=rng.randbytes)
    return encode(RelayCell(cell))


def _send(endpoint: str, frames: list[bytes]) -> None:
    with DealerClient(endpoint) as sock:
        for frame in frames:
            sock.send(frame)
        time.sleep(0.2)  # let them leave before the link closes
    time.sleep(SETTLE_S)  # and cross the path before the counters are read


def _moved(url: str, name: str, before: dict[str, float],
           enough: Callable[[dict[str, int]], bool] = lambda moved: True) -> dict[str, int]:
    """How ``name``'s counters moved since ``before``, waiting up to :data:`WAIT_S` for
    ``enough`` (what the attack expects), so a slow host is not mistaken for a violation."""
    deadline = time.monotonic() + WAIT_S
    while not enough(moved := _delta(before, counters(url, name))) and time.monotonic() < deadline:
        time.sleep(0.2)
    return moved


def _watched(url: str, name: str, send: Callable[[], int],
             enough: Callable[[dict[str, int]], bool] = lambda moved: True) -> tuple[int, dict[str, int]]:
    before = counters(url, name)
    sent = send()
    return sent, _moved(url, name, before, enough)


def _flip(data: bytes, rng: random.Random, start: int = 0) -> bytes:
    out = bytearray(data)
    out[rng.randrange(start, len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


# ------------------------------------------------------------------------ relay attacks


def attack_onion_mutated(t: OverlayTarget, port: Port, rng: random.Random) -> tuple[int, str]:
    cells = []
    for i in range(MUTANTS):
        cell = build_forward([r.hop() for r in t.relays], t.worker.node_id.encode("ascii"),
                             _envelope(split(_request_frame(rng), 4, 3)[0]), epoch=current_epoch(),
                             rng=rng.randbytes)[1]
        cells.append(encode(RelayCell(_flip(cell, rng, 0 if i % 2 else len(cell) // 2))))
    sent, moved = _watched(t.relay_metrics, "permamesh_relay_dropped_total",
                           lambda: _send(port.endpoint, cells) or len(cells),
                           lambda moved: sum(moved.values()) >= len(cells))
    if sum(moved.values()) < len(cells):
        raise FuzzViolation(f"only {sum(moved.values())} of {len(cells)} mutated cells were dropped ({moved})")
    return sent, f"relay drops {moved}"


def attack_onion_replay(t: OverlayTarget, port: Port, rng: random.Random) -> tuple[int, str]:
    frame = _cell(t, _envelope(split(_request_frame(rng), 4, 3)[0]), rng)
    before = counters(t.worker_metrics, "permamesh_overlay_events_total")
    sent, moved = _watched(t.relay_metrics, "permamesh_relay_dropped_total",
                           lambda: _send(port.endpoint, [frame] * REPLAYS) or REPLAYS,
                           lambda moved: moved.get("replayed", 0) >= REPLAYS - 1)
    taken = _moved(t.worker_metrics, "permamesh_overlay_events_total", before,
                   lambda moved: moved.get("cloves", 0) >= 1)
    if moved.get("replayed", 0) < REPLAYS - 1:
        raise FuzzViolation(f"{REPLAYS} copies of one cell: only {moved.get('replayed', 0)} dropped as replayed")
    if taken.get("cloves", 0) != 1:
        raise FuzzViolation(f"{REPLAYS} copies of one cell: the worker took {taken.get('cloves', 0)} cloves")
    return sent, f"relay drops {moved}; worker took 1 clove"


def _junk_envelopes(rng: random.Random) -> list[bytes]:
    out = []
    for i in range(MUTANTS):
        clove = split(_request_frame(rng), 4, 3)[i % 4]
        if i % 3 == 0:
            out.append(mutate(_envelope(clove), rng))
        elif i % 3 == 1:
            out.append(_envelope(dataclasses.replace(clove, data_share=_flip(clove.data_share, rng))))
        else:
            out.append(rng.randbytes(rng.randint(1, 2048)))
    return out


def attack_onion_junk_inside(t: OverlayTarget, port: Port, rng: random.Random) -> tuple[int, str]:
    frames = [_cell(t, payload, rng) for payload in _junk_envelopes(rng) if payload]
    before = counters(t.worker_metrics, "permamesh_overlay_events_total")
    _send(port.endpoint, frames)
    moved = _delta(before, counters(t.worker_metrics, "permamesh_overlay_events_total"))
    if moved.get("requests", 0):
        raise FuzzViolation(f"junk inside valid onions rebuilt {moved['requests']} request(s)")
    return len(frames), f"worker inbox {moved}"


# ------------------------------------------------------------------------ worker attacks


def _reforged(clove: Clove, rng: random.Random) -> Clove:
    """A clove with a changed share whose own fingerprint entry is recomputed to match it."""
    forged = dataclasses.replace(clove, key_share=_flip(clove.key_share, rng))
    prints = list(clove.fingerprints)
    prints[clove.index] = forged.content_fingerprint()
    return dataclasses.replace(forged, fingerprints=tuple(prints))


def attack_clove_mutated(t: OverlayTarget, port: Port, rng: random.Random) -> tuple[int, str]:
    drops = []
    for _ in range(MUTANTS // 4):
        cloves = split(_request_frame(rng), 4, 3)
        drops += [_envelope(dataclasses.replace(cloves[0], data_share=_flip(cloves[0].data_share, rng))),
                  _envelope(_reforged(cloves[1], rng)), _envelope(cloves[2])]
    for junk in [rng.randbytes(rng.randint(1, 4096)) for _ in range(4)]:
        drops += [_envelope(c) for c in split(junk, 4, 3)[:3]]  # valid cloves of a junk message
    for mutant in resigned_mutants(_request_frame(rng), rng, limit=8):
        drops += [_envelope(c) for c in split(mutant, 4, 3)[:3]]  # of a re-signed mutant request
    frames = [encode(CloveDrop(d)) for d in drops]
    sent, moved = _watched(t.worker_metrics, "permamesh_overlay_events_total",
                           lambda: _send(port.endpoint, frames) or len(frames))
    return sent, f"worker inbox {moved}"


def attack_clove_duplicates(t: OverlayTarget, port: Port, rng: random.Random) -> tuple[int, str]:
    frame = encode(CloveDrop(_envelope(split(_request_frame(rng), 4, 3)[0])))
    sent, moved = _watched(t.worker_metrics, "permamesh_overlay_events_total",
                           lambda: _send(port.endpoint, [frame] * REPLAYS) or REPLAYS,
                           lambda moved: moved.get("cloves", 0) + moved.get("duplicate", 0) >= REPLAYS)
    if moved.get("cloves", 0) != 1 or moved.get("duplicate", 0) != REPLAYS - 1:
        raise FuzzViolation(f"{REPLAYS} drops of one clove: inbox moved {moved}")
    return sent, f"worker inbox {moved}"


def overlay_attacks(t: OverlayTarget) -> dict[str, dict[str, Callable[[Port, random.Random], tuple[int, str]]]]:
    """Port name -> attack name -> attack, bound to ``t``."""
    def bind(fn):
        return lambda port, rng: fn(t, port, rng)

    return {"relay": {"onion_mutated": bind(attack_onion_mutated), "onion_replay": bind(attack_onion_replay),
                      "onion_junk_inside": bind(attack_onion_junk_inside)},
            "worker": {"clove_mutated": bind(attack_clove_mutated),
                       "clove_duplicates": bind(attack_clove_duplicates)}}
