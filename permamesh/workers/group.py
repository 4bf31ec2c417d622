"""A worker's membership in its group: tree sync, and forwarding jobs to the best member.

Workers serving one model form a group. Each runs a :class:`GroupLink` on its event loop:

- **links**: one :class:`~permamesh.transport.AsyncDealer` to every other member's ROUTER,
  from a peer source (the local registry today, the committee registry later). Members are
  known by their Ed25519 keys; group messages from any other key are dropped.
- **sync**: its prefix cache's inserts and evictions feed a
  :class:`~permamesh.routing.sync.DeltaPublisher`; a delta (or a load-only heartbeat) goes to
  every member each ``sync_interval_s`` and into its own :class:`GroupReplica` (loopback).
  Deltas from members go to the replica; divergence triggers sync requests and snapshots.
- **routing**: a client's job arriving here is hashed into its block chain, matched in the
  replica's tree, and a :class:`~permamesh.routing.policy.Policy` picks the member with the
  best estimated time to first token. Another member gets a :class:`ForwardedRequest`; its
  answers come back on our link and are relayed to the client, who never learns who ran it.
- **failure**: a forwarded job silent for ``forward_timeout_s``, or whose member expired or
  refused it (``queue_full``/``shutting_down``), is re-routed; if tokens were already relayed
  the client is told ``lost`` and its client resubmits (skipping what it showed).

Who calls it: :class:`~permamesh.workers.server.WorkerServer` hands it client jobs
(:meth:`route`) and group messages (:meth:`on_peer_message`); the executor's ``on_done`` hook
feeds :meth:`on_cache_events`. Everything runs on the event-loop thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Callable

from permamesh.routing.blocks import BlockHasher
from permamesh.routing.errors import RoutingError
from permamesh.routing.messages import Load, TreeDelta, TreeSnapshot, TreeSyncRequest
from permamesh.routing.view import GroupView
from permamesh.routing.policy import MemberState, RouteQuery, estimate_prefill_s, make_policy
from permamesh.routing.sync import DeltaPublisher, GroupReplica
from permamesh.transport import AsyncDealer
from permamesh.wire import (
    Accepted, ErrorReply, ForwardedRequest, GenerateRequest, GenerateResult, Message, Progress,
    Received, TokenChunk, WireError, decode, encode,
)
from permamesh.workers.executor import DEFAULT_DECODE_TOK_PER_S, DEFAULT_PREFILL_TOK_PER_S
from permamesh.workers.host import WorkerHost


log = logging.getLogger(__name__)

GROUP_MESSAGES = (TreeDelta, TreeSyncRequest, ForwardedRequest)
# a member's refusals that another member (or this one) can answer instead; "forbidden" comes
# from a member whose directory copy does not list us yet
REROUTE_CODES = ("queue_full", "shutting_down", "forbidden")


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    name: str  # group name: the workers serving one model share one
    salt: bytes = b""  # trust-domain salt of block hashes (tree replicas never see prompt text)
    block_size: int = 16  # tokens per block
    policy: str = "permamesh"  # random, round-robin, least-loaded, cache-aware, permamesh
    seed: int = 0  # seeds the policy's tie-breaking
    sync_interval_s: float = 0.25  # delta / heartbeat period
    heartbeat_s: float = 1.0  # a load-only delta at least this often
    member_timeout_s: float = 3.0  # a member unheard this long is dropped
    forward_timeout_s: float = 5.0  # a forwarded job silent this long is re-routed
    peer_refresh_s: float = 1.0  # how often the peer source is read
    measure_full_tree: bool = False  # also count what broadcasting full trees would cost (benchmarks)
    decode_share_weight: float = 0.5  # permamesh policy, trap (e): members schedule per step


@dataclasses.dataclass(frozen=True)
class Peer:
    node_id: str
    endpoint: str
    sign_key: bytes


@dataclasses.dataclass
class _Pending:
    client: bytes  # the client's ROUTER identity
    request: GenerateRequest
    ids: tuple[int, ...]
    query: RouteQuery
    target: str
    last_heard: float
    tried: set[str]
    accepted_sent: bool = False
    relayed_index: int = -1  # highest token index relayed to the client


class GroupLink:
    def __init__(self, server: WorkerHost, config: GroupConfig, peers: Callable[[], list[Peer]],
                 reputation: Callable[[str], float] = lambda worker: 1.0) -> None:
        self.server, self.config, self._peer_source, self.reputation = server, config, peers, reputation
        self.me = server.worker_id
        self.hasher = BlockHasher(config.block_size, config.salt)
        self.publisher = DeltaPublisher(config.name, self.me, int.from_bytes(os.urandom(7), "big"),
                                        signer=server.identity, track_full_tree=config.measure_full_tree)
        self.replica = GroupReplica(config.name, self.me)
        self.view = GroupView()
        self.policy = make_policy(config.policy, config.seed, config.decode_share_weight)
        self.links: dict[str, tuple[Peer, AsyncDealer, asyncio.Task]] = {}
        self._keys: dict[bytes, str] = {}  # member sign key -> node id
        self.pending: dict[str, _Pending] = {}
        self.forwarded = 0
        self._task: asyncio.Task | None = None
        self._last_publish = 0.0
        self._last_refresh = -1e9

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._task = asyncio.create_task(self._maintain())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for node_id in list(self.links):
            await self._unlink(node_id)

    # ---------------------------------------------------------------- routing
    def route(self, client: bytes, req: GenerateRequest) -> Message | None:
        """A client's job arrived here: run it locally or forward it. Returns a reply to send
        now (Accepted or an error), or None when a member's answer will be relayed."""
        ids = tuple(self.server.engine.prompt_ids(req))
        chain = tuple(self.hasher.chain(ids))
        query = RouteQuery(chain, len(ids), req.max_tokens, self.config.block_size, req.session or None)
        pending = _Pending(client, req, ids, query, self.me, time.monotonic(), set())
        return self._dispatch(pending)

    def _dispatch(self, p: _Pending) -> Message | None:
        matched = self.replica.tree.match(p.query.chain)
        members = [m for m in self._members() if m.worker not in p.tried]
        try:
            target = self.policy.choose(p.query, members, matched) if members else self.me
        except RoutingError as exc:
            log.warning("routing failed (%s); serving locally", exc)
            target = self.me
        p.tried.add(target)
        if target == self.me:
            cached = min(matched.get(self.me, 0) * self.config.block_size, len(p.ids))
            reply = self.server.accept(p.client, p.request, p.ids, cached)
            return None if (p.accepted_sent and isinstance(reply, Accepted)) else reply
        state = next(m for m in members if m.worker == target)
        self.view.assign(target, estimate_prefill_s(p.query, state, matched.get(target, 0)))
        p.target, p.last_heard = target, time.monotonic()
        self.pending[p.request.request_id] = p
        self.forwarded += 1
        frame = encode(ForwardedRequest(p.request, self.me, self.config.name), self.server.identity)
        asyncio.ensure_future(self.links[target][1].send(frame))
        return None

    def _members(self) -> list[MemberState]:
        ex = self.server.executor
        mine = MemberState(self.me, ex.load, ex.backlog_s,
                           ex.prefill_rate or DEFAULT_PREFILL_TOK_PER_S, ex.decode_rate or DEFAULT_DECODE_TOK_PER_S,
                           self.reputation(self.me))
        live = set(self.replica.members()) & set(self.links)
        others = [dataclasses.replace(m, reputation=self.reputation(m.worker)) for m in self.view.members() if m.worker in live]
        return sorted([mine, *others], key=lambda m: m.worker)

    def _reroute(self, p: _Pending, why: str) -> None:
        self.pending.pop(p.request.request_id, None)
        if p.relayed_index >= 0:  # the client saw tokens: let it resubmit and skip them
            self.server.send(p.client, ErrorReply(p.request.request_id, "lost", f"member {p.target} failed ({why}) mid-answer"))
            return
        log.info("re-routing %s away from %s: %s", p.request.request_id, p.target, why)
        reply = self._dispatch(p)
        if reply is not None:
            self.server.send(p.client, reply)
            p.accepted_sent = True

    # ---------------------------------------------------------------- messages from members
    def on_peer_message(self, peer: bytes, received: Received) -> Message | None:
        """A group message arrived on our ROUTER; returns a reply for ``peer`` if any."""
        sender = self._keys.get(received.sender or b"")
        msg = received.msg
        if sender is None:  # perhaps a member we have not discovered yet: look again soon
            self._last_refresh = -1e9
            log.debug("dropping %s from a key outside group %s", msg.TAG, self.config.name)
            if isinstance(msg, ForwardedRequest):
                return ErrorReply(msg.request.request_id, "forbidden", "not a member of this group")
            return None
        now = time.monotonic()
        if isinstance(msg, TreeDelta):
            if msg.worker == sender:
                self.replica.apply_delta(msg, now)
                self._observe_load(msg.worker, msg.load)
            return None
        if isinstance(msg, TreeSyncRequest):
            if msg.requester != sender or msg.group != self.config.name or msg.worker != self.me:
                return None
            snapshot, _ = self.publisher.publish_snapshot(self._load())  # counted in sync stats
            return snapshot
        if isinstance(msg, ForwardedRequest):
            req = msg.request
            ids = tuple(self.server.engine.prompt_ids(req))
            matched = self.replica.tree.match(tuple(self.hasher.chain(ids))).get(self.me, 0)
            return self.server.accept(peer, req, ids, min(matched * self.config.block_size, len(ids)))
        return None

    def _observe_load(self, worker: str, load: Load) -> None:
        try:
            self.view.update(MemberState(worker, load.queue_length, load.backlog_s, load.prefill_tok_per_s,
                                         load.decode_tok_per_s, 1.0, load.cached_blocks))
        except RoutingError as exc:  # a member publishing nonsense keeps its last sane load
            log.warning("ignoring the load published by %s: %s", worker, exc)

    async def _link_recv(self, node_id: str, dealer: AsyncDealer) -> None:
        """Answers from one member: relays for forwarded jobs, snapshots for our replica."""
        while True:
            frame = await dealer.recv()
            try:
                received = decode(frame)
            except WireError as exc:
                log.warning("bad frame from member %s: %s", node_id, exc)
                continue
            if self._keys.get(received.sender or b"") != node_id:
                continue
            msg = received.msg
            if isinstance(msg, TreeSnapshot):
                if msg.worker == node_id:
                    self.replica.apply_snapshot(msg, time.monotonic())
                continue
            self.replica.touch(node_id, time.monotonic())
            p = self.pending.get(getattr(msg, "request_id", ""))
            if p is None or p.target != node_id:
                continue
            p.last_heard = time.monotonic()
            self._relay(p, msg)

    def _relay(self, p: _Pending, msg: Message) -> None:
        rid = p.request.request_id
        if isinstance(msg, Accepted):
            if p.accepted_sent:
                return
            p.accepted_sent = True
        elif isinstance(msg, TokenChunk):
            if msg.index <= p.relayed_index and msg.token_ids:
                return
            p.relayed_index = max(p.relayed_index, msg.index)
        elif isinstance(msg, ErrorReply) and msg.code in REROUTE_CODES:
            self._reroute(p, msg.code)
            return
        elif isinstance(msg, (GenerateResult, ErrorReply)):
            self.pending.pop(rid, None)
        self.server.send(p.client, msg)

    # ---------------------------------------------------------------- upkeep
    def on_cache_events(self, inserted: list[tuple[bytes, ...]], evicted: list[tuple[bytes, ...]]) -> None:
        for chain in evicted:
            self.publisher.record_evict(chain)
        for chain in inserted:
            self.publisher.record_insert(chain)

    def _load(self) -> Load:
        ex = self.server.executor
        return Load(ex.load, ex.backlog_s, ex.prefill_rate or DEFAULT_PREFILL_TOK_PER_S,
                    ex.decode_rate or DEFAULT_DECODE_TOK_PER_S, len(self.publisher.current))

    async def _maintain(self) -> None:
        while True:
            now = time.monotonic()
            if now - self._last_refresh >= self.config.peer_refresh_s:
                self._last_refresh = now
                await self._refresh_links()
            if self.publisher.pending or now - self._last_publish >= self.config.heartbeat_s:
                # the full-tree baseline is counted at every publish: it would carry the load too
                self._publish(now)
            for request in self.replica.sync_requests(now):
                link = self.links.get(request.worker)
                if link is not None:
                    await link[1].send(encode(request, self.server.identity))
            self._judge(now)
            await asyncio.sleep(self.config.sync_interval_s)

    def _judge(self, now: float) -> None:
        """Drop members unheard for ``member_timeout_s`` (re-routing what they held) and re-route
        forwarded jobs silent for ``forward_timeout_s``."""
        for gone in self.replica.expire(now, self.config.member_timeout_s):
            self.view.remove(gone)
            for p in [p for p in self.pending.values() if p.target == gone]:
                self._reroute(p, "member expired")
        for p in [p for p in self.pending.values() if now - p.last_heard > self.config.forward_timeout_s]:
            self._reroute(p, f"silent for {self.config.forward_timeout_s:g} s")

    def _publish(self, now: float) -> None:
        self._last_publish = now
        delta, frame = self.publisher.publish(self._load())
        self.replica.apply_delta(delta, now)
        for _, dealer, _ in self.links.values():
            asyncio.ensure_future(dealer.send(frame))

    async def _refresh_links(self) -> None:
        try:
            peers = {p.node_id: p for p in self._peer_source() if p.node_id != self.me}
        except Exception as exc:  # a broken peer source must not stop sync
            log.warning("cannot read group peers: %s", exc)
            return
        for node_id in [n for n in self.links if n not in peers or self.links[n][0] != peers[n]]:
            await self._unlink(node_id)
        for node_id, peer in sorted(peers.items()):
            if node_id not in self.links:
                dealer = AsyncDealer(peer.endpoint)
                self.links[node_id] = (peer, dealer, asyncio.create_task(self._link_recv(node_id, dealer)))
                self._keys[peer.sign_key] = node_id
                log.info("group %s: linked to %s at %s", self.config.name, node_id, peer.endpoint)

    async def _unlink(self, node_id: str) -> None:
        peer, dealer, task = self.links.pop(node_id)
        self._keys.pop(peer.sign_key, None)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        dealer.close()
        self.view.remove(node_id)
        for p in [p for p in self.pending.values() if p.target == node_id]:  # its answers cannot arrive now
            self._reroute(p, "left the group's directory")
