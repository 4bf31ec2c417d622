"""Physics: nobody answers faster than light in fibre. A node claiming Tokyo that answers a
Frankfurt probe in 2 ms is lying; an honest node's measurements never refute it wherever it
really is; fewer than three probes cannot vouch for a claim; triangulation finds where the
probes agree, or that they cannot."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.scheduler.errors import SchedulerError
from permamesh.scheduler.physics import check_location, reach_km, triangulate
from permamesh.scheduler.profile import haversine_km

FRANKFURT, TOKYO, NEW_YORK, LONDON = (50.11, 8.68), (35.68, 139.69), (40.71, -74.0), (51.51, -0.13)
SINGAPORE = (1.35, 103.82)


def honest(where, probes, stretch=1.5, overhead_ms=0.5):
    """RTTs a real node at ``where`` would show: fibre is longer than the great circle."""
    return [(p, 2 * haversine_km(where, p) / 200.0 * stretch + overhead_ms) for p in probes]


def test_tokyo_answering_frankfurt_in_two_ms_is_impossible():
    verdict = check_location(TOKYO, [(FRANKFURT, 2.0)])
    assert not verdict.possible and not verdict.insufficient  # one refuting probe suffices
    assert verdict.worst_violation_km == pytest.approx(haversine_km(TOKYO, FRANKFURT) - 300, abs=1)
    assert "impossible" in verdict.why and "within 300 km" in verdict.why


def test_a_plausible_claim_is_possible():
    measured = honest(FRANKFURT, [FRANKFURT, LONDON, NEW_YORK, TOKYO])
    verdict = check_location(FRANKFURT, measured)
    assert verdict.possible and not verdict.insufficient and verdict.probes == 4
    assert verdict.worst_violation_km == 0.0 and verdict.why.startswith("possible")


def test_the_worst_probe_is_reported():
    measured = honest(FRANKFURT, [FRANKFURT, LONDON, TOKYO])
    verdict = check_location(NEW_YORK, measured)  # the Frankfurt probe refutes it hardest
    assert not verdict.possible and "(50.110, 8.680)" in verdict.why


def test_fewer_than_three_probes_are_insufficient():
    for probes in ([FRANKFURT], [FRANKFURT, LONDON], [FRANKFURT, FRANKFURT, LONDON]):
        verdict = check_location(FRANKFURT, honest(FRANKFURT, probes))
        assert verdict.possible and verdict.insufficient
        assert verdict.why.startswith("insufficient probes")
    assert check_location(FRANKFURT, []).insufficient


@settings(max_examples=80, deadline=None)
@given(st.tuples(st.floats(-89, 89), st.floats(-179, 179)),
       st.lists(st.tuples(st.floats(-89, 89), st.floats(-179, 179)), min_size=3, max_size=6),
       st.floats(1.0, 3.0), st.floats(0.0, 50.0))
def test_an_honest_node_is_never_refuted(where, probes, stretch, overhead_ms):
    verdict = check_location(where, honest(where, probes, stretch, overhead_ms))
    assert verdict.possible


@settings(max_examples=80, deadline=None)
@given(st.tuples(st.floats(-89, 89), st.floats(-179, 179)),
       st.tuples(st.floats(-89, 89), st.floats(-179, 179)), st.floats(0.0, 5.0))
def test_a_claim_farther_than_light_allows_is_refuted(probe, claim, rtt):
    verdict = check_location(claim, [(probe, rtt)])
    assert verdict.possible == (haversine_km(claim, probe) <= reach_km(rtt))


def test_triangulation_finds_the_region_or_a_contradiction():
    agree = triangulate(honest(SINGAPORE, [SINGAPORE, TOKYO, FRANKFURT], stretch=1.2))
    assert agree.feasible and agree.example is not None
    assert haversine_km(agree.example, SINGAPORE) < 1500
    assert agree.cells < agree.of / 100  # the probes pin it down to a small part of the globe
    # "2 ms from Frankfurt and 2 ms from Tokyo": no point on Earth is both
    contradiction = triangulate([(FRANKFURT, 2.0), (TOKYO, 2.0)])
    assert not contradiction.feasible and "contradict" in contradiction.why


def test_malformed_measurements_are_errors():
    for bad in ([(FRANKFURT, -1.0)], [(FRANKFURT, float("nan"))], [((95.0, 0.0), 3.0)],
                [("here", 3.0)], [(FRANKFURT,)]):
        with pytest.raises(SchedulerError):
            check_location(FRANKFURT, bad)
    with pytest.raises(SchedulerError):
        triangulate([(FRANKFURT, 3.0)], step_deg=0)
