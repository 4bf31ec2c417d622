"""Replica placement across failure domains: which nodes serve which model.

:func:`place` takes the mesh (node profiles), the demands (model, replica count) and the
committee's reputations, and assigns each model its replicas so that no single failure takes
down more than ``max_domain_share`` of a model's capacity. The rules:

- A node serves at most one model. A model's candidates are the nodes whose ``models`` list
  it; when no eligible node lists it, any eligible node may serve it (said in ``why``).
- A node whose reputation is below ``min_reputation`` is never placed. Without a reputation
  mapping every node counts 1.0; with one, a node missing from it counts 0.0 (trusted
  partners only: no reputation, no work).
- Candidates are taken greedily by ``reputation x normalized node score``, highest first,
  ties by node id. The normalized score is ``(s - min) / (max - min)`` over the eligible
  nodes (1.0 when all are equal); scores are :func:`~permamesh.scheduler.domains.mesh_scores`
  against the whole given mesh unless the caller passes them.
- The cap rule: for every kind in ``config.domains`` (grid, ISP, location, software by
  default) a model may have at most ``cap = max(1, floor(max_domain_share * replicas))``
  nodes in one domain, where ``replicas`` is the model's TARGET count (computed exactly, as
  fractions). A node is added only if no domain of any kind would exceed the cap. With the
  default 0.34 this needs at least 3 replicas (3 -> 1 per domain, 6 -> 2, 12 -> 4); fewer
  replicas are placed but marked infeasible, since one replica is already over 34%.
- When a model cannot reach its count under the cap, we place what fits, mark it infeasible
  and say why (how many candidates each kind blocked). We never exceed the cap silently.
- Models are filled round-robin (one node per model per round, models by name) so the first
  model does not take every good node.
- With ``previous``: its assignments whose nodes are still present, eligible, candidates and
  within the cap are kept first (a re-placement after a failure moves as few nodes as
  possible), then the gaps are filled as above.

Greedy, not exhaustive: a mesh where a cleverer search would fit every replica can still be
reported infeasible; the report says so rather than break the cap.

:func:`replace_failed` re-places after a failure; :func:`place_many` solves many placements,
as Ray tasks when Ray is importable. Who calls it: the scheduler's callers and
:mod:`~permamesh.scheduler.chaossim`. Pure and deterministic (any input order, same answer).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from permamesh.scheduler.domains import (DOMAINS, EXTRA_KINDS, domain_of, domain_shares,
                                         fast_locations, mesh_scores)
from permamesh.scheduler.errors import SchedulerError
from permamesh.scheduler.profile import NodeProfile
from permamesh.scheduler.weights import Weights, load_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Demand:
    model: str
    replicas: int  # how many nodes should serve it

    def __post_init__(self) -> None:
        if not self.model:
            raise SchedulerError("a demand needs a model name")
        if type(self.replicas) is not int or self.replicas < 1:
            raise SchedulerError(f"demand {self.model}: replicas={self.replicas!r} must be >= 1")


@dataclass(frozen=True)
class PlacementConfig:
    max_domain_share: float = 0.34
    domains: tuple[str, ...] = DOMAINS + ("continent",)  # continents too: see docs/placement.md 5.1
    min_reputation: float = 0.3

    def __post_init__(self) -> None:
        if not (0 < self.max_domain_share <= 1):
            raise SchedulerError(f"max_domain_share={self.max_domain_share!r} not in (0, 1]")
        unknown = [k for k in self.domains if k not in DOMAINS + EXTRA_KINDS]
        if unknown or not self.domains:
            raise SchedulerError(f"placement domains {self.domains!r}: unknown or none; "
                                 f"known: {', '.join(DOMAINS + EXTRA_KINDS)}")


@dataclass(frozen=True)
class Placement:
    assignments: dict[str, tuple[str, ...]]  # model -> node ids, sorted
    shares: dict[str, dict[str, dict[str, float]]]  # model -> kind -> domain -> share
    feasible: dict[str, bool]  # full replica count and every kind's max share <= the cap
    why: tuple[str, ...]
    replicas: dict[str, int] = field(default_factory=dict)  # model -> target count


def domain_cap(replicas: int, max_domain_share: float) -> int:
    """Most nodes of one model in one domain: max(1, floor(share x replicas)), exactly."""
    return max(1, math.floor(Fraction(repr(max_domain_share)) * replicas))


def moved_nodes(old: Placement, new: Placement) -> set[str]:
    """Nodes that serve a model in ``new`` and did not serve that model in ``old``."""
    return {n for m, ids in new.assignments.items() for n in ids
            if n not in old.assignments.get(m, ())}


def _priorities(eligible: list[NodeProfile], rep: Mapping[str, float],
                scores: Mapping[str, float]) -> dict[str, float]:
    values = [scores[n.node_id] for n in eligible]
    lo, hi = (min(values), max(values)) if values else (0.0, 0.0)
    span = hi - lo
    return {n.node_id: rep[n.node_id] * ((scores[n.node_id] - lo) / span if span > 0 else 1.0)
            for n in eligible}


def place(nodes: Sequence[NodeProfile], demands: Sequence[Demand],
          reputation: Mapping[str, float] | None = None,
          config: PlacementConfig = PlacementConfig(), weights: Weights | None = None,
          previous: Placement | None = None, *, scores: Mapping[str, float] | None = None,
          locations: Mapping[str, str] | None = None) -> Placement:
    """Assign each demand's replicas to nodes under the cap rule (module docstring).

    ``scores`` (node_id -> node score) and ``locations`` (node_id -> location name) may be
    passed when the caller already has them for this mesh (or a larger one containing it).
    """
    mesh = sorted(nodes, key=lambda n: n.node_id)
    for a, b in zip(mesh, mesh[1:]):
        if a.node_id == b.node_id:
            raise SchedulerError(f"node id {a.node_id} listed twice in the mesh")
    models = sorted(d.model for d in demands)
    for a, b in zip(models, models[1:]):
        if a == b:
            raise SchedulerError(f"model {a} demanded twice")
    target = {d.model: d.replicas for d in demands}
    why: list[str] = []
    rep = {n.node_id: 1.0 if reputation is None else float(reputation.get(n.node_id, 0.0))
           for n in mesh}
    eligible = [n for n in mesh if rep[n.node_id] >= config.min_reputation]
    if len(eligible) < len(mesh):
        low = [n.node_id for n in mesh if rep[n.node_id] < config.min_reputation]
        why.append(f"excluded {len(low)} node(s) with reputation < {config.min_reputation}: "
                   f"{', '.join(low[:5])}{' ...' if len(low) > 5 else ''}")
    if weights is None and (scores is None or locations is None):
        weights = load_weights()
    if locations is None:
        locations = fast_locations(mesh, weights.same_location_km)
    if scores is None:
        scores = mesh_scores(mesh, weights, locations)
    missing = [n.node_id for n in eligible if n.node_id not in scores]
    if missing:
        raise SchedulerError(f"no score for {len(missing)} node(s): {', '.join(missing[:5])}")
    prio = _priorities(eligible, rep, scores)
    order = sorted(eligible, key=lambda n: (-prio[n.node_id], n.node_id))
    rank = {n.node_id: i for i, n in enumerate(order)}
    doms = {n.node_id: tuple(domain_of(n, k, locations) for k in config.domains) for n in order}
    cands: dict[str, list[str]] = {}
    for m in models:
        cands[m] = [n.node_id for n in order if m in n.models]
        if not cands[m]:
            cands[m] = [n.node_id for n in order]
            why.append(f"model {m}: no eligible node lists it; any node may serve it")
    cap = {m: domain_cap(target[m], config.max_domain_share) for m in models}
    chosen: dict[str, list[str]] = {m: [] for m in models}
    counts: dict[str, dict[tuple[int, str], int]] = {m: defaultdict(int) for m in models}
    used: set[str] = set()

    def fits(m: str, node_id: str) -> bool:
        return all(counts[m][(k, d)] < cap[m] for k, d in enumerate(doms[node_id]))

    def take(m: str, node_id: str) -> None:
        chosen[m].append(node_id)
        used.add(node_id)
        for k, d in enumerate(doms[node_id]):
            counts[m][(k, d)] += 1

    if previous is not None:
        for m in models:
            before = sorted(previous.assignments.get(m, ()), key=lambda i: (rank.get(i, -1), i))
            cand_set = set(cands[m])
            kept = 0
            for i in before:
                if i in cand_set and i not in used and kept < target[m] and fits(m, i):
                    take(m, i)
                    kept += 1
            if kept < len(before):
                why.append(f"model {m}: kept {kept} of {len(before)} previous replica(s); "
                           f"the others are gone, excluded, taken or over the cap")
    pointer = {m: 0 for m in models}
    open_models = [m for m in models if len(chosen[m]) < target[m]]
    while open_models:
        still_open = []
        for m in open_models:
            c = cands[m]
            while pointer[m] < len(c) and (c[pointer[m]] in used or not fits(m, c[pointer[m]])):
                pointer[m] += 1  # used or over the cap now means so for good: counts only grow
            if pointer[m] < len(c):
                take(m, c[pointer[m]])
                if len(chosen[m]) < target[m]:
                    still_open.append(m)
        open_models = still_open
    by_id = {n.node_id: n for n in mesh}
    assignments, shares, feasible = {}, {}, {}
    for m in models:
        ids = tuple(sorted(chosen[m]))
        assignments[m] = ids
        shares[m] = {k: domain_shares(ids, by_id, k, locations) for k in config.domains}
        worst = max((max(s.values(), default=0.0) for s in shares[m].values()), default=0.0)
        feasible[m] = len(ids) == target[m] and worst <= config.max_domain_share
        if not feasible[m]:
            why.append(_explain(m, target[m], cap[m], ids, cands[m], used, doms, config, counts))
    for line in why:
        log.info("placement: %s", line)
    return Placement(assignments, shares, feasible, tuple(why), dict(sorted(target.items())))


def _explain(m: str, replicas: int, cap: int, ids: tuple[str, ...], cands: list[str],
             used: set[str], doms: Mapping[str, tuple[str, ...]], config: PlacementConfig,
             counts: Mapping[str, Mapping[tuple[int, str], int]]) -> str:
    share = config.max_domain_share
    head = f"model {m}: infeasible, placed {len(ids)} of {replicas} replica(s)"
    if math.floor(Fraction(repr(share)) * replicas) == 0:
        return (f"{head}: with {replicas} replica(s) one replica is {1 / replicas:.0%} of "
                f"capacity, over the {share:.0%} cap; ask for at least {math.ceil(1 / share)}")
    blocked: dict[str, int] = defaultdict(int)
    free = 0
    for node_id in cands:
        if node_id in used:
            continue
        free += 1
        for k, d in enumerate(doms[node_id]):
            if counts[m][(k, d)] >= cap:
                blocked[config.domains[k]] += 1
    detail = ", ".join(f"{k} {blocked[k]}" for k in config.domains if blocked[k]) or "none"
    return (f"{head}: {len(cands)} candidate(s), {len(cands) - free} already serving a model, "
            f"{free} free but over the cap of {cap} per domain ({share:.0%} x {replicas}); "
            f"free candidates blocked by kind: {detail}")


def replace_failed(previous: Placement, nodes: Sequence[NodeProfile], failed: set[str] | frozenset,
                   demands: Sequence[Demand] | None = None, **kwargs) -> Placement:
    """Re-place after ``failed`` nodes went down: :func:`place` on the survivors with
    ``previous``, so surviving replicas stay where they are. Demands default to the previous
    targets. ``kwargs`` go to :func:`place` (reputation, config, weights, scores, locations)."""
    if demands is None:
        demands = [Demand(m, previous.replicas.get(m, max(1, len(ids))))
                   for m, ids in sorted(previous.assignments.items())]
    survivors = [n for n in nodes if n.node_id not in failed]
    return place(survivors, demands, previous=previous, **kwargs)


RAY_MIN_PROBLEMS = 16  # fewer placements than this run in-process unless use_ray=True


def place_many(problems: Sequence[tuple[Sequence[NodeProfile], Sequence[Demand]]],
               ray_address: str | None = None, use_ray: bool | None = None,
               **kwargs) -> list[Placement]:
    """:func:`place` for each (nodes, demands), in order; ``kwargs`` go to every call.

    As Ray tasks when ``use_ray`` is True, or when it is None and either ``ray_address`` is
    given or there are at least :data:`RAY_MIN_PROBLEMS` problems (Ray's start-up, ~5 s here,
    is not worth it for a few): ``ray.init(address=...)`` for a partner's cluster, else a local
    2-CPU Ray without dashboard. Sequentially otherwise. ``use_ray=True`` without Ray is a
    :class:`SchedulerError`.
    """
    ray = None
    if use_ray is None:
        use_ray = None if (ray_address or len(problems) >= RAY_MIN_PROBLEMS) else False
    if use_ray is not False:
        try:
            import ray  # noqa: F811  (a dependency; imported only when used)
        except ImportError:
            if use_ray:
                raise SchedulerError("use_ray=True but Ray is not installed "
                                     "(pip install ray, or pass use_ray=False)") from None
            ray = None
    if ray is None:
        return [place(nodes, demands, **kwargs) for nodes, demands in problems]
    started = False
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, ignore_reinit_error=True)
        else:
            ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
        started = True
    try:
        task = ray.remote(place)
        return list(ray.get([task.remote(list(n), list(d), **kwargs) for n, d in problems]))
    finally:
        if started:
            ray.shutdown()
