"""The prefix KV cache: requests that share a prompt prefix skip its prefill and still answer
exactly as an engine without a cache does; the byte budget holds and evictions are reported."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from permamesh.routing.blocks import BlockHasher
from permamesh.workers.engine import Engine, SamplingParams
from permamesh.workers.errors import WorkerError
from permamesh.workers.prefix_cache import PrefixKVCache

BLOCK = 16
GREEDY = SamplingParams(max_tokens=10, logprobs=True)
BIG = 1 << 26


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(256) for _ in range(n)]  # byte tokens of the tiny model


def _cached_engine(loaded, budget: int = BIG) -> Engine:
    return Engine(loaded, PrefixKVCache(BlockHasher(BLOCK), budget))


def _assert_same(got, want) -> None:
    assert got.token_ids == want.token_ids
    assert got.finish_reason == want.finish_reason
    assert len(got.logprobs) == len(want.logprobs)
    assert max((abs(a - b) for a, b in zip(got.logprobs, want.logprobs)), default=0.0) < 1e-4


def _kv(loaded, tokens: list[int]):
    """The model's own cache after prefilling ``tokens`` (what the engine would store)."""
    import torch

    with torch.inference_mode():
        return loaded.model(input_ids=torch.tensor([tokens]), use_cache=True).past_key_values


def test_a_shared_prefix_is_served_from_the_cache_with_identical_answers(tiny_loaded):
    rng = random.Random(1)
    prefix = _tokens(rng, 100)
    first, second = prefix + [7] + _tokens(rng, 20), prefix + [9] + _tokens(rng, 20)
    plain, cached = Engine(tiny_loaded), _cached_engine(tiny_loaded)

    cold = cached.generate(first, GREEDY)
    warm = cached.generate(second, GREEDY)

    assert cold.cached_tokens == 0 and plain.generate(first, GREEDY).cached_tokens == 0
    assert warm.cached_tokens == 96  # 100 shared tokens, cut to whole blocks
    _assert_same(cold, plain.generate(first, GREEDY))
    _assert_same(warm, plain.generate(second, GREEDY))
    stats = cached.prefix_cache.stats()
    assert (stats.hits, stats.misses, stats.hit_tokens) == (1, 1, 96)


def test_the_next_turn_of_a_chat_reuses_the_whole_first_turn(tiny_loaded):
    rng = random.Random(2)
    turn1 = _tokens(rng, 75)
    plain, cached = Engine(tiny_loaded), _cached_engine(tiny_loaded)
    for params in (GREEDY, SamplingParams(max_tokens=10, temperature=0.9, seed=3, logprobs=True)):
        cached.prefix_cache.clear()
        answer1 = cached.generate(turn1, params)
        _assert_same(answer1, plain.generate(turn1, params))
        assert answer1.finish_reason == "length" and len(answer1.token_ids) == 10
        turn2 = turn1 + list(answer1.token_ids) + _tokens(rng, 30)

        answer2 = cached.generate(turn2, params)

        # 85 tokens in turn 1; all but the last answer token went through the model: 5 full blocks
        assert answer2.cached_tokens == (75 + 10) // BLOCK * BLOCK == 80
        _assert_same(answer2, plain.generate(turn2, params))


@pytest.mark.parametrize("length", [64, 70])
def test_a_fully_cached_prompt_still_prefills_its_last_token(tiny_loaded, length):
    prompt = _tokens(random.Random(length), length)
    plain, cached = Engine(tiny_loaded), _cached_engine(tiny_loaded)
    cached.generate(prompt, GREEDY)

    again = cached.generate(prompt, GREEDY)

    assert again.cached_tokens == (length - 1) // BLOCK * BLOCK < length
    _assert_same(again, plain.generate(prompt, GREEDY))


def test_stored_kv_survives_later_growth_of_the_caches_it_came_from(tiny_loaded):
    import torch

    tokens = _tokens(random.Random(4), 50)
    cache = PrefixKVCache(BlockHasher(BLOCK), BIG)
    source = _kv(tiny_loaded, tokens)
    assert cache.store(tokens, source) == 3
    matched, first = cache.lookup(tokens)
    snapshot = [(k.clone(), v.clone()) for k, v, _ in first]
    with torch.inference_mode():  # grow and scribble on both caches in place
        tiny_loaded.model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=first, use_cache=True)
        for layer in [*source.layers, *first.layers]:
            layer.keys.zero_()
            layer.values.zero_()

    matched_again, second = cache.lookup(tokens)

    assert matched == matched_again == 48
    for (k, v), (k2, v2, _) in zip(snapshot, second):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    # and through the engine: the same prompt again answers as without a cache
    plain, cached = Engine(tiny_loaded), _cached_engine(tiny_loaded)
    cached.generate(tokens, GREEDY)
    _assert_same(cached.generate(tokens, GREEDY), plain.generate(tokens, GREEDY))


def test_the_budget_holds_and_the_least_recently_used_chain_goes_first(tiny_loaded):
    rng = random.Random(5)
    hasher = BlockHasher(BLOCK)
    a, b, c = _tokens(rng, 3 * BLOCK), _tokens(rng, 2 * BLOCK), _tokens(rng, 2 * BLOCK)
    probe = PrefixKVCache(hasher, BIG)
    probe.store(a, _kv(tiny_loaded, a))
    per_block = probe.stats().bytes_used // 3
    cache = PrefixKVCache(hasher, 5 * per_block + per_block // 2)
    budget = cache.stats().budget_bytes

    assert cache.store(a, _kv(tiny_loaded, a)) == 3
    assert cache.store(b, _kv(tiny_loaded, b)) == 2
    inserted, evicted = cache.drain_events()
    assert sorted(inserted) == sorted([tuple(hasher.chain(a)), tuple(hasher.chain(b))]) and evicted == []
    assert cache.lookup(a + [1])[0] == 48  # a is now more recent than b
    assert cache.store(c, _kv(tiny_loaded, c)) == 2  # needs two blocks: both of b's go

    stats = cache.stats()
    assert stats.bytes_used <= budget and stats.blocks == 5 and stats.evicted_blocks == 2
    inserted, evicted = cache.drain_events()
    assert inserted == [tuple(hasher.chain(c))]
    assert evicted == [tuple(hasher.chain(b)[:1])]  # removing b's first block removes its chain
    assert cache.lookup(b + [1]) == (0, None)
    assert cache.lookup(a + [1])[0] == 48 and cache.lookup(c + [1])[0] == 32
    assert cache.drain_events() == ([], [])


def test_a_store_larger_than_the_budget_keeps_the_prefix_that_fits(tiny_loaded):
    rng = random.Random(6)
    hasher = BlockHasher(BLOCK)
    old, big = _tokens(rng, 2 * BLOCK), _tokens(rng, 6 * BLOCK)
    per_block = 2 * 2 * (2 * BLOCK * 16) * 4  # layers x (K, V) x (kv heads x block x head dim) x fp32
    cache = PrefixKVCache(hasher, 3 * per_block + 100)
    cache.store(old, _kv(tiny_loaded, old))

    assert cache.store(big, _kv(tiny_loaded, big)) == 3  # old goes first, then as much as fits

    assert cache.stats().bytes_used == 3 * per_block <= cache.stats().budget_bytes
    assert cache.lookup(big)[0] == 3 * BLOCK and cache.lookup(old + [0])[0] == 0
    inserted, evicted = cache.drain_events()
    assert inserted == [tuple(hasher.chain(big)[:3])] and evicted == [tuple(hasher.chain(old)[:1])]
    # storing it again keeps the cached prefix: a chain never evicts itself to grow
    assert cache.store(big, _kv(tiny_loaded, big)) == 0 and cache.lookup(big)[0] == 3 * BLOCK
    assert PrefixKVCache(hasher, per_block - 1).store(old, _kv(tiny_loaded, old)) == 0
    with pytest.raises(WorkerError):
        PrefixKVCache(hasher, -1)



def test_caches_that_do_not_hold_the_whole_prefix_are_not_stored():
    import torch
    from transformers import DynamicCache

    tokens = list(range(32))
    keys = torch.ones(1, 1, 32, 2)
    sliding = DynamicCache(ddp_cache_data=[(keys, keys, torch.tensor(8))])  # keeps the last 8 only
    cache = PrefixKVCache(BlockHasher(BLOCK), BIG)

    assert cache.store(tokens, sliding) == 0 and cache.store(tokens, object()) == 0
    assert cache.stats().blocks == 0 and cache.drain_events() == ([], [])

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    shared=st.integers(0, 70),
    tails=st.lists(st.integers(1, 30), min_size=2, max_size=4),
    budget_blocks=st.integers(0, 12),
)
def test_random_prompts_sharing_random_prefixes_answer_as_without_a_cache(
        tiny_loaded, seed, shared, tails, budget_blocks):
    rng = random.Random(seed)
    prefix = _tokens(rng, shared)
    per_block = 2 * 2 * (2 * BLOCK * 16) * 4
    plain, cached = Engine(tiny_loaded), _cached_engine(tiny_loaded, budget_blocks * per_block)
    params = SamplingParams(max_tokens=4, logprobs=True)
    for tail in tails:
        prompt = prefix + _tokens(rng, tail)
        _assert_same(cached.generate(prompt, params), plain.generate(prompt, params))
        assert cached.prefix_cache.stats().bytes_used <= budget_blocks * per_block



def _fake_kv(tokens: list[int], held: int):
    """A one-layer cache whose K and V at position p are a function of tokens[: p + 1]."""
    import torch
    from transformers import DynamicCache

    rows = [[float(hash(tuple(tokens[: p + 1])) % 9973), float(p)] for p in range(held)]
    keys = torch.tensor(rows).reshape(1, 1, held, 2)
    cache = DynamicCache()
    cache.update(keys, -keys, 0)
    return cache


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["store", "lookup", "drain"]),
                           st.lists(st.integers(0, 2), max_size=12), st.integers(0, 3)), max_size=30),
    budget_blocks=st.integers(0, 8),
)
def test_events_replayed_in_either_order_mirror_the_cache(ops, budget_blocks):
    """Whatever happens, the chains reported by drain_events rebuild exactly the cached set,
    the budget holds, and lookups return the KV of exactly the matched tokens."""
    import torch

    hasher = BlockHasher(2)
    per_block = 2 * 2 * 2 * 4  # (K, V) x 2 positions x 2 floats x fp32
    cache = PrefixKVCache(hasher, budget_blocks * per_block)
    mirror: dict[bytes, bytes | None] = {}  # digest -> parent digest, as a routing peer sees it

    def apply(inserts_first: bool) -> None:
        inserted, evicted = cache.drain_events()
        steps = [("insert", c) for c in inserted] + [("evict", c) for c in evicted]
        for kind, chain in steps if inserts_first else steps[::-1]:
            if kind == "insert":
                for i, digest in enumerate(chain):
                    mirror[digest] = chain[i - 1] if i else None
            else:
                doomed = {chain[-1]}
                while True:
                    more = {d for d, parent in mirror.items() if parent in doomed} - doomed
                    if not more:
                        break
                    doomed |= more
                for digest in doomed:
                    mirror.pop(digest, None)

    seen: list[list[int]] = []
    for kind, tokens, shortfall in ops:
        seen.append(tokens)
        if kind == "store":
            held = max(0, len(tokens) - shortfall)
            cache.store(tokens, _fake_kv(tokens, held) if held else _fake_kv([0], 1))
        elif kind == "lookup":
            matched, kv = cache.lookup(tokens)
            assert matched < max(len(tokens), 1) and matched % 2 == 0
            if matched:
                want = _fake_kv(tokens, matched)
                assert torch.equal(kv.layers[0].keys, want.layers[0].keys)
                assert torch.equal(kv.layers[0].values, want.layers[0].values)
        else:
            apply(inserts_first=shortfall % 2 == 0)
        assert cache.stats().bytes_used <= budget_blocks * per_block
    apply(inserts_first=True)

    assert cache.stats().blocks == len(mirror)
    for tokens in seen:
        chain = hasher.chain(tokens)
        in_mirror = next((i for i, d in enumerate(chain) if d not in mirror), len(chain))
        assert cache.lookup(tokens + [0])[0] == 2 * in_mirror


@pytest.mark.model
def test_smollm2_answers_the_same_with_a_cached_prefix(smollm2_loaded):
    tok = smollm2_loaded.tokenizer
    text = " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(60))
    prompt = tok.encode(text)[:600]
    assert len(prompt) == 600
    follow_up = prompt + tok.encode(" Question: what is 7 squared? Answer:")
    params = SamplingParams(max_tokens=8)
    cached = _cached_engine(smollm2_loaded)
    cached.generate(prompt, params)

    warm = cached.generate(follow_up, params)

    assert warm.cached_tokens >= 576
    cold = Engine(smollm2_loaded).generate(follow_up, params)
    assert warm.token_ids == cold.token_ids and warm.text == cold.text
