"""Path kits made ahead of time: the public-key work of a request, done while the client idles.

Most of what a client spends before its first clove can leave is X25519: one agreement per
hop for the forward onion and one per hop for each of the two reply blocks (ack and answer),
36 for four paths of three relays. None of it depends on the request, so it can be done
before the request exists, the way Tor builds circuits before a user asks for one:

- :func:`prepare_kit` does it for one path: the forward hops' key agreements and the two
  finished reply blocks with their keys, stamped with the replay-guard epoch they were made
  in. A kit is used for one clove only (relays drop a reused header as a replay).
- :class:`KitPreparer` keeps the next request's path set ready: a background thread draws
  ``n`` paths from the client's :class:`PathSelector` (the same draw the request would make)
  and builds their kits. :meth:`KitPreparer.take` hands the set to exactly one request and
  asks for the next set, which is built only when :meth:`KitPreparer.refill` says the client
  is idle again, so preparation never competes with a request in flight.

A taken set is used only if its epoch is still the current one; otherwise it is thrown away
and the request builds its kits itself, as it does when no set is ready. Preparation changes
when the work happens, never which paths are drawn or what goes on the wire.

Who calls it: :class:`~permamesh.routing.overlay.sender.OverlayClient` only.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence

from permamesh.routing.overlay import cells
from permamesh.routing.overlay.cells import HopInfo, HopSecret
from permamesh.routing.overlay.errors import OverlayError
from permamesh.routing.overlay.reply import ReplyBlock, ReplyKeys, build_reply_block

log = logging.getLogger(__name__)

__all__ = ["KitPreparer", "PathKit", "prepare_kit"]


@dataclasses.dataclass(frozen=True)
class PathKit:
    """Everything a clove over ``path`` needs except the clove itself; single use."""

    path: tuple[bytes, ...]  # relay node ids, first hop first
    epoch: int  # replay-guard epoch of every header in the kit
    forward: tuple[HopSecret, ...] = dataclasses.field(repr=False)  # one per hop of ``path``
    ack: tuple[ReplyBlock, ReplyKeys] = dataclasses.field(repr=False)  # over the reversed path
    answer: tuple[ReplyBlock, ReplyKeys] = dataclasses.field(repr=False)


def prepare_kit(hops: Sequence[HopInfo], client_id: bytes, epoch: int,
                rng: cells.Rng = cells.default_rng) -> PathKit:
    """The kit for one clove over ``hops``: replies come back over the reversed path."""
    back = list(reversed(hops))
    return PathKit(
        path=tuple(h.node_id for h in hops),
        epoch=epoch,
        forward=tuple(cells.client_secret(h, rng) for h in hops),
        ack=build_reply_block(back, client_id, epoch=epoch, rng=rng),
        answer=build_reply_block(back, client_id, epoch=epoch, rng=rng),
    )


Draw = Callable[[], Sequence[Sequence[HopInfo]]]  # the next request's paths (may raise)


class KitPreparer:
    """One ready path set for the next request, built on a background thread while idle.

    ``draw`` picks the paths (the client passes its selector under its own lock); ``epoch``
    returns the current replay-guard epoch. Thread-safe; :meth:`close` stops the thread.
    """

    def __init__(self, draw: Draw, client_id: bytes, epoch: Callable[[], int]) -> None:
        self._draw, self._client_id, self._epoch = draw, client_id, epoch
        self._cond = threading.Condition()
        self._ready: list[PathKit] | None = None
        self._wanted = True  # a set should be built (the client is idle)
        self._building = False
        self._closed = False
        self.built = self.used = self.discarded = 0  # sets, for tests and benchmarks
        self._thread = threading.Thread(target=self._run, name="overlay-prepare", daemon=True)
        self._thread.start()

    def take(self, timeout_s: float = 0.05) -> list[PathKit] | None:
        """The ready set (waiting up to ``timeout_s`` for one being built), or None. Either
        way no new set is built until :meth:`refill`."""
        with self._cond:
            if self._ready is None and self._building:
                self._cond.wait_for(lambda: not self._building, timeout_s)
            kits, self._ready, self._wanted = self._ready, None, False
        if kits is None:
            return None
        if any(k.epoch != self._epoch() for k in kits):
            self.discarded += 1
            return None
        self.used += 1
        return kits

    def refill(self) -> None:
        """The client is idle: build the next set if none is ready."""
        with self._cond:
            self._wanted = True
            self._cond.notify_all()

    def wait_ready(self, timeout_s: float = 5.0) -> bool:
        """Block until a set is ready (or preparation cannot make one); True if one is."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._ready is not None
                                or not (self._wanted or self._building), timeout_s)
            return self._ready is not None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or (self._wanted and self._ready is None))
                if self._closed:
                    return
                self._building, self._wanted = True, False
            kits: list[PathKit] | None = None
            try:
                epoch = self._epoch()
                kits = [prepare_kit(hops, self._client_id, epoch) for hops in self._draw()]
            except OverlayError as exc:  # e.g. too few relays right now: requests build their own
                log.info("no path set prepared: %s", exc)
            except Exception:  # never let the thread die silently; requests still work without it
                log.exception("path preparation failed")
            with self._cond:
                self._building = False
                if kits is not None and not self._closed:
                    self._ready = kits
                    self.built += 1
                self._cond.notify_all()
