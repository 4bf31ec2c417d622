"""Onion layering of fixed-size cells: the client wraps, each relay peels one layer.

The client calls :func:`build_forward` with a path of up to :data:`MAX_HOPS` relays and gets
the first hop's id and a cell; each relay calls :func:`peel` with its X25519 key and its
:class:`ReplayGuard` and gets one of three outcomes:

- :class:`NextHop`: send ``cell`` (same length) to ``next_hop``; all the relay learned;
- :class:`ExitPayload`: the relay is the path's last hop (the proxy): hand ``payload`` to
  the destination named in ``exit_command`` (opaque to this module, e.g. an entry worker id);
- :class:`ReplyDelivery`: the relay is the last hop of a reply path (see :mod:`reply`): pass
  the still-layered ``payload`` with ``reply_id`` to the client ``client_id``.

Forward payload layers are ChaCha20-Poly1305 with the tag carried in the hop's header slot,
so a flipped payload byte is caught by the very next relay and the payload length never
changes. Every key is fresh per cell, so two cells with one payload share no bytes.

A forged, replayed, stale, truncated or oversized cell raises :class:`OverlayError` with the
reason; nothing else escapes :func:`peel`, and a rejected cell leaves the relay's state as it
was, so the relay keeps serving.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from permamesh.identity import KeyExchangeKey
from permamesh.overlay import cells
from permamesh.overlay.cells import (
    CELL_HEADER_BYTES,
    MAX_CELL_BYTES,
    MAX_HOPS,
    SIZE_CLASSES,
    HopInfo,
    Rng,
)
from permamesh.overlay.errors import OverlayError

logger = logging.getLogger(__name__)

__all__ = [
    "CELL_HEADER_BYTES", "MAX_CELL_BYTES", "MAX_EXIT_COMMAND_BYTES", "MAX_FORWARD_PAYLOAD",
    "MAX_HOPS", "SIZE_CLASSES", "ExitPayload", "HopInfo", "NextHop", "Peeled", "ReplayGuard",
    "ReplyDelivery", "build_forward", "peel",
]

MAX_EXIT_COMMAND_BYTES = cells.TERMINAL_BODY_BYTES - cells.TAG_BYTES - 1  # 74
MAX_FORWARD_PAYLOAD = SIZE_CLASSES[-1] - cells.LENGTH_BYTES  # bytes


class ReplayGuard:
    """The replay tags of the cells one relay accepted, kept per cell epoch.

    Every cell carries the builder's epoch (a caller-defined clock tick, e.g. minutes / 10).
    A relay accepts epochs ``current - window < e <= current + 1`` and remembers the tag of
    each accepted cell until its epoch leaves that window, so memory stays bounded and an old
    cell can neither be replayed nor slip in after its tags were dropped. The caller drives
    the clock with :meth:`advance`; nothing here reads the wall clock.

    At most ``capacity`` tags are held. Each tag is charged to the ``owner`` that sent the
    cell (the relay passes its upstream peer). Below ``capacity - reserve`` every owner is
    admitted; above it, an owner already holding its fair share of that soft limit (divided
    among the owners holding tags) is shed, so the upstream that sends the most is refused
    first and the reserve stays for the others. At ``capacity`` every cell is refused (fail
    closed) until :meth:`advance` frees room. Tags are never dropped early: that would let a
    cell be replayed.
    """

    def __init__(self, *, epoch: int = 0, window: int = 2, capacity: int = 1 << 18) -> None:
        if window < 1 or capacity < 1 or not 0 <= epoch <= cells.MAX_EPOCH:
            raise ValueError("need window >= 1, capacity >= 1 and epoch in 0..2**32-1")
        self._epoch, self._window, self._capacity = epoch, window, capacity
        self._soft = capacity - capacity // 4  # above this, heavy owners are shed
        self._seen: dict[int, set[bytes]] = {}
        self._owners: dict[int, Counter[bytes]] = {}  # epoch -> owner -> tags held
        self._held: Counter[bytes] = Counter()  # owner -> tags held, all epochs
        self._total = 0
        self._lock = threading.Lock()

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        with self._lock:
            return self._total

    def held_by(self, owner: bytes) -> int:
        """Tags held now that ``owner``'s cells put here."""
        with self._lock:
            return self._held[owner]

    def advance(self, epoch: int) -> None:
        """Move to ``epoch`` (never backwards) and forget tags of epochs now out of window."""
        with self._lock:
            if epoch <= self._epoch:
                return
            self._epoch = min(epoch, cells.MAX_EPOCH)
            oldest = self._epoch - self._window + 1
            for stale in [e for e in self._seen if e < oldest]:
                self._total -= len(self._seen.pop(stale))
                self._held.subtract(self._owners.pop(stale, Counter()))
            self._held = +self._held  # drop owners that hold nothing now

    def check(self, epoch: int, tag: bytes) -> None:
        """Raise :class:`OverlayError` if a cell of ``epoch`` with ``tag`` must be refused."""
        with self._lock:
            self._check_locked(epoch, tag)

    def admit(self, epoch: int, tag: bytes, owner: bytes = b"") -> None:
        """Remember ``tag`` (the cell was accepted), charged to ``owner``; raises like
        :meth:`check`, when the guard is full, or when ``owner`` is over its share."""
        with self._lock:
            self._check_locked(epoch, tag)
            if self._total >= self._capacity:
                logger.warning("replay guard full (%d tags); refusing cells", self._capacity)
                raise OverlayError("cell rejected: replay cache full until the next epoch")
            if self._total >= self._soft:
                owners = len(self._held) + (owner not in self._held)
                if self._held[owner] >= self._soft // owners:
                    raise OverlayError("cell rejected: upstream over its replay-cache share (shed)")
            self._seen.setdefault(epoch, set()).add(tag)
            self._owners.setdefault(epoch, Counter())[owner] += 1
            self._held[owner] += 1
            self._total += 1

    def _check_locked(self, epoch: int, tag: bytes) -> None:
        if epoch <= self._epoch - self._window:
            raise OverlayError(f"cell rejected: stale epoch {epoch} (relay at {self._epoch})")
        if epoch > self._epoch + 1:
            raise OverlayError(f"cell rejected: future epoch {epoch} (relay at {self._epoch})")
        if tag in self._seen.get(epoch, ()):
            raise OverlayError("cell rejected: replayed")


@dataclass(frozen=True)
class NextHop:
    """Forward ``cell`` to the relay ``next_hop``."""

    next_hop: bytes  # node id, 16 bytes
    cell: bytes


@dataclass(frozen=True)
class ExitPayload:
    """The path ends here: deliver ``payload`` as ``exit_command`` says."""

    exit_command: bytes  # opaque to the overlay, at most MAX_EXIT_COMMAND_BYTES
    payload: bytes


@dataclass(frozen=True)
class ReplyDelivery:
    """A reply path ends here: give ``payload`` (still layered) and ``reply_id`` to the client."""

    client_id: bytes  # node id, 16 bytes
    reply_id: bytes  # 16 bytes, picks the client's ReplyKeys
    payload: bytes


Peeled = NextHop | ExitPayload | ReplyDelivery


def build_forward(
    path: Sequence[HopInfo],
    exit_command: bytes,
    payload: bytes,
    *,
    epoch: int = 0,
    size_class: int | None = None,
    rng: Rng = cells.default_rng,
    secrets: Sequence[cells.HopSecret] | None = None,
) -> tuple[bytes, bytes]:
    """``(first hop id, cell)`` carrying ``payload`` over ``path`` to ``exit_command``.

    The payload is padded to ``size_class`` (default: the smallest that fits). ``epoch`` must
    be within the relays' :class:`ReplayGuard` window. ``rng`` supplies every random byte.
    ``secrets`` are the hops' key agreements made ahead of time (``cells.client_secret`` per
    hop, see :mod:`~permamesh.overlay.prepared`); each set must be used for one cell
    only, or the relays drop the second as a replay.
    """
    if not isinstance(exit_command, bytes) or len(exit_command) > MAX_EXIT_COMMAND_BYTES:
        raise OverlayError(f"exit command must be bytes of at most {MAX_EXIT_COMMAND_BYTES}")
    if not isinstance(payload, bytes):
        raise OverlayError("payload must be bytes")
    if not 1 <= len(path) <= MAX_HOPS:
        raise OverlayError(f"a path has 1..{MAX_HOPS} hops, got {len(path)}")
    total = cells.size_class_for(cells.LENGTH_BYTES + len(payload), size_class)
    if secrets is None:
        secrets = [cells.client_secret(hop, rng) for hop in path]
    elif len(secrets) != len(path):
        raise OverlayError(f"{len(secrets)} hop secrets for a path of {len(path)} hops")
    body = cells.pad(payload, total)
    tags: list[bytes] = [b""] * len(path)
    for i in range(len(path) - 1, -1, -1):  # innermost layer first
        body, tags[i] = cells.aead_seal(secrets[i].aead_key, body)
    last = cells.terminal_slot(
        cells.CMD_EXIT, epoch, tags[-1] + bytes([len(exit_command)]) + exit_command
    )
    header = cells.build_header(path, secrets, cells.CMD_RELAY, tags, last, epoch, rng)
    return path[0].node_id, header + body


def peel(key: KeyExchangeKey, cell: bytes, guard: ReplayGuard, owner: bytes = b"") -> Peeled:
    """Remove one layer of ``cell`` as the relay holding ``key``; see the module docstring.
    ``owner`` (the upstream that sent the cell) is charged for its replay tag.

    Raises :class:`OverlayError` (and only that) for any cell that must be dropped.
    """
    try:
        return _peel(key, cell, guard, owner)
    except OverlayError as exc:
        logger.debug("%s", exc)
        raise


def _peel(key: KeyExchangeKey, cell: bytes, guard: ReplayGuard, owner: bytes) -> Peeled:
    alpha, beta, gamma, payload = cells.split_cell(cell)
    secret = cells.relay_secret(key, alpha)
    if not hmac.compare_digest(cells.header_mac(secret, beta), gamma):
        raise OverlayError("cell rejected: header MAC mismatch (forged, corrupted or not ours)")
    plain = cells.chacha(secret.header_key, beta + bytes(cells.SLOT_BYTES))
    command, epoch, body = cells.parse_slot(plain[: cells.SLOT_BYTES])
    guard.check(epoch, secret.replay_tag)
    result: Peeled
    if command == cells.CMD_RELAY:
        next_hop, next_alpha, next_gamma, tag = cells.parse_route(body)
        inner = cells.aead_open(secret.aead_key, payload, tag)
        result = NextHop(next_hop, next_alpha + plain[cells.SLOT_BYTES :] + next_gamma + inner)
    elif command == cells.CMD_EXIT:
        tag, n = body[: cells.TAG_BYTES], body[cells.TAG_BYTES]
        if n > MAX_EXIT_COMMAND_BYTES:
            raise OverlayError(f"cell rejected: exit command of {n} bytes")
        exit_command = body[cells.TAG_BYTES + 1 : cells.TAG_BYTES + 1 + n]
        inner = cells.unpad(cells.aead_open(secret.aead_key, payload, tag))
        result = ExitPayload(exit_command, inner)
    elif command == cells.CMD_REPLY_RELAY:
        next_hop, next_alpha, next_gamma, _ = cells.parse_route(body)
        layered = cells.chacha(secret.stream_key, payload)
        result = NextHop(next_hop, next_alpha + plain[cells.SLOT_BYTES :] + next_gamma + layered)
    elif command == cells.CMD_DELIVER:
        client_id, reply_id = cells.parse_delivery(body)
        result = ReplyDelivery(client_id, reply_id, cells.chacha(secret.stream_key, payload))
    else:
        raise OverlayError(f"cell rejected: unknown command {command}")
    guard.admit(epoch, secret.replay_tag, owner)
    return result
