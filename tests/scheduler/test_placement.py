"""Placement: replicas spread over failure domains. The cap (at most floor(share x replicas)
nodes of a model per domain, at least 1) holds for every kind on random meshes; what cannot
fit is marked infeasible with a reason, never placed over the cap; low-reputation nodes are
never placed; the same mesh in any order gives the same placement; a re-placement after a
failure keeps the survivors and fills the gaps. Also the fast location grouping and scores
against the reference ones in profile/scoring."""

from __future__ import annotations

import importlib.util
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.scheduler.chaossim import synthetic_mesh
from permamesh.scheduler.domains import (DOMAINS, domain_of, domain_shares, fast_locations,
                                         mesh_scores)
from permamesh.scheduler.errors import SchedulerError
from permamesh.scheduler.placement import (Demand, PlacementConfig, domain_cap, moved_nodes,
                                           place, place_many, replace_failed)
from permamesh.scheduler.profile import NodeProfile, group_locations
from permamesh.scheduler.scoring import score_all
from permamesh.scheduler.weights import Weights

W = Weights()
PLACES = ((50.11, 8.68), (35.68, 139.69), (40.71, -74.0), (-33.87, 151.21), (-23.55, -46.63),
          (-1.29, 36.82))


def node(node_id: str, where=PLACES[0], **kw) -> NodeProfile:
    base = dict(grid="g1", isp="i1", asn=1, silicon_year=2016, cpu_mhz=2000, idle_w=30,
                loaded_w=90, software="v1", models=("m",))
    return NodeProfile(node_id, "p", where[0], where[1], **(base | kw))


def spread(n: int, **kw) -> list[NodeProfile]:
    """n nodes, each its own grid, ISP, place and (cycling) version."""
    return [node(f"n{i:02d}", (PLACES[i % 6][0] + i // 6, PLACES[i % 6][1]), grid=f"g{i}",
                 isp=f"i{i}", software=f"v{i % 4}", **kw) for i in range(n)]


@st.composite
def problems(draw):
    n = draw(st.integers(0, 24))
    nodes = []
    for i in range(n):
        lat, lon = draw(st.sampled_from(PLACES))
        nodes.append(node(
            f"n{i:02d}", (lat + draw(st.sampled_from([0.0, 0.001, 2.0])), lon),
            grid=draw(st.sampled_from(["g1", "g2", "g3", "g4", ""])),
            isp=draw(st.sampled_from(["i1", "i2", "i3", "i4"])),
            software=draw(st.sampled_from(["v1", "v2", "v3"])),
            models=tuple(draw(st.lists(st.sampled_from(["a", "b"]), max_size=2, unique=True))),
            cpu_mhz=draw(st.integers(0, 4000)), host=draw(st.sampled_from(["", "h1"]))))
    demands = [Demand(m, draw(st.integers(1, 9))) for m in ("a", "b") if draw(st.booleans())]
    reputation = draw(st.none() | st.dictionaries(
        st.sampled_from([n.node_id for n in nodes] or ["x"]), st.floats(0, 1)))
    share = draw(st.sampled_from([0.34, 0.5, 0.25, 1.0]))
    return nodes, demands, reputation, PlacementConfig(max_domain_share=share)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_placement_never_exceeds_the_cap_and_explains_what_does_not_fit(problem):
    nodes, demands, reputation, config = problem
    p = place(nodes, demands, reputation, config, W)
    locations = group_locations(nodes)
    by_id = {n.node_id: n for n in nodes}
    served = [i for ids in p.assignments.values() for i in ids]
    assert len(served) == len(set(served))  # a node serves at most one model
    for d in demands:
        ids = p.assignments[d.model]
        assert list(ids) == sorted(ids) and len(ids) <= d.replicas
        cap = domain_cap(d.replicas, config.max_domain_share)
        for kind in DOMAINS:
            per_domain = Counter(domain_of(by_id[i], kind, locations) for i in ids)
            assert max(per_domain.values(), default=0) <= cap
            assert p.shares[d.model][kind] == pytest.approx(
                {k: v / len(ids) for k, v in per_domain.items()})
        for i in ids:
            rep = 1.0 if reputation is None else reputation.get(i, 0.0)
            assert rep >= config.min_reputation
        worst = max(max(s.values(), default=0) for s in p.shares[d.model].values())
        assert p.feasible[d.model] == (len(ids) == d.replicas
                                       and worst <= config.max_domain_share)
        if not p.feasible[d.model]:
            assert any(line.startswith(f"model {d.model}: infeasible") for line in p.why)


def test_the_cap_is_exact_and_at_least_one():
    assert [domain_cap(r, 0.34) for r in (1, 2, 3, 5, 6, 12, 100)] == [1, 1, 1, 1, 2, 4, 34]
    assert domain_cap(100, 0.29) == 29  # 0.29 * 100 is 28.999... in floats
    assert domain_cap(10, 1.0) == 10


def test_too_few_replicas_are_placed_but_marked_infeasible():
    p = place(spread(6), [Demand("m", 2)], weights=W)
    assert len(p.assignments["m"]) == 2 and not p.feasible["m"]
    assert "ask for at least 3" in p.why[-1]


def test_two_grids_cannot_hold_six_replicas_under_a_third_each():
    nodes = [n.__class__(**{**n.__dict__, "grid": f"g{i % 2}"}) for i, n in enumerate(spread(12))]
    p = place(nodes, [Demand("m", 6)], weights=W)
    assert len(p.assignments["m"]) == 4  # two per grid, the cap for 6 replicas
    assert not p.feasible["m"] and max(p.shares["m"]["grid"].values()) == 0.5
    assert "blocked by kind: grid 8" in p.why[-1]


def test_low_reputation_and_unknown_nodes_are_never_placed():
    nodes = spread(8)
    rep = {n.node_id: 1.0 for n in nodes} | {"n00": 0.29, "n01": 0.0}
    del rep["n02"]
    p = place(nodes, [Demand("m", 4)], rep, weights=W)
    assert not {"n00", "n01", "n02"} & set(p.assignments["m"])
    assert len(p.assignments["m"]) == 4 and p.feasible["m"]
    assert "excluded 3 node(s)" in p.why[0]


def test_listed_nodes_first_and_any_node_when_none_lists_the_model():
    nodes = spread(8, models=("a",))
    p = place(nodes, [Demand("a", 3), Demand("z", 3)], weights=W)
    assert p.feasible == {"a": True, "z": True}
    assert "model z: no eligible node lists it" in p.why[0]
    with pytest.raises(SchedulerError):
        place(nodes, [Demand("a", 3), Demand("a", 4)], weights=W)


def test_models_take_turns_and_reputation_breaks_the_order():
    nodes = spread(12, models=("a", "b"))
    p = place(nodes, [Demand("a", 3), Demand("b", 3)], weights=W)
    assert len(p.assignments["a"]) == len(p.assignments["b"]) == 3
    favourite = p.assignments["b"][0]
    rep = {n.node_id: 0.5 for n in nodes} | {favourite: 1.0}
    assert favourite in place(nodes, [Demand("a", 1)], rep, weights=W).assignments["a"]


def test_same_mesh_in_any_order_gives_the_same_placement():
    nodes = synthetic_mesh(400, seed=3)
    demands = [Demand("mistral-7b", 6), Demand("llama-3.1-8b", 9), Demand("qwen2.5-7b", 3)]
    first = place(nodes, demands, weights=W)
    shuffled = nodes[:]
    random.Random(1).shuffle(shuffled)
    assert place(shuffled, demands[::-1], weights=W) == first
    assert all(first.feasible.values())


def test_replacement_keeps_the_survivors_and_restores_the_count():
    nodes = synthetic_mesh(400, seed=5)
    demands = [Demand("mistral-7b", 6), Demand("llama-3.1-8b", 9)]
    before = place(nodes, demands, weights=W)
    by_id = {n.node_id: n for n in nodes}
    lost_grid = by_id[before.assignments["llama-3.1-8b"][0]].grid
    failed = {n.node_id for n in nodes if n.grid == lost_grid}
    after = replace_failed(before, nodes, failed, weights=W)
    lost = 0
    for m, ids in before.assignments.items():
        survivors = set(ids) - failed
        lost += len(ids) - len(survivors)
        assert survivors <= set(after.assignments[m])
        assert len(after.assignments[m]) == len(ids) and after.feasible[m]
        assert not failed & set(after.assignments[m])
    assert lost > 0 and len(moved_nodes(before, after)) == lost  # only the lost ones move
    assert replace_failed(before, nodes, set(), weights=W) == before  # nothing failed: no move


def test_a_stricter_config_drops_previous_replicas_over_the_new_cap():
    nodes = [n.__class__(**{**n.__dict__, "grid": f"g{i % 3}"}) for i, n in enumerate(spread(12))]
    loose = place(nodes, [Demand("m", 6)], config=PlacementConfig(max_domain_share=1.0),
                  weights=W)
    strict = place(nodes, [Demand("m", 6)], weights=W, previous=loose)
    assert max(Counter(n.grid for n in nodes if n.node_id in strict.assignments["m"])
               .values()) <= 2 and strict.feasible["m"]


def test_place_many_sequentially_equals_place():
    problems = [(spread(9), [Demand("m", 3)]), (synthetic_mesh(120, 2), [Demand("qwen2.5-7b", 6)])]
    assert place_many(problems, use_ray=False, weights=W) == [place(n, d, weights=W)
                                                             for n, d in problems]
    # few problems: in-process by default, whether or not Ray is installed
    assert place_many(problems[:1], weights=W) == [place(*problems[0], weights=W)]
    if importlib.util.find_spec("ray") is None:
        with pytest.raises(SchedulerError, match="Ray is not installed"):
            place_many(problems, use_ray=True)


def test_domains_of_a_node_and_their_shares():
    a = node("a", grid="", isp="fibre", software="v2")
    b = node("b", PLACES[1], grid="tokyo", isp="fibre", software="", host="h1")
    locs = group_locations([a, b])
    assert [domain_of(a, k, locs) for k in DOMAINS] == ["?", "fibre", "50.110,8.680", "v2"]
    assert domain_of(b, "continent", locs) == "Asia"
    assert domain_of(b, "host", locs) == "35.680,139.690///h1"
    assert domain_shares(["a", "b"], [a, b], "isp", locs) == {"fibre": 1.0}
    assert domain_shares(["a", "b"], {"a": a, "b": b}, "grid", locs) == {"?": 0.5, "tokyo": 0.5}
    with pytest.raises(SchedulerError, match="unknown failure-domain kind"):
        domain_of(a, "planet", locs)
    with pytest.raises(SchedulerError):
        PlacementConfig(domains=("planet",))
    with pytest.raises(SchedulerError):
        Demand("m", 0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PLACES + ((89.9999, 0.0), (89.9999, 90.0),
                                                    (0.0, 179.9999), (0.0, -179.9999))),
                          st.sampled_from([0.0, 0.001, 0.003, 0.0049, 1.0]),
                          st.sampled_from([0.0, 0.002, 0.006])), max_size=30))
def test_fast_locations_equal_group_locations(points):
    nodes = [node(f"n{i:02d}", (min(90.0, lat + dlat), min(180.0, lon + dlon)))
             for i, ((lat, lon), dlat, dlon) in enumerate(points)]
    assert fast_locations(nodes) == group_locations(nodes)


def test_mesh_scores_equal_node_score():
    nodes = synthetic_mesh(150, seed=7)
    fast, slow = mesh_scores(nodes, W), score_all(nodes, W)
    assert fast.keys() == slow.keys()
    for node_id, scored in slow.items():
        assert fast[node_id] == pytest.approx(scored.value, rel=1e-9, abs=1e-6)


@pytest.mark.slow
def test_place_many_on_a_local_ray_equals_sequential():
    """Ray's local cluster (ray.init(), ~5-10 s to start here): same placements as in-process."""
    pytest.importorskip("ray")
    meshes = [synthetic_mesh(120, seed=s) for s in range(3)]
    problems = [(m, [Demand("mistral-7b", 6), Demand("qwen2.5-7b", 3)]) for m in meshes]
    assert place_many(problems, use_ray=True) == place_many(problems, use_ray=False)
