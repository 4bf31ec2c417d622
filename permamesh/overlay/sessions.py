"""Session path sets: which paths a conversation's requests use, for how long, and after failures.

A client keeps one path set per session (``docs/paths.md`` section 5): its requests all go over
the same n paths, so few relays ever see the client and the links between relays stay warm.
:class:`SessionPaths` builds the set on first use (:meth:`SessionPaths.paths_for`), rotates it
after ``max_uses`` requests or ``max_age_s`` seconds, replaces a path that timed out with one
that avoids its relays for the rest of the set's life (:meth:`SessionPaths.path_failed`),
patches every path through a relay known dead (:meth:`SessionPaths.mark_failed`), and rebuilds
a whole set for a resend (:meth:`SessionPaths.resend_paths`). :meth:`SessionPaths.peek` tells
the client's preparer which paths the next request will use, without counting a use.

Pure and deterministic given the selector's random generator and the clock. Who calls it:
:class:`~permamesh.overlay.sender.OverlayClient` (under its own lock) and tests.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from permamesh.overlay.errors import OverlayError
from permamesh.overlay.paths import Path, PathSelector

log = logging.getLogger(__name__)

__all__ = ["SessionPaths"]


@dataclass
class _Session:
    paths: list[Path]
    built_at: float  # clock time the set was built
    uses: int = 0
    suspects: frozenset[bytes] = frozenset()  # relays of this session's paths that timed out


class SessionPaths:
    """Per-session path sets: built on first use, rebuilt after ``max_uses`` requests or
    ``max_age_s`` seconds, patched when a path times out or a relay is known dead, rebuilt
    for a resend. At most ``max_sessions`` sessions are remembered (least recently used
    dropped).

    ``clock`` returns seconds (monotonic); tests pass a fake one. Not thread-safe: one client
    owns one instance."""

    def __init__(self, selector: PathSelector, clock: Callable[[], float] | None = None,
                 max_sessions: int = 1024) -> None:
        if max_sessions < 1:
            raise OverlayError("max_sessions must be >= 1")
        self._selector = selector
        self._clock = clock or time.monotonic
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._failed: set[bytes] = set()
        self._max_sessions = max_sessions

    @property
    def failed(self) -> frozenset[bytes]:
        """Relays known dead; no new path uses them."""
        return frozenset(self._failed)

    def peek(self, session_id: str) -> tuple[Path, ...]:
        """The path set the session's next request will use (built or rotated now if due);
        counts no use."""
        return tuple(self._current(session_id).paths)

    def paths_for(self, session_id: str) -> tuple[Path, ...]:
        """The path set the session's next request uses (counts one use)."""
        state = self._current(session_id)
        state.uses += 1
        return tuple(state.paths)

    def suspects(self, session_id: str) -> frozenset[bytes]:
        """Relays of the session's paths that timed out since its set was built."""
        state = self._sessions.get(session_id)
        return state.suspects if state is not None else frozenset()

    def _current(self, session_id: str) -> _Session:
        policy, now = self._selector.policy, self._clock()
        state = self._sessions.get(session_id)
        if (state is None or state.uses >= policy.max_uses
                or now - state.built_at >= policy.max_age_s):
            # suspicion is per path set: a rotation forgets it
            state = _Session(self._selector.select(exclude=self._failed), now)
            self._remember(session_id, state)
            log.debug("session %s: new path set", session_id)
        else:
            self._sessions.move_to_end(session_id)
        return state

    def _remember(self, session_id: str, state: _Session) -> None:
        self._sessions[session_id] = state
        self._sessions.move_to_end(session_id)
        while len(self._sessions) > self._max_sessions:
            self._sessions.popitem(last=False)

    def path_failed(self, session_id: str, relays: Collection[bytes]) -> bool:
        """A path over ``relays`` timed out: they become suspects for the rest of the set's
        life, and the set's path that holds any of them is replaced by one that keeps the
        rules of ``docs/paths.md`` section 3 together with the paths kept. False when no new
        path exists: the session then loses its set, and its next request rebuilds (or fails
        with the rule that cannot be met)."""
        state = self._sessions.get(session_id)
        if state is None:
            return False
        state.suspects = state.suspects | frozenset(relays)
        return self._replace(session_id, state, lambda path: any(r.node_id in relays for r in path))

    def resend_paths(self, session_id: str, failed: Iterable[int]) -> tuple[Path, ...]:
        """A request timed out: the relays of paths ``failed`` (indices into the current set)
        become suspects for this session (a client cannot tell which hop died), and the resend
        goes over a whole fresh path set that avoids them. Counts one use."""
        state = self._sessions.get(session_id)
        if state is None:
            raise OverlayError(f"session {session_id!r} has no paths to resend over")
        suspects = set(state.suspects)
        for index in failed:
            if not 0 <= index < len(state.paths):
                raise OverlayError(f"session {session_id!r}: no path {index}")
            suspects.update(r.node_id for r in state.paths[index])
        paths = self._selector.select(exclude=self._failed | suspects)
        self._remember(session_id, _Session(paths, self._clock(), 1, frozenset(suspects)))
        return tuple(paths)

    def mark_failed(self, node_id: bytes) -> int:
        """A relay is known dead: every path through it is replaced (the session's other
        paths are kept). Returns how many paths were replaced. A session whose path cannot be
        replaced loses its set; its next :meth:`paths_for` rebuilds or raises."""
        self._failed.add(node_id)
        replaced = 0
        for session_id in sorted(self._sessions):
            state = self._sessions[session_id]
            before = list(state.paths)
            if not self._replace(session_id, state, lambda path: any(r.node_id == node_id for r in path)):
                continue
            replaced += sum(a != b for a, b in zip(before, state.paths))
        return replaced

    def _replace(self, session_id: str, state: _Session, hit: Callable[[Path], bool]) -> bool:
        """Replace every path of ``state`` that ``hit`` selects; False (and the set dropped)
        if one cannot be replaced."""
        policy = self._selector.policy
        for i, path in enumerate(state.paths):
            if not hit(path):
                continue
            others = [p for j, p in enumerate(state.paths) if j != i]
            exclude = self._failed | state.suspects | {r.node_id for p in others for r in p}
            proxy_isps = {p[-1].isp for p in others} if policy.distinct_proxy_isps else ()
            try:
                state.paths[i] = self._selector.select(1, exclude=exclude, avoid_proxy_isps=proxy_isps)[0]
            except OverlayError as exc:
                log.warning("session %s: cannot replace a path: %s", session_id, exc)
                del self._sessions[session_id]
                return False
        return True

    def mark_recovered(self, node_id: bytes) -> None:
        """A relay known dead is back; new paths may use it again."""
        self._failed.discard(node_id)

    def forget(self, session_id: str) -> None:
        """Drop a finished session's paths."""
        self._sessions.pop(session_id, None)
