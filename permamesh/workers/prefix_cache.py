"""The prefix KV cache: keys and values of token blocks already prefilled, reused by later prompts.

A prompt is cut into blocks of ``hasher.block_size`` tokens named by chained digests
(:class:`permamesh.routing.blocks.BlockHasher`). Digest ``i`` commits to the whole prefix of
``i + 1`` blocks, so a flat dict keyed by digest is a radix tree over blocks: the longest cached
prefix of a prompt is the longest run of its digests found in the dict. Each entry holds the KV
tensors of its own block only, cloned out of the model's cache, plus its parent digest and how
many cached blocks extend it.

Eviction takes the least recently used *leaf* (a block no cached block extends) until the bytes
held fit the budget, so the set of cached blocks stays prefix-closed: a cached block's whole
prefix is cached. Recency is a logical clock that ticks once per lookup or store.

Who calls it: :meth:`permamesh.workers.engine.Engine.generate`, on the engine thread only (not
thread-safe). The worker server drains inserted/evicted chains after each request with
:meth:`PrefixKVCache.drain_events` and publishes them to its group (routing delta sync).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from permamesh.routing.blocks import BlockHasher
from permamesh.workers.errors import WorkerError

log = logging.getLogger(__name__)

Chain = tuple[bytes, ...]


@dataclass(frozen=True)
class CacheStats:
    hits: int  # lookups that matched at least one block
    misses: int  # lookups that matched nothing
    hit_tokens: int  # prompt tokens served from the cache, summed over lookups
    lookup_tokens: int  # prompt tokens looked up, summed over lookups
    blocks: int  # blocks held now
    bytes_used: int  # bytes of K and V held now
    budget_bytes: int
    evicted_blocks: int  # blocks dropped so far (budget evictions and clear())


class Lookups:
    """What both prefix stores (this KV cache and llama.cpp's saved sequence states) do on a
    lookup: match the prompt's full blocks, leaving a token to prefill, against the digests they
    hold, and count hits, misses and tokens for :class:`CacheStats`."""

    def __init__(self, hasher: BlockHasher) -> None:
        self.hasher = hasher
        self.hits = self.misses = self.hit_tokens = self.tokens = 0

    def match(self, token_ids: Sequence[int], held) -> tuple[list[bytes], int]:
        """(the digests of the prompt's usable blocks, how many lead blocks are in ``held``)."""
        size = self.hasher.block_size
        usable = max(len(token_ids) - 1, 0) // size
        digests = self.hasher.chain(token_ids[: usable * size]) if usable else []
        matched = 0
        while matched < len(digests) and digests[matched] in held:
            matched += 1
        self.tokens += len(token_ids)
        if matched:
            self.hits += 1
            self.hit_tokens += matched * size
        else:
            self.misses += 1
        return digests, matched

    def stats(self, blocks: int, bytes_used: int, budget: int, evicted: int) -> CacheStats:
        return CacheStats(self.hits, self.misses, self.hit_tokens, self.tokens, blocks, bytes_used, budget, evicted)


class _Block:
    """One cached block (mutable bookkeeping, private to the cache)."""

    __slots__ = ("parent", "keys", "values", "nbytes", "last_used", "children")

    def __init__(self, parent: bytes | None, keys: tuple, values: tuple, nbytes: int, now: int) -> None:
        self.parent = parent
        self.keys = keys  # one [batch, kv_heads, block_size, head_dim] tensor per layer
        self.values = values
        self.nbytes = nbytes
        self.last_used = now
        self.children = 0  # cached blocks whose parent is this one


def _full_attention_layers(cache) -> list | None:
    """The cache's layers if every one is a plain growing full-attention layer, else None.

    Sliding-window layers keep only the last window, quantized layers keep most positions
    elsewhere, KV-sharing layers hold nothing: their tensors are not the whole prefix, so such
    models are simply not cached (every lookup misses).
    """
    from transformers.cache_utils import DynamicLayer

    layers = list(getattr(cache, "layers", None) or ())
    for layer in layers:
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.dim() != 4:
            return None
    return layers or None


class PrefixKVCache:
    """KV tensors of token blocks, keyed by chained block digests; LRU eviction of leaf blocks
    under a byte budget."""

    def __init__(self, hasher: BlockHasher, budget_bytes: int) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise WorkerError(f"budget_bytes must be an integer >= 0, not {budget_bytes!r}")
        self._hasher = hasher
        self._budget = budget_bytes
        self._blocks: dict[bytes, _Block] = {}
        self._heap: list[tuple[int, bytes]] = []  # (last_used, digest) of leaves; stale entries skipped
        self._clock = 0
        self._bytes = 0
        self._lookups, self._evicted = Lookups(hasher), 0
        self._inserted: dict[bytes, Chain] = {}  # pending insert events, keyed by their last digest
        self._evicted_chains: dict[bytes, Chain] = {}  # pending evict events, keyed by the evicted digest

    @property
    def block_size(self) -> int:
        return self._hasher.block_size

    @property
    def hasher(self) -> BlockHasher:
        return self._hasher

    @property
    def budget_bytes(self) -> int:
        return self._budget

    def lookup(self, token_ids: Sequence[int]) -> tuple[int, object | None]:
        """The longest cached full-block prefix of ``token_ids`` that leaves at least one token
        to prefill: ``(matched_tokens, new DynamicCache of exactly those tokens)`` or ``(0, None)``."""
        from transformers import DynamicCache

        size = self.block_size
        digests, matched = self._lookups.match(token_ids, self._blocks)
        if matched == 0:
            return 0, None
        self._clock += 1
        chain = [self._blocks[d] for d in digests[:matched]]
        for digest, block in zip(digests, chain):
            self._touch(digest, block)
        import torch

        cache = DynamicCache()
        for layer in range(len(chain[0].keys)):
            keys = torch.cat([b.keys[layer] for b in chain], dim=-2)
            values = torch.cat([b.values[layer] for b in chain], dim=-2)
            cache.update(keys, values, layer)
        return matched * size, cache

    def store(self, token_ids: Sequence[int], cache) -> int:
        """Store every full block of ``token_ids`` not cached yet, taking its KV from ``cache``
        (which must hold at least the first ``len(token_ids)`` positions); return blocks added."""
        layers = _full_attention_layers(cache)
        if layers is None:
            log.debug("cache layers are not all full-attention dynamic layers; nothing stored")
            return 0
        size = self.block_size
        held = min(layer.keys.shape[-2] for layer in layers)
        digests = self._hasher.chain(token_ids[: min(len(token_ids), held) // size * size])
        if not digests:
            return 0
        self._clock += 1
        known = 0
        while known < len(digests) and digests[known] in self._blocks:
            self._touch(digests[known], self._blocks[digests[known]])
            known += 1
        wanted = len(digests) - known
        if wanted == 0:
            return 0
        per_block = max(1, sum(l.keys[:, :, :size].numel() * l.keys.element_size()
                               + l.values[:, :, :size].numel() * l.values.element_size() for l in layers))
        while self._bytes + wanted * per_block > self._budget and self._evict_one(older_than=self._clock):
            pass
        fits = max(0, min(wanted, (self._budget - self._bytes) // per_block))
        for index in range(known, known + fits):
            start, end = index * size, (index + 1) * size
            keys = tuple(l.keys[:, :, start:end, :].clone() for l in layers)
            values = tuple(l.values[:, :, start:end, :].clone() for l in layers)
            self._add(digests[index], digests[index - 1] if index else None, keys, values, per_block)
        if fits:
            if known:
                self._inserted.pop(digests[known - 1], None)  # the new chain extends it
            self._inserted[digests[known + fits - 1]] = tuple(digests[: known + fits])
        if fits < wanted:
            log.debug("prefix cache budget %d bytes: stored %d of %d new blocks", self._budget, fits, wanted)
        return fits

    def drain_events(self) -> tuple[list[Chain], list[Chain]]:
        """``(inserted chains, evicted chains)`` since the last drain, each from the root.

        The two lists are netted so they can be applied in either order: an inserted chain is
        trimmed to the blocks still cached, and an evicted chain names a block not cached now
        (one whose ancestor is also reported evicted is left out: removing the ancestor removes it).
        """
        inserted = sorted(self._inserted.values())
        gone = {d for d in self._evicted_chains if d not in self._blocks}
        evicted = sorted(chain for d, chain in self._evicted_chains.items()
                         if d in gone and not any(a in gone for a in chain[:-1]))
        self._inserted = {}
        self._evicted_chains = {}
        return inserted, evicted

    def stats(self) -> CacheStats:
        return self._lookups.stats(len(self._blocks), self._bytes, self._budget, self._evicted)

    def clear(self) -> None:
        """Drop every block (counted as evicted and reported as evicted chains); keep counters."""
        for digest, block in self._blocks.items():
            if block.parent is None:
                self._evicted_chains[digest] = (digest,)
        self._evicted += len(self._blocks)
        self._blocks.clear()
        self._heap.clear()
        self._inserted.clear()
        self._bytes = 0

    # -- bookkeeping -------------------------------------------------------------------------

    def _touch(self, digest: bytes, block: _Block) -> None:
        block.last_used = self._clock
        if block.children == 0:
            self._push(digest, block)

    def _push(self, digest: bytes, block: _Block) -> None:
        heapq.heappush(self._heap, (block.last_used, digest))
        if len(self._heap) > 2 * len(self._blocks) + 64:  # too many stale entries: rebuild
            self._heap = [(b.last_used, d) for d, b in self._blocks.items() if b.children == 0]
            heapq.heapify(self._heap)

    def _add(self, digest: bytes, parent: bytes | None, keys: tuple, values: tuple, nbytes: int) -> None:
        if parent is not None:
            self._blocks[parent].children += 1
        block = _Block(parent, keys, values, nbytes, self._clock)
        self._blocks[digest] = block
        self._bytes += nbytes
        self._evicted_chains.pop(digest, None)
        self._push(digest, block)

    def _evict_one(self, older_than: int) -> bool:
        """Drop the least recently used leaf used before ``older_than``; False if there is none."""
        while self._heap:
            stamp, digest = self._heap[0]
            block = self._blocks.get(digest)
            if block is None or block.children or block.last_used != stamp:
                heapq.heappop(self._heap)  # stale
                continue
            if stamp >= older_than:
                return False
            heapq.heappop(self._heap)
            chain = self._chain_to(digest)
            del self._blocks[digest]
            self._bytes -= block.nbytes
            self._evicted += 1
            self._evicted_chains[digest] = chain
            pending = self._inserted.pop(digest, None)
            if block.parent is not None:
                parent = self._blocks[block.parent]
                parent.children -= 1
                if pending is not None:
                    self._inserted.setdefault(block.parent, pending[:-1])
                if parent.children == 0:
                    self._push(block.parent, parent)
            return True
        return False

    def _chain_to(self, digest: bytes) -> Chain:
        chain = [digest]
        parent = self._blocks[digest].parent
        while parent is not None:
            chain.append(parent)
            parent = self._blocks[parent].parent
        return tuple(reversed(chain))
