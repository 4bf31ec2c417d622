"""Holdings: the prefix-closed set of blocks one group member holds, as delta sync tracks it.

Both sides of delta sync keep :class:`Holdings`: a
:class:`~permamesh.routing.sync.DeltaPublisher` its cache's current and last announced blocks,
a :class:`~permamesh.routing.replica.GroupReplica` each member's announced ones. A block is
held below its parent (:data:`ROOT` above a chain's first block), so the set is a forest of
chains whose *holdings digest* is the XOR of :func:`holdings_element` over held blocks (why,
in :mod:`permamesh.routing.sync`). :func:`check_name` is the group and worker id check both
sides share.
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b

from permamesh.routing.errors import RoutingError
from permamesh.routing.messages import HOLDINGS_SIZE, MAX_NAME, MAX_RUN, Insert

ROOT = b""  # the parent of a chain's first block
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
        assert digest not in self._parent and (parent == ROOT or parent in self._parent)
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
        while digest != ROOT:
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
        return set(self._children.get(ROOT, ()))


def check_name(value: object, what: str) -> str:
    """``value`` if it is a valid group or worker id (1 to MAX_NAME characters), else raise."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise RoutingError(f"{what} must be a string of 1-{MAX_NAME} characters, not {value!r}")
    return value
