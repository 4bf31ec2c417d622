"""``permamesh payouts``: each partner's monthly payment, with its "why", from the committee.

The scheduler reads the committee's ``/registry`` (every registered node's signed profile and
reputation; excluded nodes are left out), builds :class:`NodeProfile`s and applies
:func:`monthly_payments` with the weights file. Nothing here is stored on the ledger: the
figures are a pure function of the registry and the weights, so anyone can recompute them.

A node whose claimed location a committee member's round trip proves impossible (the row's
``physics`` verdict, :func:`~permamesh.scheduler.profile.refuted`) is paid nothing: it is left
out of the mesh the others are ranked and paid against (its false coordinates would otherwise
take a paid slot at the claimed location and inflate everyone's distance bonus), and listed
under its partner as not paid, with a "why" naming the node, the member and the violation in
km. It is paid again once its partner registers a claim the round trips allow.

Who calls it: :mod:`permamesh.cli` (``permamesh payouts``), the demo and the gateway's dashboard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction

from permamesh.scheduler.payments import NodePay, Payment, monthly_payments
from permamesh.scheduler.profile import from_registry, from_registry_row, location_key, refuted
from permamesh.scheduler.weights import Weights

log = logging.getLogger(__name__)


def registry_payments(query: Callable[[str, bytes], object], weights: Weights) -> dict[str, Payment]:
    """Monthly payments of every partner in the committee's registry."""
    return rows_payments(query("/registry", b""), weights)


def _refused(row: Mapping) -> NodePay:
    """A node whose claimed location is impossible: paid nothing, and why (rank 0: not ranked)."""
    node, physics = from_registry_row(row), row["physics"]
    where = location_key(node)
    member = str(physics.get("member") or "?")[:16]
    return NodePay(node.node_id, node.partner, where, 0, 0.0, False, 0, (
        f"node {node.node_id[:16]} claims location {where}, which member {member}'s round trip "
        f"proves impossible ({physics.get('worst_violation_km', 0.0):g} km beyond light's reach): "
        "not paid and left out of the mesh's ranking until its partner corrects the claim",
        f"physics: {refuted(row)}"))


def rows_payments(rows: Iterable[Mapping], weights: Weights) -> dict[str, Payment]:
    """Monthly payments over ``/registry`` rows; refuted locations are paid nothing (module doc).
    Committee members' own nodes (role ``validator``) are not partners' service nodes: no
    partner is paid for them."""
    rows = [r for r in rows if not (isinstance(r, Mapping) and r.get("role") == "validator")]
    payments = monthly_payments(from_registry(rows), weights)
    refused: dict[str, list[NodePay]] = defaultdict(list)
    for row in rows:
        if isinstance(row, Mapping) and not row.get("excluded") and refuted(row):
            pay = _refused(row)
            refused[pay.partner].append(pay)
            log.info("payouts: node %s refused: %s", pay.node_id[:16], pay.why[0])
    for partner, nodes in refused.items():
        pay = payments.get(partner) or Payment(partner, 0, 0, Fraction(1), (), (
            "no paid nodes: the claimed location of each of its nodes is impossible", "total: 0 c"))
        payments[partner] = dataclasses.replace(
            pay, nodes=tuple(sorted(pay.nodes + tuple(nodes), key=lambda n: n.node_id)))
    return dict(sorted(payments.items()))


def _cents(value: int) -> str:
    return f"{value / 100:,.2f}"


def format_payments(payments: dict[str, Payment]) -> str:
    lines = []
    for partner, pay in payments.items():
        paid = sum(1 for n in pay.nodes if n.paid)
        lines.append(f"partner {partner[:16]}: {_cents(pay.total)} a month "
                     f"({paid} of {len(pay.nodes)} nodes paid, modifiers x{float(pay.multiplier):.3f})")
        lines += [f"  why: {reason}" for reason in pay.why]
        for node in pay.nodes:
            lines.append(f"  node {node.node_id[:16]} at {node.location}: {_cents(node.amount)}"
                         f"{'' if node.paid else ' (not paid)'}")
            lines += [f"    why: {reason}" for reason in node.why]
    return "\n".join(lines) if lines else "no registered nodes"


def payments_json(payments: dict[str, Payment]) -> str:
    def plain(value):
        if isinstance(value, Fraction):
            return str(value)
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if hasattr(value, "__dataclass_fields__"):
            return {k: plain(getattr(value, k)) for k in value.__dataclass_fields__}
        return value

    return json.dumps({partner: plain(pay) for partner, pay in payments.items()}, indent=1)
