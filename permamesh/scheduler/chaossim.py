"""A simulated chaos drill: thousands of synthetic nodes, the seed's failure modes, and the
rules' win conditions checked against a placement.

:func:`synthetic_mesh` builds a seeded mesh that looks like a community one: locations
scattered around a few metropolitan regions on six continents, a few large locations (small
datacenters, some racks) and many homes, power grids that are regional, ISPs that serve two or
three regions and several ISPs per location (neighbours on separate providers), some VMs that
share a physical machine, three software versions rolled out unevenly, each node offering one
to three of a handful of models.

:func:`scenarios` lists the failures to drill (the seed's "failure modes to simulate"): a power
outage per grid, an ISP outage per ISP (a DDoS on an address range is one too), a bug per
software version, the largest locations lost (physical intrusion, fire), the largest
physical hosts lost (hardware failure; with no VMs, one machine is one node), DDoS on single
nodes, and a network partition per continent (that continent cut off, seen from the rest).
Economic, regulatory and social attacks are not simulated here: they act on partners and
trust, not on machines (the jurisdiction cut-off is close to a continent partition).

:func:`simulate` plays one failure against a placement. The model: each model receives
``rate_per_s`` requests per second, each on a uniformly random replica and lasting
``service_s``. At t=0 the failed nodes stop. Requests in flight on them, or sent to them before
the failure is detected (``detect_s``), are retried by the client on a surviving replica of
the same model (the client retry rule); a request fails only when its model has no surviving
replica, and then every request until the re-placement is ready (``replace_s`` later) fails
too. The scheduler then calls :func:`~permamesh.scheduler.placement.replace_failed`;
recovery takes ``detect_s + replace_s`` when capacity was lost and the re-placement restores
every model's replica count, 0 when nothing was lost, and ``inf`` when it cannot be restored.
Times are simulated, never measured: the drill reads no clock.

:func:`run_chaos_sim` places the default demands on a synthetic mesh, plays every scenario and
sums up the win conditions: no single failure over ``max_domain_share`` of a model's capacity,
no request lost, recovery under 5 s, at least M distinct grids per model.

Who calls it: tests, ``docs/placement.md`` figures, future outage drills. Pure, deterministic.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from permamesh.scheduler.domains import DOMAINS, fast_locations, host_key, mesh_scores
from permamesh.scheduler.placement import (Demand, Placement, PlacementConfig, moved_nodes,
                                           place, replace_failed)
from permamesh.scheduler.profile import NodeProfile, continent
from permamesh.scheduler.weights import Weights, load_weights

log = logging.getLogger(__name__)

# (region, centre lat, centre lon, relative weight): six continents, Europe and North America
# heavier, as a community mesh would start.
REGIONS = (("frankfurt", 50.1, 8.7, 3), ("london", 52.5, -1.5, 2), ("new-york", 40.7, -74.0, 3),
           ("chicago", 41.9, -87.6, 2), ("sao-paulo", -23.5, -46.6, 1), ("nairobi", -1.3, 36.8, 1),
           ("mumbai", 19.1, 72.9, 1), ("tokyo", 35.7, 139.7, 2), ("sydney", -33.9, 151.2, 1))
MODELS = ("llama-3.1-8b", "mistral-7b", "qwen2.5-7b", "smollm2-1.7b")
# Four live versions by default: with a cap of 0.34 a model spreads over at least three of
# them, and after a bug in one the other k - 1 must hold every replica again under the cap:
# (k - 1) * floor(0.34 * r) >= r needs k >= 4. With three versions a version bug costs a
# third of the capacity and cannot be re-placed (the drill reports recovery_s = inf).
VERSIONS = ("v1", "v2", "v3", "v4")
# What the drill recommends: the four default kinds plus continents, so that a partition (a
# continent cut off) is capped too. The score's distance term ranks the remotest region's
# nodes highest, so without this cap a model's replicas gather on the remotest continent.
DRILL_CONFIG = PlacementConfig()  # the default: the four kinds and continents


@dataclass(frozen=True)
class Scenario:
    kind: str  # grid, isp, software, location, host, ddos, partition
    domain: str
    failed: frozenset[str]


@dataclass(frozen=True)
class ScenarioResult:
    kind: str
    domain: str
    failed_nodes: int
    capacity_loss_share: float  # max over models of lost replicas / placed replicas
    requests_retried: int  # hit the failure, served by a surviving replica
    requests_failed: int  # lost: the model had no surviving replica
    recovery_s: float  # detect + re-place if capacity was lost; 0 if none; inf if not restored
    restored_share: float  # min over models of replicas after re-placement / replicas before
    grids_covered_after: int  # distinct grids of the surviving replicas, min over models
    models_down: tuple[str, ...]  # models with no surviving replica
    moved: int  # nodes newly assigned by the re-placement


def synthetic_mesh(n_nodes: int, seed: int, n_grids: int = 27, n_isps: int = 18,
                   n_locations: int | None = None, versions: Sequence[str] = VERSIONS,
                   models: Sequence[str] = MODELS) -> list[NodeProfile]:
    """A seeded mesh of ``n_nodes`` (module docstring). ``n_grids=1`` clusters it on one grid.

    Versions are rolled out unevenly (the i-th of k on i / (1 + ... + k) of the nodes).
    """
    rng = random.Random(seed)
    n_locations = n_locations or max(1, n_nodes // 4)
    grids: dict[int, list[str]] = defaultdict(list)
    for g in range(max(1, n_grids)):
        grids[g % len(REGIONS)].append(f"grid-{REGIONS[g % len(REGIONS)][0]}-{g // len(REGIONS)}")
    isps: dict[int, list[str]] = defaultdict(list)
    for i in range(max(1, n_isps)):
        for r in rng.sample(range(len(REGIONS)), k=min(len(REGIONS), rng.choice((2, 2, 3)))):
            isps[r].append(f"isp-{i}")
    locations = []
    for k in range(n_locations):
        r = rng.choices(range(len(REGIONS)), weights=[reg[3] for reg in REGIONS])[0]
        _, lat, lon, _ = REGIONS[r]
        grid_pool = grids.get(r) or grids[r % len(grids)]
        isp_pool = isps.get(r) or [f"isp-{r % max(1, n_isps)}"]
        locations.append(dict(
            lat=max(-89.0, min(89.0, lat + rng.uniform(-4, 4))),
            lon=max(-179.0, min(179.0, lon + rng.uniform(-6, 6))), grid=rng.choice(grid_pool),
            isps=rng.sample(isp_pool, k=min(len(isp_pool), rng.choice((1, 1, 2, 3)))),
            datacenter=f"dc-{k}" if rng.random() < 0.1 else "", partner=f"p{k:04d}"))
    size = [1 / (k + 1) ** 0.8 for k in range(n_locations)]  # a few big sites, many homes
    last_host: dict[int, tuple[str, str]] = {}
    out = []
    for i in range(n_nodes):
        k = rng.choices(range(n_locations), weights=size)[0]
        loc = locations[k]
        rack = f"r{rng.randrange(4)}" if loc["datacenter"] else ""
        host = f"h{i}"
        if k in last_host and rng.random() < 0.15:  # a VM on the previous machine here
            rack, host = last_host[k]
        last_host[k] = (rack, host)
        out.append(NodeProfile(
            node_id=f"n{i:05d}", partner=loc["partner"],
            lat=loc["lat"] + rng.uniform(-3e-4, 3e-4), lon=loc["lon"] + rng.uniform(-3e-4, 3e-4),
            grid=loc["grid"], isp=rng.choice(loc["isps"]), asn=64512 + k % 1000,
            datacenter=loc["datacenter"], rack=rack, host=host,
            silicon_year=rng.randint(2010, 2025), cpu_mhz=rng.randrange(1800, 4000, 100),
            idle_w=rng.randint(10, 80), loaded_w=rng.randint(60, 300),
            ram_mb=rng.choice((16384, 32768, 65536, 131072)), backup_power=rng.random() < 0.3,
            chaos_opt_in=rng.random() < 0.5,
            software=rng.choices(list(versions), weights=range(1, len(versions) + 1))[0],
            models=tuple(sorted(rng.sample(list(models), k=rng.randint(1, min(3, len(models)))))),
            link_mbps=rng.choice((100.0, 300.0, 1000.0)), uptime=rng.uniform(0.95, 1.0)))
    return out


def scenarios(nodes: Sequence[NodeProfile], locations: Mapping[str, str] | None = None,
              top: int = 5) -> list[Scenario]:
    """Every failure to drill, in a fixed order (module docstring)."""
    mesh = sorted(nodes, key=lambda n: n.node_id)
    locations = locations if locations is not None else fast_locations(mesh)
    groups: dict[tuple[str, str], set[str]] = defaultdict(set)
    for n in mesh:
        groups[("grid", n.grid or "?")].add(n.node_id)
        groups[("isp", n.isp or "?")].add(n.node_id)
        groups[("software", n.software or "?")].add(n.node_id)
        groups[("location", locations[n.node_id])].add(n.node_id)
        groups[("host", host_key(n, locations))].add(n.node_id)
        groups[("partition", continent(n.lat, n.lon))].add(n.node_id)
    out = []
    for kind in ("grid", "isp", "software", "location", "host", "partition"):
        keys = sorted((k for k in groups if k[0] == kind), key=lambda k: (-len(groups[k]), k))
        if kind in ("location", "host"):
            keys = keys[:top]
        out.extend(Scenario(kind, d, frozenset(groups[(kind, d)])) for _, d in keys)
    for i in sorted({0, len(mesh) // 3, 2 * len(mesh) // 3}) if mesh else ():
        out.append(Scenario("ddos", mesh[i].node_id, frozenset({mesh[i].node_id})))
    return out


def simulate(nodes: Sequence[NodeProfile], placement: Placement, scenario: Scenario,
             detect_s: float = 2.0, replace_s: float = 1.0, rate_per_s: float = 50.0,
             seed: int = 0, *, service_s: float = 0.5, config: PlacementConfig = PlacementConfig(),
             reputation: Mapping[str, float] | None = None, weights: Weights | None = None,
             scores: Mapping[str, float] | None = None,
             locations: Mapping[str, str] | None = None) -> ScenarioResult:
    """Play ``scenario`` against ``placement`` (module docstring for the model)."""
    by_id = {n.node_id: n for n in nodes}
    failed = scenario.failed
    loss, retried, lost, grids_after, down = 0.0, 0, 0, [], []
    for m, ids in sorted(placement.assignments.items()):
        alive = [i for i in ids if i not in failed]
        loss = max(loss, (len(ids) - len(alive)) / len(ids) if ids else 1.0)
        grids_after.append(len({by_id[i].grid for i in alive}))
        if not alive:
            down.append(m)
        rng = random.Random(f"{seed}:{scenario.kind}:{scenario.domain}:{m}")
        sent = round(rate_per_s * (service_s + detect_s))  # in flight, or sent before detection
        hits = sum(1 for _ in range(sent) if rng.choice(ids) in failed) if ids else sent
        if alive:
            retried += hits
        else:
            lost += hits + round(rate_per_s * replace_s)  # and nothing serves until re-placed
    after = replace_failed(placement, nodes, set(failed), config=config, reputation=reputation,
                           weights=weights, scores=scores, locations=locations)
    restored_share = min((len(after.assignments.get(m, ())) / len(ids) if ids else 0.0
                          for m, ids in placement.assignments.items()), default=1.0)
    restored = restored_share >= 1 and all(
        after.feasible.get(m, False) or not placement.feasible.get(m, False)
        for m in placement.assignments)
    recovery = 0.0 if loss == 0 else (detect_s + replace_s if restored else math.inf)
    return ScenarioResult(scenario.kind, scenario.domain, len(failed), loss, retried, lost,
                          recovery, min(restored_share, 1.0), min(grids_after, default=0),
                          tuple(down), len(moved_nodes(placement, after)))


def run_chaos_sim(n_nodes: int = 2000, seed: int = 0, demands: Sequence[Demand] | None = None,
                  config: PlacementConfig = PlacementConfig(), *, min_grids: int = 3,
                  max_recovery_s: float = 5.0, nodes: Sequence[NodeProfile] | None = None,
                  replicas: int = 12, **sim) -> dict:
    """Place, drill every scenario, and report the win conditions (module docstring).

    ``nodes`` replaces the synthetic mesh; ``demands`` default to ``replicas`` of every model
    the mesh offers; ``sim`` goes to :func:`simulate` (detect_s, replace_s, rate_per_s, ...).
    """
    mesh = list(nodes) if nodes is not None else synthetic_mesh(n_nodes, seed)
    weights = load_weights()
    locations = fast_locations(mesh, weights.same_location_km)
    scores = mesh_scores(mesh, weights, locations)
    if demands is None:
        demands = [Demand(m, replicas) for m in sorted({m for n in mesh for m in n.models})]
    ctx = dict(config=config, weights=weights, scores=scores, locations=locations)
    placement = place(mesh, demands, **ctx)
    rows = [simulate(mesh, placement, sc, seed=seed, **ctx, **sim)
            for sc in scenarios(mesh, locations)]
    by_kind: dict[str, float] = {}
    for r in rows:
        by_kind[r.kind] = max(by_kind.get(r.kind, 0.0), r.capacity_loss_share)
    by_id = {n.node_id: n for n in mesh}
    grids = min((len({by_id[i].grid for i in ids}) for ids in placement.assignments.values()),
                default=0)
    worst = max((r.capacity_loss_share for r in rows), default=0.0)
    jobs_lost = sum(r.requests_failed for r in rows)
    recovery = max((r.recovery_s for r in rows), default=0.0)
    wins = {"no_domain_over_share": worst <= config.max_domain_share,
            "no_job_lost": jobs_lost == 0, f"recovery_under_{max_recovery_s:g}s":
            recovery < max_recovery_s, f"grids_at_least_{min_grids}": grids >= min_grids}
    summary = {
        "nodes": len(mesh), "scenarios": len(rows), "max_capacity_loss_share": worst,
        "worst_scenario": next((f"{r.kind} {r.domain}" for r in rows
                                if r.capacity_loss_share == worst), ""),
        "worst_by_kind": by_kind, "jobs_lost": jobs_lost,
        "requests_retried": sum(r.requests_retried for r in rows),
        "max_recovery_s": recovery,
        "unrecovered": [f"{r.kind} {r.domain}" for r in rows if r.recovery_s == math.inf],
        "distinct_grids": grids, "placement_feasible": all(placement.feasible.values()),
        "win_conditions": wins, "win": all(wins.values())}
    log.info("chaos sim: %s", summary)
    per_model = {m: {"replicas": len(ids), "target": placement.replicas[m],
                     "feasible": placement.feasible[m]}
                 for m, ids in placement.assignments.items()}
    return {"summary": summary, "placement": per_model, "why": list(placement.why),
            "scenarios": [asdict(r) for r in rows]}
