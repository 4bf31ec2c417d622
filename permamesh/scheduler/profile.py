"""Node profiles as the scheduler sees them, and what "the same location" means.

A :class:`NodeProfile` is plain data: what a partner claims about one node (from the
committee's ``/registry``, see :func:`from_registry_row`) plus three figures the committee
measures over a period (``link_mbps``, ``uptime``, ``executions``). Nothing here checks a claim;
:mod:`~permamesh.scheduler.physics` tests claimed coordinates against round-trip times, and the
committee's ``/registry`` carries that verdict per node (its ``physics`` field). A row whose
claimed location the members' round trips refute (:func:`refuted`) is left out by
:func:`from_registry`, as an excluded one is: its location and continent, hence its failure
domains and its distance to every peer, are known to be false, so neither placement nor
payment may count on them (``docs/placement.md`` 4.6).

Location rule (``docs/placement.md`` section 1): two nodes are at the same location when their
coordinates round to the same 3 decimals of a degree (:func:`location_key`, about 100 m), or
when they are less than ``same_location_km`` (0.5 km) apart on the great circle. The relation
is not transitive (A-B and B-C each 0.4 km apart, A-C 0.8 km), so :func:`group_locations` takes
its transitive closure: a chain of near neighbours is one location, named by the smallest
:func:`location_key` among its members. Scoring and payment both use that grouping.

:func:`continent` maps coordinates to a continent by a coarse bounding-box table (first match
wins); it exists for the payment's "different continents" modifier only.

Who calls it: :mod:`~permamesh.scheduler.scoring`, :mod:`~permamesh.scheduler.payments`,
readers of ``/registry``. Pure: no clock, no network.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from permamesh.scheduler.errors import SchedulerError

log = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0088  # mean Earth radius (IUGG)
SAME_LOCATION_KM = 0.5  # default distance under which two nodes share a location


@dataclass(frozen=True)
class NodeProfile:
    node_id: str  # hex node key
    partner: str  # hex key of the partner who registered it
    lat: float  # degrees, -90..90
    lon: float  # degrees, -180..180
    grid: str  # power grid / utility region
    isp: str
    asn: int
    datacenter: str = ""  # "" = not in a datacenter (a home, an office)
    rack: str = ""  # meaningful within its datacenter only
    host: str = ""  # the physical machine; VMs on one machine share it
    silicon_year: int = 0  # year the silicon was made; 0 = unknown
    cpu_mhz: int = 0
    idle_w: int = 0  # watts at idle
    loaded_w: int = 0  # watts under load
    ram_mb: int = 0
    gpu: str = ""
    backup_power: bool = False  # verified backup power (UPS, battery, laptop)
    chaos_opt_in: bool = False
    software: str = ""  # software version string
    models: tuple[str, ...] = ()
    link_mbps: float = 100.0  # measured link speed, Mbit/s
    uptime: float = 1.0  # fraction of the period the node answered health checks, 0..1
    executions: int = 0  # jobs served in the period

    def __post_init__(self) -> None:
        if not self.node_id:
            raise SchedulerError("node_id must not be empty")
        for name, low, high in (("lat", -90.0, 90.0), ("lon", -180.0, 180.0),
                                ("uptime", 0.0, 1.0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)
                    and low <= value <= high):
                raise SchedulerError(
                    f"node {self.node_id}: {name}={value!r} outside [{low}, {high}]")
        if not (math.isfinite(self.link_mbps) and self.link_mbps >= 0):
            raise SchedulerError(f"node {self.node_id}: link_mbps must be finite and >= 0")
        for name in ("cpu_mhz", "idle_w", "loaded_w", "ram_mb", "executions", "silicon_year"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise SchedulerError(f"node {self.node_id}: {name}={value!r} must be an int >= 0")


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance in km between two (lat, lon) points in degrees."""
    lat1, lon1, lat2, lon2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = (math.sin((lat2 - lat1) / 2) ** 2
         + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2)
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def distance_km(a: NodeProfile, b: NodeProfile) -> float:
    return haversine_km((a.lat, a.lon), (b.lat, b.lon))


def location_key(profile: NodeProfile) -> str:
    """The node's coordinates rounded to 3 decimals (about 100 m), e.g. ``"50.110,8.682"``."""
    return f"{round(profile.lat * 1000) / 1000:.3f},{round(profile.lon * 1000) / 1000:.3f}"


def same_location(a: NodeProfile, b: NodeProfile, km: float = SAME_LOCATION_KM) -> bool:
    """The pairwise rule: same rounded coordinates, or closer than ``km``."""
    return location_key(a) == location_key(b) or distance_km(a, b) < km


def group_locations(nodes: Iterable[NodeProfile],
                    km: float = SAME_LOCATION_KM) -> dict[str, str]:
    """node_id -> location name: the transitive closure of :func:`same_location`.

    A location is named by the smallest :func:`location_key` among its nodes, so the result
    does not depend on the order of ``nodes``. O(n^2) distance checks.
    """
    ordered = sorted(nodes, key=lambda n: n.node_id)
    sets = DisjointSets(len(ordered))
    for i, a in enumerate(ordered):
        for j in range(i + 1, len(ordered)):
            if same_location(a, ordered[j], km):
                sets.join(i, j)
    return sets.names(ordered)


class DisjointSets:
    """Union-find over node indexes; a set is named by the smallest location key in it.
    Used by :func:`group_locations` and :func:`permamesh.scheduler.domains.fast_locations`."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def root(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        ri, rj = self.root(i), self.root(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def names(self, ordered: list[NodeProfile]) -> dict[str, str]:
        """node_id -> the smallest :func:`location_key` of its set."""
        names: dict[int, str] = {}
        for i, node in enumerate(ordered):
            key, r = location_key(node), self.root(i)
            names[r] = min(names.get(r, key), key)
        return {node.node_id: names[self.root(i)] for i, node in enumerate(ordered)}


# (name, lat_min, lat_max, lon_min, lon_max); first match wins, so order matters.
CONTINENT_BOXES: tuple[tuple[str, float, float, float, float], ...] = (
    ("Antarctica", -90.0, -60.0, -180.0, 180.0),
    ("Europe", 36.0, 72.0, -25.0, 45.0),  # includes Iceland, Anatolia
    ("Africa", -35.0, 12.0, -18.0, 52.0),
    ("Africa", 12.0, 36.0, -18.0, 33.0),  # Sahara and the Maghreb, up to Suez
    ("Oceania", -50.0, -1.0, 130.0, 180.0),  # Australia, New Guinea, New Zealand
    ("Oceania", -50.0, 0.0, -180.0, -120.0),  # Polynesia
    ("Asia", -11.0, 82.0, 25.0, 180.0),  # Middle East, Russia east of the Urals box, SE Asia
    ("Asia", 50.0, 72.0, -180.0, -169.0),  # Chukotka
    ("South America", -56.0, 12.5, -77.0, -34.0),
    ("South America", -56.0, 7.0, -82.0, -77.0),
    ("North America", 7.0, 84.0, -170.0, -10.0),  # with Central America, Caribbean, Greenland
)


def continent(lat: float, lon: float) -> str:
    """The continent of a point by :data:`CONTINENT_BOXES`, or ``"unknown"`` (open ocean)."""
    for name, lat_lo, lat_hi, lon_lo, lon_hi in CONTINENT_BOXES:
        if lat_lo <= lat <= lat_hi and lon_lo <= lon <= lon_hi:
            return name
    return "unknown"


def _field(profile: Mapping, name: str, kind: type, node: str) -> object:
    value = profile.get(name, kind())
    if kind is str and not isinstance(value, str):
        raise SchedulerError(f"registry row {node}: profile.{name} must be a string")
    if kind is bool and not isinstance(value, bool):
        raise SchedulerError(f"registry row {node}: profile.{name} must be a boolean")
    if kind is int and type(value) is not int:
        raise SchedulerError(f"registry row {node}: profile.{name} must be an integer")
    return value


def from_registry_row(row: Mapping, *, link_mbps: float = 100.0, uptime: float = 1.0,
                      executions: int = 0) -> NodeProfile:
    """A profile from one row of the committee's ``/registry`` JSON (lat/lon in 1e-6 degrees).

    ``link_mbps``, ``uptime`` and ``executions`` are not in the registry: the caller passes
    what it measured. :class:`SchedulerError` for a malformed row.
    """
    if not isinstance(row, Mapping) or not isinstance(row.get("profile"), Mapping):
        raise SchedulerError("registry row must be an object with a 'profile' object")
    node = row.get("node")
    if not isinstance(node, str) or not node:
        raise SchedulerError("registry row without a 'node' id")
    p = row["profile"]
    ints = {k: _field(p, k, int, node) for k in ("lat_e6", "lon_e6", "asn", "silicon_year",
                                                 "cpu_mhz", "idle_w", "loaded_w", "ram_mb")}
    strs = {k: _field(p, k, str, node) for k in ("grid", "isp", "datacenter", "rack", "host",
                                                 "gpu", "software")}
    models = p.get("models", [])
    if not isinstance(models, (list, tuple)) or not all(isinstance(m, str) for m in models):
        raise SchedulerError(f"registry row {node}: profile.models must be a list of strings")
    partner = row.get("partner")
    if not isinstance(partner, str):
        raise SchedulerError(f"registry row {node}: 'partner' must be a hex string")
    return NodeProfile(
        node_id=node, partner=partner, lat=ints.pop("lat_e6") / 1e6, lon=ints.pop("lon_e6") / 1e6,
        backup_power=_field(p, "backup_power", bool, node),
        chaos_opt_in=_field(p, "chaos_opt_in", bool, node),
        models=tuple(models), link_mbps=link_mbps, uptime=uptime, executions=executions,
        **ints, **strs)


def refuted(row: Mapping) -> str | None:
    """Why a ``/registry`` row's claimed location is impossible (its ``physics`` verdict says a
    member's round trip refutes it), or None: possible, insufficient or not measured."""
    physics = row.get("physics") if isinstance(row, Mapping) else None
    if isinstance(physics, Mapping) and physics.get("possible") is False:
        return str(physics.get("why") or "impossible")
    return None


def from_registry(rows: Iterable[Mapping]) -> tuple[NodeProfile, ...]:
    """Profiles of every row neither excluded by the committee nor :func:`refuted`, by node id."""
    out = []
    for row in rows:
        if isinstance(row, Mapping) and row.get("excluded"):
            log.info("registry: skipping excluded node %s", row.get("node"))
            continue
        if refuted(row):
            log.info("registry: skipping node %s: its claimed location is impossible", row.get("node"))
            continue
        out.append(from_registry_row(row))
    return tuple(sorted(out, key=lambda n: n.node_id))
