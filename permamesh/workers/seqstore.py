"""The llama.cpp engine's prefix store: saved sequence states under a byte budget.

llama.cpp can serialize one sequence's KV (``llama_state_seq_get_data``) and load it into
another sequence later (``llama_state_seq_set_data``). :class:`SeqStateStore` keeps such states,
each for the token ids it holds, named like the torch engine's prefix cache: the ids are cut
into blocks of ``hasher.block_size`` tokens named by chained digests
(:class:`permamesh.routing.blocks.BlockHasher`), so a digest commits to its whole prefix. A
state *covers* the blocks of its chain; the longest covered run of a prompt's digests is its
cached prefix: the engine loads that state and drops the positions after the match.

A state whose chain extends an older one replaces it (the older is then redundant); a state
whose chain an existing one already extends is not kept. Eviction drops the least recently used
state until the bytes fit the budget. The public surface (``lookup``/``store``/
``drain_events``/``stats``/``clear``/``block_size``) matches
:class:`~permamesh.workers.prefix_cache.PrefixKVCache`, so the worker server publishes its
inserted and evicted chains to the group the same way.

Who calls it: :class:`permamesh.workers.llamacpp.LlamaEngine` on the engine thread (not
thread-safe); the worker server drains its events after each request.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from permamesh.routing.blocks import BlockHasher
from permamesh.workers.errors import WorkerError
from permamesh.workers.prefix_cache import CacheStats, Lookups

log = logging.getLogger(__name__)

Chain = tuple[bytes, ...]


@dataclass
class _Entry:
    chain: Chain
    state: bytes  # llama_state_seq_get_data of a sequence holding the chain's tokens (and maybe a few more)
    last_used: int


class SeqStateStore:
    """Saved sequence states keyed by chained block digests; LRU eviction under a byte budget."""

    def __init__(self, hasher: BlockHasher, budget_bytes: int) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise WorkerError(f"budget_bytes must be an integer >= 0, not {budget_bytes!r}")
        self._hasher, self._budget = hasher, budget_bytes
        self._entries: dict[int, _Entry] = {}
        self._cover: dict[bytes, set[int]] = {}  # digest -> entries whose chain holds it
        self._ids = itertools.count()
        self._clock = self._bytes = 0
        self._lookups, self._evicted = Lookups(hasher), 0
        self._inserted: dict[bytes, Chain] = {}
        self._evicted_chains: set[Chain] = set()

    @property
    def block_size(self) -> int:
        return self._hasher.block_size

    def lookup(self, token_ids: Sequence[int]) -> tuple[int, bytes | None]:
        """The longest covered full-block prefix that leaves a token to prefill:
        ``(matched_tokens, a state holding at least them)`` or ``(0, None)``."""
        size = self.block_size
        digests, matched = self._lookups.match(token_ids, self._cover)
        if matched == 0:
            return 0, None
        self._clock += 1
        best = min(self._cover[digests[matched - 1]], key=lambda e: len(self._entries[e].state))  # least to load
        self._entries[best].last_used = self._clock
        return matched * size, self._entries[best].state

    def store(self, token_ids: Sequence[int], state: bytes) -> int:
        """Keep ``state`` (of a sequence holding ``token_ids``); return blocks newly covered."""
        size = self.block_size
        chain = tuple(self._hasher.chain(token_ids[: len(token_ids) // size * size]))
        if not chain or len(state) > self._budget:
            return 0
        self._clock += 1
        extending = self._cover.get(chain[-1], ())
        if extending:  # a kept state holds the whole chain already (a digest commits to its prefix)
            for e in extending:
                self._entries[e].last_used = self._clock
            return 0
        links = set(chain)
        for key in {e for d in chain for e in self._cover.get(d, ()) if self._entries[e].chain[-1] in links}:
            self._drop(key, evicted=False)  # a prefix of the new chain: redundant now
        new = sum(1 for d in chain if d not in self._cover)
        while self._bytes + len(state) > self._budget and self._evict_one():
            pass
        key = next(self._ids)
        self._entries[key] = _Entry(chain, state, self._clock)
        self._bytes += len(state)
        for d in chain:
            self._cover.setdefault(d, set()).add(key)
        if new:
            for d in chain[:-1]:
                self._inserted.pop(d, None)
            self._inserted[chain[-1]] = chain
        return new

    def drain_events(self) -> tuple[list[Chain], list[Chain]]:
        """``(inserted chains, evicted chains)`` since the last drain, netted as
        :meth:`PrefixKVCache.drain_events` does: inserts trimmed to covered blocks, each evicted
        chain ending at a block not covered now whose ancestors are all still covered."""
        inserted = []
        for chain in self._inserted.values():
            held = next((i for i, d in enumerate(chain) if d not in self._cover), len(chain))
            if held:
                inserted.append(chain[:held])
        evicted = {chain for chain in self._evicted_chains if chain[-1] not in self._cover}
        gone = {chain[-1] for chain in evicted}
        evicted = {chain for chain in evicted if not any(d in gone for d in chain[:-1])}
        self._inserted, self._evicted_chains = {}, set()
        return sorted(set(inserted)), sorted(evicted)

    def stats(self) -> CacheStats:
        return self._lookups.stats(len(self._cover), self._bytes, self._budget, self._evicted)

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key, evicted=True)

    def _evict_one(self) -> bool:
        if not self._entries:
            return False
        key = min(self._entries, key=lambda e: self._entries[e].last_used)
        self._drop(key, evicted=True)
        return True

    def _drop(self, key: int, evicted: bool) -> None:
        entry = self._entries.pop(key)
        self._bytes -= len(entry.state)
        for i, d in enumerate(entry.chain):
            holders = self._cover[d]
            holders.discard(key)
            if not holders:
                del self._cover[d]
                if evicted:
                    self._evicted += len(entry.chain) - i
                    self._evicted_chains.add(entry.chain[: i + 1])
                    evicted = False  # descendants go with this block
