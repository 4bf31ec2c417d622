"""Scoring: a node's score told term by term with the arithmetic done by hand; then the rules
as properties: the mesh wants to spread (VMs on one host < separate machines, one rack <
two racks), and the same mesh in any order scores the same, bit for bit. Also the location
rule, the continent table, registry rows and the weights file."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.committee import txs
from permamesh.scheduler.errors import SchedulerError
from permamesh.scheduler.profile import (NodeProfile, continent, from_registry, from_registry_row,
                                         group_locations, haversine_km, location_key,
                                         same_location)
from permamesh.scheduler.scoring import explain, node_score, score_all
from permamesh.scheduler.weights import Weights, load_weights, weights_from_dict

W = Weights()
FRANKFURT, TOKYO = (50.11, 8.68), (35.68, 139.69)
NEW_YORK, SYDNEY = (40.71, -74.0), (-33.87, 151.21)
PLACES = (FRANKFURT, TOKYO, NEW_YORK, SYDNEY, (-23.55, -46.63), (-1.29, 36.82))


def node(node_id: str, where=FRANKFURT, partner: str = "p1", **kw) -> NodeProfile:
    base = dict(grid="grid", isp="isp", asn=1, silicon_year=2016, cpu_mhz=2000, idle_w=30,
                loaded_w=90)
    return NodeProfile(node_id, partner, where[0], where[1], **(base | kw))


@st.composite
def meshes(draw, min_size=1, max_size=7):
    """Small meshes with many colocations: nodes on a few places, some nudged a few metres."""
    n = draw(st.integers(min_size, max_size))
    out = []
    for i in range(n):
        lat, lon = draw(st.sampled_from(PLACES))
        nudge = draw(st.sampled_from([0.0, 0.0, 0.002, 3.0]))
        out.append(node(
            f"n{i:02d}", (lat + nudge, lon), partner=draw(st.sampled_from(["p1", "p2", "p3"])),
            isp=draw(st.sampled_from(["isp-a", "isp-b", "isp-c", ""])),
            datacenter=draw(st.sampled_from(["", "dc1"])), rack=draw(st.sampled_from(["", "r1"])),
            host=draw(st.sampled_from(["", "h1", "h2"])),
            silicon_year=draw(st.integers(0, 2030)), cpu_mhz=draw(st.integers(0, 5000)),
            idle_w=draw(st.integers(0, 200)), loaded_w=draw(st.integers(0, 500)),
            link_mbps=draw(st.sampled_from([10.0, 100.0, 1000.0])),
            uptime=draw(st.floats(0, 1)), executions=draw(st.integers(0, 10_000)),
            backup_power=draw(st.booleans()), chaos_opt_in=draw(st.booleans())))
    return out


def test_a_node_scored_by_hand():
    # a 2014 server in Frankfurt, a neighbour VM on its own host, a peer in Tokyo on 50 Mbit/s
    a = node("a", silicon_year=2014, cpu_mhz=2400, idle_w=40, loaded_w=120, datacenter="fra1",
             rack="r7", host="box1")
    vm = node("b", datacenter="fra1", rack="r7", host="box1")
    tokyo = node("c", TOKYO, link_mbps=50.0)
    scored = node_score(a, [tokyo, a, vm], W)  # the node itself is skipped
    km = haversine_km(FRANKFURT, TOKYO)
    assert 9300 < km < 9400
    expected = [("silicon_age", 12 * 10.0), ("cpu_speed", 2400 * 0.01),
                ("efficiency", 10000 / 160), ("peer b: same location", -50.0),
                ("peer b: same datacenter", -100.0), ("peer b: same rack", -200.0),
                ("peer b: same host", -400.0), ("peer c: distance", km * 50 * 0.0001)]
    assert [(t.name, t.contribution) for t in scored.why] == expected
    assert scored.value == pytest.approx(sum(c for _, c in expected))
    text = explain(scored)
    assert "peer b: same host: -400 (host=box1, SAME_HOST_PENALTY=400)" in text
    assert "link_mbps=50" in text and text.startswith("node a: node_score = ")


def test_guards_unknown_age_and_zero_watts_earn_nothing():
    scored = node_score(node("x", silicon_year=0, idle_w=0, loaded_w=0, cpu_mhz=0), [], W)
    assert scored.value == 0.0
    assert node_score(node("y", silicon_year=2030), [], W).why[0].contribution == 0.0  # future


@settings(max_examples=60, deadline=None)
@given(meshes(0, 4), st.sampled_from(["", "dc1"]), st.sampled_from(["", "r1"]))
def test_vms_on_one_host_score_lower_than_separate_machines(others, dc, rack):
    me = node("me", datacenter=dc, rack=rack, host="box")
    twin = dict(datacenter=dc, rack=rack)
    vm = node("peer", host="box", **twin)
    separate = node("peer", host="other-box", **twin)
    assert node_score(me, [vm, *others], W).value < node_score(me, [separate, *others], W).value


@settings(max_examples=60, deadline=None)
@given(meshes(0, 4), st.sampled_from(["h1", "h2"]))
def test_one_rack_scores_lower_than_two_racks(others, peer_host):
    me = node("me", datacenter="dc9", rack="r1", host="h1")
    same = node("peer", datacenter="dc9", rack="r1", host=peer_host)
    other = node("peer", datacenter="dc9", rack="r2", host=peer_host)
    assert node_score(me, [same, *others], W).value < node_score(me, [other, *others], W).value


def test_distance_scores_positive_and_uses_the_slower_link():
    me = node("me", link_mbps=1000.0)
    near, far = node("p", (50.5, 8.68)), node("p", TOKYO)
    assert 0 < node_score(me, [near], W).value < node_score(me, [far], W).value
    assert node_score(me, [far], W).why[-1].inputs[1] == ("link_mbps", 100.0)


@settings(max_examples=60, deadline=None)
@given(meshes(1, 7), st.randoms(use_true_random=False))
def test_scores_do_not_depend_on_input_order(mesh, rnd):
    shuffled = mesh[:]
    rnd.shuffle(shuffled)
    assert score_all(mesh, W) == score_all(shuffled, W)
    for n in mesh:
        assert node_score(n, mesh, W) == node_score(n, shuffled, W)


def test_duplicate_node_ids_are_refused():
    with pytest.raises(SchedulerError, match="twice"):
        node_score(node("a"), [node("b"), node("b", TOKYO)], W)


def test_same_location_rounding_distance_and_chains():
    a, b = node("a", (50.11012, 8.68004)), node("b", (50.11049, 8.68049))
    assert location_key(a) == location_key(b) == "50.110,8.680" and same_location(a, b)
    c = node("c", (50.1130, 8.68))  # ~330 m north of a, other key: same by distance
    assert location_key(c) != location_key(a) and same_location(a, c)
    assert not same_location(a, node("d", (50.12, 8.68)))  # ~1.1 km
    chain = [node("x0", (50.0, 8.0)), node("x1", (50.004, 8.0)), node("x2", (50.008, 8.0))]
    assert not same_location(chain[0], chain[2])  # 0.9 km apart, but linked through x1
    assert set(group_locations(reversed(chain)).values()) == {"50.000,8.000"}


def test_continents_by_coarse_boxes():
    cities = {FRANKFURT: "Europe", TOKYO: "Asia", NEW_YORK: "North America",
              SYDNEY: "Oceania", (-23.55, -46.63): "South America", (-1.29, 36.82): "Africa",
              (30.04, 31.24): "Africa", (25.2, 55.27): "Asia", (64.15, -21.94): "Europe",
              (4.71, -74.07): "South America", (8.98, -79.52): "North America",
              (-77.85, 166.67): "Antarctica", (-36.85, 174.76): "Oceania", (1.35, 103.82): "Asia",
              (0.0, -30.0): "unknown"}
    assert {where: continent(*where) for where in cities} == cities


def test_registry_rows_become_profiles():
    claim = txs.NodeProfile(lat_e6=35_680_000, lon_e6=139_690_000, grid="tepco", isp="ntt",
                            asn=2914, datacenter="ty8", rack="r2", host="m1", silicon_year=2015,
                            cpu_mhz=2600, idle_w=50, loaded_w=180, ram_mb=65536,
                            backup_power=True, software="0.1.0", models=("smollm2",))
    row = {"partner": "ab" * 32, "role": "worker", "endpoint": "tcp://x:1", "node": "cd" * 32,
           "profile": dataclasses.asdict(claim) | {"models": ["smollm2"]},
           "reputation_ppm": 500_000, "excluded": False}
    p = from_registry_row(row, uptime=0.99)
    assert (p.lat, p.lon, p.isp, p.host, p.models, p.uptime) == (35.68, 139.69, "ntt", "m1",
                                                                  ("smollm2",), 0.99)
    assert from_registry([row | {"excluded": True, "node": "ef" * 32}, row]) == (
        dataclasses.replace(p, uptime=1.0),)
    with pytest.raises(SchedulerError, match="profile.asn must be an integer"):
        from_registry_row(row | {"profile": row["profile"] | {"asn": "2914"}})
    with pytest.raises(SchedulerError, match="lat"):
        from_registry_row(row | {"profile": row["profile"] | {"lat_e6": 91_000_000}})


def test_weights_file_defaults_and_clear_errors(tmp_path):
    assert load_weights() == Weights()
    path = tmp_path / "w.toml"
    path.write_text("[rules]\ncurrent_year = 2030\n[payment]\nbase_rate = 5\n")
    assert load_weights(path) == dataclasses.replace(Weights(), current_year=2030, base_rate=5)
    for bad, message in (({"score": {"AGE": 1.0}}, r"unknown key \[score\] AGE"),
                         ({"extra": {}}, r"unknown table \[extra\]"),
                         ({"payment": {"base_rate": 9.5}}, "must be an integer"),
                         ({"score": {"AGE_W": "ten"}}, "must be a number"),
                         ({"rules": {"max_paid_per_location": 0}}, ">= 1"),
                         ({"score": {"SAME_RACK_PENALTY": 999.0}}, "penalties must grow")):
        with pytest.raises(SchedulerError, match=message):
            weights_from_dict(bad)
    path.write_text("[score\n")
    with pytest.raises(SchedulerError, match="not valid TOML"):
        load_weights(path)
