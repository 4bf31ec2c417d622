"""Payments: one partner's month worked out by hand; then the rules as properties: the third
node at a location is a donation, spreading it to a new location gets it paid, every modifier
multiplies exactly as stated, and the figures (whole cents) do not depend on input order."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.scheduler.payments import monthly_payments
from permamesh.scheduler.profile import group_locations, haversine_km
from permamesh.scheduler.weights import Weights
from tests.scheduler.test_scoring import FRANKFURT, NEW_YORK, TOKYO, meshes, node

W = Weights()


def nodes_of(payments):
    return {n.node_id: n for p in payments.values() for n in p.nodes}


def paid_count(payments) -> int:
    return sum(n.paid for n in nodes_of(payments).values())


def test_one_partners_month_by_hand():
    a = node("a", silicon_year=2016, uptime=0.99, executions=100, loaded_w=100)
    b = node("b", TOKYO, silicon_year=2010, uptime=0.97, executions=100, loaded_w=100)
    pay = monthly_payments([b, a], W)["p1"]
    km = round(haversine_km(FRANKFURT, TOKYO) * 1000) / 1000
    age = (10 + 16) / 2
    expected_terms = [2 * 1000,  # base
                      round(5 * Fraction(98)),  # mean uptime 98%
                      round(Fraction("0.05") * Fraction(str(km))),  # each is the other's peer
                      min(1000, round(Fraction(2000) / Fraction(200, 200))),  # 200 W / 200 runs
                      round(20 * Fraction(age))]
    assert expected_terms[3] == 1000  # 2000 / (1 W per execution), capped at efficiency_cap
    assert pay.subtotal == sum(expected_terms)
    assert pay.multiplier == Fraction(120, 100)  # Europe + Asia
    assert pay.total == round(Fraction(pay.subtotal) * Fraction(6, 5))
    assert pay.why[0] == "base: 1000 c x 2 paid node(s) = 2000 c"
    assert "continent: +20% (paid nodes on Asia, Europe)" in pay.why
    assert pay.why[-1] == f"total: {pay.subtotal} c x 1.2 = {pay.total} c"
    assert sum(n.amount for n in pay.nodes) == pay.total
    assert [n.amount for n in pay.nodes] == [pay.total - pay.total // 2, pay.total // 2]


@settings(max_examples=60, deadline=None)
@given(meshes(0, 4), st.lists(st.tuples(st.integers(1990, 2026), st.integers(100, 4000)),
                              min_size=1, max_size=6))
def test_the_third_node_at_a_location_is_a_donation(others, crowd):
    here = (12.5, 100.9)  # a place no generated node uses
    mesh = others + [node(f"z{i}", here, partner=f"z{i % 2}", silicon_year=y, cpu_mhz=mhz)
                     for i, (y, mhz) in enumerate(crowd)]
    pays = nodes_of(monthly_payments(mesh, W))
    local = sorted((pays[f"z{i}"] for i in range(len(crowd))), key=lambda n: n.rank)
    assert [n.paid for n in local] == [i < 2 for i in range(len(crowd))]
    assert [n.score for n in local] == sorted((n.score for n in local), reverse=True)
    for n in local[2:]:
        assert n.amount == 0 and "a donation" in n.why[0]
    if len(local) >= 3:
        assert local[2].why[0].startswith("third node at location 12.500,100.900: a donation")
    assert all(n.amount > 0 for n in local[:2])


@settings(max_examples=60, deadline=None)
@given(meshes(0, 5), st.lists(st.integers(1990, 2026), min_size=3, max_size=4), st.booleans())
def test_moving_a_donated_node_to_a_new_location_gets_it_paid(others, years, join_a_loner):
    mesh = others + [node(f"z{i}", (12.5, 100.9), partner=f"p{i % 3 + 1}", silicon_year=y)
                     for i, y in enumerate(years)]
    locations = group_locations(mesh)
    before = monthly_payments(mesh, W)
    donated = [n for n in nodes_of(before).values() if not n.paid]
    assert donated  # the crowd of three or more at (12.5, 100.9) has at least one
    loners = [n for n in mesh if list(locations.values()).count(locations[n.node_id]) == 1]
    for gift in donated:
        mover = next(n for n in mesh if n.node_id == gift.node_id)
        target = next((n for n in loners if join_a_loner), None)
        where = (target.lat, target.lon) if target else (-60.5, -100.5)  # nobody's there
        moved = [dataclasses.replace(n, lat=where[0], lon=where[1]) if n is mover else n
                 for n in mesh]
        after = monthly_payments(moved, W)
        pay = nodes_of(after)[mover.node_id]
        assert pay.paid and pay.amount > gift.amount == 0
        # its old location keeps its paid nodes (or splits into more), the new one adds one
        assert paid_count(after) > paid_count(before)


def _pair(**kw):
    """Two paid nodes of one partner, everything but ``kw`` equal."""
    a = node("a", **{k: v[0] for k, v in kw.items()})
    b = node("b", (50.3, 8.9), **{k: v[1] for k, v in kw.items()})
    return monthly_payments([a, b], W)["p1"]


@pytest.mark.parametrize("flag, pct", [("backup_power", 15), ("chaos_opt_in", 5)])
def test_backup_and_chaos_need_every_paid_node(flag, pct):
    full, half = _pair(**{flag: (True, True)}), _pair(**{flag: (True, False)})
    assert full.subtotal == half.subtotal and half.multiplier == 1
    assert full.multiplier == Fraction(100 + pct, 100)
    assert full.total == round(Fraction(full.subtotal) * Fraction(100 + pct, 100))
    assert "without" in " ".join(half.why) and f"+{pct}% (every paid node" in " ".join(full.why)


def test_modifiers_multiply_together():
    everything = _pair(backup_power=(True, True), chaos_opt_in=(True, True))
    assert everything.multiplier == Fraction(115, 100) * Fraction(105, 100)
    assert everything.total == round(everything.subtotal * Fraction(115 * 105, 10_000))


def test_different_continents_add_twenty_percent():
    near = monthly_payments([node("a"), node("b", (48.85, 2.35))], W)["p1"]  # Paris
    far = monthly_payments([node("a"), node("b", NEW_YORK)], W)["p1"]
    assert near.multiplier == 1 and far.multiplier == Fraction(6, 5)


def test_isp_diversity_at_a_location_counts_neighbours_and_is_capped():
    one = monthly_payments([node("a", isp="x"), node("b", isp="x")], W)["p1"]
    two = monthly_payments([node("a", isp="x"), node("b", isp="y")], W)["p1"]
    # a neighbour of another partner, a third node here (a donation), brings a third ISP
    three = monthly_payments([node("a", isp="x", silicon_year=2000), node("b", isp="y"),
                              node("c", partner="p2", isp="z", silicon_year=2025)], W)
    assert (one.multiplier, two.multiplier) == (1, Fraction(110, 100))
    assert three["p1"].multiplier == Fraction(120, 100) and three["p2"].total == 0
    assert "no paid nodes" in three["p2"].why[0]
    many = [node(f"n{i}{j}", (10.0 * i, 20.0), isp=f"isp{j}") for i in range(4) for j in range(3)]
    capped = monthly_payments(many, dataclasses.replace(W, isp_cap_pct=30))["p1"]
    assert capped.multiplier == Fraction(130, 100) and any("capped" in w for w in capped.why)


def test_fewer_watts_per_execution_pay_more_and_zero_watts_pay_nothing():
    def efficiency(**kw):
        pay = monthly_payments([node("a", **kw)], W)["p1"]
        return next(w for w in pay.why if w.startswith("efficiency"))

    assert efficiency(loaded_w=200, executions=1).endswith("= 10 c")
    assert efficiency(loaded_w=100, executions=1).endswith("= 20 c")
    assert efficiency(loaded_w=100, executions=10).endswith("= 200 c")
    assert efficiency(loaded_w=1, executions=10**6).endswith("(capped) = 1000 c")
    assert efficiency(loaded_w=0, executions=10) == (
        "efficiency: 0 W claimed under load: no efficiency bonus = 0 c")


@settings(max_examples=40, deadline=None)
@given(meshes(1, 7), st.randoms(use_true_random=False))
def test_payments_are_whole_cents_and_independent_of_order(mesh, rnd):
    shuffled = mesh[:]
    rnd.shuffle(shuffled)
    pays = monthly_payments(mesh, W)
    assert pays == monthly_payments(shuffled, W)
    for pay in pays.values():
        assert isinstance(pay.total, int) and pay.total >= 0
        assert sum(n.amount for n in pay.nodes) == pay.total
        assert all(isinstance(n.amount, int) for n in pay.nodes)
        assert pay.why and all(n.why for n in pay.nodes)
