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
- :mod:`~permamesh.routing.holdings`: :class:`Holdings`, the prefix-closed block set both
  sides of tree sync keep per member, and its order-free holdings digest.
- :mod:`~permamesh.routing.sync`: delta sync between tree replicas (the protocol), and each
  worker's :class:`DeltaPublisher` of its own cache's changes.
- :mod:`~permamesh.routing.replica`: :class:`GroupReplica`, a worker's replica of the group's
  tree kept in step by deltas and snapshots; :class:`ReplicaMember` is its view of one member.
- :mod:`~permamesh.routing.view`: :class:`GroupView`, what one router knows of the members'
  loads (their published :class:`MemberState` plus its own assignments since).
- :mod:`~permamesh.routing.policy`: the routing policies (:func:`make_policy`):
  :class:`~permamesh.routing.policy.PermameshPolicy`, the longest match weighed against load by
  estimated time to first token, and the baselines it is compared with.
- :mod:`~permamesh.routing.errors`: :class:`RoutingError`, the package's exception family.

How a request reaches its entry worker anonymously is the overlay's business
(:mod:`permamesh.overlay`); this package starts at the entry worker, which asks its replica and
a policy where the request should run (:mod:`permamesh.workers.group` does the asking).
"""

from permamesh.routing.blocks import DIGEST_SIZE, BlockHasher, chain_digests
from permamesh.routing.errors import RoutingError
from permamesh.routing.holdings import Holdings
from permamesh.routing.hrtree import HashRadixTree
from permamesh.routing.messages import Insert, Load, TreeDelta, TreeSnapshot, TreeSyncRequest
from permamesh.routing.policy import POLICY_NAMES, MemberState, Policy, RouteQuery, make_policy
from permamesh.routing.replica import GroupReplica, ReplicaMember
from permamesh.routing.sync import DeltaPublisher, SyncStats
from permamesh.routing.view import GroupView

__all__ = [
    "DIGEST_SIZE",
    "POLICY_NAMES",
    "BlockHasher",
    "DeltaPublisher",
    "GroupReplica",
    "GroupView",
    "HashRadixTree",
    "Holdings",
    "Insert",
    "Load",
    "MemberState",
    "Policy",
    "ReplicaMember",
    "RouteQuery",
    "RoutingError",
    "SyncStats",
    "TreeDelta",
    "TreeSnapshot",
    "TreeSyncRequest",
    "chain_digests",
    "make_policy",
]
