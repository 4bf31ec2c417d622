"""Closing an epoch: aggregate the members' score reports, advance reputation, pay service.

Runs inside FinalizeBlock at the last block of an epoch (height a multiple of
``blocks_per_epoch``), closing the epoch ``max_report_lag`` epochs back, so members have a
whole epoch to score and report. Everything is integer arithmetic in sorted key order.

- **Aggregation.** A node's credit for the epoch is the lower median of the reports that
  cover it, used only when more than 2/3 of the committee reported it. One lying member (of
  four) therefore moves nothing: the median lies between honest reports. A node covered by
  too few reports is left as it was ("unscored"), never punished for the committee's gaps.
- **Reputation.** :func:`permamesh.verify.reputation.update`, the fixed-point rule.
- **Service payout.** Credit earned serving this epoch, weighted by the node's reputation
  after the update. (The seed's monthly partner formula, placement issue, builds on it.)
- **Tiers.** A trial partner whose trial is over, with every registered node trusted, may
  now vouch (tier 2).

Who calls it: :meth:`permamesh.committee.app.LedgerApp.finalize_block`.
"""

from __future__ import annotations

import logging

from permamesh.committee.ledger import (ACCOUNT, EPOCH, NODE, PARTNER, PAYOUT, REP, REPORT,
                                        TIER_TRIAL, TIER_VOUCH, Ledger, epoch_key, lower_median)
from permamesh.verify import reputation as rep_rules
from permamesh.verify.reputation import PPM, NodeReputation

log = logging.getLogger(__name__)


def closing_epoch(ledger: Ledger, height: int) -> int | None:
    """The epoch this block closes, or None."""
    rules = ledger.rules
    if height < 1 or height % rules.blocks_per_epoch:
        return None
    epoch = height // rules.blocks_per_epoch - 1 - rules.max_report_lag
    return epoch if epoch >= 0 else None


def aggregate(ledger: Ledger, epoch: int) -> tuple[dict[bytes, int], int]:
    """Per-node aggregated credit for ``epoch`` and the number of reports seen."""
    by_node: dict[bytes, list[int]] = {}
    reports = 0
    prefix = epoch_key(epoch)
    for key, _ in ledger.store.scan(REPORT):
        if not key.startswith(prefix):
            continue
        reports += 1
        for node_key, credit, _challenges in ledger.read(REPORT, key):
            by_node.setdefault(bytes(node_key), []).append(credit)
    scored = {node: lower_median(credits) for node, credits in sorted(by_node.items())
              if ledger.quorum(len(credits))}
    return scored, reports


def close_epoch(ledger: Ledger, epoch: int) -> dict:
    """Close ``epoch``: reputation, payouts, tiers; returns the epoch record it stored."""
    config = ledger.genesis.reputation
    scored, reports = aggregate(ledger, epoch)
    excluded = []
    for node_key, credit in scored.items():
        state = NodeReputation.from_fields(ledger.read(REP, node_key), config)
        state = rep_rules.update(state, credit, config)
        ledger.write(REP, node_key, state.to_fields())
        if state.excluded:
            excluded.append(node_key.hex())
    paid = 0
    for key, _ in list(ledger.store.scan(ACCOUNT)):
        account = ledger.read(ACCOUNT, key)
        if not account["epoch_earned"]:
            continue
        rep = ledger.read(REP, key)
        rep_ppm = rep["reputation_ppm"] if rep is not None and not rep["excluded"] else 0
        payout = account["epoch_earned"] * rep_ppm // PPM
        ledger.write(PAYOUT, epoch_key(epoch, key),
                     {"units": account["epoch_earned"], "reputation_ppm": rep_ppm, "payout": payout,
                      "why": f"{account['epoch_earned']} units served x reputation {rep_ppm} ppm"})
        ledger.write(ACCOUNT, key, account | {"epoch_earned": 0})
        paid += payout
    promoted = _promote(ledger, epoch)
    for key, _ in list(ledger.store.scan(REPORT)):
        if int.from_bytes(key[:8], "big") <= epoch:
            ledger.store.delete(REPORT, key)
    record = {"epoch": epoch, "reports": reports, "scored": len(scored), "paid": paid,
              "excluded": excluded, "promoted": promoted}
    ledger.write(EPOCH, epoch.to_bytes(8, "big"), record)
    log.info("epoch %d closed: %d reports, %d nodes scored, %d excluded", epoch, reports,
             len(scored), len(excluded))
    return record


def _promote(ledger: Ledger, epoch: int) -> list[str]:
    config = ledger.genesis.reputation
    nodes_of: dict[bytes, list[bytes]] = {}
    for node_key, raw in ledger.store.scan(NODE):
        nodes_of.setdefault(bytes(ledger.read(NODE, node_key)["partner"]), []).append(node_key)
    promoted = []
    for partner, _ in list(ledger.store.scan(PARTNER)):
        row = ledger.read(PARTNER, partner)
        if row["tier"] != TIER_TRIAL or epoch < row["admitted"] + ledger.rules.trial_epochs:
            continue
        nodes = nodes_of.get(partner, [])
        if nodes and all(rep_rules.is_trusted(
                NodeReputation.from_fields(ledger.read(REP, n), config), config) for n in nodes):
            ledger.write(PARTNER, partner, row | {"tier": TIER_VOUCH})
            promoted.append(partner.hex())
    return promoted
