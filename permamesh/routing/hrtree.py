"""The hash-radix tree: which worker holds which prefix of which block chain.

Keys are chains of block digests (see :mod:`permamesh.routing.blocks`). The tree is a radix
tree: every node carries a compressed *edge* (a run of digests), its children keyed by the first
digest of their edges, and ``holders``, a map from worker id to the last time that worker used
the node's blocks. All blocks of one edge share one holder map.

Invariant (*prefix closure*): a worker that holds a chain holds every prefix of it, so a child's
holders are always a subset of its parent's. :meth:`HashRadixTree.insert` marks the whole path;
:meth:`~HashRadixTree.remove`, :meth:`~HashRadixTree.drop_worker` and
:meth:`~HashRadixTree.evict_lru` take a worker off a node together with everything below it.
Nodes nobody holds are pruned at once.

The module is pure and deterministic: no I/O, no clock (callers pass ``now``), and no result
depends on dict insertion order. Timestamps only ever move forward (``max(old, now)``), so the
same operations applied in any order leave the same timestamps.

Edges are split where a chain diverges or ends mid-edge and are never re-merged, so the node
layout depends on history. Nothing observable does: ``len()`` counts blocks, not nodes, and
:meth:`~HashRadixTree.snapshot` reports *canonical segments* (maximal runs of blocks with a
single successor and an unchanged holder set), so replicas with equal content agree on
``snapshot()`` and ``digest()`` whatever their layout.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from hashlib import blake2b

from permamesh.routing.errors import RoutingError

Chain = tuple[bytes, ...]


class _Node:
    __slots__ = ("edge", "children", "holders", "parent")

    def __init__(self, edge: Chain, parent: _Node | None) -> None:
        self.edge = edge
        self.children: dict[bytes, _Node] = {}
        self.holders: dict[str, float] = {}
        self.parent = parent


def _key(chain: Sequence[bytes]) -> Chain:
    key = tuple(chain)
    for index, digest in enumerate(key):
        if not isinstance(digest, bytes):
            raise RoutingError(f"chain element {index} is {type(digest).__name__}, not bytes")
    return key


def _check_worker(worker: object) -> str:
    if not isinstance(worker, str) or not worker:
        raise RoutingError(f"worker ids are non-empty strings, not {worker!r}")
    return worker


def _check_now(now: object) -> float:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise RoutingError(f"now must be a finite number, not {now!r}")
    return float(now)


def _first_digest(node: _Node) -> bytes:
    return node.edge[0]


def _full_chain(node: _Node) -> Chain:
    edges: list[Chain] = []
    while node.parent is not None:
        edges.append(node.edge)
        node = node.parent
    return tuple(digest for edge in reversed(edges) for digest in edge)


class HashRadixTree:
    """Which workers hold which prefixes of which chains, with per-worker last-use times."""

    def __init__(self) -> None:
        self._root = _Node((), None)
        self._blocks = 0  # distinct blocks in the tree
        self._held: dict[str, int] = {}  # worker -> blocks it holds

    # -- the walk ---------------------------------------------------------------------------

    def _walk(self, key: Chain, *, split: bool) -> tuple[list[_Node], int, int]:
        """Follow ``key`` from the root, one dict look-up per node.

        Returns the nodes entered (root excluded), how many blocks of ``key`` matched, and how
        many blocks of the last node's edge matched. With ``split``, a last node matched only
        part-way is split so that the path ends exactly where the match does.
        """
        node, pos, path, taken = self._root, 0, [], 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            edge = child.edge
            limit = min(len(edge), len(key) - pos)
            taken = 1
            while taken < limit and edge[taken] == key[pos + taken]:
                taken += 1
            path.append(child)
            pos += taken
            if taken < len(edge):
                if split:
                    path[-1] = self._split(child, taken)
                break
            node = child
        return path, pos, taken

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut ``node``'s edge after ``at`` blocks; return the new upper node (``node`` is the
        lower one and keeps its children)."""
        parent = node.parent
        assert parent is not None and 0 < at < len(node.edge)
        upper = _Node(node.edge[:at], parent)
        upper.holders = dict(node.holders)
        upper.children[node.edge[at]] = node
        parent.children[node.edge[0]] = upper
        node.edge = node.edge[at:]
        node.parent = upper
        return upper

    def _detach(self, node: _Node) -> None:
        parent = node.parent
        assert parent is not None
        del parent.children[node.edge[0]]
        node.parent = None
        self._blocks -= len(node.edge)

    def _strip(self, tops: list[_Node], worker: str) -> int:
        """Take ``worker`` off every node in ``tops`` and off all their descendants; prune."""
        order: list[_Node] = []
        stack = [node for node in tops if worker in node.holders]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(c for c in node.children.values() if worker in c.holders)
        dropped = 0
        for node in reversed(order):  # children before parents
            del node.holders[worker]
            dropped += len(node.edge)
            if not node.holders:
                self._detach(node)
        self._forget(worker, dropped)
        return dropped

    def _forget(self, worker: str, dropped: int) -> None:
        left = self._held.get(worker, 0) - dropped
        if left:
            self._held[worker] = left
        else:
            self._held.pop(worker, None)

    # -- mutations ----------------------------------------------------------------------------

    def insert(self, chain: Sequence[bytes], worker: str, now: float) -> int:
        """Record that ``worker`` holds ``chain`` (and so every prefix of it), used at ``now``.

        Returns how many blocks ``worker`` did not hold before. An empty chain is a no-op.
        """
        key, worker, now = _key(chain), _check_worker(worker), _check_now(now)
        path, pos, _ = self._walk(key, split=True)
        if pos < len(key):
            parent = path[-1] if path else self._root
            leaf = _Node(key[pos:], parent)
            parent.children[key[pos]] = leaf
            self._blocks += len(leaf.edge)
            path.append(leaf)
        added = 0
        for node in path:
            old = node.holders.get(worker)
            if old is None:
                added += len(node.edge)
                node.holders[worker] = now
            elif now > old:
                node.holders[worker] = now
        if added:
            self._held[worker] = self._held.get(worker, 0) + added
        return added

    def touch(self, chain: Sequence[bytes], worker: str, now: float) -> int:
        """Refresh ``worker``'s last-use time to ``now`` on the leading blocks of ``chain`` it
        holds (never backwards). Returns how many blocks that covered; holds nothing new."""
        key, worker, now = _key(chain), _check_worker(worker), _check_now(now)
        path, pos, taken = self._walk(key, split=False)
        refreshed = 0
        for index, node in enumerate(path):
            if worker not in node.holders:
                break
            if index == len(path) - 1 and taken < len(node.edge):
                node = self._split(node, taken)
            refreshed += len(node.edge)
            node.holders[worker] = max(node.holders[worker], now)
        return refreshed

    def remove(self, chain: Sequence[bytes], worker: str) -> int:
        """``worker`` evicted the last block of ``chain``.

        Exact semantics: afterwards ``worker`` holds no chain that has ``chain`` as a prefix
        (the last block of ``chain`` and everything below it are gone), while its holds on the
        shorter prefixes ``chain[:-1]``, ``chain[:-2]``, ... are untouched. So it holds at most
        ``len(chain) - 1`` blocks of ``chain``. If ``worker`` did not hold all of ``chain`` this
        is a no-op. ``remove((), worker)`` is :meth:`drop_worker`. Returns the blocks dropped.
        """
        key, worker = _key(chain), _check_worker(worker)
        if not key:
            return self.drop_worker(worker)
        path, pos, taken = self._walk(key, split=False)
        if pos < len(key) or worker not in path[-1].holders:
            return 0
        node = path[-1]
        if taken > 1:  # the last block of chain sits at edge[taken - 1]; cut just above it
            self._split(node, taken - 1)
        return self._strip([node], worker)

    def drop_worker(self, worker: str) -> int:
        """Forget ``worker`` everywhere (it left the group). Returns the blocks dropped."""
        worker = _check_worker(worker)
        return self._strip(list(self._root.children.values()), worker)

    def evict_lru(self, worker: str, max_blocks: int) -> list[Chain]:
        """Evict ``worker``'s least-recently-used blocks until it holds at most ``max_blocks``.

        Only *leaf* blocks (blocks of ``worker`` with no block of ``worker`` below them) are
        ever evicted, one block at a time, oldest first; ties go to the lexicographically
        smaller chain. Returns the evicted chains, each the full chain from the root to the
        first block evicted from one run: calling ``remove(c, worker)`` for each returned ``c``
        in order reproduces this eviction on a replica.
        """
        worker = _check_worker(worker)
        if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 0:
            raise RoutingError(f"max_blocks must be an integer >= 0, not {max_blocks!r}")
        excess = self._held.get(worker, 0) - max_blocks
        if excess <= 0:
            return []
        heap = self._leaves_of(worker)
        heapq.heapify(heap)
        evicted: list[Chain] = []
        while excess > 0:
            stamp, rank, node, full = heapq.heappop(heap)
            if full is None:
                full = _full_chain(node)
            count = min(excess, len(node.edge))
            if count < len(node.edge):
                self._split(node, len(node.edge) - count)
            parent = node.parent
            assert parent is not None
            del node.holders[worker]
            if not node.holders:
                self._detach(node)
            self._forget(worker, count)
            excess -= count
            gone = full[: len(full) - count + 1]
            if evicted and evicted[-1][: len(gone)] == gone:
                evicted[-1] = gone  # removing the shorter chain covers the earlier one
            else:
                evicted.append(gone)
            if (
                parent is not self._root
                and excess > 0
                and not any(worker in c.holders for c in parent.children.values())
            ):
                # The parent takes its last child's rank: it sorts against every other leaf
                # exactly as that child did (their paths part above it).
                heapq.heappush(
                    heap, (parent.holders[worker], rank, parent, full[: len(full) - count])
                )
        return evicted

    def _leaves_of(self, worker: str) -> list[tuple[float, int, _Node, Chain | None]]:
        """``worker``'s leaf nodes (no node of ``worker`` below them) as ``(last use, rank,
        node, None)``, ranked in the lexicographic order of their full chains.

        Visits only ``worker``'s nodes, depth first, children in order of their first digest:
        two leaves part where their paths go down children with different first digests, so
        leaves come in chain order without building the chains. Needs ``worker`` in the tree.
        """
        leaves: list[tuple[float, int, _Node, Chain | None]] = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            top = len(stack)
            for child in node.children.values():
                if worker in child.holders:
                    stack.append(child)
            if len(stack) == top:
                leaves.append((node.holders[worker], len(leaves), node, None))
            elif len(stack) > top + 1:  # the stack must pop the smallest first digest first
                stack[top:] = sorted(stack[top:], key=_first_digest, reverse=True)
        return leaves

    # -- queries ----------------------------------------------------------------------------

    def match(self, chain: Sequence[bytes]) -> dict[str, int]:
        """For each worker holding at least the first block of ``chain``, how many leading
        blocks of ``chain`` it holds. Keys are in sorted order. Read-only."""
        key = _key(chain)
        path, pos, _ = self._walk(key, split=False)
        found: dict[str, int] = {}
        depth = 0
        for node in path:  # holders shrink going down, so deeper nodes overwrite
            depth = min(depth + len(node.edge), pos)
            found.update(dict.fromkeys(node.holders, depth))
        return dict(sorted(found.items()))

    def blocks_held(self, worker: str) -> int:
        """How many blocks ``worker`` holds (0 for an unknown worker)."""
        return self._held.get(_check_worker(worker), 0)

    def workers(self) -> list[str]:
        """Every worker holding at least one block, sorted."""
        return sorted(self._held)

    def __len__(self) -> int:
        """The number of distinct blocks (chain positions) in the tree, not of nodes."""
        return self._blocks

    def snapshot(self) -> list[tuple[Chain, tuple[str, ...]]]:
        """The content as canonical segments, sorted by chain.

        One ``(full chain, sorted holders)`` entry per block that ends a segment: a block whose
        number of successors is not one, or whose single successor has a different holder set.
        Every block in a segment has the holders of its last block. Timestamps are left out, and
        the listing depends only on content, never on node layout or operation order.
        """
        out: list[tuple[Chain, tuple[str, ...]]] = []
        stack: list[tuple[_Node, Chain]] = [(self._root, ())]
        while stack:
            node, prefix = stack.pop()
            full = prefix + node.edge
            kids = node.children
            if node.parent is not None:
                only = next(iter(kids.values())) if len(kids) == 1 else None
                if only is None or only.holders.keys() != node.holders.keys():
                    out.append((full, tuple(sorted(node.holders))))
            stack.extend((child, full) for child in kids.values())
        out.sort()
        return out

    def digest(self) -> bytes:
        """A 32-byte BLAKE2b digest of :meth:`snapshot`: equal content, equal digest."""
        h = blake2b(digest_size=32, person=b"permamesh/hrtree")
        entries = self.snapshot()
        h.update(len(entries).to_bytes(8, "little"))
        for chain, holders in entries:
            h.update(len(chain).to_bytes(8, "little"))
            for block in chain:
                h.update(len(block).to_bytes(8, "little") + block)
            h.update(len(holders).to_bytes(8, "little"))
            for worker in holders:
                name = worker.encode("utf-8")
                h.update(len(name).to_bytes(8, "little") + name)
        return h.digest()
