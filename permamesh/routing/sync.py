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

This module is the publisher's side; :mod:`~permamesh.routing.holdings` has the block sets
both sides keep and :mod:`~permamesh.routing.replica` the replica (re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import astuple, dataclass, replace

from permamesh.identity import NodeIdentity
from permamesh.routing.blocks import DIGEST_SIZE
from permamesh.routing.errors import RoutingError
from permamesh.routing.holdings import ROOT, Holdings, check_name
from permamesh.routing.messages import (
    MAX_DELTA_BLOCKS, MAX_DELTA_EVICTS, MAX_DELTA_RUNS, MAX_SEQ, MAX_SNAPSHOT_BLOCKS,
    MAX_SNAPSHOT_RUNS, Load, TreeDelta, TreeSnapshot, TreeSyncRequest,
)
from permamesh.routing.replica import GroupReplica  # re-exported: callers import it from here
from permamesh.wire import encode


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
        self.group, self.worker = check_name(group, "group"), check_name(worker, "worker")
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
        parent, added = ROOT, 0
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
        parent = key[-2] if len(key) > 1 else ROOT
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
                      and (pub.parent(d) == ROOT or pub.parent(d) in cur))[:MAX_DELTA_EVICTS]
        for digest in gone:
            pub.remove_subtree(digest)
        tops = [d for d in self._dirty if d in cur and d not in pub
                and (cur.parent(d) == ROOT or cur.parent(d) in pub)]
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
