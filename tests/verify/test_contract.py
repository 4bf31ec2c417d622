"""The sampling contract: an honest sampler keeps it (fp32 and bf16 weights, seeded or not),
a worker that always answers the argmax or ignores the seed breaks it; the sums are judged
over a window of epochs; one answer's typicality is two-sided."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from permamesh.verify import contract
from permamesh.verify.contract import ContractConfig, ContractState, Tally, judge, update
from permamesh.verify.credit import CreditConfig, answer_credit, config_for
from permamesh.verify.errors import VerifyError
from permamesh.verify.scoring import TokenEvidence


def bernoulli_tally(rng: random.Random, tokens: int, p: float, *, argmax: bool = False) -> Tally:
    hits = tokens if argmax else sum(rng.random() < p for _ in range(tokens))
    return Tally(tokens=tokens, argmax_hits=hits, argmax_expected=tokens * p, argmax_variance=tokens * p * (1 - p))


def test_an_honest_samplers_argmax_hits_never_break_the_contract_in_a_thousand_windows() -> None:
    rng = random.Random(1)
    config = ContractConfig()
    for _ in range(1000):
        state = ContractState()
        for _ in range(config.window_epochs):
            state = update(state, bernoulli_tally(rng, rng.randint(0, 120), rng.uniform(0.3, 0.95)), config)
        assert judge(state, config).ok


def test_argmax_only_breaks_the_contract_within_one_epoch_of_ordinary_sampled_answers() -> None:
    rng = random.Random(2)
    state = update(ContractState(), bernoulli_tally(rng, 60, 0.6, argmax=True))
    verdict = judge(state)
    assert not verdict.ok and verdict.argmax_z > 6 and "argmax" in verdict.reason


def test_too_few_sampled_tokens_are_not_judged_and_old_epochs_leave_the_window() -> None:
    config = ContractConfig(window_epochs=3)
    assert judge(update(ContractState(), Tally(tokens=5, argmax_hits=5, argmax_expected=2.5,
                                                argmax_variance=1.25), config), config).ok
    state = update(ContractState(), bernoulli_tally(random.Random(3), 80, 0.5, argmax=True), config)
    assert not judge(state, config).ok
    for _ in range(3):
        state = update(state, Tally(), config)
    assert judge(state, config).ok and len(state.epochs) == 3


def test_seed_mismatches_beyond_the_slack_break_it_and_a_few_flips_do_not() -> None:
    flips = Tally(seeded_tokens=40, seed_mismatches=2)
    assert judge(update(ContractState(), flips)).ok
    ignored = Tally(seeded_tokens=40, seed_mismatches=12)
    verdict = judge(update(ContractState(), ignored))
    assert not verdict.ok and "seed" in verdict.reason


def test_typicality_is_two_sided_in_aggregate() -> None:
    low = Tally(tokens=100, typicality_sum=-80.0, typicality_variance=100.0)
    high = Tally(tokens=100, typicality_sum=+80.0, typicality_variance=100.0)
    assert not judge(update(ContractState(), low)).ok
    assert not judge(update(ContractState(), high)).ok
    assert judge(update(ContractState(), Tally(tokens=100, typicality_sum=20.0, typicality_variance=100.0))).ok


def test_bad_configs_and_inputs_raise() -> None:
    with pytest.raises(VerifyError):
        ContractConfig(max_z=0)
    with pytest.raises(VerifyError):
        update(ContractState(), "tally")


def evidence(n: int, *, z_sum: float, temperature: float = 0.7) -> TokenEvidence:
    return TokenEvidence(tuple([z_sum / n] * n), (True,) * n, (0.0,) * n, (1.0,) * n, -1.0, True, temperature, 1.0,
                         0.0, (0.5,) * n, ())


def test_a_seeded_token_that_lost_the_replay_by_a_hair_counts_as_its_draw_on_llamacpp() -> None:
    """llama.cpp's 8-bit activations tip near-tie races: a seeded token that finished within
    ``seed_tie_nats`` (0.5) of the replay's winner is no mismatch for a llama.cpp worker; the
    same answer from a torch worker (tie 0) counts every loss; a token outside the reference's
    nucleus (no weight: 1e30) counts on both."""
    import dataclasses

    from permamesh.verify.credit import ENGINE_CONFIGS

    gaps = (0.0, 0.0, 0.2, 0.49, 0.8, 1e30, 0.0, 0.05)
    ev = dataclasses.replace(evidence(8, z_sum=0.0), seed_match=tuple(g == 0.0 for g in gaps), seed_gap=gaps)
    kw = dict(finish_reason="length", max_tokens=8, stop_hit=False)
    llama = answer_credit(ev, [0.0] * 8, config=ENGINE_CONFIGS["llamacpp"], **kw).sampling
    torch_ = answer_credit(ev, [0.0] * 8, config=ENGINE_CONFIGS["torch"], **kw).sampling
    assert (llama.seeded_tokens, llama.seed_mismatches) == (8, 2)
    assert (torch_.seeded_tokens, torch_.seed_mismatches) == (8, 5)
    no_gaps = dataclasses.replace(ev, seed_gap=())  # evidence without gaps: every loss counts
    assert answer_credit(no_gaps, [0.0] * 8, config=ENGINE_CONFIGS["llamacpp"], **kw).sampling.seed_mismatches == 5


def test_one_answers_typicality_has_an_upper_bound_too() -> None:
    kw = dict(finish_reason="length", max_tokens=25, stop_hit=False)
    assert answer_credit(evidence(25, z_sum=0.0), [0.0] * 25, **kw).behaviour == 1.0
    assert answer_credit(evidence(25, z_sum=5.0 * 5), [1.0] * 25, **kw).behaviour == 1.0  # z = +5
    assert answer_credit(evidence(25, z_sum=12.0 * 5), [2.4] * 25, **kw).behaviour == 0.0  # z = +12


def test_a_scored_prefix_checks_counts_on_the_whole_answer_but_not_its_end() -> None:
    ev = evidence(16, z_sum=0.0)
    reported = [0.0] * 40
    ok = answer_credit(ev, reported, finish_reason="stop", max_tokens=64, stop_hit=False, answer_tokens=40)
    assert ok.structure == 1.0 and ok.scored_tokens == 16
    cut = answer_credit(ev, reported, finish_reason="length", max_tokens=64, stop_hit=False, answer_tokens=40)
    assert cut.structure == 0.0 and "truncated" in cut.reason
    short = answer_credit(ev, [0.0] * 39, finish_reason="stop", max_tokens=64, stop_hit=False, answer_tokens=40)
    assert short.credit == 0.0
    with pytest.raises(VerifyError):
        answer_credit(ev, reported, finish_reason="stop", max_tokens=64, stop_hit=False, answer_tokens=8)


def test_each_engine_has_its_tolerance_and_an_unknown_engine_gets_the_strictest() -> None:
    assert config_for("llamacpp").agree_tol > config_for("torch").agree_tol
    assert config_for("llamacpp").agree_zero == config_for("torch").agree_zero  # cheaters stay caught
    assert config_for("something-new") == config_for("torch") == CreditConfig()


# -- with a real (tiny) model: honest samplers keep it, argmax-only and seed-ignoring do not ----------


@pytest.fixture(scope="module")
def bench_zoo():
    from permamesh.bench.verifyzoo import Zoo, load_reference
    from permamesh.verify.verifier import Verifier
    from permamesh.workers import models

    ref = load_reference(models.TINY_RANDOM, None, 0)
    return Zoo(ref, 0), Verifier(ref)


def sampled_requests(n: int, seed: int):
    from permamesh.wire import ChatMessage, GenerateRequest

    rng = random.Random(seed)
    words = "the mesh serves models to people who ask questions about cats rivers and code".split()
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        yield GenerateRequest(f"{seed:04d}{i:028x}", messages=(ChatMessage("user", text),), max_tokens=20,
                              temperature=rng.choice((0.5, 0.7, 1.0)), seed=rng.choice((0, 42, rng.getrandbits(32))),
                              logprobs=True)


def judged(node, verifier, seed: int, answers: int = 8) -> contract.Verdict:
    credits = [verifier.score(req, node(req)) for req in sampled_requests(answers, seed)]
    return judge(update(ContractState(), contract.tally(credits)))


def test_honest_fp32_and_bf16_samplers_keep_the_contract_on_seeded_answers(bench_zoo) -> None:
    zoo, verifier = bench_zoo
    for kind in ("same", "bf16"):
        verdict = judged(zoo.honest(kind, kind), verifier, seed=5)
        assert verdict.ok, f"{kind}: {verdict.reason}"
        assert verdict.seeded_tokens > 0 and verdict.seed_mismatches <= 1


def test_argmax_only_and_seed_ignoring_workers_break_it(bench_zoo) -> None:
    zoo, verifier = bench_zoo
    argmax = judged(zoo.cheater("argmax-only"), verifier, seed=6)
    assert not argmax.ok and argmax.argmax_z > 6, argmax
    ignoring = judged(zoo.cheater("seed-ignoring"), verifier, seed=7)
    assert not ignoring.ok and "seed" in ignoring.reason, ignoring
    assert ignoring.seed_mismatches > ignoring.seeded_tokens / 2


@pytest.mark.parametrize(("engine", "flip_rate"), [("torch", 0.0032), ("llamacpp", 0.006)])
def test_each_engines_honest_seed_flips_pass_and_a_seed_ignorer_fails(engine: str, flip_rate: float) -> None:
    """Flip rates are the ones measured against SmolLM2's fp32 reference (bf16 torch; llama.cpp's
    GGUF and its Q8_0 copy counted beyond the engine's seed tie, 0.4-0.6%); a seed-ignoring
    worker misses a third of its draws or more (about half beyond the tie)."""
    config = contract.contract_for(engine)
    rng = random.Random(7)
    failed = 0
    for _ in range(2000):  # one seeded answer of 16 tokens: the hardest case for an honest worker
        flips = sum(rng.random() < flip_rate for _ in range(16))
        failed += not judge(update(ContractState(), Tally(seeded_tokens=16, seed_mismatches=flips), config),
                            config).ok
    assert failed <= 2  # ~1e-4 each
    for tokens in (16, 48):
        ignored = Tally(seeded_tokens=tokens, seed_mismatches=round(tokens / 3))
        assert not judge(update(ContractState(), ignored, config), config).ok


def test_an_unknown_engine_gets_the_strictest_contract() -> None:
    assert contract.contract_for("made-up") == contract.contract_for("torch")
    assert contract.contract_for("llamacpp").seed_grace > contract.contract_for("torch").seed_grace
