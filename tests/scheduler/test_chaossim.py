"""The chaos drill: a synthetic 2000-node mesh survives every single-domain failure of the
seed (power, ISP, version, location, machine, DDoS) with at most a third of any model's
capacity lost, no request lost and recovery in 3 s; a continent partition needs the
continent cap; and a mesh clustered on one grid, or with only three versions, loses."""

from __future__ import annotations

import math

import pytest

from permamesh.scheduler.chaossim import (DRILL_CONFIG, Scenario, run_chaos_sim, scenarios,
                                          simulate, synthetic_mesh)
from permamesh.scheduler.domains import fast_locations
from permamesh.scheduler.domains import DOMAINS
from permamesh.scheduler.placement import Demand, PlacementConfig, place
from permamesh.scheduler.profile import continent
from permamesh.scheduler.weights import Weights

SINGLE_DOMAIN = ("grid", "isp", "software", "location", "host", "ddos")


@pytest.fixture(scope="module")
def default_run():
    return run_chaos_sim(n_nodes=2000, seed=0), None


def test_synthetic_mesh_is_seeded_and_spread():
    mesh = synthetic_mesh(2000, seed=0)
    assert mesh == synthetic_mesh(2000, seed=0) and mesh != synthetic_mesh(2000, seed=1)
    assert len({continent(n.lat, n.lon) for n in mesh}) >= 6
    assert len({n.grid for n in mesh}) >= 20 and len({n.software for n in mesh}) == 4
    locations = fast_locations(mesh)
    isp_sites, site_isps = {}, {}
    for n in mesh:
        isp_sites.setdefault(n.isp, set()).add(locations[n.node_id])
        site_isps.setdefault(locations[n.node_id], set()).add(n.isp)
    assert max(map(len, isp_sites.values())) > 10  # ISPs shared across locations
    assert max(map(len, site_isps.values())) >= 2  # neighbours on separate ISPs
    hosts = [(n.datacenter, n.rack, n.host) for n in mesh]
    assert len(set(hosts)) < len(hosts)  # some VMs share a machine
    assert {m for n in mesh for m in n.models} >= {"mistral-7b", "qwen2.5-7b"}


def test_scenarios_cover_the_failure_modes():
    mesh = synthetic_mesh(300, seed=2)
    found = scenarios(mesh)
    kinds = {s.kind for s in found}
    assert kinds == {"grid", "isp", "software", "location", "host", "partition", "ddos"}
    assert {s.domain for s in found if s.kind == "grid"} == {n.grid for n in mesh}
    assert {s.domain for s in found if s.kind == "software"} == {n.software for n in mesh}
    assert sum(s.kind == "location" for s in found) == 5
    assert all(len(s.failed) == 1 for s in found if s.kind == "ddos")
    assert found == scenarios(mesh[::-1])


def test_a_2000_node_mesh_survives_every_single_domain_failure(default_run):
    report, elapsed = default_run
    summary = report["summary"]
    assert summary["nodes"] == 2000 and summary["placement_feasible"]
    rows = report["scenarios"]
    assert len(rows) > 50
    for row in rows:
        if row["kind"] in SINGLE_DOMAIN:
            assert row["capacity_loss_share"] <= 0.34, row
            assert not row["models_down"]
    assert summary["jobs_lost"] == 0 and summary["requests_retried"] > 0
    assert summary["max_recovery_s"] < 5 and summary["unrecovered"] == []
    assert summary["distinct_grids"] >= 3
    assert summary["win_conditions"]["no_job_lost"]
    assert summary["win_conditions"]["recovery_under_5s"]


def test_a_continent_partition_needs_the_continent_cap(default_run):
    # the four kinds only: the distance term favours the remotest region, so a
    # continent partition costs more than a third; the default config caps continents too
    four = run_chaos_sim(n_nodes=2000, seed=0, config=PlacementConfig(domains=DOMAINS))["summary"]
    assert four["worst_by_kind"]["partition"] > 0.34 and not four["win"]
    capped = default_run[0]["summary"]
    assert DRILL_CONFIG == PlacementConfig()
    assert capped["max_capacity_loss_share"] <= 0.34
    assert capped["win"] and all(capped["win_conditions"].values())


def test_a_mesh_on_one_grid_loses():
    report = run_chaos_sim(n_nodes=400, seed=1, nodes=synthetic_mesh(400, seed=1, n_grids=1))
    summary = report["summary"]
    assert not summary["placement_feasible"] and not summary["win"]
    assert summary["max_capacity_loss_share"] == 1.0 and summary["jobs_lost"] > 0
    assert summary["distinct_grids"] == 1
    assert not summary["win_conditions"]["no_domain_over_share"]
    assert not summary["win_conditions"]["grids_at_least_3"]
    assert any("blocked by kind: grid" in line for line in report["why"])


def test_three_versions_cannot_be_replaced_after_a_version_bug():
    mesh = synthetic_mesh(600, seed=4, versions=("v1", "v2", "v3"))
    summary = run_chaos_sim(nodes=mesh)["summary"]
    assert summary["worst_by_kind"]["software"] <= 0.34  # the cap still holds the loss
    assert summary["max_recovery_s"] == math.inf
    assert {u.split()[0] for u in summary["unrecovered"]} == {"software"}
    assert not summary["win_conditions"]["recovery_under_5s"]


def test_requests_fail_only_when_a_model_has_no_replica_left():
    mesh = synthetic_mesh(200, seed=6)
    w = Weights()
    placement = place(mesh, [Demand("mistral-7b", 3), Demand("qwen2.5-7b", 3)], weights=w)
    doomed = frozenset(placement.assignments["mistral-7b"])
    result = simulate(mesh, placement, Scenario("test", "all of mistral", doomed), weights=w,
                      rate_per_s=10.0, detect_s=2.0, replace_s=1.0)
    assert result.models_down == ("mistral-7b",) and result.capacity_loss_share == 1.0
    assert result.requests_failed == 25 + 10  # 2.5 s of requests, then 1 s of re-placing
    assert result.recovery_s == 3.0 and result.moved == 3
    one = frozenset(placement.assignments["qwen2.5-7b"][:1])
    hit = simulate(mesh, placement, Scenario("test", "one", one), weights=w, seed=3)
    assert hit == simulate(mesh, placement, Scenario("test", "one", one), weights=w, seed=3)
    assert hit.requests_failed == 0 and hit.requests_retried > 0 and hit.moved == 1
    assert hit.capacity_loss_share == pytest.approx(1 / 3)
