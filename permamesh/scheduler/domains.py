"""Failure domains: which nodes one failure takes down together, and the mesh-wide figures
placement needs on thousands of nodes (locations and node scores) computed quickly.

A *failure domain* of a kind is the set of nodes one failure of that kind takes down:

- ``grid``: one power grid (a power outage);
- ``isp``: one ISP (an ISP outage; a DDoS on an address range is an ISP-sized failure);
- ``location``: one location as :func:`~permamesh.scheduler.profile.group_locations` defines it
  (physical intrusion, a fire; also every VM of one physical machine, which is in one place);
- ``software``: one software version (a bug in that version).

These four are :data:`DOMAINS`, the kinds placement spreads over by default. Two more kinds
can be asked for: ``continent`` (:func:`~permamesh.scheduler.profile.continent`: a network
partition or a jurisdiction cut off) and ``host`` (one physical machine; finer than
``location``, so it never binds when ``location`` is capped too).

An empty grid, ISP or version string is one domain, ``"?"``: nodes that do not say are assumed
to share it (the worst case), never assumed to be independent.

Capacity: every node counts 1 (one replica slot) in :func:`domain_shares`; there is no
per-node capacity yet (a node serves at most one model, see placement).

:func:`fast_locations` returns exactly what ``group_locations`` returns (same transitive
closure, same names) but visits only nearby pairs (cells on the sphere), so 2000 nodes take
milliseconds instead of seconds. :func:`mesh_scores` is the value of
:func:`~permamesh.scheduler.scoring.node_score` for every node at once (numpy over the
distance matrix, in blocks); it equals ``score_all`` up to float summation order (tests check
1e-9 relative), without the ``why``. Use ``scoring`` to explain one node.

Who calls it: :mod:`~permamesh.scheduler.placement`, :mod:`~permamesh.scheduler.chaossim`.
Pure, deterministic (nodes are visited in node-id order).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

from permamesh.scheduler.errors import SchedulerError
from permamesh.scheduler.profile import (EARTH_RADIUS_KM, DisjointSets, NodeProfile, continent, distance_km,
                                         location_key)
from permamesh.scheduler.scoring import node_score
from permamesh.scheduler.weights import Weights

log = logging.getLogger(__name__)

DOMAINS: tuple[str, ...] = ("grid", "isp", "location", "software")
EXTRA_KINDS: tuple[str, ...] = ("continent", "host")
UNKNOWN = "?"


def host_key(node: NodeProfile, locations: Mapping[str, str]) -> str:
    """The physical machine: location/datacenter/rack/host, or the node itself if no host."""
    if not node.host:
        return f"node:{node.node_id}"
    return f"{locations[node.node_id]}/{node.datacenter}/{node.rack}/{node.host}"


def domain_of(node: NodeProfile, kind: str, locations: Mapping[str, str]) -> str:
    """The node's domain of ``kind`` (one of :data:`DOMAINS` or :data:`EXTRA_KINDS`)."""
    if kind == "grid":
        return node.grid or UNKNOWN
    if kind == "isp":
        return node.isp or UNKNOWN
    if kind == "software":
        return node.software or UNKNOWN
    if kind == "location":
        try:
            return locations[node.node_id]
        except KeyError:
            raise SchedulerError(f"node {node.node_id} has no location") from None
    if kind == "continent":
        return continent(node.lat, node.lon)
    if kind == "host":
        return host_key(node, locations)
    raise SchedulerError(f"unknown failure-domain kind {kind!r}; known: "
                         f"{', '.join(DOMAINS + EXTRA_KINDS)}")


def _by_id(nodes: Mapping[str, NodeProfile] | Iterable[NodeProfile]) -> Mapping[str, NodeProfile]:
    return nodes if isinstance(nodes, Mapping) else {n.node_id: n for n in nodes}


def domain_shares(node_ids: Iterable[str],
                  nodes: Mapping[str, NodeProfile] | Iterable[NodeProfile], kind: str,
                  locations: Mapping[str, str]) -> dict[str, float]:
    """domain -> share of the given nodes' capacity (1 per node), keys sorted; {} if none."""
    by_id = _by_id(nodes)
    counts: dict[str, int] = defaultdict(int)
    ids = sorted(set(node_ids))
    for node_id in ids:
        counts[domain_of(by_id[node_id], kind, locations)] += 1
    return {d: counts[d] / len(ids) for d in sorted(counts)}


def _unit(node: NodeProfile) -> tuple[float, float, float]:
    lat, lon = math.radians(node.lat), math.radians(node.lon)
    return (EARTH_RADIUS_KM * math.cos(lat) * math.cos(lon),
            EARTH_RADIUS_KM * math.cos(lat) * math.sin(lon), EARTH_RADIUS_KM * math.sin(lat))


def fast_locations(nodes: Iterable[NodeProfile], km: float = 0.5) -> dict[str, str]:
    """node_id -> location name, equal to ``group_locations(nodes, km)``, in about O(n).

    Two nodes closer than ``km`` on the great circle are closer than ``km`` in a straight line,
    so they lie in the same or adjacent cubes of side ``km`` around the Earth's centre; only
    those pairs are tested, with the same predicate (``distance_km < km``); equal rounded keys
    are joined directly.
    """
    ordered = sorted(nodes, key=lambda n: n.node_id)
    sets = DisjointSets(len(ordered))
    keys = [location_key(n) for n in ordered]
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        sets.join(first.setdefault(key, i), i)
    if km > 0:
        side = km * 1.01
        cells: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for i, node in enumerate(ordered):
            cells[tuple(int(math.floor(c / side)) for c in _unit(node))].append(i)
        for (cx, cy, cz), members in cells.items():
            near = [j for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)
                    for j in cells.get((cx + dx, cy + dy, cz + dz), ())]
            for i in members:
                for j in near:
                    if j > i and distance_km(ordered[i], ordered[j]) < km:
                        sets.join(i, j)
    return sets.names(ordered)


def _codes(values: list[str]) -> np.ndarray:
    """Integer codes, 0 for the empty string."""
    table: dict[str, int] = {"": 0}
    return np.array([table.setdefault(v, len(table)) for v in values], dtype=np.int64)


def mesh_scores(nodes: Iterable[NodeProfile], weights: Weights,
                locations: Mapping[str, str] | None = None, block: int = 512) -> dict[str, float]:
    """node_id -> node_score value for every node against all the others (see module doc)."""
    mesh = sorted(nodes, key=lambda n: n.node_id)
    for a, b in zip(mesh, mesh[1:]):
        if a.node_id == b.node_id:
            raise SchedulerError(f"node id {a.node_id} listed twice in the mesh")
    if not mesh:
        return {}
    if locations is None:
        locations = fast_locations(mesh, weights.same_location_km)
    own = np.array([node_score(n, (), weights, {n.node_id: "-"}).value for n in mesh])
    lat = np.radians(np.array([n.lat for n in mesh]))
    lon = np.radians(np.array([n.lon for n in mesh]))
    link = np.array([n.link_mbps for n in mesh], dtype=float)
    loc = _codes([locations[n.node_id] for n in mesh])
    dc, rack = _codes([n.datacenter for n in mesh]), _codes([n.rack for n in mesh])
    host = _codes([n.host for n in mesh])
    w = weights
    peer = np.zeros(len(mesh))
    for start in range(0, len(mesh), block):
        s = slice(start, start + block)
        h = (np.sin((lat[None, :] - lat[s, None]) / 2) ** 2 + np.cos(lat[s, None])
             * np.cos(lat[None, :]) * np.sin((lon[None, :] - lon[s, None]) / 2) ** 2)
        km = 2 * EARTH_RADIUS_KM * np.arcsin(np.minimum(1.0, np.sqrt(h)))
        same_loc = loc[s, None] == loc[None, :]
        same_dc = (dc[s, None] == dc[None, :]) & (dc[s, None] != 0)
        same_rack = same_dc & (rack[s, None] == rack[None, :]) & (rack[s, None] != 0)
        same_host = (same_loc & (host[s, None] == host[None, :]) & (host[s, None] != 0)
                     & (dc[s, None] == dc[None, :]) & (rack[s, None] == rack[None, :]))
        terms = np.where(same_loc, -w.COLOCATION_PENALTY,
                         km * np.minimum(link[s, None], link[None, :]) * w.DISTANCE_LINK_W)
        terms -= (same_dc * w.SAME_DATACENTER_PENALTY + same_rack * w.SAME_RACK_PENALTY
                  + same_host * w.SAME_HOST_PENALTY)
        rows = np.arange(terms.shape[0])
        terms[rows, rows + start] = 0.0  # the node itself is no peer
        peer[s] = terms.sum(axis=1)
    return {n.node_id: float(own[i] + peer[i]) for i, n in enumerate(mesh)}
