"""Continuous batching in the torch engine: one forward per step over every active request.

The story: requests join and leave between steps, long prompts are prefilled in chunks while
the others keep decoding, and through all of it each request gets the answer (and the raw
model's log-probabilities) it would get alone. The prefix cache keeps serving a new request the
KV of its longest cached prefix, even while others share the steps."""

from __future__ import annotations

import random
import threading

import pytest

from permamesh.client.blocking import Client
from permamesh.identity import NodeIdentity
from permamesh.workers.server import ServerConfig, ServerThread, WorkerServer

from permamesh.routing.blocks import BlockHasher
from permamesh.workers.engine import Engine, EngineConfig, SamplingParams
from permamesh.workers.prefix_cache import PrefixKVCache

GREEDY = SamplingParams(max_tokens=24, logprobs=True)
LOGPROB_TOLERANCE = 1e-4  # fp32, batched vs alone (measured ~5e-7 on tiny-random)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(256) for _ in range(n)]


def _assert_same(got, want) -> None:
    assert got.token_ids == want.token_ids
    assert got.finish_reason == want.finish_reason
    assert max((abs(a - b) for a, b in zip(got.logprobs, want.logprobs)), default=0.0) < LOGPROB_TOLERANCE


def _run_together(engine: Engine, prompts, params, join_at=None):
    """Run ``prompts`` through one engine, request i joining at step ``join_at[i]`` (default 0);
    return their completions and the step reports."""
    join_at = join_at or [0] * len(prompts)
    runs, done, reports, step = {}, {}, [], 0
    while len(done) < len(prompts):
        for i, prompt in enumerate(prompts):
            if join_at[i] <= step and i not in runs:
                runs[i] = engine.start(prompt, params)
        active = [run for i, run in runs.items() if i not in done]
        if active:
            reports.append(engine.step(active))
            assert not reports[-1].failed
        for i, run in runs.items():
            if i not in done and run.done:
                done[i] = engine.finish(run)
        step += 1
    return [done[i] for i in range(len(prompts))], reports


def test_greedy_answers_are_identical_alone_and_in_a_batch(tiny_loaded):
    rng = random.Random(3)
    prompts = [_tokens(rng, n) for n in (5, 40, 300, 17, 1, 90, 64, 8)]
    engine = Engine(tiny_loaded, config=EngineConfig(step_tokens=64))
    alone = [engine.generate(p, GREEDY) for p in prompts]
    together, reports = _run_together(engine, prompts, GREEDY, join_at=[0, 0, 1, 3, 3, 7, 12, 20])
    for got, want in zip(together, alone):
        _assert_same(got, want)
    assert max(r.prefill_tokens + r.decode_tokens for r in reports) <= 64
    assert max(r.decode_tokens for r in reports) >= 6  # several requests really shared steps


def test_seeded_sampling_is_identical_alone_and_in_a_batch(tiny_loaded):
    rng = random.Random(4)
    prompts = [_tokens(rng, n) for n in (12, 70, 33)]
    engine = Engine(tiny_loaded)
    params = [SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=s, logprobs=True) for s in (1, 2, 3)]
    alone = [engine.generate(p, q) for p, q in zip(prompts, params)]
    runs = [engine.start(p, q) for p, q in zip(prompts, params)]
    while any(not run.done for run in runs):
        engine.step([run for run in runs if not run.done])
    for run, want in zip(runs, alone):
        _assert_same(engine.finish(run), want)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding(tiny_loaded):
    rng = random.Random(5)
    engine = Engine(tiny_loaded, config=EngineConfig(step_tokens=32))
    decoding = engine.start(_tokens(rng, 10), SamplingParams(max_tokens=40))
    engine.step([decoding])  # prefilled, first token out
    long_prompt = engine.start(_tokens(rng, 200), SamplingParams(max_tokens=3))
    tokens_before = len(decoding.ids)
    reports = []
    while long_prompt.prefilling:
        reports.append(engine.step([decoding, long_prompt]))
    assert len(reports) == 7  # 200 prompt tokens at 31 a step (one goes to the decoding request)
    assert all(r.decode_tokens == 1 and r.prefill_tokens <= 31 for r in reports)
    assert len(decoding.ids) == tokens_before + len(reports)  # it never stalled
    for run in (decoding, long_prompt):
        engine.abandon(run)


def test_requests_leave_and_their_kv_is_freed(tiny_loaded):
    rng = random.Random(6)
    engine = Engine(tiny_loaded, config=EngineConfig(step_tokens=512))
    prompts = [_tokens(rng, 400) for _ in range(4)]  # 1,600 + answers: the pool grows while they run
    alone = [engine.generate(p, GREEDY) for p in prompts]
    together, _ = _run_together(engine, prompts, GREEDY, join_at=[0, 1, 2, 3])
    for got, want in zip(together, alone):
        _assert_same(got, want)
    pool = engine._pool
    assert pool.used() == 0 and pool.capacity == pool.initial_slots  # shrunk back once empty


def test_one_requests_failure_does_not_touch_the_others(tiny_loaded):
    rng = random.Random(7)
    engine = Engine(tiny_loaded)
    prompts = [_tokens(rng, 20) for _ in range(3)]
    alone = [engine.generate(p, GREEDY) for p in prompts]

    def explode(step):
        if step.index == 3:
            raise RuntimeError("the client went away")

    runs = [engine.start(prompts[0], GREEDY), engine.start(prompts[1], GREEDY, explode), engine.start(prompts[2], GREEDY)]
    failed = []
    while any(not run.done for run in runs):
        report = engine.step([run for run in runs if not run.done])
        for run, exc in report.failed:
            failed.append(str(exc))
            engine.abandon(run)
    assert failed == ["the client went away"]
    _assert_same(engine.finish(runs[0]), alone[0])
    _assert_same(engine.finish(runs[2]), alone[2])


def test_a_new_request_reuses_the_kv_of_its_longest_cached_prefix_while_others_run(tiny_loaded):
    rng = random.Random(8)
    system = _tokens(rng, 80)
    first, second = system + _tokens(rng, 10), system + _tokens(rng, 12)
    plain = Engine(tiny_loaded)
    engine = Engine(tiny_loaded)  # the worker learns its group's salt after the engine is made
    engine.prefix_cache = PrefixKVCache(BlockHasher(16), 1 << 26)

    busy = engine.start(_tokens(rng, 30), SamplingParams(max_tokens=60))
    one = engine.start(first, GREEDY)
    while one.prefilling:
        engine.step([busy, one])
    two = engine.start(second, GREEDY)  # the first prompt's KV was kept when its prefill ended
    assert two.cached_tokens == 80
    runs = [busy, one, two]
    while any(not run.done for run in runs):
        engine.step([run for run in runs if not run.done])
    results = [engine.finish(run) for run in runs]
    _assert_same(results[1], plain.generate(first, GREEDY))
    _assert_same(results[2], plain.generate(second, GREEDY))
    assert results[2].cached_tokens == 80


def test_concurrent_clients_of_a_worker_get_the_answers_they_would_get_alone(tiny_loaded):
    engine = Engine(tiny_loaded)
    prompts = [f"question number {i} " * (i + 1) for i in range(6)]
    alone = [engine.generate(engine.tokenizer.encode(p), SamplingParams(max_tokens=20)).token_ids for p in prompts]
    thread = ServerThread(WorkerServer(engine, NodeIdentity.generate(), ServerConfig(max_active=4)))
    endpoint = thread.start()
    answers: dict[int, tuple[int, ...]] = {}
    try:
        def ask(i: int) -> None:
            with Client([endpoint]) as client:
                answers[i] = client.generate(prompts[i], max_tokens=20).token_ids

        askers = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join(60)
        with Client([endpoint]) as client:
            (status,) = client.status()
    finally:
        thread.stop()
    assert [answers.get(i) for i in range(len(prompts))] == alone
    assert status.served == len(prompts) and status.decode_tok_per_s > 0
    assert thread.server.executor.steps < sum(len(a) for a in alone)  # tokens shared steps


@pytest.mark.model
def test_smollm2_greedy_answers_are_identical_alone_and_in_a_batch(smollm2_loaded):
    engine = Engine(smollm2_loaded)
    from permamesh.wire import ChatMessage

    questions = ["What is the capital of France?", "Name three colours.", "Count to five.",
                 "Write a haiku about the sea.", "What is 2 + 2?", "Say hello in Spanish."]
    prompts = [engine.tokenizer.chat_ids([ChatMessage("user", q)]) for q in questions]
    params = SamplingParams(max_tokens=16, logprobs=True)
    alone = [engine.generate(p, params) for p in prompts]
    together, _ = _run_together(engine, prompts, params, join_at=[0, 0, 2, 2, 5, 9])
    for got, want in zip(together, alone):
        _assert_same(got, want)
