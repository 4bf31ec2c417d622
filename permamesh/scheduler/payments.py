"""Monthly compensation: who is paid, how much, and why, in whole cents.

:func:`monthly_payments` takes the period's mesh (every node's profile with its measured
uptime, link speed and executions) and returns one :class:`Payment` per partner. The rules
(``docs/placement.md`` section 3):

1. At each location (:func:`~permamesh.scheduler.profile.group_locations`) at most
   ``max_paid_per_location`` (2) nodes are paid: the highest node scores
   (:func:`~permamesh.scheduler.scoring.node_score` against the whole mesh), ties broken by
   node id. The third and later nodes serve work but earn 0: a donation.
2. A partner with at least one paid node earns, over its paid nodes only::

       base_rate * paid_node_count
     + uptime_bonus * mean uptime in percent (0..100)
     + distance_bonus * mean distance in km from its paid nodes to every other node
     + min(efficiency_cap, efficiency_bonus / watts_per_execution)
     + age_bonus * mean silicon age in years

   The rules write ``efficiency_bonus * watts_per_execution``, but they also say lower watts
   score higher, so fewer watts per execution must pay more: we divide. watts_per_execution
   is the partner's paid nodes' summed ``loaded_w`` over their summed ``executions`` (at
   least 1), i.e. mean loaded watts over mean executions; a claimed 0 W earns no efficiency
   bonus, and the term is capped so that farming executions cannot dominate a payment.
3. Modifiers multiply the subtotal (each a factor (100 + pct) / 100): +continent_pct (20%)
   when the paid nodes lie on two or more continents
   (:func:`~permamesh.scheduler.profile.continent`; "unknown", open ocean, does not count);
   +isp_pct (10%) per unique ISP beyond the first among all nodes at each location where the
   partner has a paid node, summed over those locations and capped at isp_cap_pct (50%), so a
   neighbour on another ISP lifts both partners; +backup_pct (15%) when every paid node has
   verified backup power; +chaos_pct (5%) when every paid node opted in to chaos drills.

Arithmetic: each term is an exact fraction (weights as the fractions of their decimal text,
uptime in ppm, distances in whole metres), rounded half-to-even to whole cents; the subtotal
is the sum of those cents and the total is the subtotal times the exact multiplier, rounded
once more. Nothing depends on input order or the clock. A partner's total is shared equally
among its paid nodes, the leftover cents going one each to the lowest node ids.

Who calls it: the committee's payout step and ``permamesh`` reports. Pure.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

from permamesh.scheduler.errors import SchedulerError
from permamesh.scheduler.profile import NodeProfile, continent, distance_km, group_locations
from permamesh.scheduler.scoring import node_score, silicon_age
from permamesh.scheduler.weights import Weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodePay:
    node_id: str
    partner: str
    location: str  # location name (see profile.group_locations)
    rank: int  # 1 = highest node score at its location
    score: float
    paid: bool
    amount: int  # cents: this node's share of its partner's total (0 for a donation)
    why: tuple[str, ...]


@dataclass(frozen=True)
class Payment:
    partner: str
    total: int  # cents for the month
    subtotal: int  # cents before modifiers
    multiplier: Fraction  # product of the modifier factors
    nodes: tuple[NodePay, ...]  # every node of the partner, paid or not, by node id
    why: tuple[str, ...]


def _ordinal(n: int) -> str:
    words = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth"}
    if n in words:
        return words[n]
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _cents(value: Fraction) -> int:
    return round(value)  # Fraction rounds half to even, exactly


def _rank(mesh: list[NodeProfile],
          w: Weights) -> tuple[dict[str, str], dict[str, tuple[int, float]]]:
    """node_id -> location, and node_id -> (rank at its location, score)."""
    locations = group_locations(mesh, w.same_location_km)
    if len(locations) != len(mesh):
        raise SchedulerError("a node id is listed twice in the mesh")
    scores = {n.node_id: node_score(n, mesh, w, locations).value for n in mesh}
    members: dict[str, list[str]] = defaultdict(list)
    for node_id in sorted(locations):
        members[locations[node_id]].append(node_id)
    ranks = {}
    for ids in members.values():
        for rank, node_id in enumerate(sorted(ids, key=lambda i: (-scores[i], i)), start=1):
            ranks[node_id] = (rank, scores[node_id])
    return locations, ranks


def _terms(paid: list[NodeProfile], mesh: list[NodeProfile], w: Weights) -> list[tuple[int, str]]:
    n = len(paid)
    base = w.base_rate * n
    uptime_pct = Fraction(sum(round(p.uptime * 1_000_000) for p in paid), 10_000 * n)
    metres = [round(distance_km(p, q) * 1000) for p in paid for q in mesh if q.node_id != p.node_id]
    mean_km = Fraction(sum(metres), 1000 * len(metres)) if metres else Fraction(0)
    loaded, executions = sum(p.loaded_w for p in paid), sum(p.executions for p in paid)
    wpe = Fraction(loaded, max(1, executions))
    efficiency = Fraction(0)
    if wpe:
        efficiency = min(Fraction(w.efficiency_cap), w.exact("efficiency_bonus") / wpe)
    age = Fraction(sum(silicon_age(p, w) for p in paid), n)
    out = [(base, f"base: {w.base_rate} c x {n} paid node(s) = {base} c")]
    c = _cents(w.exact("uptime_bonus") * uptime_pct)
    out.append((c, f"uptime: {w.uptime_bonus} c x {float(uptime_pct):.4f}% mean uptime = {c} c"))
    c = _cents(w.exact("distance_bonus") * mean_km)
    out.append((c, f"distance: {w.distance_bonus} c x {float(mean_km):.3f} km mean distance "
                   f"to the {len(mesh) - 1} other node(s) = {c} c"))
    c = _cents(efficiency)
    if not wpe:
        text = "0 W claimed under load: no efficiency bonus"
    else:
        capped = " (capped)" if efficiency == w.efficiency_cap else ""
        text = (f"{w.efficiency_bonus} / {float(wpe):.4g} W per execution ({loaded} W loaded over "
                f"{executions} execution(s)){capped}")
    out.append((c, f"efficiency: {text} = {c} c"))
    c = _cents(w.exact("age_bonus") * age)
    out.append((c, f"age: {w.age_bonus} c x {float(age):.4g} years mean silicon age = {c} c"))
    return out


def _modifiers(paid: list[NodeProfile], at: dict[str, list[NodeProfile]],
               locations: dict[str, str], w: Weights) -> list[tuple[int, str]]:
    continents = sorted({continent(p.lat, p.lon) for p in paid} - {"unknown"})
    pct = w.continent_pct if len(continents) >= 2 else 0
    names = ', '.join(continents) or 'no known continent'
    out = [(pct, f"continent: +{pct}% (paid nodes on {names})")]
    extras, extra_isps = [], 0
    for loc in sorted({locations[p.node_id] for p in paid}):
        isps = sorted({n.isp for n in at[loc]} - {""})
        if len(isps) > 1:
            extra_isps += len(isps) - 1
            extras.append(f"{loc}: {len(isps)} ISPs ({', '.join(isps)})")
    pct = min(w.isp_cap_pct, w.isp_pct * extra_isps)
    out.append((pct, f"isp: +{pct}% ({'; '.join(extras) or 'one ISP at each paid location'}"
                     f"{', capped' if pct == w.isp_cap_pct and extras else ''})"))
    for flag, name, label in (("backup_power", "backup", "verified backup power"),
                              ("chaos_opt_in", "chaos", "chaos opt-in")):
        lacking = [p.node_id for p in paid if not getattr(p, flag)]
        pct = 0 if lacking else getattr(w, f"{name}_pct")
        note = (f"without {label}: {', '.join(lacking)}" if lacking
                else f"every paid node has {label}")
        out.append((pct, f"{name}: +{pct}% ({note})"))
    return out


def _partner(partner: str, own: list[NodeProfile], mesh: list[NodeProfile],
             at: dict[str, list[NodeProfile]], locations: dict[str, str],
             ranks: dict[str, tuple[int, float]], w: Weights) -> Payment:
    paid = [n for n in own if ranks[n.node_id][0] <= w.max_paid_per_location]
    if not paid:
        why = ("no paid nodes: each of its nodes is beyond the first "
               f"{w.max_paid_per_location} at its location (a donation)", "total: 0 c")
        subtotal, multiplier, total = 0, Fraction(1), 0
    else:
        terms, mods = _terms(paid, mesh, w), _modifiers(paid, at, locations, w)
        subtotal = sum(c for c, _ in terms)
        multiplier = Fraction(1)
        for pct, _ in mods:
            multiplier *= Fraction(100 + pct, 100)
        total = _cents(subtotal * multiplier)
        why = (*(t for _, t in terms), f"subtotal: {subtotal} c", *(t for _, t in mods),
               f"total: {subtotal} c x {float(multiplier):.6g} = {total} c")
    share, left = divmod(total, len(paid)) if paid else (0, 0)
    nodes, i = [], 0
    for n in own:
        rank, score = ranks[n.node_id]
        loc = locations[n.node_id]
        if rank > w.max_paid_per_location:
            nodes.append(NodePay(n.node_id, partner, loc, rank, score, False, 0, (
                f"{_ordinal(rank)} node at location {loc}: a donation (at most "
                f"{w.max_paid_per_location} paid per location, ranked by node score "
                f"{score:.6g})",)))
            continue
        amount = share + (1 if i < left else 0)
        i += 1
        nodes.append(NodePay(n.node_id, partner, loc, rank, score, True, amount, (
            f"{_ordinal(rank)} node at location {loc} (node score {score:.6g}): paid",
            f"share: {total} c over {len(paid)} paid node(s) = {amount} c")))
    return Payment(partner, total, subtotal, multiplier, tuple(nodes), why)


def monthly_payments(nodes: Iterable[NodeProfile], weights: Weights) -> dict[str, Payment]:
    """partner -> :class:`Payment` for the period's mesh, every figure with its reason."""
    mesh = sorted(nodes, key=lambda n: n.node_id)
    locations, ranks = _rank(mesh, weights)
    at: dict[str, list[NodeProfile]] = defaultdict(list)
    by_partner: dict[str, list[NodeProfile]] = defaultdict(list)
    for n in mesh:
        at[locations[n.node_id]].append(n)
        by_partner[n.partner].append(n)
    out = {partner: _partner(partner, by_partner[partner], mesh, at, locations, ranks, weights)
           for partner in sorted(by_partner)}
    log.debug("payments: %d partners, %d nodes, %d cents", len(out), len(mesh),
              sum(p.total for p in out.values()))
    return out
