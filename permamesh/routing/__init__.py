"""Routing: send each request to the worker that already holds most of what it needs.

An LLM request goes to the worker holding the longest cached prefix of its prompt; a container
job goes to the worker holding the most layers of its OCI image. Each worker group keeps
replicas of a *hash-radix tree* over chained block hashes, so replicas compare prefixes by
digest and never carry prompt text.

Modules today:

- :mod:`~permamesh.routing.blocks`: chained block hashing. :class:`BlockHasher` names full
  blocks of tokens; :func:`chain_digests` chains arbitrary byte strings (OCI layer digests).
- :mod:`~permamesh.routing.hrtree`: :class:`HashRadixTree`, the pure, deterministic record of
  which worker holds which prefix, with LRU eviction and a canonical snapshot and digest for
  comparing replicas.
- :mod:`~permamesh.routing.messages`: the signed wire messages of tree sync
  (:class:`TreeDelta`, :class:`TreeSyncRequest`, :class:`TreeSnapshot`, :class:`Load`).
- :mod:`~permamesh.routing.sync`: delta sync between tree replicas: each worker's
  :class:`DeltaPublisher` and its :class:`GroupReplica` of the group's tree.
- :mod:`~permamesh.routing.errors`: :class:`RoutingError`, the package's exception family.

Planned: the routing policy (longest match against load), S-IDA cloves, onion layers, path
selection, and relaying.
"""

from permamesh.routing.blocks import DIGEST_SIZE, BlockHasher, chain_digests
from permamesh.routing.errors import RoutingError
from permamesh.routing.hrtree import HashRadixTree
from permamesh.routing.messages import Insert, Load, TreeDelta, TreeSnapshot, TreeSyncRequest
from permamesh.routing.sync import DeltaPublisher, GroupReplica, MemberState, SyncStats

__all__ = [
    "DIGEST_SIZE",
    "BlockHasher",
    "DeltaPublisher",
    "GroupReplica",
    "HashRadixTree",
    "Insert",
    "Load",
    "MemberState",
    "RoutingError",
    "SyncStats",
    "TreeDelta",
    "TreeSnapshot",
    "TreeSyncRequest",
    "chain_digests",
]
