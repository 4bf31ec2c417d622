"""Late evidence: judging the paths a request no longer waited for.

A request returns as soon as k answer cloves rebuild its answer, so the n - k other paths may
not have been heard from yet: a healthy path's answer clove is often a millisecond behind (and
its ack was left out, ``docs/paths.md`` 6.3), while a path through a dead relay never answers.
Without a verdict, a session would keep a dead path in its set for its whole life and run
every later request with no spare path. :class:`LateEvidence` holds such paths with the keys
of their outstanding reply blocks; the client offers it every delivery it cannot place
(:meth:`LateEvidence.offer`: an authenticated ack or answer clove clears the path) and asks for
verdicts before its next request (:meth:`LateEvidence.settle`): a path still unheard from
``timeout_s`` after its clove left has failed, and ``on_failed(session, relays)`` replaces it
in the session's set. Bounded: at most ``capacity`` paths are held; the oldest verdict comes
early (as failed) when more arrive.

Who calls it: :class:`~permamesh.overlay.sender.OverlayClient` only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping

from permamesh.overlay.envelope import decode_reply_item
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.messages import RelayDelivery
from permamesh.overlay.reply import ReplyKeys, open_reply

log = logging.getLogger(__name__)

__all__ = ["LateEvidence"]


@dataclasses.dataclass
class _Held:
    session: str
    relays: tuple  # the path's relay records, first hop first
    sent_at: float  # monotonic seconds the clove left
    reply_ids: tuple[bytes, ...]


class LateEvidence:
    def __init__(self, timeout_s: float, on_failed: Callable[[str, tuple], None], capacity: int = 256) -> None:
        self.timeout_s, self.on_failed, self.capacity = timeout_s, on_failed, capacity
        self._held: OrderedDict[int, _Held] = OrderedDict()
        self._keys: dict[bytes, tuple[ReplyKeys, int]] = {}
        self._next = 0
        self.failed = 0  # paths judged failed after their request returned
        self.cleared = 0  # paths heard from after their request returned

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, session: str, relays: tuple, sent_at: float, replies: Mapping[bytes, ReplyKeys]) -> None:
        """Keep a path its request stopped waiting for, with its reply blocks' keys."""
        if not replies:
            return
        token, self._next = self._next, self._next + 1
        self._held[token] = _Held(session, relays, sent_at, tuple(replies))
        for reply_id, keys in replies.items():
            self._keys[reply_id] = (keys, token)
        while len(self._held) > self.capacity:
            oldest = next(iter(self._held))
            self._fail(oldest)

    def offer(self, delivery: RelayDelivery) -> bool:
        """A delivery no running request expects: True if it cleared a held path."""
        entry = self._keys.get(delivery.reply_id)
        if entry is None:
            return False
        keys, token = entry
        try:
            decode_reply_item(open_reply(keys, delivery.payload))
        except OverlayError as exc:  # forged or corrupted: it proves nothing
            log.debug("late reply rejected: %s", exc)
            return False
        self._drop(token)
        self.cleared += 1
        return True

    def settle(self, now: float) -> int:
        """Judge held paths whose time is up; returns how many failed."""
        due = [t for t, h in self._held.items() if now - h.sent_at >= self.timeout_s]
        for token in due:
            self._fail(token)
        return len(due)

    def _fail(self, token: int) -> None:
        held = self._drop(token)
        self.failed += 1
        log.info("a path of session %r never answered; replacing it", held.session)
        self.on_failed(held.session, held.relays)

    def _drop(self, token: int) -> _Held:
        held = self._held.pop(token)
        for reply_id in held.reply_ids:
            self._keys.pop(reply_id, None)
        return held
