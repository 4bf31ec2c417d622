"""The permacomputer node score, term by term, with the reason for every point.

The formula is the game rules' (``docs/placement.md`` section 2)::

    node_score = silicon_age_years * AGE_W
               + cpu_mhz * SPEED_W
               + 1 / (idle_w + loaded_w) * EFF_W
               + sum over peers:  -COLOCATION_PENALTY                        if same location
                                  distance_km * link_mbps * DISTANCE_LINK_W  otherwise
               - SAME_DATACENTER_PENALTY per peer in the node's datacenter
               - SAME_RACK_PENALTY       per peer in its rack (in that datacenter)
               - SAME_HOST_PENALTY       per peer on its physical machine (VMs)

The link speed of a pair is the slower of the two nodes' ``link_mbps``. The penalties stack:
a VM's sibling on the same host is also at the same location and, in a datacenter, in the
same rack and datacenter, so it costs all four. Empty datacenter / rack / host strings never
match (two homes are not "the same datacenter"); a host matches only within the same
location, datacenter and rack, since one machine is in one place.

Guards: an unknown silicon year (0) or one after ``current_year`` counts as age 0; a claimed
0 W (idle + loaded) earns no efficiency points rather than a division by zero.

Determinism: peers are visited in node-id order and the node itself is skipped, so the same
mesh in any order gives the same float, bit for bit, and the same ``why``.

Who calls it: :mod:`~permamesh.scheduler.payments` (to rank nodes at a location), placement
(later), dashboards via :func:`explain`. Pure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from permamesh.scheduler.errors import SchedulerError
from permamesh.scheduler.profile import NodeProfile, distance_km, group_locations
from permamesh.scheduler.weights import Weights

log = logging.getLogger(__name__)

Value = float | int | str


@dataclass(frozen=True)
class Term:
    name: str  # e.g. "silicon_age", "peer 0a1b: same rack"
    inputs: tuple[tuple[str, Value], ...]  # the figures it was computed from
    contribution: float  # points added (negative for a penalty)


@dataclass(frozen=True)
class Scored:
    node_id: str
    value: float  # the sum of the terms' contributions, in order
    why: tuple[Term, ...]


def silicon_age(node: NodeProfile, weights: Weights) -> int:
    """Whole years since the silicon was made; 0 when unknown or in the future."""
    if node.silicon_year <= 0:
        return 0
    return max(0, weights.current_year - node.silicon_year)


def _own_terms(node: NodeProfile, w: Weights) -> list[Term]:
    age = silicon_age(node, w)
    watts = node.idle_w + node.loaded_w
    return [
        Term("silicon_age", (("silicon_year", node.silicon_year),
                             ("current_year", w.current_year), ("age_years", age),
                             ("AGE_W", w.AGE_W)), age * w.AGE_W),
        Term("cpu_speed", (("cpu_mhz", node.cpu_mhz), ("SPEED_W", w.SPEED_W)),
             node.cpu_mhz * w.SPEED_W),
        Term("efficiency", (("idle_w", node.idle_w), ("loaded_w", node.loaded_w),
                            ("EFF_W", w.EFF_W)), w.EFF_W / watts if watts > 0 else 0.0),
    ]


def shares(a: NodeProfile, b: NodeProfile, same_loc: bool) -> tuple[bool, bool, bool]:
    """(same datacenter, same rack, same host) for a pair, by the rules in the docstring."""
    dc = bool(a.datacenter) and a.datacenter == b.datacenter
    rack = dc and bool(a.rack) and a.rack == b.rack
    host = (same_loc and bool(a.host) and a.host == b.host
            and a.datacenter == b.datacenter and a.rack == b.rack)
    return dc, rack, host


def _peer_terms(node: NodeProfile, peer: NodeProfile, same_loc: bool, w: Weights) -> list[Term]:
    tag = f"peer {peer.node_id}"
    if same_loc:
        terms = [Term(f"{tag}: same location", (("COLOCATION_PENALTY", w.COLOCATION_PENALTY),),
                      -w.COLOCATION_PENALTY)]
    else:
        km = distance_km(node, peer)
        mbps = min(node.link_mbps, peer.link_mbps)
        terms = [Term(f"{tag}: distance", (("distance_km", km), ("link_mbps", mbps),
                                           ("DISTANCE_LINK_W", w.DISTANCE_LINK_W)),
                      km * mbps * w.DISTANCE_LINK_W)]
    dc, rack, host = shares(node, peer, same_loc)
    for hit, what, name, penalty in (
            (dc, "datacenter", "SAME_DATACENTER_PENALTY", w.SAME_DATACENTER_PENALTY),
            (rack, "rack", "SAME_RACK_PENALTY", w.SAME_RACK_PENALTY),
            (host, "host", "SAME_HOST_PENALTY", w.SAME_HOST_PENALTY)):
        if hit:
            value = getattr(peer, what)
            terms.append(Term(f"{tag}: same {what}", ((what, value), (name, penalty)), -penalty))
    return terms


def node_score(node: NodeProfile, peers: Iterable[NodeProfile], weights: Weights,
               locations: Mapping[str, str] | None = None) -> Scored:
    """The node's score against ``peers`` (the node itself, if listed, is skipped).

    ``locations`` (node_id -> location name, from
    :func:`~permamesh.scheduler.profile.group_locations` over the whole mesh) may be passed
    when scoring many nodes; by default it is computed from ``node`` and ``peers``.
    """
    others = sorted((p for p in peers if p.node_id != node.node_id), key=lambda p: p.node_id)
    for a, b in zip(others, others[1:]):
        if a.node_id == b.node_id:
            raise SchedulerError(f"node id {a.node_id} listed twice among peers")
    if locations is None:
        locations = group_locations([node, *others], weights.same_location_km)
    terms = _own_terms(node, weights)
    for peer in others:
        same_loc = locations[node.node_id] == locations[peer.node_id]
        terms.extend(_peer_terms(node, peer, same_loc, weights))
    value = 0.0
    for term in terms:
        value += term.contribution
    return Scored(node.node_id, value, tuple(terms))


def score_all(nodes: Iterable[NodeProfile], weights: Weights) -> dict[str, Scored]:
    """Every node scored against all the others (node_id -> :class:`Scored`), O(n^2)."""
    mesh = sorted(nodes, key=lambda n: n.node_id)
    locations = group_locations(mesh, weights.same_location_km)
    if len(locations) != len(mesh):
        raise SchedulerError("a node id is listed twice in the mesh")
    return {n.node_id: node_score(n, mesh, weights, locations) for n in mesh}


def _fmt(value: Value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def explain(scored: Scored) -> str:
    """One line per term, then the total, e.g. ``cpu_speed: +24 (cpu_mhz=2400, SPEED_W=0.01)``."""
    lines = [f"node {scored.node_id}: node_score = {scored.value:.6g}"]
    for term in scored.why:
        inputs = ", ".join(f"{k}={_fmt(v)}" for k, v in term.inputs)
        lines.append(f"  {term.name}: {term.contribution:+.6g} ({inputs})")
    return "\n".join(lines)
