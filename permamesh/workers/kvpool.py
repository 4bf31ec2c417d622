"""The KV pool: keys and values of every active sequence in one tensor pair per layer.

The batched torch engine runs one forward over the new tokens of every active request, packed
into a single row (``[1, N]``). Their keys and values are written into *slots* of a shared pool
(``[1, kv_heads, capacity, head_dim]`` per layer); a slot remembers which sequence owns it and
at which position. Attention then runs over the pool's used slots with a 4D boolean mask that
lets each query token see exactly the slots of its own sequence at positions up to its own:
the same keys, values and positions it would see alone, so every sequence's logits are those
of the model's own distribution whatever else shares the step (up to float rounding).

Slots need not be contiguous or in order (rotary positions are applied before caching; the
mask, not the layout, says who sees what). New tokens take the lowest free slots, so the part
of the pool attention reads (up to the highest used slot) stays small; the pool doubles when it
runs out and shrinks back once no sequence holds slots.

:class:`PoolCache` is the transformers :class:`~transformers.Cache` handed to the model for one
forward: each layer's ``update`` writes the step's new keys and values into their slots and
returns the used part of the pool.

Who calls it: :class:`permamesh.workers.engine.Engine` only, on the engine thread (not
thread-safe).
"""

from __future__ import annotations

import logging

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

log = logging.getLogger(__name__)

INITIAL_SLOTS = 1024  # tokens the pool holds before it first grows


class KVPool:
    """Slots of K and V shared by every active sequence; sequences are small integer ids."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str,
                 initial_slots: int = INITIAL_SLOTS) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device, self.initial_slots = dtype, device, initial_slots
        self._slots: dict[int, list[int]] = {}  # sequence -> its slots, in position order
        self._next_id = 0
        self._allocate(initial_slots)

    def _allocate(self, capacity: int) -> None:
        shape = (1, self.kv_heads, capacity, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        self.owner = torch.full((capacity,), -1, dtype=torch.long, device=self.device)  # -1 = free
        self.position = torch.zeros(capacity, dtype=torch.long, device=self.device)

    @property
    def capacity(self) -> int:
        return self.owner.shape[0]

    @property
    def bytes_used(self) -> int:
        """Bytes of K and V the pool holds (allocated, used or not)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.capacity * self.keys[0].element_size()

    def open(self) -> int:
        """A new, empty sequence."""
        self._next_id += 1
        self._slots[self._next_id] = []
        return self._next_id

    def close(self, seq: int) -> None:
        """Free ``seq``'s slots (unknown ids are ignored); shrink once the pool is empty."""
        slots = self._slots.pop(seq, None)
        if slots:
            self.owner[torch.tensor(slots, dtype=torch.long, device=self.device)] = -1
        if not self._slots and self.capacity > self.initial_slots:
            self._allocate(self.initial_slots)

    def length(self, seq: int) -> int:
        return len(self._slots[seq])

    def reserve(self, seq: int, count: int) -> torch.Tensor:
        """Slots for the next ``count`` positions of ``seq`` (their KV is written by the forward)."""
        free = torch.nonzero(self.owner < 0).flatten()
        if free.numel() < count:
            self._grow(count - free.numel())
            free = torch.nonzero(self.owner < 0).flatten()
        slots = free[:count]
        start = len(self._slots[seq])
        self.owner[slots] = seq
        self.position[slots] = torch.arange(start, start + count, device=self.device)
        self._slots[seq].extend(slots.tolist())
        return slots

    def _grow(self, missing: int) -> None:
        old_keys, old_values, old_owner, old_position = self.keys, self.values, self.owner, self.position
        old = self.capacity
        self._allocate(max(2 * old, old + missing))
        for layer in range(self.layers):
            self.keys[layer][:, :, :old] = old_keys[layer]
            self.values[layer][:, :, :old] = old_values[layer]
        self.owner[:old], self.position[:old] = old_owner, old_position
        log.debug("KV pool grew from %d to %d slots", old, self.capacity)

    def load(self, seq: int, cache) -> int:
        """Copy the KV of a cache of ``seq``'s first tokens (a prefix-cache hit) into its slots."""
        count = cache.layers[0].keys.shape[-2]
        slots = self.reserve(seq, count)
        for layer in range(self.layers):
            self.keys[layer].index_copy_(2, slots, cache.layers[layer].keys.to(self.dtype))
            self.values[layer].index_copy_(2, slots, cache.layers[layer].values.to(self.dtype))
        return count

    def gather(self, seq: int) -> DynamicCache:
        """``seq``'s KV in position order as a plain DynamicCache (what the prefix cache stores)."""
        slots = torch.tensor(self._slots[seq], dtype=torch.long, device=self.device)
        cache = DynamicCache()
        for layer in range(self.layers):
            cache.update(self.keys[layer].index_select(2, slots), self.values[layer].index_select(2, slots), layer)
        return cache

    def used(self) -> int:
        """Slots attention must read: up to the highest slot in use."""
        taken = torch.nonzero(self.owner >= 0)
        return int(taken[-1]) + 1 if taken.numel() else 0

    def mask(self, query_seq: torch.Tensor, query_pos: torch.Tensor, used: int, additive_dtype=None) -> torch.Tensor:
        """``[1, 1, N, used]``: query ``i`` (of sequence ``query_seq[i]`` at ``query_pos[i]``) sees
        the slots of its own sequence at positions up to its own. Boolean, or additive (0 or the
        dtype's minimum) when ``additive_dtype`` is given (eager attention)."""
        owner, position = self.owner[:used], self.position[:used]
        visible = (owner[None, :] == query_seq[:, None]) & (position[None, :] <= query_pos[:, None])
        if additive_dtype is not None:
            zero = torch.zeros((), dtype=additive_dtype, device=self.device)
            visible = torch.where(visible, zero, torch.finfo(additive_dtype).min)
        return visible[None, None]


class _PoolLayer(CacheLayerMixin):
    """One model layer's view of the pool for one forward."""

    is_sliding = False

    def __init__(self, pool: KVPool, layer: int, slots: torch.Tensor, used: int) -> None:
        super().__init__()
        self._pool, self._layer, self._slots, self._used = pool, layer, slots, used
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the pool is allocated already
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = self._pool.keys[self._layer], self._pool.values[self._layer]
        keys.index_copy_(2, self._slots, key_states.to(keys.dtype))
        values.index_copy_(2, self._slots, value_states.to(values.dtype))
        return keys[:, :, : self._used], values[:, :, : self._used]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._used, 0

    def get_seq_length(self) -> int:
        return self._used

    def get_max_length(self) -> int:
        return -1


class PoolCache(Cache):
    """The cache for one packed forward: new tokens go to ``slots`` (one per token, in order);
    attention reads the first ``used`` slots of the pool."""

    def __init__(self, pool: KVPool, slots: torch.Tensor, used: int) -> None:
        super().__init__(layers=[_PoolLayer(pool, layer, slots, used) for layer in range(pool.layers)])
