"""The relay: peel one onion layer per cell and pass what is left to the next hop.

One event-loop thread owns everything: a ROUTER socket (:class:`RouterServer`) that clients,
upstream relays and entry workers connect to, one cached DEALER (:class:`AsyncDealer`) per
downstream endpoint, the :class:`ReplayGuard`, the token buckets and the attached clients.
Per frame received from a peer (a zmq connection):

1. the peer's token bucket pays one token, else the frame is dropped (``rate_limited``);
2. the frame is decoded as :class:`RelayCell` or :class:`RelayAttach`; anything else is
   answered ``ErrorReply(code="bad_frame")`` (``bad_frames``);
3. ``RelayAttach(client_id)`` binds ``client_id`` to this connection (the first signing key
   to attach a client id owns it while it is remembered). At most ``max_clients`` are kept and
   each connection may attach ``max_attach_per_peer``; when full, an attachment never used
   goes first, then one unused for ``attach_hold_s``; one that carried a delivery or was
   re-attached within ``attach_hold_s`` is never evicted: the new attach is refused instead;
4. ``RelayCell`` is peeled (:func:`onion.peel`, ~0.15 ms, on the loop): :class:`NextHop` goes
   on as a ``RelayCell`` to the relay ``directory()`` names, :class:`ExitPayload` goes as
   :class:`CloveDrop` to the entry worker ``workers()`` names (its node id is the exit
   command), :class:`ReplyDelivery` goes as :class:`RelayDelivery` to the attached client.

A cell that fails to peel (forged, replayed, stale, truncated...) or that names an unknown
next hop, worker or client is dropped, counted per reason in :class:`RelayStats` and logged
at debug level; it is never answered (answers would be an oracle). Every frame the relay
sends is signed with its own identity.

The guard holds at most ``replay_capacity`` tags, each charged to the upstream connection
that sent the cell; near the cap the upstream holding the most is shed (``shed``) so the
others keep being served (see :class:`ReplayGuard`).

Epochs: the guard's epoch is ``current_epoch(config.epoch_s)``, re-read once a second;
clients building cells for these relays use the same function. Who calls it:
:mod:`~permamesh.overlay.relayproc` (``permamesh relay``) and tests, through
:meth:`RelayServer.serve` or :class:`RelayThread`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping

from permamesh.identity import NodeIdentity
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.messages import CloveDrop, RelayAttach, RelayCell, RelayDelivery
from permamesh.overlay.onion import ExitPayload, NextHop, ReplayGuard, ReplyDelivery, peel
from permamesh.transport import AsyncDealer, RouterServer, ServingThread, TransportError
from permamesh.wire import ErrorReply, Message, StatusRequest, WireError, decode, encode

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_EPOCH_S", "RelayConfig", "RelayServer", "RelayStats", "RelayThread", "current_epoch"]

DEFAULT_EPOCH_S = 600.0  # seconds per replay-guard epoch
Lookup = Callable[[], Mapping[bytes, str]]  # node id bytes -> endpoint

# OverlayError message fragments -> the reason a dropped cell is counted under
_REASONS = (("MAC mismatch", "forged"), ("failed authentication", "forged_payload"),
            ("replayed", "replayed"), ("stale epoch", "stale"), ("future epoch", "future"),
            ("truncated", "truncated"), ("oversized", "oversized"), ("size class", "bad_size"),
            ("replay cache full", "guard_full"), ("replay-cache share", "shed"), ("ephemeral key", "bad_key"))


def current_epoch(epoch_s: float = DEFAULT_EPOCH_S, now: float | None = None) -> int:
    """The cell epoch at wall-clock time ``now`` (default: now): ``int(now // epoch_s)``."""
    return int((time.time() if now is None else now) // epoch_s) & 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class RelayConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    rate_per_s: float = 1000.0  # frames per second refilled into each upstream peer's bucket
    burst: int = 2000  # bucket size: frames a peer may send at once
    epoch_s: float = DEFAULT_EPOCH_S  # seconds per replay-guard epoch
    replay_window: int = 2  # epochs a cell stays acceptable (and its tag remembered)
    max_clients: int = 65_536  # attached clients remembered
    max_attach_per_peer: int = 16  # client ids one upstream connection may hold attached
    attach_hold_s: float = 600.0  # an attachment used this recently is never evicted (seconds)
    replay_capacity: int = 1 << 18  # replay tags held at most (~130 bytes each)
    max_peers: int = 65_536  # upstream token buckets remembered (LRU)
    max_links: int = 1024  # downstream DEALER connections kept open (LRU)
    drop_all: bool = False  # fault injection: a "dead" relay that reads and drops every frame
    fail_after: int = 0  # fault injection: turn dead after handling this many cells (0 = never)

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and self.burst >= 1 and self.epoch_s > 0 and self.replay_window >= 1
                and min(self.max_clients, self.max_peers, self.max_links, self.max_attach_per_peer,
                        self.replay_capacity) >= 1 and self.attach_hold_s >= 0 and self.fail_after >= 0):
            raise OverlayError(f"relay config out of range: {self}")


@dataclasses.dataclass(frozen=True)
class RelayStats:
    """A snapshot of a relay's counters since it started."""

    cells_in: int  # RelayCell frames decoded (after the rate limit)
    forwarded: int  # cells passed to the next relay
    exited: int  # cloves handed to an entry worker
    delivered: int  # replies handed to an attached client
    attached: int  # clients attached now
    rate_limited: int  # frames dropped by the token buckets
    bad_frames: int  # frames that did not decode (answered bad_frame)
    dropped_by_reason: Mapping[str, int]  # cells dropped after decoding, per reason
    replay_tags: int = 0  # tags the replay guard holds now (at most replay_capacity)

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())


class _Bucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` held."""

    __slots__ = ("tokens", "at")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens, self.at = burst, now

    def take(self, rate: float, burst: float, now: float) -> bool:
        self.tokens = min(burst, self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclasses.dataclass
class _Attachment:
    peer: bytes  # the connection deliveries go to
    key: bytes | None  # the signing key that attached the client id first
    used_at: float | None = None  # monotonic time of the last delivery or re-attach


class RelayServer:
    """A relay on one event loop; ``directory()`` names relays and ``workers()`` entry workers
    by node id bytes (both called per cell, so keep them cheap: see ``CachedLookup``)."""

    def __init__(self, identity: NodeIdentity, config: RelayConfig, directory: Lookup, workers: Lookup) -> None:
        self.identity, self.config = identity, config
        self.node_id = identity.node_id
        self.endpoint: str | None = None
        self._directory, self._workers = directory, workers
        self._guard = ReplayGuard(epoch=current_epoch(config.epoch_s), window=config.replay_window,
                                  capacity=config.replay_capacity)
        self._buckets: OrderedDict[bytes, _Bucket] = OrderedDict()
        self._clients: OrderedDict[bytes, _Attachment] = OrderedDict()  # least recently used first
        self._fresh: OrderedDict[bytes, None] = OrderedDict()  # ids attached but never used, oldest first
        self._per_peer: Counter[bytes] = Counter()  # upstream connection -> ids it holds attached
        self._links: OrderedDict[str, tuple[AsyncDealer, asyncio.Task]] = OrderedDict()
        self._failed = False  # fail_after reached: from now on the relay acts dead
        self._lock = threading.Lock()  # counters are read from other threads
        self._counts: Counter[str] = Counter()
        self._drops: Counter[str] = Counter()

    # ------------------------------------------------------------------ lifecycle
    async def serve(self, stop: asyncio.Event, on_ready: Callable[[str], None] | None = None) -> None:
        router = RouterServer(self.config.host, self.config.port, self.identity.transport.private_bytes())
        self.endpoint = router.endpoint
        tasks = [asyncio.create_task(self._recv_loop(router)), asyncio.create_task(self._epoch_loop())]
        log.info("relay %s serving on %s", self.node_id, self.endpoint)
        try:
            if on_ready is not None:
                on_ready(self.endpoint)
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            links, self._links = list(self._links.values()), OrderedDict()
            for _, drain in links:
                drain.cancel()
            await asyncio.gather(*(drain for _, drain in links), return_exceptions=True)
            for link, _ in links:
                link.close()
            router.close()
            log.info("relay %s stopped: %s", self.node_id, self.stats())

    def stats(self) -> RelayStats:
        """The counters now (any thread)."""
        with self._lock:
            c = self._counts
            return RelayStats(c["cells_in"], c["forwarded"], c["exited"], c["delivered"], len(self._clients),
                              c["rate_limited"], c["bad_frames"], dict(self._drops), len(self._guard))

    # ------------------------------------------------------------------ receiving
    async def _epoch_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._guard.advance(current_epoch(self.config.epoch_s))

    async def _recv_loop(self, router: RouterServer) -> None:
        while True:
            peer, frame = await router.recv()
            try:
                await self._handle(router, peer, frame)
            except Exception:  # a bug handling one frame must not stop the relay
                log.exception("failed to handle a frame from %s", peer.hex()[:16])
                self._drop("internal")

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _drop(self, reason: str, detail: object = "") -> None:
        log.debug("relay %s dropped a cell (%s) %s", self.node_id, reason, detail)
        with self._lock:
            self._drops[reason] += 1

    def _admit(self, peer: bytes) -> bool:
        now, cfg = time.monotonic(), self.config
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = _Bucket(cfg.burst, now)
            if len(self._buckets) > cfg.max_peers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(peer)
        return bucket.take(cfg.rate_per_s, cfg.burst, now)

    async def _handle(self, router: RouterServer, peer: bytes, frame: bytes | None) -> None:
        if not self._admit(peer):
            self._count("rate_limited")
            return
        if self.config.drop_all or self._failed:  # a dead relay answers nothing
            self._drop("dead")
            return
        try:
            if frame is None:
                raise WireError("expected exactly one frame part")
            received = decode(frame, expect=(RelayCell, RelayAttach, StatusRequest))
        except WireError as exc:
            self._count("bad_frames")
            log.debug("relay %s rejected a frame from %s: %s", self.node_id, peer.hex()[:16], exc)
            await router.send(peer, encode(ErrorReply("", "bad_frame", str(exc)), self.identity))
            return
        msg = received.msg
        if isinstance(msg, RelayAttach):
            self._attach(peer, msg.client_id, received.sender)
        elif isinstance(msg, RelayCell):
            await self._on_cell(router, peer, msg.cell)
        elif isinstance(msg, StatusRequest):  # a committee member's liveness probe: a signed answer is the proof
            self._count("probes")
            await router.send(peer, encode(ErrorReply(msg.request_id, "not_a_worker", "a relay: alive, no job status"),
                                           self.identity))

    def _attach(self, peer: bytes, client_id: bytes, sender: bytes | None) -> None:
        known = self._clients.get(client_id)
        if known is not None:
            if known.key != sender:
                self._drop("attach_conflict", client_id.hex())
                return
            if known.peer != peer:  # the client reconnected: the attachment moves with it
                self._unbind(known.peer)
                self._per_peer[peer] += 1
                known.peer = peer
            self._use(client_id, known)  # a re-attach proves the client is alive
            return
        if self._per_peer[peer] >= self.config.max_attach_per_peer:
            self._drop("attach_budget", peer.hex()[:16])
            return
        if len(self._clients) >= self.config.max_clients and not self._evict_one():
            self._drop("attach_full", client_id.hex())
            return
        self._clients[client_id] = _Attachment(peer, sender)
        self._fresh[client_id] = None
        self._per_peer[peer] += 1

    def _use(self, client_id: bytes, attachment: _Attachment) -> None:
        """``client_id`` got a delivery or re-attached: it is in use, not to be evicted soon."""
        attachment.used_at = time.monotonic()
        self._fresh.pop(client_id, None)
        self._clients.move_to_end(client_id)

    def _evict_one(self) -> bool:
        """Make room for one attachment: the oldest never used, else the least recently used
        if idle for ``attach_hold_s``; False when every attachment is in use."""
        if self._fresh:
            victim = next(iter(self._fresh))
        else:
            victim, oldest = next(iter(self._clients.items()))
            if oldest.used_at is not None and time.monotonic() - oldest.used_at < self.config.attach_hold_s:
                return False
        self._fresh.pop(victim, None)
        self._unbind(self._clients.pop(victim).peer)
        return True

    def _unbind(self, peer: bytes) -> None:
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]

    # ------------------------------------------------------------------ one cell
    async def _on_cell(self, router: RouterServer, peer: bytes, cell: bytes) -> None:
        self._count("cells_in")
        if self.config.fail_after and self._counts["cells_in"] > self.config.fail_after:
            self._failed = True
            self._drop("dead")
            return
        try:
            peeled = peel(self.identity.kex, cell, self._guard, peer)
        except OverlayError as exc:
            text = str(exc)
            self._drop(next((r for key, r in _REASONS if key in text), "rejected"), text)
            return
        if isinstance(peeled, NextHop):
            endpoint = self._directory().get(peeled.next_hop)
            if endpoint is None:
                self._drop("unknown_next_hop", peeled.next_hop)
            elif await self._send_to(endpoint, RelayCell(peeled.cell)):
                self._count("forwarded")
        elif isinstance(peeled, ExitPayload):
            endpoint = self._workers().get(peeled.exit_command)
            if endpoint is None:
                self._drop("unknown_worker", peeled.exit_command)
            elif not peeled.payload:
                self._drop("empty_payload")
            elif await self._send_to(endpoint, CloveDrop(peeled.payload)):
                self._count("exited")
        elif isinstance(peeled, ReplyDelivery):
            client = self._clients.get(peeled.client_id)
            if client is None:
                self._drop("unknown_client", peeled.client_id.hex())
                return
            self._use(peeled.client_id, client)
            delivery = RelayDelivery(peeled.reply_id, peeled.payload)
            await router.send(client.peer, encode(delivery, self.identity))
            self._count("delivered")

    # ------------------------------------------------------------------ downstream links
    async def _send_to(self, endpoint: str, msg: Message) -> bool:
        try:
            link = self._link(endpoint)
        except TransportError as exc:
            self._drop("bad_endpoint", exc)
            return False
        await link.send(encode(msg, self.identity))
        return True

    def _link(self, endpoint: str) -> AsyncDealer:
        entry = self._links.get(endpoint)
        if entry is not None:
            self._links.move_to_end(endpoint)
            return entry[0]
        link = AsyncDealer(endpoint)
        self._links[endpoint] = (link, asyncio.create_task(self._drain(link)))
        if len(self._links) > self.config.max_links:
            _, (old, drain) = self._links.popitem(last=False)
            drain.add_done_callback(lambda _: old.close())
            drain.cancel()
        return link

    async def _drain(self, link: AsyncDealer) -> None:
        """Read (and log) what a downstream peer answers, so nothing piles up unread."""
        while True:
            frame = await link.recv()
            try:
                msg = decode(frame).msg
            except WireError as exc:
                log.debug("undecodable answer from %s: %s", link.endpoint, exc)
                continue
            log.debug("%s answered %s: %s", link.endpoint, msg.TAG, msg)


class RelayThread(ServingThread):
    """Run a :class:`RelayServer` on its own event loop in a background thread (tests, embedding)."""

    error, what = OverlayError, "relay"

    def __init__(self, server: RelayServer) -> None:
        super().__init__(server, name=f"relay-{server.node_id}")
