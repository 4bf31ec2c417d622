"""``permamesh payouts``: each partner's monthly payment, with its "why", from the committee.

The scheduler reads the committee's ``/registry`` (every registered node's signed profile and
reputation; excluded nodes are left out), builds :class:`NodeProfile`s and applies
:func:`monthly_payments` with the weights file. Nothing here is stored on the ledger: the
figures are a pure function of the registry and the weights, so anyone can recompute them.

Who calls it: :mod:`permamesh.cli` (``permamesh payouts``) and the demo.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from fractions import Fraction

from permamesh.scheduler.payments import Payment, monthly_payments
from permamesh.scheduler.profile import from_registry
from permamesh.scheduler.weights import Weights

log = logging.getLogger(__name__)


def registry_payments(query: Callable[[str, bytes], object], weights: Weights) -> dict[str, Payment]:
    """Monthly payments of every partner in the committee's registry."""
    return monthly_payments(from_registry(query("/registry", b"")), weights)


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
