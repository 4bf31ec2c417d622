"""Credit arithmetic over synthetic evidence (pure: no model). Each check alone, then how they
combine, then bad numbers from a peer."""

from __future__ import annotations

import dataclasses

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.verify.credit import CreditConfig, answer_credit, perplexity_credit, ramp, to_ppm
from permamesh.verify.errors import VerifyError
from permamesh.verify.scoring import TokenEvidence


def evidence(ref=(-0.1, -0.2, -0.3), greedy=True, matches=None, temperature=0.0, expected=None, var=None,
             end_logprob=-0.05, end_is_greedy=True) -> TokenEvidence:
    n = len(ref)
    return TokenEvidence(tuple(ref), tuple(matches if matches is not None else [greedy] * n),
                         tuple(expected if expected is not None else ref), tuple(var if var is not None else [0.5] * n),
                         end_logprob, end_is_greedy, temperature, 1.0)


def test_an_honest_greedy_answer_gets_full_credit():
    c = answer_credit(evidence(), [-0.1, -0.2, -0.3], finish_reason="stop", max_tokens=8, stop_hit=False)
    assert c.credit == 1.0 and c.reason == "" and c.greedy_share == 1.0 and c.ppm == 1_000_000


def test_reported_logprobs_within_the_noise_floor_pass_and_far_ones_fail():
    close = answer_credit(evidence(), [-0.12, -0.18, -0.33], finish_reason="stop", max_tokens=8, stop_hit=False)
    assert close.credit == 1.0
    far = answer_credit(evidence(), [-1.1, -1.2, -1.3], finish_reason="stop", max_tokens=8, stop_hit=False)
    assert far.credit == 0.0 and "differ by 1 nats" in far.reason
    half = answer_credit(evidence(), [-0.215, -0.315, -0.415], finish_reason="stop", max_tokens=8, stop_hit=False)
    # three tokens: the tolerance widens by sqrt(8 / 3) (a mean of few tokens is noisier)
    assert half.agreement == pytest.approx(ramp(-0.115, -0.2, -0.03 * (8 / 3) ** 0.5)) and 0 < half.credit < 1


def test_a_greedy_near_tie_counts_as_a_match_within_the_engines_margin():
    """An honest llama.cpp answer may take the reference's second choice where the two are
    within a few tenths of a nat; a token far below the argmax is still a mismatch."""
    from permamesh.verify.credit import config_for

    ties = dataclasses.replace(evidence(ref=(-0.7, -0.1, -0.75, -0.2), matches=[False, True, False, True]),
                               greedy_gap=(0.2, 0.0, 0.25, 0.0))
    reported = [-0.7, -0.1, -0.75, -0.2]
    strict = answer_credit(ties, reported, finish_reason="length", max_tokens=4, stop_hit=False)
    assert strict.greedy_share == 0.5 and strict.credit == 0.0  # torch's 0.05 nats: two mismatches
    llama = answer_credit(ties, reported, finish_reason="length", max_tokens=4, stop_hit=False,
                          config=config_for("llamacpp"))
    assert llama.greedy_share == 1.0 and llama.credit == 1.0
    far = dataclasses.replace(ties, greedy_gap=(2.0, 0.0, 3.0, 0.0))
    assert answer_credit(far, reported, finish_reason="length", max_tokens=4, stop_hit=False,
                         config=config_for("llamacpp")).credit == 0.0


def test_a_grammars_forced_tokens_are_not_compared_but_the_models_choices_are():
    """Under a grammar, ``compared`` marks where the model chose: a forced token's log-prob (in
    the model's tail, far off for a quantized engine) is left out of the gap; the chosen ones
    still are, so a cheater's wrong numbers there cost what they always did."""
    forced = dataclasses.replace(evidence(ref=(-0.1, -9.0, -0.3, -0.2)), compared=(True, False, True, True))
    honest = answer_credit(forced, [-0.1, -7.5, -0.31, -0.2], finish_reason="stop", max_tokens=8, stop_hit=False)
    assert honest.credit == 1.0 and honest.mean_abs_diff == pytest.approx(0.01 / 3)
    cheat = answer_credit(forced, [-0.5, -9.0, -0.7, -0.6], finish_reason="stop", max_tokens=8, stop_hit=False)
    assert cheat.credit == 0.0 and cheat.mean_abs_diff == pytest.approx(0.4)
    unmarked = answer_credit(evidence(ref=(-0.1, -9.0, -0.3, -0.2)), [-0.1, -7.5, -0.31, -0.2],
                             finish_reason="stop", max_tokens=8, stop_hit=False)
    assert unmarked.credit < 1.0  # without the mark every position counts, as before


def test_greedy_mismatches_cost_credit_at_temperature_zero():
    c = answer_credit(evidence(matches=[True, False, False]), [-0.1, -0.2, -0.3], finish_reason="stop",
                      max_tokens=8, stop_hit=False)
    assert c.greedy_share == pytest.approx(1 / 3) and c.credit == 0.0 and "greedy match" in c.reason


def test_a_sampled_answer_is_judged_by_typicality():
    typical = evidence(ref=[-2.0] * 20, expected=[-2.0] * 20, var=[1.0] * 20, temperature=0.8)
    assert answer_credit(typical, [-2.0] * 20, finish_reason="length", max_tokens=20, stop_hit=False).credit == 1.0
    # tokens 2.5 nats less likely than the reference's own samples, every one: z = -50 / sqrt(20)
    unlikely = evidence(ref=[-4.5] * 20, expected=[-2.0] * 20, var=[1.0] * 20, temperature=0.8)
    c = answer_credit(unlikely, [-4.5] * 20, finish_reason="length", max_tokens=20, stop_hit=False)
    assert c.typicality_z == pytest.approx(-50 / math.sqrt(20 + 1e-6)) and c.credit == 0.0


@pytest.mark.parametrize("finish, n_max, end_greedy, stop_hit, ok", [
    ("length", 3, True, False, True),  # ran to max_tokens
    ("length", 8, True, False, False),  # "length" before max_tokens: cut short
    ("stop", 8, True, False, True),  # the reference would end here too
    ("stop", 8, False, False, False),  # the reference would go on: truncated
    ("stop", 8, False, True, True),  # a stop string ended it
    ("eos?", 8, True, False, False),  # unknown reason
])
def test_structure_catches_truncation(finish, n_max, end_greedy, stop_hit, ok):
    c = answer_credit(evidence(end_is_greedy=end_greedy), [-0.1, -0.2, -0.3], finish_reason=finish, max_tokens=n_max,
                      stop_hit=stop_hit)
    assert (c.structure == 1.0) is ok and (c.credit == 0.0) is (not ok)


@pytest.mark.parametrize("gap, ok", [(0.02, True), (0.09, True), (0.5, False), (6.0, False)])
def test_a_greedy_stop_at_a_near_tie_is_not_truncation(gap, ok):
    """A bf16 worker may rank the ending first where the fp32 reference ranks it a hair lower
    (seen in the honest soak); a real truncation leaves the ending far below the argmax."""
    ev = dataclasses.replace(evidence(end_is_greedy=False), end_gap=gap)
    c = answer_credit(ev, [-0.1, -0.2, -0.3], finish_reason="stop", max_tokens=8, stop_hit=False)
    assert (c.structure == 1.0) is ok and ("truncated" in c.reason) is (not ok)


def test_a_sampled_stop_needs_a_plausible_end():
    ev = evidence(temperature=0.7, end_logprob=math.log(1e-6), end_is_greedy=False)
    c = answer_credit(ev, [-0.1, -0.2, -0.3], finish_reason="stop", max_tokens=8, stop_hit=False)
    assert c.credit == 0.0 and "truncated" in c.reason


def test_missing_or_extra_logprobs_are_zero_credit():
    for reported in ([], [-0.1], [-0.1, -0.2, -0.3, -0.4]):
        c = answer_credit(evidence(), reported, finish_reason="stop", max_tokens=8, stop_hit=False)
        assert c.credit == 0.0 and "log-probs reported" in c.reason


def test_perplexity_credit_is_planetserves_rule_and_not_part_of_c():
    assert perplexity_credit([math.log(0.5)] * 4) == pytest.approx(0.5)  # PPL 2
    assert perplexity_credit([]) == 0.0
    c = answer_credit(evidence(ref=[-3.0, -3.0, -3.0]), [-3.0] * 3, finish_reason="stop", max_tokens=8, stop_hit=False)
    assert c.perplexity == pytest.approx(math.exp(-3.0)) and c.credit == 1.0  # PPL 20, still honest


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=0, max_size=6),
       st.sampled_from(["stop", "length", "", "x" * 40]), st.integers(0, 10), st.booleans())
def test_any_reported_numbers_give_a_credit_in_range_and_never_raise(reported, finish, max_tokens, stop_hit):
    c = answer_credit(evidence(), reported, finish_reason=finish, max_tokens=max_tokens, stop_hit=stop_hit)
    assert 0.0 <= c.credit <= 1.0 and 0 <= c.ppm <= 1_000_000


def test_config_and_ppm_reject_nonsense():
    with pytest.raises(VerifyError):
        CreditConfig(agree_tol=1.0, agree_zero=0.5)
    with pytest.raises(VerifyError):
        to_ppm(float("nan"))
    assert to_ppm(1.7) == 1_000_000 and to_ppm(-1) == 0
