"""The simulator: hand-checked service times, caches that fill and evict, reproducible runs,
and the claim itself (prefix-aware routing beats round-robin on chats)."""

from __future__ import annotations

import math
import statistics

import pytest

from permamesh.bench.sim import SimConfig, simulate, word_tokenizer
from permamesh.bench.stats import RequestRecord, percentile, summarize
from permamesh.bench.traces import GENERATORS, BenchError, TraceRequest
from permamesh.routing.policy import POLICY_NAMES

PREFILL, CACHED, DECODE, OVERHEAD = 370.0, 15000.0, 50.0, 0.01


def tokens_by_prompt(request: TraceRequest) -> list[int]:
    """Test tokenizer: the prompt is a space-separated list of token ids."""
    return [int(t) for t in (request.prompt or "").split()]


def prompt(tokens: list[int]) -> str:
    return " ".join(map(str, tokens))


def raw(session: str, t: float, tokens: list[int], max_tokens: int) -> TraceRequest:
    return TraceRequest(session, t, max_tokens, prompt=prompt(tokens))


A = list(range(1, 65))  # 4 blocks
B = A + list(range(100, 132))  # A plus 2 more blocks
C = list(range(500, 564))  # unrelated, 4 blocks


def run(trace: list[TraceRequest], **kw: object) -> list[RequestRecord]:
    config = SimConfig(**{"workers": 1, "policy": "permamesh", **kw})  # type: ignore[arg-type]
    return simulate(trace, config, tokens_by_prompt)


def test_one_worker_serves_fifo_and_reuses_the_prefix_it_holds() -> None:
    first, second = run([raw("a", 0.0, A, 10), raw("b", 0.5, B, 5)])
    prefill_a = OVERHEAD + 64 / PREFILL
    assert first.ttft_s == pytest.approx(prefill_a)
    assert first.e2e_s == pytest.approx(prefill_a + 10 / DECODE)
    assert (first.cached_tokens, first.prompt_tokens, first.worker) == (0, 64, "w000")
    # b arrives after a finished: a's four blocks are cached.
    prefill_b = OVERHEAD + 32 / PREFILL + 64 / CACHED
    assert second.cached_tokens == 64
    assert second.ttft_s == pytest.approx(prefill_b)
    assert second.e2e_s == pytest.approx(prefill_b + 5 / DECODE)
    assert (first.request_id, second.request_id) == ("req-000000", "req-000001")

    # b arrives while a runs: it waits in the queue, then still finds a's blocks.
    _, queued = run([raw("a", 0.0, A, 10), raw("b", 0.1, B, 5)])
    assert queued.cached_tokens == 64
    assert queued.ttft_s == pytest.approx(first.e2e_s - 0.1 + prefill_b)


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    _, again = run([raw("a", 0.0, A, 1), raw("b", 5.0, A, 1)])
    assert again.cached_tokens == 63
    assert again.ttft_s == pytest.approx(OVERHEAD + 1 / PREFILL + 63 / CACHED)


def test_a_worker_keeps_the_answer_it_generated_for_the_sessions_next_turn() -> None:
    turn1 = list(range(1, 41))  # 40 tokens: 2 full blocks
    turn2 = turn1 + list(range(41, 65)) + list(range(900, 930))  # + a 24-token answer + more
    trace = [raw("s", 0.0, turn1, 24), raw("s", 10.0, turn2, 8)]
    assert run(trace)[1].cached_tokens == 64  # prompt and answer: (40 + 24) // 16 blocks
    assert run(trace, cache_answers=False)[1].cached_tokens == 32  # the prompt's 2 blocks
    other = [raw("s", 0.0, turn1, 24), raw("t", 10.0, turn2, 8)]  # not the same session
    assert run(other)[1].cached_tokens == 32


def test_a_full_cache_evicts_its_least_recently_used_blocks() -> None:
    trace = [raw("a", 0.0, A, 1), raw("c", 5.0, C, 1), raw("b", 10.0, B, 1)]
    assert [r.cached_tokens for r in run(trace)] == [0, 0, 64]
    # Room for four blocks: C pushes A out (down to 90%: three blocks of C stay).
    assert [r.cached_tokens for r in run(trace, cache_blocks_per_worker=4)] == [0, 0, 0]
    assert [r.cached_tokens for r in run(trace, cache_blocks_per_worker=0)] == [0, 0, 0]


def test_with_one_worker_every_policy_gives_the_same_run() -> None:
    trace = GENERATORS["multi-turn"](120, 0.5, seed=2)
    runs = {name: simulate(trace, SimConfig(1, name, seed=4)) for name in POLICY_NAMES}
    assert all(r == runs["random"] for r in runs.values())
    assert {r.worker for r in runs["random"]} == {"w000"}


def test_runs_are_reproducible_per_seed() -> None:
    trace = GENERATORS["system-prompt"](300, 3.0, seed=2)
    for name in ("random", "permamesh"):
        config = SimConfig(8, name, seed=1)
        assert simulate(trace, config) == simulate(trace, config)
        assert simulate(trace, config) != simulate(trace, SimConfig(8, name, seed=2))


def _at_load(name: str, n: int, workers: int, load: float, seed: int) -> list[TraceRequest]:
    """A trace whose uncached work is ``load`` x what ``workers`` can do."""
    probe = GENERATORS[name](n, 1.0, seed)
    cold = statistics.fmean(
        OVERHEAD + len(word_tokenizer(r)) / PREFILL + r.max_tokens / DECODE for r in probe
    )
    return GENERATORS[name](n, load * workers / cold, seed)


@pytest.mark.parametrize("entry", ["random", "central"])
def test_prefix_aware_routing_cuts_chat_ttft_well_below_round_robin(entry: str) -> None:
    trace = _at_load("multi-turn", 1600, workers=16, load=0.7, seed=3)
    result = {
        name: summarize(simulate(trace, SimConfig(16, name, entry=entry, seed=1)))
        for name in ("round-robin", "least-loaded", "permamesh")
    }
    ours, rr, ll = result["permamesh"], result["round-robin"], result["least-loaded"]
    assert ours["ttft_mean_s"] < 0.5 * rr["ttft_mean_s"]
    assert ours["ttft_mean_s"] < 0.5 * ll["ttft_mean_s"]
    assert ours["e2e_p99_s"] < ll["e2e_p99_s"]
    assert ours["cache_hit_rate"] > rr["cache_hit_rate"] + 0.3


def test_one_hot_system_prompt_does_not_pull_all_traffic_onto_one_worker() -> None:
    trace = [
        TraceRequest(f"u{i}", r.t, r.max_tokens, (r.messages[0], r.messages[1]))
        for i, r in enumerate(_at_load("system-prompt", 600, workers=8, load=0.6, seed=5))
    ]
    records = simulate(trace, SimConfig(8, "permamesh", seed=1))
    summary = summarize(records, [f"w{k:03d}" for k in range(8)])
    assert min(summary["per_worker"].values()) > 0  # type: ignore[union-attr]
    assert summary["load_imbalance"] < 2.0
    assert summary["cache_hit_rate"] > 0.6


def test_members_under_the_reputation_floor_get_nothing_and_an_empty_field_fails() -> None:
    trace = GENERATORS["system-prompt"](200, 2.0, seed=1)
    mixed = simulate(trace, SimConfig(4, "permamesh", reputations=(1.0, 0.1)))
    assert {r.worker for r in mixed} == {"w000", "w002"}
    baseline = simulate(trace, SimConfig(4, "round-robin", reputations=(1.0, 0.1)))
    assert {r.worker for r in baseline} == {"w000", "w001", "w002", "w003"}  # it ignores them
    shunned = simulate(trace[:10], SimConfig(4, "permamesh", reputations=(0.1,)))
    assert all(not r.ok and "reputation" in r.error and r.worker == "" for r in shunned)
    assert summarize(shunned)["failed"] == 10


def test_faster_workers_take_more_of_the_load() -> None:
    trace = _at_load("system-prompt", 600, workers=4, load=0.6, seed=6)
    records = simulate(trace, SimConfig(4, "permamesh", speeds=(3.0, 1.0, 1.0, 1.0)))
    counts = summarize(records, ["w000", "w001", "w002", "w003"])["per_worker"]
    assert counts["w000"] > 600 // 4 * 2  # type: ignore[index]
    assert counts["w000"] > max(counts["w001"], counts["w002"], counts["w003"])  # type: ignore[index]


@pytest.mark.parametrize(
    "bad",
    [
        {"workers": 0},
        {"policy": "fastest"},
        {"entry": "anycast"},
        {"decode_tok_per_s": 0.0},
        {"sync_interval_s": -1.0},
        {"speeds": (1.0, 0.0)},
        {"reputations": (2.0,)},
    ],
)
def test_a_bad_config_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(BenchError, match="bad SimConfig"):
        SimConfig(**{"workers": 2, "policy": "permamesh", **bad})  # type: ignore[arg-type]


# -- stats ----------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank_and_summaries_count_what_they_say() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 99) == 5.0
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 20) == 1.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 0)
    records = [
        RequestRecord("r0", "s", "a", 0.0, 1.0, 3.0, 100, 50),
        RequestRecord("r1", "s", "a", 1.0, 2.0, 4.0, 100, 100),
        RequestRecord("r2", "t", "b", 2.0, 4.0, 8.0, 200, 0),
        RequestRecord("r3", "t", "", 3.0, math.nan, math.nan, 50, 0, ok=False, error="x"),
    ]
    summary = summarize(records, workers=["a", "b", "c"])
    assert summary["count"] == 4 and summary["failed"] == 1
    assert summary["ttft_mean_s"] == pytest.approx(7 / 3)
    assert (summary["ttft_p50_s"], summary["ttft_p99_s"], summary["e2e_p99_s"]) == (2.0, 4.0, 8.0)
    assert summary["cache_hit_rate"] == pytest.approx(150 / 400)
    assert summary["per_worker"] == {"a": 2, "b": 1, "c": 0}
    assert summary["load_max"] == 2 and summary["load_imbalance"] == pytest.approx(2.0)
