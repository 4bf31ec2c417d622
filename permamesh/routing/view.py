"""What one router knows of its group's members: their published loads and its own assignments.

An entry worker (:mod:`permamesh.workers.group`) and the simulator (:mod:`permamesh.bench.sim`)
keep one :class:`GroupView` per router: it holds each member's last published
:class:`~permamesh.routing.policy.MemberState`, adds the router's own assignments to it until
a report includes them (so a burst does not pile onto one member between reports), and hands
the :class:`~permamesh.routing.policy.Policy` the members' effective states. Pure: no I/O, no
clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from permamesh.routing.errors import RoutingError

if TYPE_CHECKING:
    from permamesh.routing.policy import MemberState


def _plausible(s: MemberState) -> bool:
    return bool(
        isinstance(s.worker, str) and s.worker and s.queue_length >= 0 and s.cached_blocks >= 0
        and 0 <= s.backlog_s < math.inf and 0 <= s.reputation <= 1
        and 0 < s.prefill_tok_per_s < math.inf and 0 < s.decode_tok_per_s < math.inf
    )


class GroupView:
    """What one router knows about its group: members' last published loads plus its own
    assignments since.

    :meth:`assign` adds a request's queue slot, work and new blocks to its member at once
    (optimistically). The member's next published load (:meth:`update`) replaces them, except
    those it says it has not seen: ``seen_assignments`` counts this router's assignments to it
    since the view was created. Published loads come from peers, so implausible ones raise
    RoutingError (``check=False`` only for states this process computed itself).
    """

    def __init__(self, states: Iterable[MemberState] = (), *, check: bool = True) -> None:
        self._check = check
        self._base: dict[str, MemberState] = {}  # last report (adjusted by completions)
        self._pending: dict[str, list[tuple[float, int]]] = {}  # (work_s, blocks) unreported
        self._sent: dict[str, int] = {}  # assignments made by this router, per member
        self._order: list[MemberState] | None = None  # effective states, sorted by worker
        self._index: dict[str, int] = {}
        for state in states:
            self.update(state)

    def _refresh(self, worker: str) -> None:
        state, pending = self._base[worker], self._pending.get(worker)
        if pending:
            state = replace(
                state,
                queue_length=state.queue_length + len(pending),
                backlog_s=state.backlog_s + sum(work for work, _ in pending),
                cached_blocks=state.cached_blocks + sum(blocks for _, blocks in pending),
            )
        if self._order is not None:
            self._order[self._index[worker]] = state

    def update(self, state: MemberState, seen_assignments: int | None = None) -> None:
        """A member published ``state``: it replaces the optimistic additions it has seen."""
        if self._check and not _plausible(state):
            raise RoutingError(f"implausible member state {state!r}")
        worker, pending = state.worker, self._pending.get(state.worker)
        if pending:
            unseen = 0 if seen_assignments is None else self._sent[worker] - seen_assignments
            del pending[: len(pending) - min(max(unseen, 0), len(pending))]
        if worker not in self._base:
            self._order = None
        self._base[worker] = state
        if pending:
            self._refresh(worker)
        elif self._order is not None:
            self._order[self._index[worker]] = state

    def assign(self, worker: str, work_s: float, blocks: int = 0) -> None:
        """This router sent ``worker`` a request of ``work_s`` seconds that will add ``blocks``
        blocks to its cache."""
        if worker not in self._base:
            raise RoutingError(f"assigned to {worker!r}, which is not in the view")
        self._pending.setdefault(worker, []).append((float(work_s), int(blocks)))
        self._sent[worker] = self._sent.get(worker, 0) + 1
        self._refresh(worker)

    def complete(self, worker: str, work_s: float) -> None:
        """This router learned that a request it sent ``worker`` finished (ignored for a
        member that left)."""
        if worker not in self._base:
            return
        base, pending = self._base[worker], self._pending.get(worker)
        if pending:  # not yet reported: only its blocks stay behind
            entry = next((e for e in pending if e[0] == work_s), pending[0])
            pending.remove(entry)
            base = replace(base, cached_blocks=base.cached_blocks + entry[1])
        else:  # already in the last report
            queue, backlog = max(base.queue_length - 1, 0), max(base.backlog_s - work_s, 0.0)
            base = replace(base, queue_length=queue, backlog_s=backlog)
        self._base[worker] = base
        self._refresh(worker)

    def remove(self, worker: str) -> None:
        """``worker`` left the group."""
        for table in (self._base, self._pending, self._sent):
            table.pop(worker, None)
        self._order = None

    def members(self) -> list[MemberState]:
        """Every member, sorted by worker id, with this router's optimistic additions."""
        if self._order is None:
            self._order = [self._base[w] for w in sorted(self._base)]
            self._index = {s.worker: i for i, s in enumerate(self._order)}
            for worker in self._pending:
                self._refresh(worker)
        return list(self._order)

    def __contains__(self, worker: object) -> bool:
        return worker in self._base

    def __len__(self) -> int:
        return len(self._base)
