"""DevnetNode: one validator of the embedded devnet, on one asyncio loop with zmq sockets.

The loop owns a ROUTER socket (peers' and clients' frames in, replies to clients out), a
CurveZMQ server with the validator's transport key (``NodeIdentity.transport``): its endpoint
is ``tcp://HOST:PORT?key=HEX``, and a client or peer that does not name that key never
completes the handshake. It also owns a DEALER to each other validator (consensus, gossip and
catch-up out, each to the key its peer entry names). It feeds every peer message to its
:class:`Tendermint`, carries out the actions it returns (send, set a timer, apply a decided
block through :class:`Chain`), keeps the mempool (``CheckTx`` on entry, ``CheckTx`` RECHECK of
what is left after each block), answers clients' ``SubmitTx`` (after commit when asked),
``QueryMsg`` (``Query``) and ``StatusMsg``.

Catch-up: a consensus message from a height above ours means we fell behind (we were down,
or missed a decision), so we ask that peer for the blocks we lack; each arrives with its
commit, which is verified vote by vote before the block is applied.

Byzantine mode ``equivocate`` (drills and tests only): every vote and proposal this node
signs has a conflicting twin; half the peers get each, and one peer gets both (in CometBFT
gossip would carry both to everyone), so the honest side has evidence.

Bounded memory: the ROUTER queues at most ``ROUTER_HWM`` frames to each peer and takes at
most as many from it before it is read (zmq high-water marks; TCP pushes back beyond that).
A reply to a client that does not read its replies is dropped and counted
(``dropped_replies``), never queued without end. A junk frame is decoded, refused and gone.
Heights asked for by a client are clamped to what the store holds. Status asks are answered
within a budget per peer and for all peers (:mod:`~permamesh.committee.devnet.askbudget`);
the rest are dropped and counted (``status_dropped``).

Who calls it: ``permamesh validator --engine devnet`` (:mod:`permamesh.committee.validator`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable

import zmq
import zmq.asyncio

from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.devnet import messages as m
from permamesh.committee.devnet.askbudget import AskBudget
from permamesh.committee.devnet.blocks import Block
from permamesh.committee.devnet.chain import Chain, decode_commit
from permamesh.committee.devnet.tendermint import (Broadcast, Decide, Misbehaviour,
                                                   ScheduleTimeout, Tendermint, TimeoutConfig)
from permamesh.committee.devnet.votes import Proposal, Vote, sign_proposal, sign_vote, verify_commit
from permamesh.committee.errors import CommitteeError, ProtocolError
from permamesh.identity import KeyExchangeKey, NodeIdentity
from permamesh.transport import OPEN_SOCKETS, AsyncDealer, TransportError, with_key
from permamesh.wire.codec import MAX_FRAME_BYTES, Message, WireError, decode, encode

log = logging.getLogger(__name__)

_PEER_MSGS = (m.ProposalMsg, m.VoteMsg, m.TxsMsg, m.BlocksRequest, m.BlocksReply)
MAX_MEMPOOL = 50_000
SYNC_BATCH = 50  # blocks per catch-up reply
ROUTER_HWM = 256  # frames queued to (and from) one peer before zmq drops (or stops reading)
STATUS_SPAN = 1000  # app hashes per status answer


class PeerRouter:
    """The node's ROUTER: bounded queues per peer and sends that never wait.

    Like :class:`permamesh.transport.RouterServer` (a CurveZMQ server when given
    ``secret_key``), plus high-water marks set before binding (zmq copies them into each
    accepted connection) and ``ROUTER_MANDATORY``, so a send to a peer whose queue is full, or
    who left, fails at once: the frame is dropped and counted. Only the event-loop thread that
    created it may use it."""

    def __init__(self, host: str, port: int, hwm: int = ROUTER_HWM,
                 secret_key: KeyExchangeKey | None = None) -> None:
        self._sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        OPEN_SOCKETS.add(self._sock)
        for option, value in ((zmq.LINGER, 0), (zmq.MAXMSGSIZE, MAX_FRAME_BYTES + 1024),
                              (zmq.SNDHWM, hwm), (zmq.RCVHWM, hwm), (zmq.ROUTER_MANDATORY, 1)):
            self._sock.setsockopt(option, value)
        if secret_key is not None:
            self._sock.curve_server = True
            self._sock.curve_secretkey = secret_key.private_bytes()
        try:
            if port:
                self._sock.bind(f"tcp://{host}:{port}")
            else:
                self._sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as exc:
            self._sock.close(0)
            raise TransportError(f"cannot bind tcp://{host}:{port}: {exc}") from None
        self.endpoint: str = with_key(self._sock.getsockopt_string(zmq.LAST_ENDPOINT),
                                      secret_key.public_bytes if secret_key is not None else None)
        self.dropped = 0  # frames not sent: the peer's queue was full, or the peer had gone

    async def recv(self) -> tuple[bytes, bytes | None]:
        parts = await self._sock.recv_multipart(copy=True)
        return parts[0], (parts[1] if len(parts) == 2 else None)

    def send(self, peer: bytes, frame: bytes) -> bool:
        """Queue ``frame`` to ``peer`` without waiting; False (and counted) when it was dropped.

        On a ``zmq.asyncio`` socket a NOBLOCK send does not raise: it returns a Future that
        already holds the outcome (EAGAIN: queue full; EHOSTUNREACH: peer gone). We read it,
        so the drop is counted and no failed Future is left for asyncio to log with a traceback
        (found by tests/test_fuzz_ports.py: one traceback per reply to a peer that had left)."""
        try:
            sent = self._sock.send_multipart([peer, frame], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            return self._outcome(peer, exc)
        if not sent.done():  # queued behind an earlier send: its outcome comes later
            sent.add_done_callback(lambda f: self._outcome(peer, None if f.cancelled() else f.exception()))
            return True
        return self._outcome(peer, None if sent.cancelled() else sent.exception())

    def _outcome(self, peer: bytes, exc: BaseException | None) -> bool:
        if exc is None:
            return True
        self.dropped += 1
        if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, ...: a line, not a flood
            log.info("dropped a reply to %s (%s); %d dropped so far", peer.hex()[:16], exc, self.dropped)
        return False

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(0)


@dataclasses.dataclass(frozen=True)
class NodeOptions:
    host: str = "127.0.0.1"
    port: int = 0
    peers: tuple[tuple[bytes, str], ...] = ()  # the others: (validator key, endpoint with its transport key)
    timeouts: TimeoutConfig = TimeoutConfig()
    timeout_commit_s: float = 0.05  # pause after a commit before the next height starts
    empty_interval_s: float = 0.25  # the pause when the mempool is empty (a tx cuts it short)
    byzantine: str = ""  # "" or "equivocate"


class DevnetNode:
    def __init__(self, chain: Chain, identity: NodeIdentity, options: NodeOptions) -> None:
        self.chain, self.ident, self.options = chain, identity, options
        genesis = chain.genesis
        self.vset = genesis.validator_set()
        self.tm = Tendermint(genesis.chain_id, self.vset, identity, self._propose,
                             chain.validate, options.timeouts)
        self.endpoint: str | None = None
        self.mempool: OrderedDict[bytes, bytes] = OrderedDict()
        self._waiters: dict[bytes, list[tuple[bytes, int]]] = {}
        self._dealers: dict[bytes, AsyncDealer] = {}
        self._router: PeerRouter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sync_asked = 0.0
        self._start_timer: asyncio.TimerHandle | None = None  # the pause before the next height
        self._gossip: list[bytes] = []  # txs admitted from clients, not yet sent to peers
        self.misbehaviour = 0
        self.status_budget = AskBudget()

    # ------------------------------------------------------------------------ lifecycle

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[str], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.chain.handshake()
        self._router = PeerRouter(self.options.host, self.options.port, secret_key=self.ident.transport)
        self.endpoint = self._router.endpoint
        self._dealers = {key: AsyncDealer(ep) for key, ep in self.options.peers}
        recv = asyncio.create_task(self._recv_loop())
        try:
            self._run(self.tm.start_height(self.chain.height + 1))
            if on_ready is not None:
                on_ready(self.endpoint)
            await stop.wait()
        finally:
            recv.cancel()
            await asyncio.gather(recv, return_exceptions=True)
            for dealer in self._dealers.values():
                dealer.close()
            self._router.close()

    # ------------------------------------------------------------------------ consensus

    def _propose(self, height: int) -> bytes:
        return self.chain.propose(height, list(self.mempool.values()), int(time.time() * 1000))

    def _run(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, Broadcast):
                self._broadcast(action.message)
            elif isinstance(action, ScheduleTimeout):
                self._loop.call_later(action.delay_s, self._timeout, action.timeout)
            elif isinstance(action, Decide):
                self._decide(action)
            elif isinstance(action, Misbehaviour):
                self.misbehaviour += 1
                log.warning("equivocation by %s at height %d",
                            action.evidence.vote_a.validator.hex()[:16], action.evidence.vote_a.height)

    def _timeout(self, timeout) -> None:
        self._run(self.tm.on_timeout(timeout))

    def _broadcast(self, msg: Proposal | Vote) -> None:
        frames = [self._frame(msg)]
        if self.options.byzantine == "equivocate":
            frames.append(self._frame(self._twin(msg)))
        for i, dealer in enumerate(self._dealers.values()):
            self._send(dealer, frames[i * len(frames) // max(1, len(self._dealers))])
            if i == 0 and len(frames) > 1:  # one peer sees both, as gossip would ensure
                self._send(dealer, frames[1])

    def _frame(self, msg: Proposal | Vote) -> bytes:
        wrapped = m.ProposalMsg(msg) if isinstance(msg, Proposal) else m.VoteMsg(msg)
        return encode(wrapped, self.ident)

    def _twin(self, msg: Proposal | Vote) -> Proposal | Vote:
        chain_id = self.chain.genesis.chain_id
        if isinstance(msg, Vote):
            other = b"" if msg.block_hash else os.urandom(32)
            return sign_vote(chain_id, self.ident, msg.kind, msg.height, msg.round, other)
        block = self.chain.propose(msg.height, [], int(time.time() * 1000) + 1)
        return sign_proposal(chain_id, self.ident, msg.height, msg.round, block, msg.pol_round)

    def _send(self, dealer: AsyncDealer, frame: bytes) -> None:
        self._loop.create_task(dealer.send(frame))

    def _decide(self, d: Decide) -> None:
        if d.height != self.chain.height + 1:
            return
        self._apply(d.height, d.block, d.round, d.commit)
        pause = self.options.timeout_commit_s if self.mempool else self.options.empty_interval_s
        self._start_timer = self._loop.call_later(pause, self._next_height, d.height + 1)

    def _next_height(self, height: int) -> None:
        self._start_timer = None
        if self.chain.height + 1 == height and self.tm.height < height:
            self._run(self.tm.start_height(height))

    def _hurry(self) -> None:
        """A tx arrived while we wait out an empty pause: start the next height now."""
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._loop.call_soon(self._next_height, self.chain.height + 1)
            self._start_timer = None

    def _apply(self, height: int, raw: bytes, round_: int, commit: tuple[Vote, ...]) -> None:
        block = self.chain.apply(height, raw, round_, commit)
        for tx in block.txs:
            key = Block.hash_of(tx)
            self.mempool.pop(key, None)
            for peer, ref in self._waiters.pop(key, []):
                code, log_, h = self.chain.tx_results[key]
                self._reply(peer, m.TxAck(ref, code, log_, h, True))
        for key, tx in list(self.mempool.items()):
            resp = self.chain.client.check_tx(pb.RequestCheckTx(tx=tx, type=pb.RECHECK))
            if resp.code:
                self.mempool.pop(key)
                for peer, ref in self._waiters.pop(key, []):
                    self._reply(peer, m.TxAck(ref, resp.code, resp.log, 0, False))

    # ------------------------------------------------------------------------ receiving

    async def _recv_loop(self) -> None:
        """Take frames one at a time and yield to the loop after each: a recv that finds a frame
        waiting does not, so a peer that keeps the ROUTER busy would starve timers (the next
        height's start) and the sends to peers, and commits would stop while it sends."""
        while True:
            peer, frame = await self._router.recv()
            await asyncio.sleep(0)
            if frame is None:
                continue
            try:
                received = decode(frame)
                self._handle(peer, received.msg, received.sender)
            except (WireError, ProtocolError) as exc:
                log.debug("dropped a frame: %s", exc)
            except Exception:  # one bad message must never stop the validator
                log.exception("error handling %s", type(locals().get("received")).__name__)

    def _handle(self, peer: bytes, msg: Message, sender: bytes) -> None:
        if isinstance(msg, _PEER_MSGS):
            if sender not in self.vset:
                raise ProtocolError("validator message from a non-validator")
            if isinstance(msg, m.ProposalMsg):
                self._maybe_sync(sender, msg.proposal.height)
                self._run(self.tm.on_proposal(msg.proposal))
            elif isinstance(msg, m.VoteMsg):
                self._maybe_sync(sender, msg.vote.height)
                self._run(self.tm.on_vote(msg.vote))
            elif isinstance(msg, m.TxsMsg):
                for tx in msg.txs[:MAX_MEMPOOL]:
                    self._admit(tx)
            elif isinstance(msg, m.BlocksRequest):
                self._serve_blocks(sender, msg.from_height)
            else:
                self._sync(msg.blocks)
        elif isinstance(msg, m.SubmitTx):
            self._submit(peer, msg)
        elif isinstance(msg, m.QueryMsg):
            resp = self.chain.client.query(pb.RequestQuery(path=msg.path, data=msg.data))
            self._reply(peer, m.QueryAnswer(msg.ref, resp.code, resp.log, resp.value, resp.height))
        elif isinstance(msg, m.StatusMsg) and self.status_budget.allow(peer):
            height = self.chain.height
            first = min(max(1, msg.first), height + 1)  # heights beyond ours hold nothing
            last = min(msg.last, first + STATUS_SPAN - 1, height)
            hashes = self.chain.store.app_hashes(first, last) if msg.last and first <= last else []
            self._reply(peer, m.StatusAnswer(msg.ref, self.chain.height, self.chain.app_hash,
                                             tuple(h for h, _ in hashes),
                                             tuple(a for _, a in hashes), len(self.mempool),
                                             self.misbehaviour, self.status_budget.dropped))

    @property
    def dropped_replies(self) -> int:
        """Replies dropped because the client's queue was full or it had gone."""
        return 0 if self._router is None else self._router.dropped

    def _reply(self, peer: bytes, msg: Message) -> None:
        self._router.send(peer, encode(msg, self.ident))

    def _admit(self, tx: bytes) -> pb.ResponseCheckTx | None:
        key = Block.hash_of(tx)
        if key in self.mempool or len(self.mempool) >= MAX_MEMPOOL:
            return None
        resp = self.chain.client.check_tx(pb.RequestCheckTx(tx=tx, type=pb.NEW))
        if resp.code == 0:
            self.mempool[key] = tx
            self._hurry()
        return resp

    def _submit(self, peer: bytes, msg: m.SubmitTx) -> None:
        key = Block.hash_of(msg.tx)
        if key in self.chain.tx_results:
            code, log_, h = self.chain.tx_results[key]  # a replay: the first outcome again
            return self._reply(peer, m.TxAck(msg.ref, code, f"already committed at height {h}; "
                                             f"{log_}".rstrip("; "), h, True))
        resp = self._admit(msg.tx)
        if resp is None and key not in self.mempool:
            return self._reply(peer, m.TxAck(msg.ref, 20, "mempool is full", 0, False))
        if resp is not None and resp.code:
            return self._reply(peer, m.TxAck(msg.ref, resp.code, resp.log, 0, False))
        if resp is not None:
            if not self._gossip:
                self._loop.call_soon(self._flush_gossip)
            self._gossip.append(msg.tx)
        if msg.wait_commit:
            self._waiters.setdefault(key, []).append((peer, msg.ref))
        else:
            self._reply(peer, m.TxAck(msg.ref, 0, "", 0, False))

    def _flush_gossip(self) -> None:
        """Send the txs admitted since the last flush to every peer in one frame."""
        batch, self._gossip = self._gossip, []
        for start in range(0, len(batch), 1000):
            frame = encode(m.TxsMsg(tuple(batch[start:start + 1000])), self.ident)
            for dealer in self._dealers.values():
                self._send(dealer, frame)

    # ------------------------------------------------------------------------ catch-up

    def _maybe_sync(self, sender: bytes, height: int) -> None:
        now = time.monotonic()
        if height > self.chain.height + 1 and now - self._sync_asked > 0.3 and sender in self._dealers:
            self._sync_asked = now
            self._send(self._dealers[sender],
                       encode(m.BlocksRequest(self.chain.height + 1), self.ident))

    def _serve_blocks(self, sender: bytes, first: int) -> None:
        blocks, size = [], 0
        first = max(1, first)
        for height in range(first, min(self.chain.height, first + SYNC_BATCH - 1) + 1):
            raw, round_, commit = self.chain.store.get(height)
            size += len(raw)
            if size > 2 * 1024 * 1024 and blocks:
                break
            blocks.append(m.CommittedBlock(height, raw, round_, decode_commit(commit)))
        if blocks and sender in self._dealers:
            self._send(self._dealers[sender], encode(m.BlocksReply(tuple(blocks)), self.ident))

    def _sync(self, blocks: tuple[m.CommittedBlock, ...]) -> None:
        applied = 0
        for cb in sorted(blocks, key=lambda b: b.height):
            if cb.height != self.chain.height + 1:
                continue
            chain_id = self.chain.genesis.chain_id
            if not verify_commit(chain_id, self.vset, cb.height, Block.hash_of(cb.block), cb.commit):
                log.warning("catch-up block %d has no valid commit; ignored", cb.height)
                return
            if Block.decode(cb.block).last_app_hash != self.chain.app_hash:
                raise CommitteeError(f"block {cb.height} was decided on an app hash we do not "
                                     "have: our state diverged from the committee")
            self._apply(cb.height, cb.block, cb.round, cb.commit)
            applied += 1
        if applied:
            log.info("caught up to height %d", self.chain.height)
            self._sync_asked = 0.0
            self._run(self.tm.start_height(self.chain.height + 1))
