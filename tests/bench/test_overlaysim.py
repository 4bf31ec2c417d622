"""The overlay simulations: delivery under relay failure (targeted resend, whole attempts,
onion) agrees with its formulas, resends and spare cloves pay and meet the targets, and the
anonymity Monte Carlo agrees with its closed forms and shows what the path rules buy."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from permamesh.bench.anonsim import (
    DEFAULT_SCHEMES,
    METRICS,
    AnonScheme,
    _paths,
    _population,
    simulate_anonymity,
)
from permamesh.bench.overlaysim import (
    Odds,
    analytic_delivery,
    binomial_tail,
    draw_distinct,
    simulate_delivery,
)
from permamesh.bench.traces import BenchError

QUICK = dict(n_relays=10_000, failure_rates=[0.0, 0.03, 0.1, 0.2], hops=3, requests=4000,
             resends=[0, 3], seed=3)


def within_sampling_error(observed: float, expected: float, trials: int, slack: float = 0.0):
    sigma = math.sqrt(max(expected * (1 - expected), 1e-6) / trials)
    assert abs(observed - expected) <= 4.5 * sigma + slack, (observed, expected)


def agrees_with_the_formula(rows):
    for row in rows:
        # resends over fresh paths that avoid dead relays do slightly better than independent
        # paths; the slack covers that (N = 10,000 makes it tiny)
        slack = 0.004 if row["resends"] and row["failure_model"] == "dead" else 0.0
        within_sampling_error(row["delivery_rate"], row["analytic_rate"], row["requests"], slack)
        assert row["mean_attempts"] == pytest.approx(row["analytic_mean_attempts"], abs=0.06)
        assert row["mean_cloves"] == pytest.approx(row["analytic_mean_cloves"], rel=0.03)


# -- delivery --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["dead", "transient"])
def test_targeted_resend_matches_the_dynamic_program(model):
    rows = simulate_delivery(**QUICK, failure_model=model, rules=["targeted", "targeted-min"])
    assert len(rows) == 4 * 4 * 2 * 2
    assert {(row["rule"], row["reply_paths"], row["max_cloves"]) for row in rows} == {
        ("targeted", "reverse", 8), ("targeted-min", "reverse", 8)}
    agrees_with_the_formula(rows)


@pytest.mark.parametrize("reply, model", [("reverse", "dead"), ("separate", "transient"),
                                          ("separate", "dead")])
def test_the_whole_attempt_rule_matches_the_binomial_formula(reply, model):
    rows = simulate_delivery(**QUICK, rules=["attempt"], reply_paths=reply, failure_model=model)
    assert {row["rule"] for row in rows} == {"attempt"}
    agrees_with_the_formula(rows)


def test_the_formulas_by_hand():
    # (4, 3), L = 3, p = 0.1: a path works (both ways) with q = 0.729
    q = 0.9**3
    one_way = 4 * q**3 * (1 - q) + q**4
    assert analytic_delivery(4, 3, 3, 0.1) == Odds(pytest.approx(one_way), 1.0, 4.0)
    rate = analytic_delivery(4, 3, 3, 0.1, resends=2, rule="attempt", reply_paths="separate")
    miss = 1 - one_way**2
    assert rate == Odds(pytest.approx(1 - miss**3), pytest.approx(1 + miss + miss**2),
                        pytest.approx(4 * (1 + miss + miss**2)))
    # one targeted round: j of 4 acked; 4 - j new cloves go out, and the request needs 3 - j
    acked = [math.comb(4, j) * q**j * (1 - q) ** (4 - j) for j in range(5)]
    rate = acked[3] + acked[4] + sum(acked[j] * binomial_tail(4 - j, 3 - j, q) for j in range(3))
    cloves = 4 + sum(acked[j] * (4 - j) for j in range(3))
    assert analytic_delivery(4, 3, 3, 0.1, resends=1) == Odds(
        pytest.approx(rate), pytest.approx(2 - one_way), pytest.approx(cloves))
    # with no spare cloves there is nothing to resend
    assert analytic_delivery(4, 3, 3, 0.1, resends=3, max_cloves=4).rate == pytest.approx(one_way)
    # onion under the targeted rule: up to 1 + R independent single paths
    assert analytic_delivery(1, 1, 3, 0.1, resends=3).rate == pytest.approx(1 - (1 - q) ** 4)


def test_no_failures_means_every_request_arrives_first_time():
    rows = simulate_delivery(2000, [0.0], requests=500, resends=3)  # R = 3 means (0, 3)
    assert [row["resends"] for row in rows] == [0, 3] * 4
    for row in rows:
        assert row["delivery_rate"] == 1.0 and row["mean_attempts"] == 1.0
        assert row["mean_cloves"] == row["n"]


def test_the_protocol_meets_its_delivery_targets():
    # the defaults: R = 3 rounds, 8 cloves, paths of 3; targets 99.5% at 3%, 97% at 10%
    for n in (4, 5, 6):
        assert analytic_delivery(n, 3, 3, 0.03, 3).rate >= 0.995
        assert analytic_delivery(n, 3, 3, 0.10, 3).rate >= 0.97
    rows = simulate_delivery(failure_rates=[0.03, 0.1], schemes=[(4, 3)], requests=20_000,
                             resends=[3], seed=1)
    rate = {row["failure_rate"]: row["delivery_rate"] for row in rows}
    assert rate[0.03] >= 0.995 and rate[0.1] >= 0.97


def test_resends_and_spare_cloves_pay_and_results_are_reproducible_json():
    rows = simulate_delivery(**QUICK)
    assert rows == simulate_delivery(**QUICK)
    json.dumps(rows)
    rate = {(r["scheme"], r["failure_rate"], r["resends"]): r["delivery_rate"] for r in rows}
    for p in (0.03, 0.1, 0.2):
        assert rate["sida(4,3)", p, 3] > rate["sida(4,3)", p, 0]
        assert rate["sida(6,3)", p, 0] > rate["sida(5,3)", p, 0] > rate["sida(4,3)", p, 0]
    assert rate["sida(4,3)", 0.03, 0] > rate["onion", 0.03, 0]


def test_targeted_resend_sends_fewer_cloves_than_whole_attempts():
    rows = simulate_delivery(**{**QUICK, "failure_rates": [0.1, 0.2], "resends": [3]},
                             rules=["targeted", "targeted-min", "attempt"])
    by = {(r["rule"], r["scheme"], r["failure_rate"]): r for r in rows}
    for p in (0.1, 0.2):
        targeted, attempt = by["targeted", "sida(4,3)", p], by["attempt", "sida(4,3)", p]
        minimal = by["targeted-min", "sida(4,3)", p]
        assert minimal["mean_cloves"] < targeted["mean_cloves"] < attempt["mean_cloves"]
        assert targeted["delivery_rate"] >= attempt["delivery_rate"] - 0.01
        # sending only what is missing leaves less margin per round
        assert minimal["analytic_rate"] < targeted["analytic_rate"]
        # onion is the same under both rules: one fresh path per resend
        assert by["targeted", "onion", p]["analytic_rate"] == pytest.approx(
            by["attempt", "onion", p]["analytic_rate"])


def test_a_request_never_uses_more_than_max_cloves():
    # 30 relays, a third dead: many resends, each over relays not used before
    rows = simulate_delivery(30, [0.3], schemes=[(4, 3)], requests=3000, resends=[5],
                             max_cloves=6)
    assert rows[0]["mean_cloves"] <= 6 and rows[0]["delivery_rate"] > 0


def test_avoiding_the_relays_of_failed_paths_pays_when_the_dead_stay_dead():
    # 50 relays, 10 dead for the run: each failed path holds a dead one, so every resend
    # draws from a healthier pool; transient failures gain nothing from it
    args = dict(n_relays=50, failure_rates=[0.2], schemes=[(1, 1)], hops=3, requests=20_000,
                resends=[3], seed=1)
    dead = simulate_delivery(**args)[0]["delivery_rate"]
    transient = simulate_delivery(**args, failure_model="transient")[0]["delivery_rate"]
    assert dead > transient + 0.02


def test_draw_distinct_never_repeats_and_honours_avoid_lists():
    rng = np.random.default_rng(0)
    avoid = np.full((3000, 5), -1)
    avoid[:, :3] = rng.integers(0, 20, (3000, 3))
    out = draw_distinct(rng, 20, 3000, 8, avoid)
    assert all(len(set(row)) == 8 for row in out.tolist())
    assert not any(set(row) & set(a) for row, a in zip(out.tolist(), avoid.tolist()))
    # uniform over what is allowed: item 0 avoided, the other five each in 3 of 5 slots
    out = draw_distinct(rng, 6, 20_000, 3, np.zeros((20_000, 1), dtype=np.int64))
    counts = np.bincount(out.ravel(), minlength=6) / 20_000
    assert counts[0] == 0 and np.allclose(counts[1:], 0.6, atol=0.015)
    with pytest.raises(BenchError):
        draw_distinct(rng, 5, 1, 6)


@pytest.mark.parametrize("kwargs", [{"reply_paths": "both"}, {"failure_model": "sometimes"},
                                    {"failure_rates": [1.0]}, {"schemes": [(3, 4)]},
                                    {"resends": [-1]}, {"rules": ["magic"]}, {"rules": []},
                                    {"reply_paths": "separate"}, {"max_cloves": 3}])
def test_bad_delivery_arguments_are_rejected(kwargs):
    with pytest.raises(BenchError):
        simulate_delivery(**{**QUICK, "requests": 10, **kwargs})


# -- anonymity -------------------------------------------------------------------------------

ANON = dict(n_nodes=10_000, fractions=[0.01, 0.1, 0.3, 0.5], requests=5000, seed=5)


def by_scheme(rows, f):
    return {r["scheme"]: r for r in rows if r["fraction"] == f}


def test_anonymity_matches_the_closed_forms():
    rows = simulate_anonymity(**ANON)
    assert rows == simulate_anonymity(**ANON)
    json.dumps(rows)
    for row in rows:
        for metric in METRICS:
            # slack: nodes are drawn without replacement from 10,000, the formulas with
            within_sampling_error(row[metric], row["analytic"][metric], row["requests"], 0.002)


def test_at_ten_percent_permamesh_reads_and_links_least():
    row = by_scheme(simulate_anonymity(**ANON), 0.1)
    onion, garlic, mesh = row["onion"], row["garlic-cast"], row["permamesh"]
    assert mesh["read"] < garlic["read"] < onion["read"]
    assert mesh["link"] < onion["link"] < garlic["link"]
    # the price: n first hops see the client (the reason paths are kept per session)
    assert mesh["sender"] > onion["sender"]


def test_a_lone_relay_never_sees_two_cloves_of_one_request():
    rows = simulate_anonymity(**ANON, collusion="node")
    for row in rows:
        if row["kind"] != "garlic":  # distinct relays: the first hop is never a proxy too
            assert row["link"] == 0 and row["trace"] == 0
        if row["kind"] == "permamesh":
            assert row["read"] == 0 and row["read_any_hop"] == 0


def test_an_isp_cannot_read_permamesh_requests_alone():
    rows = simulate_anonymity(**ANON, adversary="isp", collusion="isp")
    assert all(row["analytic"] is None for row in rows)  # the closed forms are for "uniform"
    assert by_scheme(rows, 0.3)["permamesh"]["read"] == 0  # proxies sit in distinct ISPs
    assert by_scheme(rows, 0.3)["onion"]["read"] > 0.25


def test_permamesh_paths_obey_the_rules():
    rng = np.random.default_rng(2)
    isp_of, _ = _population(rng, 2000, 20, 0.1, "isp")
    scheme = AnonScheme("p", "permamesh", 5, 3, 4)
    paths = _paths(rng, scheme, isp_of, 2000)
    for request in paths.tolist():
        assert len({node for path in request for node in path}) == 20
        assert all(len({int(isp_of[node]) for node in path}) == 4 for path in request)
        assert len({int(isp_of[path[-1]]) for path in request}) == 5


def test_the_isp_adversary_holds_exactly_its_share():
    _, bad = _population(np.random.default_rng(0), 10_000, 100, 0.1, "isp")
    assert bad.sum() == 1000


def test_quick_settings_run_in_a_few_seconds():
    start = time.perf_counter()
    simulate_delivery(failure_rates=[0.0, 0.03, 0.1, 0.2], requests=5000)
    simulate_anonymity(requests=5000)
    assert time.perf_counter() - start < 8.0


@pytest.mark.parametrize("kwargs", [{"adversary": "nsa"}, {"collusion": "some"},
                                    {"fractions": [1.5]}, {"requests": 0}])
def test_bad_anonymity_arguments_are_rejected(kwargs):
    with pytest.raises(BenchError):
        simulate_anonymity(**{**ANON, **kwargs})
    with pytest.raises(BenchError):
        AnonScheme("x", "carrier-pigeon")
    assert DEFAULT_SCHEMES[2].n == 4
