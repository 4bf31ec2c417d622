"""Payouts read the committee's physics verdicts: an impossible location earns nothing.

The story, over plain ``/registry`` rows: two honest partners each run a node in Berlin, and
mallory claims a third one there, on older silicon, but a member in Tokyo got its answer in
2 ms: it is in Tokyo, not Berlin. Had the claim counted, mallory's node would have outscored an
honest one for Berlin's two paid slots; refused, both honest nodes are paid and mallory's says
why it is not. A partner whose only node is refuted gets a zero payment with a reason; one
with other nodes keeps their pay.
"""

from __future__ import annotations

import dataclasses

from permamesh.committee import txs
from permamesh.scheduler.payouts import format_payments, registry_payments, rows_payments
from permamesh.scheduler.profile import from_registry, refuted
from permamesh.scheduler.weights import Weights

MEMBER = "7e" * 32
BERLIN, TOKYO = (52.520, 13.405), (35.690, 139.692)


def row(node: str, partner: str, place: tuple[float, float], physics: dict | None = None, **kw) -> dict:
    profile = txs.NodeProfile(round(place[0] * 1e6), round(place[1] * 1e6), "grid-de", kw.pop("isp", "isp-a"),
                              64500, silicon_year=kw.pop("year", 2014), cpu_mhz=2400, idle_w=10, loaded_w=40)
    return {"node": node, "partner": partner, "role": "worker", "excluded": False, "reputation_ppm": 500_000,
            "profile": dataclasses.asdict(profile) | {"models": []}, "physics": physics} | kw


def impossible(km: float) -> dict:
    return {"possible": False, "probes": 1, "insufficient": True, "worst_violation_km": km, "member": MEMBER,
            "why": f"impossible: member {MEMBER[:16]}'s probe at (35.690, 139.692) got an answer in 2 ms, "
                   f"... {km:.0f} km too far"}


def mesh() -> list[dict]:
    possible = {"possible": True, "probes": 3, "insufficient": False, "worst_violation_km": 0.0,
                "member": None, "why": "possible: consistent with all 3 distinct probe locations"}
    return [row("aa" * 32, "a1" * 32, BERLIN, possible, isp="isp-a"),
            row("bb" * 32, "b2" * 32, BERLIN, None, isp="isp-b"),
            row("cc" * 32, "c3" * 32, BERLIN, impossible(8618.4), isp="isp-c", year=1990),  # old silicon
            row("dd" * 32, "d4" * 32, TOKYO, impossible(120.5))]


def test_a_refuted_location_is_not_paid_and_takes_no_paid_slot():
    rows = mesh()
    assert [refuted(r) is not None for r in rows] == [False, False, True, True]
    assert [p.node_id for p in from_registry(rows)] == ["aa" * 32, "bb" * 32]  # nor placed

    payments = rows_payments(rows, Weights())
    assert list(payments) == sorted(r["partner"] for r in rows)
    assert payments["a1" * 32].nodes[0].paid and payments["b2" * 32].nodes[0].paid  # both Berlin slots honest
    (mallory,) = payments["c3" * 32].nodes
    assert (mallory.paid, mallory.amount, mallory.location) == (False, 0, "52.520,13.405")
    assert mallory.why[0] == (f"node {'cc' * 8} claims location 52.520,13.405, which member {MEMBER[:16]}'s "
                              "round trip proves impossible (8618.4 km beyond light's reach): not paid and left "
                              "out of the mesh's ranking until its partner corrects the claim")
    assert mallory.why[1].startswith("physics: impossible: member")
    assert payments["c3" * 32].total == 0 and payments["c3" * 32].why[0].startswith("no paid nodes")

    # without the verdict mallory's old silicon would have taken one of Berlin's two paid slots
    trusting = rows_payments([r | {"physics": None} for r in rows], Weights())
    assert not all(p.nodes[0].paid for p in (trusting["a1" * 32], trusting["b2" * 32]))


def test_a_partner_keeps_its_other_nodes_pay_and_the_cli_text_says_why():
    rows = mesh()
    rows[3]["partner"] = "a1" * 32  # mallory's Tokyo liar now belongs to the Berlin partner
    payments = registry_payments(lambda path, data: rows if path == "/registry" else None, Weights())
    pay = payments["a1" * 32]
    assert [n.node_id for n in pay.nodes] == ["aa" * 32, "dd" * 32]  # by node id
    assert pay.total > 0 and pay.nodes[0].amount == pay.total and not pay.nodes[1].paid
    text = format_payments(payments)
    assert f"partner {'a1' * 8}: " in text and "(1 of 2 nodes paid" in text
    assert f"node {'dd' * 8} at 35.690,139.692: 0.00 (not paid)" in text
    assert "(120.5 km beyond light's reach)" in text
