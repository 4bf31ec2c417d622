"""A deterministic discrete-event network that drives N Tendermint engines in tests.

Time is virtual: a heap of (time, seq) events, message delays drawn from a seeded
``random.Random``. Each node carries out its engine's actions the way the devnet node will:
:class:`Broadcast` goes to every other node (after a delay, unless the ``link`` rule drops
it, sometimes twice when ``duplicate`` > 0), :class:`ScheduleTimeout` becomes a timer event,
:class:`Decide` is recorded and the next height started at once. A node that hears of a
height two or more beyond its own fetches the missing blocks and commits from a peer and
checks them with :func:`verify_commit` (block sync, as the node does it).

Byzantine nodes run an honest engine but equivocate on the wire: to each peer they
send (chosen at random per peer) the real message, a conflicting validly signed vote (or
proposal, when proposing), or both.
Crashed nodes never start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import random
from collections.abc import Callable

from permamesh.committee.devnet.tendermint import (
    Broadcast, Decide, Misbehaviour, ScheduleTimeout, Tendermint, TimeoutConfig,
)  # fmt: skip
from permamesh.committee.devnet.votes import (
    Evidence, Proposal, ValidatorSet, Vote, sign_proposal, sign_vote, verify_commit,
)  # fmt: skip
from permamesh.identity import SigningKey

CHAIN = "sim-chain"
KEYS = [SigningKey.from_private_bytes(hashlib.sha256(b"sim-key-%d" % i).digest()) for i in range(16)]


@dataclasses.dataclass
class SimNode:
    index: int
    key: SigningKey
    engine: Tendermint
    byzantine: bool = False
    crashed: bool = False
    decisions: dict[int, Decide] = dataclasses.field(default_factory=dict)
    synced: set[int] = dataclasses.field(default_factory=set)  # heights learnt by block sync
    evidence: list[Evidence] = dataclasses.field(default_factory=list)
    validated: list[bytes] = dataclasses.field(default_factory=list)  # hashes given to validate()
    proposed: int = 0

    @property
    def public_key(self) -> bytes:
        return self.key.public_bytes

    @property
    def honest(self) -> bool:
        return not (self.byzantine or self.crashed)


Link = Callable[[float, int, int, object], bool]  # (time, src, dst, message) -> delivered?


class Network:
    def __init__(
        self,
        n: int = 4,
        seed: int = 0,
        *,
        delay: tuple[float, float] = (0.001, 0.01),
        duplicate: float = 0.0,
        byzantine: tuple[int, ...] = (),
        crashed: tuple[int, ...] = (),
        powers: tuple[int, ...] | None = None,
        timeouts: TimeoutConfig = TimeoutConfig(),
        validate: Callable[[SimNode, int, bytes], bool] | None = None,
        link: Link | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.delay, self.duplicate, self.link = delay, duplicate, link
        self.validators = ValidatorSet.equal(k.public_bytes for k in KEYS[:n]) if powers is None else \
            ValidatorSet.from_powers({KEYS[i].public_bytes: p for i, p in enumerate(powers)})
        self.now, self._seq, self._events = 0.0, 0, []
        self.forks: list[tuple[int, bytes, bytes]] = []
        self.first_decision: dict[int, bytes] = {}
        self.messages_sent = 0
        self._validate = validate or (lambda node, height, block: True)
        self.nodes: list[SimNode] = []
        for i in range(n):
            node = SimNode(i, KEYS[i], engine=None, byzantine=i in byzantine, crashed=i in crashed)  # type: ignore[arg-type]
            node.engine = Tendermint(CHAIN, self.validators, KEYS[i], self._proposer_fn(node),
                                     self._validator_fn(node), timeouts)  # fmt: skip
            self.nodes.append(node)

    def _proposer_fn(self, node: SimNode) -> Callable[[int], bytes]:
        def propose(height: int) -> bytes:
            node.proposed += 1
            return b"block h=%d by=%d #%d" % (height, node.index, node.proposed)
        return propose

    def _validator_fn(self, node: SimNode) -> Callable[[int, bytes], bool]:
        def validate(height: int, block: bytes) -> bool:
            node.validated.append(hashlib.sha256(block).digest())
            return self._validate(node, height, block)
        return validate

    def node_of(self, public_key: bytes) -> SimNode:
        return next(n for n in self.nodes if n.public_key == public_key)

    # -------------------------------------------------------------------------- events

    def _push(self, at: float, kind: str, target: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, kind, target, payload))

    def start(self, height: int = 1) -> None:
        for node in self.nodes:
            if not node.crashed:
                self._apply(node, node.engine.start_height(height))

    def run(self, until: Callable[[], bool], max_time: float) -> bool:
        """Process events until ``until()`` holds (True) or virtual time passes ``max_time``."""
        while self._events and not until():
            at, _, kind, target, payload = heapq.heappop(self._events)
            if at > max_time:
                heapq.heappush(self._events, (at, 0, kind, target, payload))
                return False
            self.now = at
            node = self.nodes[target]
            if kind == "timeout":
                self._apply(node, node.engine.on_timeout(payload))
            else:
                self._sync_if_behind(node, payload)
                handler = node.engine.on_proposal if isinstance(payload, Proposal) else node.engine.on_vote
                self._apply(node, handler(payload))
        return until()

    def run_to_height(self, height: int, max_time: float = 600.0) -> bool:
        return self.run(lambda: all(height in n.decisions for n in self.nodes if n.honest), max_time)

    # -------------------------------------------------------------------------- actions

    def _apply(self, node: SimNode, actions: list) -> None:
        for action in actions:
            if isinstance(action, Broadcast):
                self._broadcast(node, action.message)
            elif isinstance(action, ScheduleTimeout):
                self._push(self.now + action.delay_s, "timeout", node.index, action.timeout)
            elif isinstance(action, Misbehaviour):
                node.evidence.append(action.evidence)
            elif isinstance(action, Decide):
                self._decided(node, action)
                self._apply(node, node.engine.start_height(action.height + 1))

    def _decided(self, node: SimNode, d: Decide) -> None:
        assert verify_commit(CHAIN, self.validators, d.height, d.block_hash, d.commit)
        node.decisions[d.height] = d
        if node.honest:
            first = self.first_decision.setdefault(d.height, d.block_hash)
            if first != d.block_hash:
                self.forks.append((d.height, first, d.block_hash))

    def _broadcast(self, node: SimNode, msg: Proposal | Vote) -> None:
        peers = [p for p in self.nodes if p is not node]
        for peer in peers:
            if not node.byzantine:
                self._send(node.index, peer.index, msg)
                continue
            choice = self.rng.choice(("real", "fake", "both"))
            if choice != "fake":
                self._send(node.index, peer.index, msg)
            if choice != "real":
                self._send(node.index, peer.index, self._conflicting(node, msg))

    def _conflicting(self, node: SimNode, msg: Proposal | Vote) -> Proposal | Vote:
        if isinstance(msg, Proposal):
            block = b"evil " + msg.block
            return sign_proposal(CHAIN, node.key, msg.height, msg.round, block, msg.pol_round)
        other = b"" if msg.block_hash else hashlib.sha256(b"evil %d %d" % (msg.height, msg.round)).digest()
        return sign_vote(CHAIN, node.key, msg.kind, msg.height, msg.round, other)

    def _send(self, src: int, dst: int, msg: object) -> None:
        if self.nodes[dst].crashed or self.nodes[src].crashed:
            return
        if self.link is not None and not self.link(self.now, src, dst, msg):
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            self.messages_sent += 1
            self._push(self.now + self.rng.uniform(*self.delay), "msg", dst, msg)

    def _sync_if_behind(self, node: SimNode, msg: Proposal | Vote) -> None:
        """Block sync: fetch decided blocks from a peer when ``msg`` is two heights ahead."""
        while msg.height > node.engine.height + 1:
            height = node.engine.height
            source = next((p for p in self.nodes if p.honest and height in p.decisions), None)
            if source is None:
                return
            d = source.decisions[height]
            assert verify_commit(CHAIN, self.validators, height, d.block_hash, d.commit)
            node.synced.add(height)
            self._decided(node, d)
            self._apply(node, node.engine.start_height(height + 1))
