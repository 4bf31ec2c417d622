"""Routing policies: which member of a worker group answers one request.

An entry worker (:mod:`permamesh.workers.group`) and the simulator (:mod:`permamesh.bench.sim`)
look a request's block chain up in the group's hash-radix tree (``matched = tree.match(chain)``:
blocks held per worker), take the members' loads from their
:class:`~permamesh.routing.view.GroupView`, and ask a :class:`Policy` (:func:`make_policy`) for
one worker id. Everything here is pure: no I/O, no clock; seeded policies are deterministic
given their seed.

:class:`PermameshPolicy` picks the eligible member (reputation at or above a floor) with the
smallest estimated time to first token (:func:`estimate_ttft_s`): its queued work plus the
prefill of what it does not hold. The baselines are what other systems ship: random,
round-robin, least-loaded, and :class:`CacheAwarePolicy` after the SGLang gateway.

Traps :class:`PermameshPolicy` guards against:

(a) *A hot prefix is not a magnet.* A popular system prompt held by one worker would pull all
    traffic onto it if routing looked at matches alone. The estimate charges the holder's
    backlog, so it wins only while its queue is shorter than the prefill it saves. Published
    loads are up to one sync interval old, so a burst could still pile up before the holder's
    next report: :meth:`GroupView.assign <permamesh.routing.view.GroupView.assign>` adds the
    router's own assignments to a member's load until a report includes them.
(b) *No death spiral.* A miss costs the same prefill tokens everywhere, so its estimates
    differ only by backlog (and speed): misses go to the least-loaded eligible member, never
    to an overloaded one (which would slow it further, evict its cache, and turn its hits
    into misses). Baselines that send misses by cache size alone (SGLang's) can spiral.
(c) *No herd.* Members whose estimates tie (idle ones do) are drawn from with the seeded
    generator, so routers with equally stale views do not all pick the lowest worker id.
(d) *Tree lag.* The tree learns what a worker holds only after it cached it (and the delta
    synced). The policy remembers each session's last request (bounded LRU) and credits its
    worker with that chain when the new prompt extends it; it keeps the session there while
    its estimate is within ``affinity_slack_rel`` / ``affinity_slack_s`` of the best, since
    blocks never capture the latest partial block.
(e) *Decoding is shared.* Real workers schedule per step, so a member's backlog counts only
    the prefills queued ahead, and a member already decoding many answers looks free. With
    ``decode_share_weight`` w > 0 the score adds ``w * max_tokens * load / decode rate``: the
    time the new answer's decode would be stretched by the ``load`` jobs it shares the member
    with (and they by it). The simulator models FIFO workers, whose backlog already holds the
    decodes, so it uses w = 0.
"""

from __future__ import annotations

import logging
import random
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from permamesh.routing.errors import RoutingError

log = logging.getLogger(__name__)

PER_REQUEST_OVERHEAD_S = 0.01  # fixed cost of any request (scheduling, first step)
CACHED_SPEEDUP = 40.0  # a cached prompt token costs 1/40 of an uncached one (measured: 39x)


@dataclass(frozen=True)
class MemberState:
    """One group member's published load and speed."""

    worker: str
    queue_length: int  # waiting + running requests
    backlog_s: float  # estimated seconds of work queued at the member
    prefill_tok_per_s: float  # measured uncached prefill rate
    decode_tok_per_s: float  # measured decode rate
    reputation: float = 1.0  # committee score in [0, 1]
    cached_blocks: int = 0  # blocks it holds (the cache-aware baseline's "tree size")


@dataclass(frozen=True)
class RouteQuery:
    """What routing knows about one request: never its text."""

    chain: tuple[bytes, ...]  # block digests of the prompt
    prompt_tokens: int
    max_tokens: int
    block_size: int  # tokens per block
    session: str | None = None


def _prefill_s(query: RouteQuery, member: MemberState, matched_blocks: int) -> float:
    cached = min(max(matched_blocks, 0) * query.block_size, query.prompt_tokens)
    uncached = query.prompt_tokens - cached
    rate = member.prefill_tok_per_s
    return PER_REQUEST_OVERHEAD_S + (uncached + cached / CACHED_SPEEDUP) / rate


def estimate_prefill_s(query: RouteQuery, member: MemberState, matched_blocks: int) -> float:
    """Seconds of prefill the request costs on ``member`` (its uncached part, the cached part
    at :data:`CACHED_SPEEDUP` times the rate, and the fixed overhead)."""
    return _prefill_s(query, member, matched_blocks)


def estimate_ttft_s(query: RouteQuery, member: MemberState, matched_blocks: int) -> float:
    """Seconds to the first token on ``member``: its backlog, the fixed per-request overhead,
    the uncached prefill, and the cached part at :data:`CACHED_SPEEDUP` times the rate."""
    return member.backlog_s + _prefill_s(query, member, matched_blocks)


def estimate_work_s(query: RouteQuery, member: MemberState, matched_blocks: int) -> float:
    """Seconds of work the request adds to ``member``'s backlog: prefill plus decode."""
    return _prefill_s(query, member, matched_blocks) + query.max_tokens / member.decode_tok_per_s


Members = Sequence[MemberState]
Matched = Mapping[str, int]  # worker -> leading blocks of the query's chain it holds


class Policy(ABC):
    """Chooses one member for a request; ``matched`` maps worker -> leading blocks of
    ``query.chain`` it holds, ``members`` come from a
    :class:`~permamesh.routing.view.GroupView`."""

    name: str = ""

    @abstractmethod
    def choose(self, query: RouteQuery, members: Members, matched: Matched) -> str:
        """The chosen worker id; RoutingError if no member is eligible."""


def _need(members: Members) -> Members:
    if not members:
        raise RoutingError("no member to route to")
    return members


class RandomPolicy(Policy):
    """A uniformly random member (seeded). Like all baselines, it ignores reputation."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, query: RouteQuery, members: Members, matched: Matched) -> str:
        return self._rng.choice(_need(members)).worker


class RoundRobinPolicy(Policy):
    """The next member in worker-id order, starting at ``start``."""

    name = "round-robin"

    def __init__(self, start: int = 0) -> None:
        self._next = start

    def choose(self, query: RouteQuery, members: Members, matched: Matched) -> str:
        ordered = sorted(_need(members), key=lambda m: m.worker)
        self._next += 1
        return ordered[(self._next - 1) % len(ordered)].worker


class LeastLoadedPolicy(Policy):
    """The smallest backlog; ties by queue length, then worker id. Ignores the cache."""

    name = "least-loaded"

    def choose(self, query: RouteQuery, members: Members, matched: Matched) -> str:
        return min(_need(members), key=lambda m: (m.backlog_s, m.queue_length, m.worker)).worker


class CacheAwarePolicy(Policy):
    """The SGLang gateway's cache-aware policy, loads counted in requests.

    If the group is imbalanced (``max - min > balance_abs`` and ``max > balance_rel * min``
    queue length) the shortest queue wins. Otherwise the longest match wins if it covers more
    than ``cache_threshold`` of the prompt; below that, the member holding the fewest blocks
    (most free cache). Ties: shorter queue, then worker id.
    """

    name = "cache-aware"

    def __init__(
        self, cache_threshold: float = 0.5, balance_abs: int = 32, balance_rel: float = 1.5
    ) -> None:
        self.cache_threshold = cache_threshold  # share of the prompt
        self.balance_abs, self.balance_rel = balance_abs, balance_rel  # requests, ratio

    def choose(self, query: RouteQuery, members: Members, matched: Matched) -> str:
        loads = [m.queue_length for m in _need(members)]
        hi, lo = max(loads), min(loads)
        if hi - lo > self.balance_abs and hi > self.balance_rel * lo:
            return min(members, key=lambda m: (m.queue_length, m.worker)).worker
        best = min(members, key=lambda m: (-matched.get(m.worker, 0), m.queue_length, m.worker))
        cached = min(matched.get(best.worker, 0) * query.block_size, query.prompt_tokens)
        if cached > self.cache_threshold * query.prompt_tokens:
            return best.worker
        return min(members, key=lambda m: (m.cached_blocks, m.queue_length, m.worker)).worker


class PermameshPolicy(Policy):
    """The smallest estimated TTFT among members with reputation >= ``reputation_floor``,
    with seeded tie-breaking and session memory (see the module docstring)."""

    name = "permamesh"

    def __init__(
        self,
        seed: int = 0,
        reputation_floor: float = 0.3,  # PlanetServe: untrusted below 0.3
        affinity_slack_rel: float = 0.10,  # keep a session's worker within +10% ...
        affinity_slack_s: float = 0.05,  # ... + 50 ms of the best estimate
        tie_s: float = 0.001,  # estimates this close are ties
        max_sessions: int = 65536,  # sessions remembered (LRU)
        decode_share_weight: float = 0.0,  # trap (e): 0 for FIFO members
    ) -> None:
        if decode_share_weight < 0:
            raise RoutingError("decode_share_weight must be >= 0")
        self.decode_share_weight = decode_share_weight
        self._rng = random.Random(seed)
        self.reputation_floor, self.tie_s = reputation_floor, tie_s
        self.max_sessions = max_sessions
        self.affinity_slack_rel, self.affinity_slack_s = affinity_slack_rel, affinity_slack_s
        # session -> (worker, blocks, last digest) of its last request
        self._sessions: OrderedDict[str, tuple[str, int, bytes]] = OrderedDict()

    def choose(self, query: RouteQuery, members: Members, matched: Matched) -> str:
        floor, session, chain = self.reputation_floor, query.session, query.chain
        last = self._sessions.get(session) if session is not None else None
        credit = dict(matched)
        if last is not None and 0 < last[1] <= len(chain) and chain[last[1] - 1] == last[2]:
            credit[last[0]] = max(credit.get(last[0], 0), last[1])  # trap (d)
        overhead, tokens = PER_REQUEST_OVERHEAD_S, query.prompt_tokens + 0.0
        scored = [  # estimate_ttft_s, inlined for members holding nothing (most of them)
            (
                estimate_ttft_s(query, m, credit[m.worker])
                if m.worker in credit
                else m.backlog_s + (overhead + tokens / m.prefill_tok_per_s),
                m.worker,
            )
            for m in members
            if m.reputation >= floor
        ]
        if self.decode_share_weight > 0:
            w, rates = self.decode_share_weight * query.max_tokens, {m.worker: m for m in members}
            scored = [(s + w * rates[wk].queue_length / rates[wk].decode_tok_per_s, wk) for s, wk in scored]
        if not scored:
            raise RoutingError(f"no member has reputation >= {floor} (of {len(members)})")
        best = min(score for score, _ in scored)
        ties = [worker for score, worker in scored if score <= best + self.tie_s]
        pick = ties[0] if len(ties) == 1 else self._rng.choice(ties)
        if session is None:
            return pick
        if last is not None and last[0] != pick:
            limit = best * (1 + self.affinity_slack_rel) + self.affinity_slack_s
            if any(worker == last[0] and score <= limit for score, worker in scored):
                log.debug("session %s stays on %s within the slack", session, last[0])
                pick = last[0]
        self._sessions[session] = (pick, len(chain), chain[-1] if chain else b"")
        self._sessions.move_to_end(session)
        if len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return pick


POLICY_NAMES = ("random", "round-robin", "least-loaded", "cache-aware", "permamesh")


def make_policy(name: str, seed: int = 0, decode_share_weight: float = 0.0) -> Policy:
    """A fresh policy by name (one of :data:`POLICY_NAMES`); ``seed`` seeds random draws and
    tie-breaking, and offsets round-robin's start; ``decode_share_weight`` is
    :class:`PermameshPolicy`'s trap (e) weight (0 for FIFO members, as in the simulator)."""
    factories = {
        "random": lambda: RandomPolicy(seed),
        "round-robin": lambda: RoundRobinPolicy(start=seed),
        "least-loaded": LeastLoadedPolicy,
        "cache-aware": CacheAwarePolicy,
        "permamesh": lambda: PermameshPolicy(seed=seed, decode_share_weight=decode_share_weight),
    }
    if name not in factories:
        raise RoutingError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
    return factories[name]()
