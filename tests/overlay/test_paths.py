"""Path selection: every rule holds on any relay set, impossible requests say why, weights
steer the draw in proportion, and sessions keep, rotate and repair their paths."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from permamesh.overlay.errors import OverlayError
from permamesh.overlay.paths import (
    PathPolicy,
    PathSelector,
    RelayDescriptor,
)


def relay(i: int, isp: str | None = None, grid: str | None = None, loc: str | None = None,
          rep: float = 0.8, bw: float = 1e6) -> RelayDescriptor:
    return RelayDescriptor(
        node_id=i.to_bytes(16, "big"),
        kex_public=bytes([i % 256]) * 32,
        address=f"tcp://10.0.{i // 256}.{i % 256}:7400",
        isp=isp or f"isp{i}",
        grid=grid or f"grid{i}",
        location=loc or f"loc{i}",
        reputation=rep,
        bandwidth=bw,
    )


def diverse(count: int, **kw: float) -> list[RelayDescriptor]:
    """Relays that share nothing: every rule is easy to meet."""
    return [relay(i, **kw) for i in range(count)]


def assert_valid(paths, policy: PathPolicy, n: int, exclude=frozenset(), avoid_proxies=frozenset()):
    assert len(paths) == n
    ids = [r.node_id for p in paths for r in p]
    assert len(ids) == len(set(ids)), "a relay appears twice in one request"
    for path in paths:
        assert len(path) == policy.hops
        for attr in ("isp", "grid", "location"):
            values = [getattr(r, attr) for r in path]
            assert len(values) == len(set(values)), f"{attr} repeated within a path"
        assert all(r.reputation >= policy.min_reputation for r in path)
        assert not {r.node_id for r in path} & set(exclude)
        assert path[-1].node_id not in avoid_proxies
    if policy.distinct_proxy_isps:
        proxy_isps = [p[-1].isp for p in paths]
        assert len(proxy_isps) == len(set(proxy_isps))


# -- descriptors and policies ----------------------------------------------------------------


@pytest.mark.parametrize("change", [
    {"node_id": b"short"}, {"kex_public": bytes(31)}, {"isp": ""}, {"reputation": 1.5},
    {"reputation": -0.1}, {"bandwidth": 0.0}, {"bandwidth": float("inf")},
])
def test_malformed_descriptors_are_rejected(change):
    fields = relay(1).__dict__ | change
    with pytest.raises(OverlayError):
        RelayDescriptor(**fields)


@pytest.mark.parametrize("change", [
    {"hops": 1}, {"hops": 9}, {"n_paths": 0}, {"min_reputation": 2.0}, {"bandwidth_cap": 0.5},
    {"max_uses": 0}, {"max_age_s": 0.0},
])
def test_bad_policies_are_rejected(change):
    with pytest.raises(OverlayError):
        PathPolicy(**change)


def test_a_relay_listed_twice_is_rejected():
    with pytest.raises(OverlayError, match="twice"):
        PathSelector([relay(1), relay(1)], rng=random.Random(0))


# -- the rules -------------------------------------------------------------------------------


def test_a_request_gets_disjoint_diverse_paths_and_the_same_seed_gives_the_same_paths():
    rng = random.Random(7)
    relays = [relay(i, f"isp{rng.randrange(8)}", f"grid{rng.randrange(5)}",
                    f"loc{rng.randrange(12)}", rep=rng.uniform(0.0, 1.0)) for i in range(200)]
    policy = PathPolicy()
    paths = PathSelector(relays, policy, random.Random(1)).select()
    assert_valid(paths, policy, 4)
    assert paths == PathSelector(relays, policy, random.Random(1)).select()
    assert paths != PathSelector(relays, policy, random.Random(2)).select()


def test_relays_under_the_reputation_floor_are_never_chosen():
    relays = diverse(30) + [relay(100 + i, rep=0.29) for i in range(300)]
    selector = PathSelector(relays, PathPolicy(), random.Random(3))
    for _ in range(200):
        assert all(r.reputation >= 0.3 for p in selector.select() for r in p)


def test_excluded_relays_and_avoided_proxies_are_respected():
    relays = diverse(40)
    selector = PathSelector(relays, PathPolicy(hops=4), random.Random(4))
    exclude = {relay(i).node_id for i in range(0, 40, 3)}
    avoid = {relay(i).node_id for i in range(1, 40, 3)}
    for _ in range(100):
        paths = selector.select(exclude=exclude, avoid_proxies=avoid)
        assert_valid(paths, selector.policy, 4, exclude, avoid)


@pytest.mark.parametrize("relays, policy, kwargs, constraint", [
    (diverse(11), PathPolicy(), {}, "relay count"),
    ([relay(i, rep=0.2 if i < 12 else 0.9) for i in range(16)], PathPolicy(), {},
     "12 below min_reputation"),
    ([relay(i, isp=f"isp{i % 2}") for i in range(50)], PathPolicy(), {}, "ISP diversity"),
    ([relay(i, grid=f"g{i % 3}") for i in range(50)], PathPolicy(hops=4), {}, "power grid"),
    # three locations: one path fits, but 4 paths need 12 slots and "a" fills only 4 of them
    ([relay(i, loc="a") for i in range(20)] + [relay(100 + i, loc=f"l{i % 2}") for i in range(4)],
     PathPolicy(), {}, "location diversity"),
    (diverse(20), PathPolicy(), {"avoid_proxies": {relay(i).node_id for i in range(17)}}, "proxy"),
    ([relay(i, isp=f"isp{i % 3}", grid=f"g{i}") for i in range(30)], PathPolicy(), {},
     "proxy ISP diversity"),
])
def test_impossible_requests_say_which_constraint_failed(relays, policy, kwargs, constraint):
    with pytest.raises(OverlayError, match=constraint):
        PathSelector(relays, policy, random.Random(0)).select(**kwargs)


def test_without_the_proxy_isp_rule_three_isps_are_enough():
    relays = [relay(i, isp=f"isp{i % 3}") for i in range(30)]
    policy = PathPolicy(distinct_proxy_isps=False)
    assert_valid(PathSelector(relays, policy, random.Random(0)).select(), policy, 4)


# -- weighting -------------------------------------------------------------------------------


def test_choice_is_proportional_to_reputation_times_bandwidth():
    # four classes of 50 relays, weights 1 : 2 : 3 : 6 (bandwidth under the cap)
    classes = [(0.4, 1e6), (0.8, 1e6), (0.6, 2e6), (0.6, 4e6)]
    relays = [relay(c * 50 + i, rep=rep, bw=bw) for c, (rep, bw) in enumerate(classes)
              for i in range(50)]
    selector = PathSelector(relays, PathPolicy(n_paths=1), random.Random(11))
    proxies: Counter[int] = Counter()
    anywhere: Counter[int] = Counter()
    for _ in range(6000):
        (path,) = selector.select()
        proxies[int.from_bytes(path[-1].node_id, "big") // 50] += 1
        for r in path:
            anywhere[int.from_bytes(r.node_id, "big") // 50] += 1
    expected = [w / 12 for w in (1, 2, 3, 6)]
    for c in range(4):
        # the proxy is the first draw: exactly proportional (about 4 standard errors)
        assert proxies[c] / 6000 == pytest.approx(expected[c], abs=0.025)
        # later hops draw without replacement from 200 relays: still close
        assert anywhere[c] / 18000 == pytest.approx(expected[c], rel=0.08)


def test_one_huge_relay_cannot_take_everything():
    relays = diverse(99) + [relay(500, bw=1e12)]
    selector = PathSelector(relays, PathPolicy(n_paths=1), random.Random(5))
    huge, typical = selector.weight(relay(500).node_id), selector.weight(relay(0).node_id)
    assert huge == pytest.approx(4 * typical)
    share = sum(selector.select()[0][-1].node_id == relay(500).node_id for _ in range(4000)) / 4000
    assert share == pytest.approx(4 / 103, abs=0.012)


# -- properties over random relay sets -------------------------------------------------------

relay_sets = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 4), st.integers(0, 6), st.floats(0.0, 1.0),
              st.floats(1.0, 1e9)),
    min_size=0, max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(relay_sets, st.integers(2, 4), st.integers(1, 4), st.booleans(), st.integers(0, 2**32))
def test_every_rule_holds_or_the_selector_refuses(spec, hops, n, proxy_rule, seed):
    relays = [relay(i, f"isp{a}", f"grid{b}", f"loc{c}", rep, bw)
              for i, (a, b, c, rep, bw) in enumerate(spec)]
    policy = PathPolicy(hops=hops, n_paths=n, distinct_proxy_isps=proxy_rule)
    exclude = {r.node_id for r in relays[::7]}
    try:
        paths = PathSelector(relays, policy, random.Random(seed)).select(exclude=exclude)
    except OverlayError as exc:
        assert str(exc)
        return
    assert_valid(paths, policy, n, exclude)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 4), st.integers(1, 6), st.integers(0, 40), st.integers(0, 2**32))
def test_generous_relay_sets_always_succeed(hops, n, extra, seed):
    policy = PathPolicy(hops=hops, n_paths=n)
    relays = diverse(hops * n + extra)
    assert_valid(PathSelector(relays, policy, random.Random(seed)).select(), policy, n)


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 4), st.integers(1, 80), st.integers(0, 2**32))
def test_too_few_isps_always_raise(hops, count, seed):
    relays = [relay(i, isp=f"isp{i % (hops - 1)}") for i in range(count)]
    with pytest.raises(OverlayError, match="relay count|ISP"):
        PathSelector(relays, PathPolicy(hops=hops), random.Random(seed)).select()


# -- sessions --------------------------------------------------------------------------------
