"""Routing policies: who answers a request, told as stories over hand-built member states,
then checked against the estimate itself over random groups."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from permamesh.routing import BlockHasher, HashRadixTree, RoutingError
from permamesh.routing.view import GroupView
from permamesh.routing.policy import (
    CACHED_SPEEDUP,
    PER_REQUEST_OVERHEAD_S,
    POLICY_NAMES,
    CacheAwarePolicy,
    LeastLoadedPolicy,
    MemberState,
    PermameshPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    RouteQuery,
    estimate_ttft_s,
    estimate_work_s,
    make_policy,
)

PREFILL, DECODE = 370.0, 50.0
CHAIN = tuple(bytes([i % 256, i // 256]) * 8 for i in range(120))  # 120 blocks of 16 tokens


def member(worker: str, backlog: float = 0.0, queue: int = 0, **kw: float) -> MemberState:
    return MemberState(worker, queue, backlog, PREFILL, DECODE, **kw)  # type: ignore[arg-type]


def query(blocks: int = 100, extra: int = 8, session: str | None = None) -> RouteQuery:
    """A prompt of ``blocks`` full blocks plus ``extra`` tokens."""
    return RouteQuery(CHAIN[:blocks], 16 * blocks + extra, 64, 16, session)


def saving_s(q: RouteQuery, blocks: int) -> float:
    """What holding ``blocks`` of ``q`` saves in prefill."""
    return 16 * blocks * (1 - 1 / CACHED_SPEEDUP) / PREFILL


# -- the estimates ---------------------------------------------------------------------------


def test_estimates_charge_the_queue_the_uncached_prefill_and_a_little_for_the_cache() -> None:
    q = query(blocks=100, extra=8)  # 1,608 tokens
    busy = member("a", backlog=2.0)
    cold = estimate_ttft_s(q, busy, 0)
    assert cold == pytest.approx(2.0 + PER_REQUEST_OVERHEAD_S + 1608 / PREFILL)
    warm = estimate_ttft_s(q, busy, 100)
    assert warm == pytest.approx(2.0 + PER_REQUEST_OVERHEAD_S + 8 / PREFILL + 1600 / PREFILL / 40)
    # The work a request adds excludes the queue and includes the decode.
    assert estimate_work_s(q, busy, 100) == pytest.approx(warm - 2.0 + 64 / DECODE)
    # A match longer than the prompt (the tree's blocks can't exceed it) is clamped.
    clamped = 2.0 + PER_REQUEST_OVERHEAD_S + 1608 / PREFILL / 40
    assert estimate_ttft_s(q, busy, 500) == pytest.approx(clamped)


# -- PermameshPolicy ---------------------------------------------------------------------------


def test_an_idle_holder_of_a_long_prefix_gets_the_request() -> None:
    members = [member("a"), member("b"), member("c")]
    assert PermameshPolicy().choose(query(), members, {"a": 4, "b": 100, "c": 4}) == "b"


def test_the_holder_is_left_once_its_backlog_exceeds_the_prefill_it_saves() -> None:
    q = query()
    saving = saving_s(q, 100 - 4)  # b holds 100 blocks, the others the 4-block system prompt
    matched = {"a": 4, "b": 100, "c": 4}
    policy = PermameshPolicy()
    below = [member("a", 0.5), member("b", 0.5 + saving - 0.1), member("c", 0.7)]
    assert policy.choose(q, below, matched) == "b"
    above = [member("a", 0.5), member("b", 0.5 + saving + 0.1), member("c", 0.7)]
    assert policy.choose(q, above, matched) == "a"


def test_a_cache_miss_goes_to_the_least_loaded_member_never_an_overloaded_one() -> None:
    q = query()
    members = [member("hot", 30.0, 12), member("warm", 3.0, 2), member("idle", 0.2, 1)]
    assert PermameshPolicy().choose(q, members, {}) == "idle"
    # A short match on the overloaded member does not tempt it either.
    assert PermameshPolicy().choose(q, members, {"hot": 10}) == "idle"


def test_the_reputation_floor_excludes_members_and_an_empty_field_is_an_error() -> None:
    members = [member("a", reputation=0.2), member("b", 5.0), member("c", 6.0)]
    assert PermameshPolicy().choose(query(), members, {"a": 100}) == "b"
    assert PermameshPolicy(reputation_floor=0.1).choose(query(), members, {"a": 100}) == "a"
    with pytest.raises(RoutingError, match="reputation"):
        PermameshPolicy().choose(query(), [member("a", reputation=0.29)], {})
    with pytest.raises(RoutingError):
        PermameshPolicy().choose(query(), [], {})


def test_a_session_stays_on_its_worker_within_the_slack_and_leaves_beyond_it() -> None:
    policy = PermameshPolicy()
    q = query(session="alice")
    assert policy.choose(q, [member("a", 0.0), member("b", 0.5)], {}) == "a"
    # b is now slightly better (within +10% / +50 ms): Alice stays on a.
    assert policy.choose(q, [member("a", 0.55), member("b", 0.5)], {}) == "a"
    # Another session with the same loads takes the better member.
    assert policy.choose(query(session="bob"), [member("a", 0.55), member("b", 0.5)], {}) == "b"
    # Far beyond the slack, Alice moves, and then sticks to her new worker.
    assert policy.choose(q, [member("a", 9.0), member("b", 0.5)], {}) == "b"
    assert policy.choose(q, [member("a", 0.55), member("b", 0.6)], {}) == "b"


def test_a_sessions_worker_is_credited_with_its_last_prompt_before_the_tree_shows_it() -> None:
    """Trap (d): turn 2 arrives before turn 1's blocks reached the tree."""
    policy = PermameshPolicy()
    idle = [member("a"), member("b"), member("c")]
    first = policy.choose(query(blocks=80, session="t"), idle, {})
    busy = [replace(m, backlog_s=2.0) if m.worker == first else m for m in idle]
    # That worker is busy and the tree knows nothing yet: the 100-block turn 2 still goes
    # there, because it will hold the first 80 blocks (saving far more than its 2 s queue).
    assert policy.choose(query(blocks=100, session="t"), busy, {}) == first
    # A prompt that does not extend turn 1 (another chain) gets no credit.
    other = RouteQuery(tuple(reversed(CHAIN[:100])), 1608, 64, 16, "t")
    assert policy.choose(other, busy, {}) != first


def test_idle_ties_are_broken_by_the_seeded_generator_not_by_worker_id() -> None:
    members = [member(f"w{i}") for i in range(8)]
    picks = [PermameshPolicy(seed=s).choose(query(), members, {}) for s in range(40)]
    assert len(set(picks)) > 3
    again = [PermameshPolicy(seed=s).choose(query(), members, {}) for s in range(40)]
    assert picks == again


group_states = st.lists(
    st.tuples(
        st.floats(0, 50),
        st.integers(0, 40),
        st.floats(0.0, 1.0),
        st.integers(0, 120),
        st.floats(0.25, 4.0),
    ),
    min_size=1,
    max_size=12,
)


@given(group_states, st.integers(1, 120))
def test_the_choice_always_has_the_smallest_estimate_of_the_eligible(states, blocks) -> None:
    q = query(blocks=blocks)
    members = [
        MemberState(f"w{i:02d}", qlen, backlog, PREFILL * speed, DECODE * speed, rep)
        for i, (backlog, qlen, rep, _, speed) in enumerate(states)
    ]
    matched = {f"w{i:02d}": min(m, blocks) for i, (_, _, _, m, _) in enumerate(states) if m}
    eligible = [m for m in members if m.reputation >= 0.3]
    if not eligible:
        with pytest.raises(RoutingError):
            PermameshPolicy().choose(q, members, matched)
        return
    pick = PermameshPolicy().choose(q, members, matched)
    est = {m.worker: estimate_ttft_s(q, m, matched.get(m.worker, 0)) for m in eligible}
    assert est[pick] <= min(est.values()) + 0.001
    if not matched and len({m.prefill_tok_per_s for m in eligible}) == 1:  # a pure miss
        assert next(m for m in eligible if m.worker == pick).backlog_s <= min(
            m.backlog_s for m in eligible
        ) + 0.001


# -- GroupView ------------------------------------------------------------------------------


def test_a_burst_behind_one_popular_prompt_spreads_instead_of_piling_onto_its_holder() -> None:
    """Trap (a): between two load reports, the router's own assignments count."""
    hasher = BlockHasher()
    tree = HashRadixTree()
    system = list(range(1000, 1000 + 16 * 60))  # a 960-token system prompt, held by gpu-a
    tree.insert(hasher.chain(system), "gpu-a", now=0.0)
    states = [member(f"gpu-{x}") for x in "abcd"]
    prompts = [system + [7, i] * 40 for i in range(40)]  # same system prompt, new questions

    def route(optimistic: bool) -> Counter[str]:
        view, policy, placed = GroupView(states), PermameshPolicy(), Counter()
        for tokens in prompts:
            chain = tuple(hasher.chain(tokens))
            q = RouteQuery(chain, len(tokens), 128, 16)
            matched = tree.match(chain)
            members = view.members()
            pick = policy.choose(q, members, matched)
            if optimistic:
                chosen = next(m for m in members if m.worker == pick)
                view.assign(pick, estimate_work_s(q, chosen, matched.get(pick, 0)))
            placed[pick] += 1
        return placed

    assert route(optimistic=False) == {"gpu-a": 40}  # stale loads: everything piles up
    spread = route(optimistic=True)
    assert set(spread) == {"gpu-a", "gpu-b", "gpu-c", "gpu-d"}
    assert max(spread.values()) <= 20 and spread["gpu-a"] == max(spread.values())


def test_a_published_load_replaces_the_optimistic_additions_it_has_seen() -> None:
    view = GroupView([member("b", 1.0, 1), member("a")])
    assert [m.worker for m in view.members()] == ["a", "b"]
    view.assign("a", 2.0, blocks=10)
    view.assign("a", 3.0, blocks=4)
    assert view.members()[0] == member("a", 5.0, 2, cached_blocks=14)
    # a reports having received one of our two requests: the second stays optimistic.
    view.update(member("a", 2.5, 1, cached_blocks=10), seen_assignments=1)
    assert view.members()[0] == member("a", 5.5, 2, cached_blocks=14)
    # A report without a count covers everything sent before it.
    view.update(member("a", 4.0, 2))
    assert view.members()[0] == member("a", 4.0, 2)
    view.assign("a", 1.0)
    view.complete("a", 1.0)  # finished before the next report
    assert view.members()[0] == member("a", 4.0, 2)
    view.complete("a", 3.0)  # a request the last report included
    assert view.members()[0] == member("a", 1.0, 1)
    view.remove("b")
    assert [m.worker for m in view.members()] == ["a"] and "b" not in view and len(view) == 1
    view.complete("b", 1.0)  # news about a member that left is ignored
    with pytest.raises(RoutingError):
        view.assign("b", 1.0)


@pytest.mark.parametrize(
    "bad",
    [
        MemberState("", 0, 0.0, PREFILL, DECODE),
        MemberState("a", -1, 0.0, PREFILL, DECODE),
        MemberState("a", 0, float("nan"), PREFILL, DECODE),
        MemberState("a", 0, 0.0, 0.0, DECODE),
        MemberState("a", 0, 0.0, PREFILL, float("inf")),
        MemberState("a", 0, 0.0, PREFILL, DECODE, reputation=1.5),
    ],
)
def test_implausible_published_loads_are_rejected(bad: MemberState) -> None:
    with pytest.raises(RoutingError, match="implausible"):
        GroupView().update(bad)


# -- the baselines ---------------------------------------------------------------------------


def test_cache_aware_follows_its_match_and_balance_thresholds() -> None:
    policy = CacheAwarePolicy()  # threshold 0.5, abs 32, rel 1.5
    q = query(blocks=100)
    members = [
        member("a", queue=3, cached_blocks=900),
        member("b", queue=1, cached_blocks=50),
        member("c", queue=2, cached_blocks=10),
    ]
    assert policy.choose(q, members, {"a": 60, "b": 10}) == "a"  # 960/1608 > 0.5
    assert policy.choose(q, members, {"a": 40, "b": 10}) == "c"  # below: fewest cached blocks
    assert policy.choose(q, members, {"a": 60, "b": 60}) == "b"  # equal matches: shorter queue
    # Imbalanced (40 - 2 > 32 and 40 > 1.5 x 2): the shortest queue wins over the match.
    skewed = [member("a", queue=40), member("b", queue=2), member("c", queue=5)]
    assert policy.choose(q, skewed, {"a": 100}) == "b"
    # A large absolute gap that is not relatively large is not imbalance.
    busy = [member("a", queue=100), member("b", queue=70), member("c", queue=80)]
    assert policy.choose(q, busy, {"a": 100}) == "a"


def test_round_robin_cycles_in_worker_order() -> None:
    policy = RoundRobinPolicy()
    members = [member("c"), member("a"), member("b")]
    assert [policy.choose(query(), members, {}) for _ in range(5)] == ["a", "b", "c", "a", "b"]
    assert RoundRobinPolicy(start=2).choose(query(), members, {}) == "c"


def test_least_loaded_takes_the_smallest_backlog_then_the_shorter_queue_then_the_id() -> None:
    members = [member("c", 1.0, 1), member("b", 1.0, 3), member("a", 2.0, 0), member("d", 1.0, 1)]
    assert LeastLoadedPolicy().choose(query(), members, {"a": 100}) == "c"


def test_random_is_reproducible_per_seed() -> None:
    members = [member(f"w{i}") for i in range(10)]

    def draw(seed: int) -> list[str]:
        policy = RandomPolicy(seed)
        return [policy.choose(query(), members, {}) for _ in range(20)]

    assert draw(1) == draw(1)
    assert len(set(draw(1))) > 3
    assert draw(1) != draw(2)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_named_policy_routes_and_refuses_an_empty_group(name: str) -> None:
    policy = make_policy(name, seed=3)
    assert policy.name == name
    assert policy.choose(query(), [member("a"), member("b")], {"b": 50}) in {"a", "b"}
    with pytest.raises(RoutingError):
        policy.choose(query(), [], {})


def test_an_unknown_policy_name_is_an_error() -> None:
    with pytest.raises(RoutingError, match="unknown policy"):
        make_policy("fastest")
