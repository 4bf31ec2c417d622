"""The overlay simulations: delivery under relay failure agrees with the binomial formula,
resends and extra cloves pay, and the anonymity Monte Carlo agrees with its closed forms
and shows what the path rules buy."""

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
from permamesh.bench.overlaysim import analytic_delivery, draw_distinct, simulate_delivery
from permamesh.bench.traces import BenchError

QUICK = dict(n_relays=10_000, failure_rates=[0.0, 0.03, 0.1, 0.2], hops=3, requests=4000,
             resends=[0, 2], seed=3)


def within_sampling_error(observed: float, expected: float, trials: int, slack: float = 0.0):
    sigma = math.sqrt(max(expected * (1 - expected), 1e-6) / trials)
    assert abs(observed - expected) <= 4.5 * sigma + slack, (observed, expected)


# -- delivery --------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, model", [("separate", "dead"), ("reverse", "transient"),
                                          ("none", "dead")])
def test_delivery_matches_the_binomial_formula(reply, model):
    rows = simulate_delivery(**QUICK, reply_paths=reply, failure_model=model)
    assert len(rows) == 4 * 4 * 2
    for row in rows:
        # resends over fresh paths that avoid dead relays do slightly better than independent
        # attempts; the slack covers that (N = 10,000 makes it tiny)
        within_sampling_error(row["delivery_rate"], row["analytic_rate"], row["requests"],
                              slack=0.004 if row["resends"] else 0.0)
        assert row["mean_attempts"] == pytest.approx(row["analytic_mean_attempts"], abs=0.06)


def test_the_formula_by_hand():
    # (4, 3), L = 3, p = 0.1: a path works with q = 0.729, the request with
    # 4 q^3 (1 - q) + q^4, the round trip with that squared
    q = 0.9**3
    one_way = 4 * q**3 * (1 - q) + q**4
    assert analytic_delivery(4, 3, 3, 0.1, reply_paths="none") == pytest.approx((one_way, 1.0))
    rate, attempts = analytic_delivery(4, 3, 3, 0.1, resends=2)
    assert rate == pytest.approx(1 - (1 - one_way**2) ** 3)
    assert attempts == pytest.approx(1 + (1 - one_way**2) + (1 - one_way**2) ** 2)


def test_no_failures_means_every_request_arrives_first_time():
    rows = simulate_delivery(2000, [0.0], requests=500, resends=3)  # R = 3 means (0, 3)
    assert [row["resends"] for row in rows] == [0, 3] * 4
    for row in rows:
        assert row["delivery_rate"] == 1.0 and row["mean_attempts"] == 1.0


def test_resends_and_spare_cloves_pay_and_results_are_reproducible_json():
    rows = simulate_delivery(**QUICK)
    assert rows == simulate_delivery(**QUICK)
    json.dumps(rows)
    rate = {(r["scheme"], r["failure_rate"], r["resends"]): r["delivery_rate"] for r in rows}
    for p in (0.03, 0.1, 0.2):
        assert rate["sida(4,3)", p, 2] > rate["sida(4,3)", p, 0]
        assert rate["sida(6,3)", p, 0] > rate["sida(5,3)", p, 0] > rate["sida(4,3)", p, 0]
    assert rate["sida(4,3)", 0.03, 0] > rate["onion", 0.03, 0]


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
                                    {"resends": [-1]}])
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
