"""Delta sync: every worker of a group keeps an exact replica of the group's hash-radix tree.

Who calls what (one worker's view; all calls are pure, ``now`` comes from the caller):

- its prefix KV cache calls :meth:`DeltaPublisher.record_insert` / ``record_evict`` with full
  chains as blocks are cached and evicted;
- after each request (and on a heartbeat timer) the worker calls :meth:`DeltaPublisher.publish`
  (or ``make_delta``), broadcasts the frame to the group, and applies the same
  :class:`TreeDelta` to its own :class:`GroupReplica` (loopback): so its own entry in
  ``replica.tree`` changes exactly like everyone else's, one publish behind its cache;
- every :class:`TreeDelta` / :class:`TreeSnapshot` received goes to ``apply_delta`` /
  ``apply_snapshot``; now and then the worker sends each of ``sync_requests(now)`` to the
  worker named in it, which answers with :meth:`DeltaPublisher.answer`, and calls ``expire``;
- the routing policy reads ``replica.tree.match(...)`` and ``replica.loads()``.

A delta is the *net* change between the holdings announced at ``seq - 1`` and now: evicted
subtrees (named by their top digest) first, then new blocks as anchored runs, parents first.
Each carries the **holdings digest**: the XOR over held blocks of
``BLAKE2b-256(digest || parent)`` (``parent`` is ``b""`` at the root), so adding or removing
one block costs O(1), the value is independent of order, and it covers the tree's shape, not
just its set of blocks. It detects accidents (loss, reordering, bugs), not a lying publisher:
XOR set hashes are forgeable, and deltas are signed by their publisher anyway.

Replica rules per member. A publisher picks a new ``epoch`` each time it starts (a random
63-bit id or a restart counter; only inequality matters). Every epoch starts empty at seq 0, so
a message of another epoch drops the member's holdings at once and is taken from there. A late
message of an old epoch thus costs one needless resync: the live epoch's next message (or the
snapshot the replica asks for) switches it back, so the replica still converges.
A delta is applied when it provably takes the replica to the publisher's state: every anchor
and evicted block is known and the resulting holdings digest matches. That is normally delta
``seq + 1``, but a later one passes too when what was missed changed nothing (lost heartbeats
cost nothing). Other later deltas wait in a small buffer (a gap) for the missing ones; delta
``seq + 1`` failing the check breaks the member until a snapshot arrives. Load is taken from
every message of the current epoch, newest seq wins.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, replace
from hashlib import blake2b

from permamesh.identity import NodeIdentity
from permamesh.routing.blocks import DIGEST_SIZE
from permamesh.routing.errors import RoutingError
from permamesh.routing.hrtree import HashRadixTree
from permamesh.routing.messages import (
    HOLDINGS_SIZE, MAX_DELTA_BLOCKS, MAX_DELTA_EVICTS, MAX_DELTA_RUNS, MAX_NAME, MAX_RUN, MAX_SEQ,
    MAX_SNAPSHOT_BLOCKS, MAX_SNAPSHOT_RUNS, Insert, Load, TreeDelta, TreeSnapshot,
    TreeSyncRequest,
)
from permamesh.wire import encode

log = logging.getLogger(__name__)

_ROOT = b""
_PERSON = b"permamesh/holdng"


def holdings_element(digest: bytes, parent: bytes) -> int:
    """One block's contribution to a holdings digest (XOR-ed in and out)."""
    h = blake2b(digest + parent, digest_size=HOLDINGS_SIZE, person=_PERSON)
    return int.from_bytes(h.digest(), "little")


class Holdings:
    """A prefix-closed set of blocks: digest -> parent, the children of each, and the digest."""

    __slots__ = ("_parent", "_children", "_acc")

    def __init__(self) -> None:
        self._parent: dict[bytes, bytes] = {}
        self._children: dict[bytes, set[bytes]] = {}
        self._acc = 0

    def __contains__(self, digest: object) -> bool:
        return digest in self._parent

    def __len__(self) -> int:
        return len(self._parent)

    @property
    def digest(self) -> bytes:
        return self._acc.to_bytes(HOLDINGS_SIZE, "little")

    @property
    def accumulator(self) -> int:
        """The digest as an integer (XOR of :func:`holdings_element` over held blocks)."""
        return self._acc

    def parent(self, digest: bytes) -> bytes:
        return self._parent[digest]

    def add(self, digest: bytes, parent: bytes) -> None:
        """Hold ``digest`` below ``parent`` (held already, or the root ``b""``)."""
        assert digest not in self._parent and (parent == _ROOT or parent in self._parent)
        self._parent[digest] = parent
        self._children.setdefault(parent, set()).add(digest)
        self._acc ^= holdings_element(digest, parent)

    def remove_subtree(self, digest: bytes) -> list[bytes]:
        """Drop ``digest`` and everything below it; return what was dropped."""
        siblings = self._children[self._parent[digest]]
        siblings.discard(digest)
        if not siblings:
            del self._children[self._parent[digest]]
        removed = self.subtree(digest)
        for node in removed:
            self._children.pop(node, None)
            self._acc ^= holdings_element(node, self._parent.pop(node))
        return removed

    def subtree(self, digest: bytes) -> list[bytes]:
        """``digest`` and every held block below it."""
        out: list[bytes] = []
        stack = [digest]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(self._children.get(node, ()))
        return out

    def chain(self, digest: bytes) -> tuple[bytes, ...]:
        """The full chain from the root to ``digest`` (``()`` for the root)."""
        out: list[bytes] = []
        while digest != _ROOT:
            out.append(digest)
            digest = self._parent[digest]
        return tuple(reversed(out))

    def is_leaf(self, digest: bytes) -> bool:
        return digest not in self._children

    def runs(self, tops: Iterable[bytes], max_blocks: int, max_runs: int) -> list[Insert]:
        """The subtrees below ``tops`` as anchored runs, parents first, in sorted order; stops
        after ``max_blocks`` digests or ``max_runs`` runs (the rest is left out)."""
        out: list[Insert] = []
        stack, left = sorted(tops, reverse=True), max_blocks
        while stack and left > 0 and len(out) < max_runs:
            node = stack.pop()
            run = [node]
            kids = self._children.get(node)
            while kids is not None and len(kids) == 1 and len(run) < min(left, MAX_RUN):
                (node,) = kids
                run.append(node)
                kids = self._children.get(node)
            out.append(Insert(self._parent[run[0]], tuple(run)))
            left -= len(run)
            stack.extend(sorted(kids or (), reverse=True))
        return out

    def roots(self) -> set[bytes]:
        return set(self._children.get(_ROOT, ()))


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise RoutingError(f"{what} must be a string of 1-{MAX_NAME} characters, not {value!r}")
    return value


def _check_chain(chain: Sequence[bytes]) -> tuple[bytes, ...]:
    key = tuple(chain)
    for index, digest in enumerate(key):
        if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
            raise RoutingError(f"chain element {index} is not a {DIGEST_SIZE}-byte digest")
    return key


@dataclass(frozen=True)
class SyncStats:
    """Frame bytes one publisher sent, and what broadcasting full holdings would have cost."""

    deltas: int = 0
    delta_bytes: int = 0
    snapshots: int = 0
    snapshot_bytes: int = 0
    full_tree_bytes: int = 0  # one snapshot frame per publish; 0 unless tracked

    def __add__(self, other: SyncStats) -> SyncStats:
        return SyncStats(*(a + b for a, b in zip(astuple(self), astuple(other))))

    @property
    def sync_bytes(self) -> int:
        return self.delta_bytes + self.snapshot_bytes

    @property
    def savings(self) -> float:
        """``full_tree_bytes / sync_bytes``: how many times fewer bytes delta sync moved."""
        return self.full_tree_bytes / self.sync_bytes if self.sync_bytes else math.inf


class DeltaPublisher:
    """One worker's side: records its cache changes and turns them into deltas and snapshots.

    Keeps two holdings: ``current`` (what the cache holds now) and ``published`` (what the
    group was told at ``seq``); a delta is their difference and snapshots show ``published``.
    ``signer`` is needed only by :meth:`publish` and :meth:`publish_snapshot`.
    """

    def __init__(self, group: str, worker: str, epoch: int, *, signer: NodeIdentity | None = None,
                 track_full_tree: bool = False, max_delta_blocks: int = MAX_DELTA_BLOCKS) -> None:
        self.group, self.worker = _check_name(group, "group"), _check_name(worker, "worker")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < MAX_SEQ:
            raise RoutingError(f"epoch must be an integer in [0, 2**63), not {epoch!r}")
        if not 0 < max_delta_blocks <= MAX_DELTA_BLOCKS:
            raise RoutingError(f"max_delta_blocks must be in 1..{MAX_DELTA_BLOCKS}")
        self.epoch, self.seq = epoch, 0
        self.signer, self.track_full_tree = signer, track_full_tree
        self.max_delta_blocks = max_delta_blocks
        self.current, self.published = Holdings(), Holdings()
        self._dirty: set[bytes] = set()  # blocks whose membership may differ between the two
        self.stats = SyncStats()

    def record_insert(self, chain: Sequence[bytes]) -> int:
        """The cache now holds ``chain`` (from the root). Returns how many blocks are new."""
        parent, added = _ROOT, 0
        for digest in _check_chain(chain):
            for held in (self.current, self.published):
                if digest in held and held.parent(digest) != parent:
                    raise RoutingError(f"block {digest.hex()} is already held below another parent")
            if digest not in self.current:
                self.current.add(digest, parent)
                self._dirty.add(digest)
                added += 1
            parent = digest
        return added

    def record_evict(self, chain: Sequence[bytes]) -> int:
        """The cache evicted the last block of ``chain`` and everything below it (the meaning
        of :meth:`HashRadixTree.remove`; ``()`` evicts all). Returns the blocks dropped."""
        key = _check_chain(chain)
        parent = key[-2] if len(key) > 1 else _ROOT
        if not key:
            tops = sorted(self.current.roots())
        elif key[-1] in self.current and self.current.parent(key[-1]) == parent:
            tops = [key[-1]]
        else:
            return 0
        dropped = [d for top in tops for d in self.current.remove_subtree(top)]
        self._dirty.update(dropped)
        return len(dropped)

    def make_delta(self, load: Load) -> TreeDelta:
        """The next delta: changes since the last one (at most ``max_delta_blocks`` new blocks;
        the rest waits for the next delta), or a load-only heartbeat. Advances ``seq``."""
        cur, pub = self.current, self.published
        gone = sorted(d for d in self._dirty if d in pub and d not in cur
                      and (pub.parent(d) == _ROOT or pub.parent(d) in cur))[:MAX_DELTA_EVICTS]
        for digest in gone:
            pub.remove_subtree(digest)
        tops = [d for d in self._dirty if d in cur and d not in pub
                and (cur.parent(d) == _ROOT or cur.parent(d) in pub)]
        inserts = cur.runs(tops, self.max_delta_blocks, MAX_DELTA_RUNS)
        for run in inserts:
            for parent, digest in zip((run.anchor,) + run.digests, run.digests):
                pub.add(digest, parent)
        self._dirty = {d for d in self._dirty if (d in cur) != (d in pub)}
        self.seq += 1
        return TreeDelta(self.group, self.worker, self.epoch, self.seq, tuple(inserts),
                         tuple(gone), load, pub.digest)

    @property
    def pending(self) -> bool:
        """Whether the cache holds changes not yet in a delta."""
        return bool(self._dirty)

    def snapshot(self, load: Load) -> TreeSnapshot:
        """Everything announced up to ``seq``, as anchored runs."""
        chains = self.published.runs(self.published.roots(), MAX_SNAPSHOT_BLOCKS, MAX_SNAPSHOT_RUNS)
        if sum(len(run.digests) for run in chains) != len(self.published):
            raise RoutingError(f"{len(self.published)} blocks do not fit in one snapshot")
        return TreeSnapshot(self.group, self.worker, self.epoch, self.seq, tuple(chains), load,
                            self.published.digest)

    def answer(self, request: TreeSyncRequest, load: Load) -> TreeSnapshot | None:
        """The snapshot a sync request asks for, or None if it is not addressed to us."""
        if request.group != self.group or request.worker != self.worker:
            return None
        return self.snapshot(load)

    def publish(self, load: Load) -> tuple[TreeDelta, bytes]:
        """:meth:`make_delta`, signed and encoded; counts the frame (and, when tracking, the
        full-snapshot frame a full-tree broadcast would have sent instead)."""
        delta = self.make_delta(load)
        frame = encode(delta, self._signer())
        full = len(encode(self.snapshot(load), self.signer)) if self.track_full_tree else 0
        self.stats = replace(self.stats, deltas=self.stats.deltas + 1,
                             delta_bytes=self.stats.delta_bytes + len(frame),
                             full_tree_bytes=self.stats.full_tree_bytes + full)
        return delta, frame

    def publish_snapshot(self, load: Load) -> tuple[TreeSnapshot, bytes]:
        """:meth:`snapshot`, signed and encoded; counted as snapshot bytes."""
        snap = self.snapshot(load)
        frame = encode(snap, self._signer())
        self.stats = replace(self.stats, snapshots=self.stats.snapshots + 1,
                             snapshot_bytes=self.stats.snapshot_bytes + len(frame))
        return snap, frame

    def _signer(self) -> NodeIdentity:
        if self.signer is None:
            raise RoutingError("publishing frames needs a signer")
        return self.signer


@dataclass(frozen=True)
class MemberState:
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
        self.group, self.me = _check_name(group, "group"), _check_name(me, "me")
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

    def state(self, worker: str) -> MemberState | None:
        m = self._members.get(worker)
        if m is None:
            return None
        return MemberState(worker, m.epoch, m.seq, m.held.digest, len(m.held), m.load,
                           m.last_heard, not self._stuck(m))

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
        if parent != _ROOT and parent not in added and (parent not in held or parent in removed):
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
