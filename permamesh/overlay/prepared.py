"""Path kits made ahead of time: the public-key work of a request, done while the client idles.

Most of what a client spends before its first clove can leave is X25519: one agreement per
hop for the forward onion and one per hop for each of the two reply blocks (ack and answer),
36 for four paths of three relays, and one per hop for each chunk block of a streamed answer. None of it depends on the request, so it can be done
before the request exists, the way Tor builds circuits before a user asks for one:

- :func:`prepare_kit` does it for one path: the forward hops' key agreements and the two
  finished reply blocks with their keys, stamped with the replay-guard epoch they were made
  in. A kit is used for one clove only (relays drop a reused header as a replay).
- :class:`KitPreparer` keeps kits ready for the paths the next request will use (the
  session's path set, :meth:`SessionPaths.peek <permamesh.overlay.sessions.SessionPaths.peek>`):
  a background thread builds one kit per path. :meth:`KitPreparer.take` hands the kits of a
  request's paths to that request and drops the rest; the next kits are built only when
  :meth:`KitPreparer.refill` says the client is idle again, so preparation never competes
  with a request in flight.

A kit is used only for the path it was made for and only while its epoch is the current one;
otherwise the request builds that path's kit itself, as it does when none is ready.
Preparation changes when the work happens, never which paths are used or what goes on the
wire.

Who calls it: :class:`~permamesh.overlay.sender.OverlayClient` only.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence

from permamesh.overlay import cells
from permamesh.overlay.cells import HopInfo, HopSecret
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.reply import ReplyBlock, ReplyKeys, build_reply_block

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
    chunks: tuple[tuple[ReplyBlock, ReplyKeys], ...] = dataclasses.field(default=(), repr=False)  # streamed chunks


def prepare_kit(hops: Sequence[HopInfo], client_id: bytes, epoch: int,
                rng: cells.Rng = cells.default_rng, chunks: int = 0) -> PathKit:
    """The kit for one clove over ``hops`` with ``chunks`` chunk blocks: replies come back
    over the reversed path."""
    back = list(reversed(hops))
    return PathKit(
        path=tuple(h.node_id for h in hops),
        epoch=epoch,
        forward=tuple(cells.client_secret(h, rng) for h in hops),
        ack=build_reply_block(back, client_id, epoch=epoch, rng=rng),
        answer=build_reply_block(back, client_id, epoch=epoch, rng=rng),
        chunks=tuple(build_reply_block(back, client_id, epoch=epoch, rng=rng) for _ in range(chunks)),
    )


Draw = Callable[[], Sequence[Sequence[HopInfo]]]  # the next request's paths (may raise)
PathKey = tuple[bytes, ...]  # relay node ids of a path, first hop first


class KitPreparer:
    """Kits for the next request's paths, built on a background thread while the client idles.

    ``draw`` names the paths (the client passes its session's set, under its own lock);
    ``epoch`` returns the current replay-guard epoch. Thread-safe; :meth:`close` stops the
    thread.
    """

    def __init__(self, draw: Draw, client_id: bytes, epoch: Callable[[], int], chunks: int = 0) -> None:
        self._draw, self._client_id, self._epoch, self._chunks = draw, client_id, epoch, chunks
        self._cond = threading.Condition()
        self._ready: dict[PathKey, PathKit] | None = None
        self._wanted = True  # a set should be built (the client is idle)
        self._building = False
        self._closed = False
        self.built = self.used = self.discarded = 0  # kits, for tests and benchmarks
        self._thread = threading.Thread(target=self._run, name="overlay-prepare", daemon=True)
        self._thread.start()

    def take(self, paths: Sequence[PathKey], timeout_s: float = 0.05) -> list[PathKit | None]:
        """The ready kit of each of ``paths`` (None where there is none, or it is stale),
        waiting up to ``timeout_s`` for kits being built. Kits of other paths are dropped, and
        no new kit is built until :meth:`refill`."""
        with self._cond:
            if self._ready is None and self._building:
                self._cond.wait_for(lambda: not self._building, timeout_s)
            ready, self._ready, self._wanted = self._ready or {}, None, False
        epoch = self._epoch()
        taken = [ready.pop(tuple(path), None) for path in paths]
        kits = [k if k is not None and k.epoch == epoch else None for k in taken]
        self.used += sum(k is not None for k in kits)
        self.discarded += len(ready) + sum(k is not None for k in taken) - sum(k is not None for k in kits)
        return kits

    def refill(self) -> None:
        """The client is idle: build the next set if none is ready."""
        with self._cond:
            self._wanted = True
            self._cond.notify_all()

    def wait_ready(self, timeout_s: float = 5.0) -> bool:
        """Block until kits are ready (or preparation cannot make them); True if they are."""
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
            kits: dict[PathKey, PathKit] | None = None
            try:
                epoch = self._epoch()
                made = [prepare_kit(hops, self._client_id, epoch, chunks=self._chunks) for hops in self._draw()]
                kits = {kit.path: kit for kit in made}
            except OverlayError as exc:  # e.g. too few relays right now: requests build their own
                log.info("no path set prepared: %s", exc)
            except Exception:  # never let the thread die silently; requests still work without it
                log.exception("path preparation failed")
            with self._cond:
                self._building = False
                if kits is not None and not self._closed:
                    self._ready = kits
                    self.built += len(kits)
                self._cond.notify_all()
