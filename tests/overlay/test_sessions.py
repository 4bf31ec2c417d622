"""A session's path set (docs/paths.md sections 5 and 6): kept across requests, rotated,
repaired around paths that timed out and relays known dead. Clocks are fake (no sleeping)."""

from __future__ import annotations

import random

import pytest

from permamesh.overlay.errors import OverlayError
from permamesh.overlay.paths import PathPolicy, PathSelector
from permamesh.overlay.sessions import SessionPaths
from tests.overlay.test_paths import assert_valid, diverse


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def session_paths(policy: PathPolicy = PathPolicy(max_uses=3, max_age_s=60.0), count: int = 60):
    clock = FakeClock()
    return SessionPaths(PathSelector(diverse(count), policy, random.Random(9)), clock), clock


def test_a_session_keeps_its_paths_until_max_uses_then_rotates():
    sessions, _ = session_paths()
    first = sessions.paths_for("s1")
    assert sessions.paths_for("s1") == first and sessions.paths_for("s1") == first
    assert sessions.paths_for("s1") != first  # fourth request: a fresh set
    assert sessions.paths_for("s2") != sessions.paths_for("s1")  # sessions do not share


def test_a_session_rotates_after_max_age():
    sessions, clock = session_paths()
    first = sessions.paths_for("s1")
    clock.now = 59.0
    assert sessions.paths_for("s1") == first
    clock.now = 60.0
    assert sessions.paths_for("s1") != first


def test_a_failed_relay_is_replaced_and_the_other_paths_are_kept():
    sessions, _ = session_paths()
    paths = sessions.paths_for("s1")
    dead = paths[1][1].node_id
    assert sessions.mark_failed(dead) == 1
    patched = sessions.paths_for("s1")
    assert patched[0] == paths[0] and patched[2:] == paths[2:]
    assert dead not in {r.node_id for p in patched for r in p}
    assert_valid(patched, PathPolicy(), 4)
    assert sessions.mark_failed(dead) == 0  # nothing uses it any more
    sessions.forget("s1")
    for _ in range(50):
        sessions.forget("s1")
        assert dead not in {r.node_id for p in sessions.paths_for("s1") for r in p}
    sessions.mark_recovered(dead)
    assert dead not in sessions.failed


def test_a_resend_avoids_every_relay_of_the_paths_that_timed_out():
    sessions, _ = session_paths()
    paths = sessions.paths_for("s1")
    suspects = {r.node_id for i in (0, 2) for r in paths[i]}
    fresh = sessions.resend_paths("s1", [0, 2])
    assert not suspects & {r.node_id for p in fresh for r in p}
    assert_valid(fresh, PathPolicy(), 4)
    suspects |= {r.node_id for r in fresh[3]}  # suspicion accumulates within the path set
    again = sessions.resend_paths("s1", [3])
    assert not suspects & {r.node_id for p in again for r in p}
    with pytest.raises(OverlayError, match="no path 4"):
        sessions.resend_paths("s1", [4])
    with pytest.raises(OverlayError, match="no paths"):
        sessions.resend_paths("nobody", [0])


def test_a_session_that_cannot_be_repaired_fails_loudly_on_next_use():
    sessions, _ = session_paths(count=12)  # exactly enough for one request
    paths = sessions.paths_for("s1")
    assert sessions.mark_failed(paths[0][0].node_id) == 0
    with pytest.raises(OverlayError, match="relay count"):
        sessions.paths_for("s1")


def test_peek_shows_the_next_requests_paths_without_using_them():
    sessions, _ = session_paths()
    peeked = sessions.peek("s1")
    for _ in range(3):  # max_uses = 3: peeking counted none of them
        assert sessions.paths_for("s1") == peeked
    assert sessions.peek("s1") != peeked  # due for rotation: peek builds the next set
    assert sessions.paths_for("s1") == sessions.peek("s1")


def test_a_path_that_timed_out_is_replaced_and_its_relays_stay_suspect_until_rotation():
    sessions, _ = session_paths(PathPolicy(max_uses=10, max_age_s=60.0))
    paths = sessions.paths_for("s1")
    timed_out = {r.node_id for r in paths[2]}
    assert sessions.path_failed("s1", timed_out)
    patched = sessions.paths_for("s1")
    assert patched[:2] == paths[:2] and patched[3] == paths[3] and patched[2] != paths[2]
    assert not timed_out & {r.node_id for p in patched for r in p}
    assert_valid(patched, PathPolicy(), 4)
    assert sessions.suspects("s1") == timed_out
    # a second failure adds to the suspects; no path of the set may use any of them
    more = {r.node_id for r in patched[0]}
    assert sessions.path_failed("s1", more)
    assert not (timed_out | more) & {r.node_id for p in sessions.paths_for("s1") for r in p}
    assert not sessions.path_failed("nobody", more) and sessions.suspects("nobody") == frozenset()


def test_a_path_failure_that_cannot_be_repaired_drops_the_set():
    sessions, _ = session_paths(count=12)  # exactly enough for one request
    paths = sessions.paths_for("s1")
    assert not sessions.path_failed("s1", {r.node_id for r in paths[0]})
    assert sessions.suspects("s1") == frozenset()  # the set is gone, and its suspicion with it
    assert_valid(sessions.paths_for("s1"), PathPolicy(), 4)  # the next request builds a new one


def test_only_the_most_recent_sessions_are_remembered():
    clock = FakeClock()
    sessions = SessionPaths(PathSelector(diverse(60), PathPolicy(), random.Random(2)), clock, max_sessions=2)
    first = sessions.paths_for("a")
    sessions.paths_for("b")
    assert sessions.paths_for("a") == first  # "a" is now the most recent
    sessions.paths_for("c")  # drops "b", the least recently used
    assert sessions.paths_for("a") == first
    with pytest.raises(OverlayError, match="max_sessions"):
        SessionPaths(PathSelector(diverse(60)), clock, max_sessions=0)
