"""The llama.cpp engine's prefix store: saved sequence states found by their longest covered
block prefix, kept under a byte budget, and reported to routing as PrefixKVCache reports."""

from __future__ import annotations

import random

import pytest

from permamesh.routing.blocks import BlockHasher
from permamesh.workers.errors import WorkerError
from permamesh.workers.seqstore import SeqStateStore

BLOCK = 4


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000) for _ in range(n)]


def test_a_prompt_finds_the_state_of_its_longest_cached_prefix():
    rng = random.Random(1)
    store, hasher = SeqStateStore(BlockHasher(BLOCK), 10_000), BlockHasher(BLOCK)
    system = _ids(rng, 10)
    assert store.lookup(system + [1, 2]) == (0, None)
    assert store.store(system + [5, 6, 7], b"first") == 3  # 13 tokens: 3 full blocks
    matched, state = store.lookup(system + [9, 9, 9, 9])
    assert (matched, state) == (8, b"first")  # the 10 shared tokens, cut to whole blocks
    assert store.lookup(system[:8]) == (4, b"first")  # one token is always left to prefill
    inserted, evicted = store.drain_events()
    assert inserted == [tuple(hasher.chain((system + [5, 6, 7])[:12]))] and evicted == []
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.hit_tokens, stats.blocks) == (2, 1, 12, 3)


def test_a_longer_state_replaces_the_one_it_extends_and_a_shorter_one_is_not_kept():
    rng = random.Random(2)
    store = SeqStateStore(BlockHasher(BLOCK), 10_000)
    turn1 = _ids(rng, 8)
    turn2 = turn1 + _ids(rng, 8)
    store.store(turn1, b"a" * 10)
    store.store(turn2, b"b" * 20)  # the next turn of the chat
    assert store.stats().bytes_used == 20
    assert store.store(turn1, b"c" * 10) == 0  # already held inside turn2's state
    assert store.stats().bytes_used == 20
    assert store.lookup(turn1 + [1]) == (8, b"b" * 20)
    inserted, evicted = store.drain_events()
    assert len(inserted) == 1 and len(inserted[0]) == 4 and evicted == []


def test_the_budget_evicts_the_least_recently_used_state_and_reports_its_blocks():
    rng = random.Random(3)
    store = SeqStateStore(BlockHasher(BLOCK), 100)
    a, b, c = _ids(rng, 8), _ids(rng, 8), _ids(rng, 8)
    store.store(a, b"x" * 40)
    store.store(b, b"y" * 40)
    store.drain_events()
    assert store.lookup(a + [0])[0] == 8  # a is used again: b is now the oldest
    store.store(c, b"z" * 40)
    assert store.lookup(b + [0]) == (0, None)
    assert store.lookup(a + [0])[0] == 8 and store.lookup(c + [0])[0] == 8
    inserted, evicted = store.drain_events()
    hasher = BlockHasher(BLOCK)
    assert evicted == [tuple(hasher.chain(b)[:1])]  # its first block: the rest goes with it
    assert inserted == [tuple(hasher.chain(c))]
    assert store.stats().evicted_blocks == 2 and store.stats().bytes_used == 80


def test_states_that_share_a_prefix_keep_it_until_the_last_goes():
    rng = random.Random(4)
    store = SeqStateStore(BlockHasher(BLOCK), 10_000)
    shared = _ids(rng, 8)
    one, two = shared + _ids(rng, 4), shared + _ids(rng, 4)
    store.store(one, b"1")
    store.store(two, b"2")
    store.drain_events()
    store.clear()
    _, evicted = store.drain_events()
    hasher = BlockHasher(BLOCK)
    assert evicted == [tuple(hasher.chain(shared)[:1])]  # netted: the shared root removes both branches
    assert store.stats().blocks == 0


def test_a_state_larger_than_the_budget_is_not_kept_and_a_bad_budget_is_refused():
    store = SeqStateStore(BlockHasher(BLOCK), 10)
    assert store.store(list(range(8)), b"x" * 11) == 0
    assert store.stats().bytes_used == 0
    with pytest.raises(WorkerError):
        SeqStateStore(BlockHasher(BLOCK), -1)
