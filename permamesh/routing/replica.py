"""A worker's replica of its group's hash-radix tree, kept in step by delta sync.

:class:`GroupReplica` applies the :class:`~permamesh.routing.messages.TreeDelta` and
:class:`~permamesh.routing.messages.TreeSnapshot` messages every member's
:class:`~permamesh.routing.sync.DeltaPublisher` sends (its own by loopback) to one
:class:`~permamesh.routing.hrtree.HashRadixTree` of the whole group, tracks each member's
:class:`~permamesh.routing.holdings.Holdings`, sequence number and load, and says which
members need a snapshot. The protocol and the replica rules per member are described in
:mod:`permamesh.routing.sync`; :class:`ReplicaMember` is what :meth:`GroupReplica.state`
reports of one member.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from permamesh.routing.errors import RoutingError
from permamesh.routing.holdings import ROOT, Holdings, check_name, holdings_element
from permamesh.routing.hrtree import HashRadixTree
from permamesh.routing.messages import (
    HOLDINGS_SIZE, Insert, Load, TreeDelta, TreeSnapshot, TreeSyncRequest,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaMember:
    """What a replica knows of one member (see :meth:`GroupReplica.state`)."""

    worker: str
    epoch: int
    seq: int  # last delta applied (or snapshot installed)
    holdings: bytes  # the replica's holdings digest for the member
    blocks: int
    load: Load
    last_heard: float
    in_sync: bool


class _Member:
    __slots__ = ("epoch", "seq", "held", "broken", "ahead", "gap_since", "asked", "load",
                 "load_stamp", "last_heard")

    def __init__(self, epoch: int, seq: int, load: Load, now: float) -> None:
        self.epoch, self.seq, self.held = epoch, 0, Holdings()
        self.broken = False  # delta seq + 1 failed; a snapshot or a delta that checks repairs it
        self.ahead: dict[int, TreeDelta] = {}  # deltas waiting for the ones before them
        self.gap_since: float | None = None
        self.asked: float | None = None  # when we last asked for a snapshot
        self.load, self.load_stamp, self.last_heard = load, (epoch, seq), now


class GroupReplica:
    """``me``'s replica of group ``group``: ``tree`` holds every member's blocks (``me``'s
    included, through loopback of its own deltas), plus each member's sync state and load."""

    def __init__(self, group: str, me: str, *, max_buffered: int = 64) -> None:
        self.group, self.me = check_name(group, "group"), check_name(me, "me")
        if isinstance(max_buffered, bool) or not isinstance(max_buffered, int) or max_buffered < 1:
            raise RoutingError(f"max_buffered must be an integer >= 1, not {max_buffered!r}")
        self.max_buffered = max_buffered
        self.tree = HashRadixTree()
        self._members: dict[str, _Member] = {}

    # -- receiving ---------------------------------------------------------------------------

    def apply_delta(self, delta: TreeDelta, now: float) -> bool:
        """Apply ``delta`` (and any buffered ones it unblocks). True when it was applied and
        its member is in step; False when it was ignored (another group, stale, duplicate)
        or is held back (a gap, or the member needs a snapshot: see :meth:`needs_resync`)."""
        m = self._receive(delta.group, delta.worker, delta.epoch, delta.seq, delta.load, now)
        if m is None or delta.seq <= m.seq or delta.seq in m.ahead:
            return False
        problem = self._try(delta.worker, m, delta, now)
        if problem is None:
            self._drain(delta.worker, m, now)
        elif delta.seq == m.seq + 1 and not m.broken:
            log.info("group %s: %s diverged at seq %d (%s); needs a snapshot",
                     self.group, delta.worker, delta.seq, problem)
            m.broken = True
        else:
            m.ahead[delta.seq] = delta  # wait for the deltas before it, or a snapshot
            while len(m.ahead) > self.max_buffered:
                del m.ahead[min(m.ahead)]
        m.gap_since = (m.gap_since if m.gap_since is not None else now) if m.ahead else None
        if not self._stuck(m):
            m.asked = None
        return problem is None and not self._stuck(m)

    def apply_snapshot(self, snap: TreeSnapshot, now: float) -> bool:
        """Replace the member's holdings with ``snap`` exactly (unless it is older than what an
        in-step replica already has, or is inconsistent). True when installed."""
        m = self._receive(snap.group, snap.worker, snap.epoch, snap.seq, snap.load, now)
        if m is None or (not m.broken and snap.seq <= m.seq):
            return False
        held = Holdings()
        problem = _check_changes(held, (), snap.chains, snap.holdings)
        if problem is not None:
            log.warning("group %s: bad snapshot of %s: %s", self.group, snap.worker, problem)
            return False
        for run in snap.chains:
            for parent, digest in zip((run.anchor,) + run.digests, run.digests):
                held.add(digest, parent)
        self.tree.drop_worker(snap.worker)
        for run in snap.chains:
            if held.is_leaf(run.digests[-1]):
                self.tree.insert(held.chain(run.digests[-1]), snap.worker, now)
        m.held, m.seq, m.broken, m.asked = held, snap.seq, False, None
        self._drain(snap.worker, m, now)
        return not m.broken

    # -- queries -----------------------------------------------------------------------------

    def members(self) -> list[str]:
        return sorted(self._members)

    def needs_resync(self) -> list[str]:
        """Members whose entry is broken or stuck behind a gap, sorted."""
        return [w for w in sorted(self._members) if self._stuck(self._members[w])]

    def sync_requests(self, now: float, *, retry_s: float = 2.0,
                      gap_grace_s: float = 0.0) -> list[TreeSyncRequest]:
        """Requests to send for :meth:`needs_resync` members: at once for a broken member,
        after ``gap_grace_s`` for a gap (a reordered delta may still fill it), and again only
        after ``retry_s``."""
        out: list[TreeSyncRequest] = []
        for worker in self.needs_resync():
            m = self._members[worker]
            if not m.broken and m.gap_since is not None and now - m.gap_since < gap_grace_s:
                continue
            if m.asked is None or now - m.asked >= retry_s:
                m.asked = now
                out.append(TreeSyncRequest(self.group, worker, self.me))
        return out

    def loads(self) -> dict[str, tuple[Load, float]]:
        """Each member's latest load and when we last heard from it."""
        return {w: (m.load, m.last_heard) for w, m in sorted(self._members.items())}

    def state(self, worker: str) -> ReplicaMember | None:
        m = self._members.get(worker)
        if m is None:
            return None
        return ReplicaMember(worker, m.epoch, m.seq, m.held.digest, len(m.held), m.load,
                           m.last_heard, not self._stuck(m))

    def touch(self, worker: str, now: float) -> None:
        """Any authentic frame from a known member (a relayed token, a progress note) shows it
        alive, as a heartbeat does: a member busy streaming answers is never expired."""
        m = self._members.get(worker)
        if m is not None and worker != self.me:
            m.last_heard = max(m.last_heard, float(now))

    def expire(self, now: float, timeout_s: float) -> list[str]:
        """Forget members (never ``me``) not heard from for ``timeout_s``; returns them."""
        gone = [w for w in sorted(self._members)
                if w != self.me and now - self._members[w].last_heard > timeout_s]
        for worker in gone:
            self.tree.drop_worker(worker)
            del self._members[worker]
            log.info("group %s: %s expired", self.group, worker)
        return gone

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    def _stuck(m: _Member) -> bool:
        return m.broken or bool(m.ahead)

    def _receive(self, group: str, worker: str, epoch: int, seq: int, load: Load,
                 now: float) -> _Member | None:
        """The member a message is about, after the epoch check; None to ignore the message."""
        if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
            raise RoutingError(f"now must be a finite number, not {now!r}")
        if group != self.group:
            log.debug("ignoring %s's message for group %r", worker, group)
            return None
        m = self._members.get(worker)
        if m is None:
            m = self._members[worker] = _Member(epoch, seq, load, now)
        elif epoch != m.epoch:
            log.info("group %s: %s restarted (epoch %d -> %d)", self.group, worker, m.epoch, epoch)
            self.tree.drop_worker(worker)  # every epoch starts empty
            m.epoch, m.seq, m.held, m.broken = epoch, 0, Holdings(), False
            m.ahead, m.gap_since = {}, None
        m.last_heard = max(m.last_heard, float(now))
        if epoch != m.load_stamp[0] or seq >= m.load_stamp[1]:
            m.load, m.load_stamp = load, (epoch, seq)
        return m

    def _drain(self, worker: str, m: _Member, now: float) -> None:
        """After the member's state moved on: apply what the buffer now allows, in order."""
        for seq in sorted(m.ahead):
            if seq <= m.seq or self._try(worker, m, m.ahead[seq], now) is None:
                del m.ahead[seq]
            elif seq == m.seq + 1 and not m.broken:
                del m.ahead[seq]
                m.broken = True
        if not m.ahead:
            m.gap_since = None

    def _try(self, worker: str, m: _Member, delta: TreeDelta, now: float) -> str | None:
        """Apply ``delta`` if it provably takes the member's state to the publisher's at
        ``delta.seq`` (its holdings digest checks out), even across a gap; else say why not
        and change nothing."""
        held = m.held
        problem = _check_changes(held, delta.evicts, delta.inserts, delta.holdings)
        if problem is not None:
            return problem
        for digest in delta.evicts:
            chain = held.chain(digest)
            held.remove_subtree(digest)
            self.tree.remove(chain, worker)
        for run in delta.inserts:
            prefix = held.chain(run.anchor)
            for parent, digest in zip((run.anchor,) + run.digests, run.digests):
                held.add(digest, parent)
            self.tree.insert(prefix + run.digests, worker, now)
        m.seq, m.broken = delta.seq, False
        return None


def _check_changes(held: Holdings, evicts: Sequence[bytes], inserts: Sequence[Insert],
                   expect: bytes) -> str | None:
    """Why removing the subtrees below ``evicts`` and then adding ``inserts`` to ``held``
    would be ill-formed or not end at holdings digest ``expect``; None if it is fine.
    Changes nothing: the cost of a dry run is that of applying."""
    acc = held.accumulator
    removed: set[bytes] = set()
    added: set[bytes] = set()
    for top in evicts:
        if top not in held:
            return "evicts a block it was not known to hold"
        for digest in held.subtree(top):
            if digest in removed:
                return "evicts overlapping chains"
            removed.add(digest)
            acc ^= holdings_element(digest, held.parent(digest))
    for run in inserts:
        parent = run.anchor
        if parent != ROOT and parent not in added and (parent not in held or parent in removed):
            return "inserts below a block it was not known to hold"
        for digest in run.digests:
            if digest in added or (digest in held and digest not in removed):
                return "inserts a block it already held"
            added.add(digest)
            acc ^= holdings_element(digest, parent)
            parent = digest
    if acc.to_bytes(HOLDINGS_SIZE, "little") != expect:
        return "holdings digest mismatch"
    return None
