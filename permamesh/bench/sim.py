"""A discrete-event simulation of one worker group serving a trace through a routing policy.

:mod:`permamesh.bench.routing` (``permamesh bench routing --mode sim``) calls :func:`simulate`:
it routes every request with the real :mod:`permamesh.routing.policy` code and returns one
:class:`~permamesh.bench.stats.RequestRecord` per request. The model of the group:

- *Workers* are FIFO servers, one request at a time, like the engine thread. A request costs
  ``per_request_overhead_s`` + uncached prompt tokens at ``prefill_tok_per_s`` + cached ones
  at ``cached_prefill_tok_per_s`` (TTFT = queue wait + that) + ``max_tokens`` at
  ``decode_tok_per_s`` (e2e = TTFT + decode), all scaled by the worker's speed multiplier.
  The defaults are measured: SmolLM2-135M on CPU prefills 2,183 tokens in 5.9 s, reuses a
  2,169-token prefix in ~0.15 s and decodes ~50 tokens/s.
- *Caches*: when a request finishes, its worker holds the prompt's full blocks and, with
  ``cache_answers``, the blocks of its answer (the model is taken to have said what the
  session's next turn quotes). Beyond ``cache_blocks_per_worker`` a worker evicts its least
  recently used blocks down to 90% of capacity, as engines free pages in batches. The cached
  part of a prompt is what the worker actually holds when the request *starts*.
- *Routing*: with ``entry="random"`` every request enters the group at a random worker, which
  routes it with its own policy instance and its own :class:`GroupView`; with
  ``entry="central"`` one router sees everything (the SGLang-gateway deployment). Members
  publish their load every ``sync_interval_s`` (0: before every arrival); between reports a
  router knows only its own assignments (optimistically added) and the completions of the
  requests it routed (answers pass back through the entry worker). The hash-radix tree
  replica is shared and exact for simplicity: delta-sync lag is not modelled.
- *Block names*: instead of BlockHasher digests the simulator interns (previous block, tokens)
  pairs to integers: exact (equal prefixes, equal names, no collisions) and cheaper.
- *Tokens*: :func:`~permamesh.bench.tokens.word_tokenizer` (:mod:`permamesh.bench.tokens`,
  re-exported here) is a fast stand-in (words and punctuation hashed to ids, about 1.3 per
  word) over :func:`~permamesh.bench.tokens.chat_text`, a ChatML rendering; pass a real
  tokenizer's ``encode`` wrapped as ``tokenize`` to use it instead.

Everything is deterministic given ``seed``. Events live in a heap; a request costs
O(prompt blocks + workers), plus the tree's LRU eviction when a cache overflows.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from permamesh.bench.stats import RequestRecord
from permamesh.bench.tokens import chat_text, tokenize_text, word_tokenizer  # re-exported
from permamesh.bench.traces import BenchError, TraceRequest
from permamesh.routing.errors import RoutingError
from permamesh.routing.hrtree import HashRadixTree
from permamesh.routing.view import GroupView
from permamesh.routing.policy import (
    POLICY_NAMES,
    MemberState,
    RouteQuery,
    estimate_work_s,
    make_policy,
)

log = logging.getLogger(__name__)

Tokenizer = Callable[[TraceRequest], list[int]]

# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    """One simulated group (see the module docstring)."""

    workers: int
    policy: str  # one of permamesh.routing.policy.POLICY_NAMES
    block_size: int = 16  # tokens per block
    prefill_tok_per_s: float = 370.0  # uncached prompt tokens per second
    cached_prefill_tok_per_s: float = 15000.0  # cached prompt tokens per second
    decode_tok_per_s: float = 50.0
    per_request_overhead_s: float = 0.01
    cache_blocks_per_worker: int = 4096  # LRU capacity, blocks
    cache_answers: bool = True
    sync_interval_s: float = 0.1  # how often members publish their load (0: always fresh)
    entry: str = "random"  # "random" or "central"
    seed: int = 0
    speeds: tuple[float, ...] = ()  # per-worker speed multipliers, cycled; () = all 1.0
    reputations: tuple[float, ...] = ()  # per-worker reputations, cycled; () = all 1.0

    def __post_init__(self) -> None:
        bad = [
            name
            for name, ok in (
                ("workers >= 1", self.workers >= 1),
                (f"policy in {POLICY_NAMES}", self.policy in POLICY_NAMES),
                ("entry 'random' or 'central'", self.entry in ("random", "central")),
                ("block_size >= 1", self.block_size >= 1),
                ("rates > 0", min(self.prefill_tok_per_s, self.cached_prefill_tok_per_s,
                                  self.decode_tok_per_s) > 0),
                ("cache_blocks_per_worker >= 0", self.cache_blocks_per_worker >= 0),
                ("times >= 0", min(self.per_request_overhead_s, self.sync_interval_s) >= 0),
                ("speeds > 0", all(s > 0 for s in self.speeds)),
                ("reputations in [0, 1]", all(0 <= r <= 1 for r in self.reputations)),
            )
            if not ok
        ]
        if bad:
            raise BenchError(f"bad SimConfig {self!r}: need {', '.join(bad)}")


# -- the simulation -------------------------------------------------------------------------

_FINISH, _TICK, _ARRIVAL = 0, 1, 2  # event kinds, in the order they run at one instant


class _Namer:
    """Names full blocks by interning ``(previous name, block tokens)``: exact prefix names."""

    def __init__(self, block_size: int) -> None:
        self._size = block_size
        self._ids: dict[tuple[int, tuple[int, ...]], int] = {}
        self._names: list[bytes] = [b""]

    def chain(self, tokens: Sequence[int], known: tuple[bytes, ...] = ()) -> tuple[bytes, ...]:
        """The names of every full block of ``tokens``, given the names of its first blocks."""
        ids, names, size = self._ids, self._names, self._size
        previous = int.from_bytes(known[-1], "little") if known else 0
        out = list(known)
        for start in range(len(known) * size, len(tokens) - size + 1, size):
            key = (previous, tuple(tokens[start : start + size]))
            previous = ids.get(key, 0)
            if not previous:
                previous = ids[key] = len(names)
                names.append(previous.to_bytes(8, "little"))
            out.append(names[previous])
        return tuple(out)


@dataclass
class _Worker:
    name: str
    speed: float  # multiplier of every rate
    reputation: float
    queue: deque[tuple[int, int, float]] = field(default_factory=deque)  # request, router, work
    busy: bool = False
    tail: float = 0.0  # when all its assigned work is expected to be done
    unfinished: int = 0
    held: int = 0  # blocks in its cache
    dirty: bool = False  # changed since it last published
    stamp: int = 0  # the tick it last published at


class _Run:
    """One simulation: the event loop's state and handlers."""

    def __init__(self, trace: Sequence[TraceRequest], c: SimConfig, tokenize: Tokenizer) -> None:
        self.trace, self.c, self.tokenize = trace, c, tokenize
        cycle = lambda values, k: values[k % len(values)] if values else 1.0  # noqa: E731
        width = max(3, len(str(c.workers - 1)))
        self.workers = [
            _Worker(f"w{k:0{width}d}", cycle(c.speeds, k), cycle(c.reputations, k))
            for k in range(c.workers)
        ]
        self.index = {w.name: k for k, w in enumerate(self.workers)}
        routers = c.workers if c.entry == "random" else 1
        self.policies = [make_policy(c.policy, seed=c.seed * 1_000_003 + e) for e in range(routers)]
        self.views = [GroupView(check=False) for _ in range(routers)]
        self.seen = [[-1] * c.workers for _ in range(routers)]  # stamps each view took
        self.synced = [-1] * routers  # the tick each view last caught up with
        self.tree, self.namer = HashRadixTree(), _Namer(c.block_size)
        self.rng = random.Random(c.seed)  # entry points
        self.tick, self.seq = 0, len(trace)
        self.published = [self.state(w, 0.0) for w in self.workers]
        self.chains: dict[int, tuple[tuple[bytes, ...], int]] = {}  # request -> names, tokens
        self.recent: dict[str, tuple[list[int], tuple[bytes, ...]]] = {}  # session -> last
        self.inflight: dict[int, tuple[_Worker, int, float, float, float, int]] = {}
        self.records: list[RequestRecord | None] = [None] * len(trace)
        self.order = sorted(range(len(trace)), key=lambda i: (trace[i].t, i))
        self.following: dict[int, int] = {}  # request -> its session's next request
        last: dict[str, int] = {}
        for i in self.order:
            if trace[i].session in last:
                self.following[last[trace[i].session]] = i
            last[trace[i].session] = i

    def chain_of(self, i: int) -> tuple[tuple[bytes, ...], int]:
        """Block names and prompt length of request ``i``; a chat's next turn reuses the names
        of the turn it extends."""
        if i not in self.chains:
            session, tokens = self.trace[i].session, self.tokenize(self.trace[i])
            before, known = self.recent.get(session, ([], ()))
            if not (len(before) <= len(tokens) and tokens[: len(before)] == before):
                known = ()
            self.chains[i] = (self.namer.chain(tokens, known), len(tokens))
            if i in self.following:
                self.recent[session] = (tokens, self.chains[i][0])
            else:
                self.recent.pop(session, None)
        return self.chains[i]

    def state(self, w: _Worker, now: float) -> MemberState:
        c = self.c
        return MemberState(
            w.name, w.unfinished, max(w.tail - now, 0.0), c.prefill_tok_per_s * w.speed,
            c.decode_tok_per_s * w.speed, w.reputation, w.held,
        )

    def publish(self, now: float) -> None:
        """Every member whose load changed (or is draining) reports it."""
        self.tick += 1
        for k, w in enumerate(self.workers):
            if w.dirty or w.unfinished:
                self.published[k] = self.state(w, now)
                w.dirty, w.stamp = False, self.tick

    def arrive(self, i: int, now: float) -> None:
        c, req, (chain, prompt) = self.c, self.trace[i], self.chain_of(i)
        if not c.sync_interval_s:
            self.publish(now)
        e = self.rng.randrange(len(self.views)) if len(self.views) > 1 else 0
        view, seen = self.views[e], self.seen[e]
        if self.synced[e] != self.tick:  # catch up with the reports since the last request
            for k, w in enumerate(self.workers):
                if seen[k] != w.stamp:
                    view.update(self.published[k])
                    seen[k] = w.stamp
            self.synced[e] = self.tick
        members, matched = view.members(), self.tree.match(chain)
        query = RouteQuery(chain, prompt, req.max_tokens, c.block_size, req.session)
        try:
            name = self.policies[e].choose(query, members, matched)
        except RoutingError as exc:
            del self.chains[i]
            self.records[i] = RequestRecord(
                f"req-{i:06d}", req.session, "", req.t, math.nan, math.nan, prompt, 0,
                ok=False, error=str(exc),
            )
            return
        k = self.index[name]
        w, work = self.workers[k], estimate_work_s(query, members[k], matched.get(name, 0))
        view.assign(name, work, blocks=len(chain) - matched.get(name, 0))
        w.tail = max(w.tail, now) + work
        w.unfinished, w.dirty = w.unfinished + 1, True
        w.queue.append((i, e, work))
        if not w.busy:
            self.start(w, now)

    def start(self, w: _Worker, now: float) -> None:
        c, (i, e, work) = self.c, w.queue.popleft()
        req, (chain, prompt) = self.trace[i], self.chain_of(i)
        cached = min(self.tree.touch(chain, w.name, now) * c.block_size if chain else 0, prompt)
        if cached and cached == prompt:
            cached -= 1  # the last prompt token is always computed: its logits start decoding
        prefill = c.per_request_overhead_s + (
            (prompt - cached) / c.prefill_tok_per_s + cached / c.cached_prefill_tok_per_s
        ) / w.speed
        decode = req.max_tokens / (c.decode_tok_per_s * w.speed)
        w.tail += prefill + decode - work  # the estimate made at assignment, corrected
        w.busy, ttft = True, now - req.t + prefill
        self.inflight[i] = (w, e, work, ttft, ttft + decode, cached)
        self.seq += 1
        heapq.heappush(self.events, (now + prefill + decode, _FINISH, self.seq, i))

    def finish(self, i: int, now: float) -> None:
        c, (w, e, work, ttft, e2e, cached) = self.c, self.inflight.pop(i)
        req, (chain, prompt) = self.trace[i], self.chain_of(i)
        held = chain
        if c.cache_answers and i in self.following:  # the answer is the next turn's quote
            j = self.following[i]
            later, _ = self.chain_of(j)
            if self.records[j] is not None:  # that turn already finished elsewhere
                del self.chains[j]
            if len(later) > len(chain) and (not chain or later[len(chain) - 1] == chain[-1]):
                held = later[: max(len(chain), (prompt + req.max_tokens) // c.block_size)]
        if c.cache_blocks_per_worker:
            self.tree.insert(held, w.name, now)
            if self.tree.blocks_held(w.name) > c.cache_blocks_per_worker:
                self.tree.evict_lru(w.name, c.cache_blocks_per_worker * 9 // 10)
            w.held = self.tree.blocks_held(w.name)
        del self.chains[i]
        self.records[i] = RequestRecord(
            f"req-{i:06d}", req.session, w.name, req.t, ttft, e2e, prompt, cached
        )
        self.views[e].complete(w.name, work)
        w.unfinished, w.busy, w.dirty = w.unfinished - 1, False, True
        if w.queue:
            self.start(w, now)

    def run(self) -> list[RequestRecord]:
        c, trace = self.c, self.trace
        self.events = [(trace[i].t, _ARRIVAL, n, i) for n, i in enumerate(self.order)]
        if c.sync_interval_s:
            ticks = {int(trace[i].t // c.sync_interval_s) for i in self.order}
            self.events += [(k * c.sync_interval_s, _TICK, k, k) for k in ticks]
        heapq.heapify(self.events)
        handlers = {_FINISH: self.finish, _TICK: lambda _, now: self.publish(now),
                    _ARRIVAL: self.arrive}
        while self.events:
            now, kind, _, item = heapq.heappop(self.events)
            handlers[kind](item, now)
        done = [r for r in self.records if r is not None]
        assert len(done) == len(trace)
        return done


def simulate(
    trace: Sequence[TraceRequest], config: SimConfig, tokenize: Tokenizer = word_tokenizer
) -> list[RequestRecord]:
    """Replay ``trace`` through ``config``'s group: one record per request, in trace order,
    ``request_id`` ``req-<index in trace>``."""
    return _Run(trace, config, tokenize).run()
