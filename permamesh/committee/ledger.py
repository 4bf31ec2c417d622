"""The ledger's rules: what each transaction may do to the state, checked before it writes.

Rows (namespace -> key -> canonical msgpack value), all in one :class:`Store`:

| ns | key | value |
|---|---|---|
| ``nonce`` | sender key | last accepted nonce |
| ``partner`` | partner key | tier, admitted epoch, vouchers |
| ``cand`` | candidate key | sorted voucher keys (until admitted) |
| ``node`` | node key | partner, kex key, role, endpoint, profile, registered epoch |
| ``desc`` | node key | the node's own descriptor (:class:`txs.Announce` fields) |
| ``probe`` | period + member key | the nodes that member found up, with round trips |
| ``live`` | node key | the last period it was counted up, and that period's median rtt |
| ``rep`` | node key | :class:`NodeReputation` fields |
| ``report`` | epoch + member key | that member's scores for the epoch |
| ``account`` | account key | balance, earned, spent, earned this epoch |
| ``job`` | user key + job id | (empty: the job was paid) |
| ``payout`` | epoch + node key | served units, reputation, payout |
| ``epoch`` | epoch | what closing it did |
| ``share``, ``group``, ``gwait`` | | worker groups' sealed salts (:mod:`groupshares`) |

Every ``apply_*`` checks everything first and writes only when the tx is valid, so a rejected
tx never changes state; a tx that was well formed, correctly signed and carried the right
nonce consumes its nonce even when a rule rejects it (so it cannot be replayed later, when
the rule might pass). Tiers: 3 seed partner, 2 may vouch, 1 trial, admitted at N vouches.

Liveness: probe period ``q`` covers heights ``q*P .. q*P+P-1`` (``P = probe_blocks``). A member
reports once per period, for the current one or the one before, and may add to its report
later in the period (an *addendum*: a report naming at least one node its report lacks; the
nodes it already named keep their round trips), so a node that announces after a member
reported is counted without waiting for the next period. A node is *counted up* in a
period when more than 2/3 of the members reported it up there; its ``live`` row then holds
that period and the lower median of its round trips. It is *running* at a height of period
``p`` when it was counted up in ``p`` or ``p - 1`` (:func:`is_running`). Probe rows of periods
before ``p - 1`` can never matter again and are pruned by the next report, so they stay at
most two periods' worth.

Who calls it: :class:`permamesh.committee.app.LedgerApp` (CheckTx with ``dry_run``,
FinalizeBlock for real); :mod:`permamesh.committee.epochs` closes epochs over the same rows.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import msgpack

from permamesh.committee import groupshares, txs
from permamesh.committee.errors import TxError
from permamesh.committee.genesis import Genesis
from permamesh.committee.store import Store
from permamesh.verify.reputation import NodeReputation

log = logging.getLogger(__name__)

NONCE, PARTNER, CAND, NODE, REP = b"nonce", b"partner", b"cand", b"node", b"rep"
DESC, PROBE, LIVE = b"desc", b"probe", b"live"
REPORT, ACCOUNT, JOB, PAYOUT, EPOCH, META = (b"report", b"account", b"job", b"payout",
                                             b"epoch", b"meta")
TIER_TRIAL, TIER_VOUCH, TIER_SEED = 1, 2, 3


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(raw: bytes | None) -> object:
    return None if raw is None else msgpack.unpackb(raw, raw=False, strict_map_key=False)


def epoch_key(epoch: int, key: bytes = b"") -> bytes:
    return epoch.to_bytes(8, "big") + key


def lower_median(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def is_running(live: dict | None, period: int) -> bool:
    """Counted up by the committee in ``period`` or the one before."""
    return live is not None and live["period"] >= period - 1


@dataclass(frozen=True)
class Applied:
    """What one successful tx did (becomes an ABCI event)."""

    kind: str
    attributes: tuple[tuple[str, str], ...]


class Ledger:
    """The rules over one store. A dry run reads only committed rows (CheckTx)."""

    def __init__(self, store: Store, genesis: Genesis) -> None:
        self.store, self.genesis, self.rules = store, genesis, genesis.rules
        self.members = frozenset(genesis.members)

    # ---------------------------------------------------------------------------- helpers

    def read(self, ns: bytes, key: bytes, committed: bool = False) -> object:
        return unpack(self.store.committed(ns, key) if committed else self.store.get(ns, key))

    def write(self, ns: bytes, key: bytes, value: object) -> None:
        self.store.put(ns, key, pack(value))

    def epoch_of(self, height: int) -> int:
        return max(0, height - 1) // self.rules.blocks_per_epoch

    def period_of(self, height: int) -> int:
        return height // self.rules.probe_blocks

    def quorum(self, reports: int) -> bool:
        """More than 2/3 of the committee."""
        return 3 * reports > 2 * len(self.members)

    def account(self, key: bytes, committed: bool = False) -> dict:
        return self.read(ACCOUNT, key, committed) or {
            "balance": 0, "earned": 0, "spent": 0, "epoch_earned": 0}

    def credit_limit(self, account: dict) -> int:
        return self.rules.base_allowance + account["earned"] * self.rules.earned_limit_ppm // 10**6

    def registered(self, key: bytes, committed: bool = False) -> bool:
        return self.read(NODE, key, committed) is not None

    def group_of(self, key: bytes, committed: bool = False) -> str:
        """The worker group ``key`` belongs to now ("" for none; :mod:`groupshares`)."""
        return groupshares.group_of(self.read(NODE, key, committed), self.read(DESC, key, committed))

    def tier(self, key: bytes, committed: bool = False) -> int:
        if key in self.genesis.seed_partners:
            return TIER_SEED
        row = self.read(PARTNER, key, committed)
        return 0 if row is None else row["tier"]

    # ------------------------------------------------------------------------- entry point

    def check_nonce(self, sender: bytes, nonce: int, expected: int | None = None) -> None:
        if expected is None:
            expected = (self.read(NONCE, sender) or 0) + 1
        if nonce != expected:
            raise TxError(txs.BAD_NONCE, f"nonce {nonce}, expected {expected} (replayed or out of order)")

    def apply(self, tx: object, sender: bytes, height: int, *, dry_run: bool = False) -> Applied:
        """Check ``tx`` against the rules and, unless ``dry_run``, write its effects.

        The nonce must already have been checked by the caller. Raises :class:`TxError`.
        """
        handler = {txs.RegisterNode: self._register, txs.Vouch: self._vouch,
                   txs.ScoreReport: self._report, txs.JobReceipt: self._receipt,
                   txs.Announce: self._announce, txs.Liveness: self._liveness,
                   txs.GroupShare: self._group_share}[type(tx)]
        effects, applied = handler(tx, sender, height, dry_run)
        if not dry_run:
            for ns, key, value in effects:
                if value is None:
                    self.store.delete(ns, key)
                else:
                    self.write(ns, key, value)
        return applied

    def consume_nonce(self, sender: bytes, nonce: int) -> None:
        self.write(NONCE, sender, nonce)

    # ------------------------------------------------------------------------------ rules

    def _register(self, tx: txs.RegisterNode, sender: bytes, height: int, committed: bool):
        epoch = self.epoch_of(height)
        if self.tier(sender, committed) < TIER_TRIAL:
            raise TxError(txs.UNAUTHORIZED, "only an admitted partner may register nodes")
        old = self.read(NODE, tx.node_key, committed)
        if old is not None and bytes(old["partner"]) != sender:
            raise TxError(txs.UNAUTHORIZED, "that node is registered by another partner")
        if tx.role == "validator" and tx.node_key not in self.members:
            raise TxError(txs.UNAUTHORIZED, "validator nodes must be committee members (genesis)")
        if tx.role == "validator" and sender not in self.genesis.seed_partners:
            raise TxError(txs.UNAUTHORIZED, "only a seed partner registers committee members (their location "
                                            "is where the physics check's probes stand)")
        row = {"partner": sender, "kex": tx.kex_key, "role": tx.role, "endpoint": tx.endpoint,
               "profile": dataclasses.asdict(tx.profile) | {"models": list(tx.profile.models)},
               "registered": epoch if old is None else old["registered"]}
        effects = [(NODE, tx.node_key, row)]
        if old is not None:  # a worker made a relay or given a new kex key gives up its group share
            desc = self.read(DESC, tx.node_key, committed)
            effects += groupshares.membership(self, tx.node_key, row, desc, self.group_of(tx.node_key, committed),
                                              committed, rekeyed=bytes(old["kex"]) != tx.kex_key)
        if old is None:
            rep = NodeReputation.initial(self.genesis.reputation).to_fields()
            effects.append((REP, tx.node_key, rep))
        return effects, Applied("register_node", (("node", tx.node_key.hex()), ("role", tx.role)))

    def _vouch(self, tx: txs.Vouch, sender: bytes, height: int, committed: bool):
        epoch = self.epoch_of(height)
        if self.tier(sender, committed) < TIER_VOUCH:
            raise TxError(txs.UNAUTHORIZED, "only tier 2+ partners may vouch")
        if tx.subject == sender:
            raise TxError(txs.INVALID, "a partner cannot vouch for itself")
        if self.tier(tx.subject, committed) >= TIER_TRIAL:
            raise TxError(txs.DUPLICATE, "that partner is already admitted")
        vouchers = [bytes(v) for v in self.read(CAND, tx.subject, committed) or []]
        if sender in vouchers:
            raise TxError(txs.DUPLICATE, "this partner already vouched for that candidate")
        vouchers = sorted(vouchers + [sender])
        if len(vouchers) < self.rules.vouches_required:
            return [(CAND, tx.subject, vouchers)], Applied(
                "vouch", (("subject", tx.subject.hex()), ("vouches", str(len(vouchers)))))
        admitted = {"tier": TIER_TRIAL, "admitted": epoch, "vouchers": vouchers}
        return [(CAND, tx.subject, None), (PARTNER, tx.subject, admitted)], Applied(
            "admit_partner", (("partner", tx.subject.hex()), ("epoch", str(epoch))))

    def _report(self, tx: txs.ScoreReport, sender: bytes, height: int, committed: bool):
        epoch = self.epoch_of(height)
        if sender not in self.members:
            raise TxError(txs.UNAUTHORIZED, "only committee members may report scores")
        if not epoch - self.rules.max_report_lag <= tx.epoch <= epoch:
            raise TxError(txs.STALE, f"epoch {tx.epoch} is not open for reports (now {epoch})")
        key = epoch_key(tx.epoch, sender)
        if self.read(REPORT, key, committed) is not None:
            raise TxError(txs.DUPLICATE, "this member already reported for that epoch")
        for score in tx.scores:
            if self.read(NODE, score.node_key, committed) is None:
                raise TxError(txs.UNKNOWN, f"node {score.node_key.hex()[:16]} is not registered")
        scores = sorted([s.node_key, s.credit_ppm, s.challenges] for s in tx.scores)
        return [(REPORT, key, scores)], Applied(
            "score_report", (("epoch", str(tx.epoch)), ("scores", str(len(scores)))))

    def _receipt(self, tx: txs.JobReceipt, sender: bytes, height: int, committed: bool):
        if self.read(NODE, tx.worker, committed) is None:
            raise TxError(txs.UNKNOWN, "the serving worker is not registered")
        if tx.worker == sender:
            raise TxError(txs.INVALID, "a node cannot pay itself")
        job = sender + tx.job_id
        if self.read(JOB, job, committed) is not None:
            raise TxError(txs.DUPLICATE, "that job was already paid")
        user, worker = self.account(sender, committed), self.account(tx.worker, committed)
        if user["balance"] - tx.units < -self.credit_limit(user):
            raise TxError(txs.NO_CREDIT, f"out of credit: balance {user['balance']}, limit "
                          f"{self.credit_limit(user)}, job needs {tx.units}")
        user = user | {"balance": user["balance"] - tx.units, "spent": user["spent"] + tx.units}
        worker = worker | {"balance": worker["balance"] + tx.units,
                           "earned": worker["earned"] + tx.units,
                           "epoch_earned": worker["epoch_earned"] + tx.units}
        return [(JOB, job, b""), (ACCOUNT, sender, user), (ACCOUNT, tx.worker, worker)], Applied(
            "job_receipt", (("worker", tx.worker.hex()), ("units", str(tx.units))))

    def _announce(self, tx: txs.Announce, sender: bytes, height: int, committed: bool):
        node = self.read(NODE, sender, committed)
        if node is None:
            if self.tier(sender, committed) >= TIER_TRIAL:
                raise TxError(txs.UNAUTHORIZED, "an announce is signed by the node's own key, "
                              "not by its partner's")
            raise TxError(txs.UNKNOWN, f"node {sender.hex()[:16]} is not registered (its partner "
                          "registers it first)")
        if node["role"] != "worker" and (tx.model or tx.group or tx.layers or tx.engine):
            raise TxError(txs.INVALID, f"a {node['role']} serves no model, engine, group or layers; "
                          "only workers announce them")
        old = self.read(DESC, sender, committed)
        if old is not None and tx.seq <= old["seq"]:
            raise TxError(txs.STALE, f"descriptor seq {tx.seq} is not above the last, {old['seq']}")
        row = {"role": node["role"], "transport_key": tx.transport_key, "endpoint": tx.endpoint,
               "model": tx.model, "group": tx.group, "layers": tx.layers, "version": tx.version,
               "seq": tx.seq, "engine": tx.engine}
        effects = [(DESC, sender, row)] + groupshares.membership(
            self, sender, node, row, self.group_of(sender, committed), committed)
        return effects, Applied(
            "announce", (("node", sender.hex()), ("endpoint", tx.endpoint), ("seq", str(tx.seq))))

    def _group_share(self, tx: txs.GroupShare, sender: bytes, height: int, committed: bool):
        effects, founded = groupshares.apply_share(self, tx, sender, committed)
        return effects, Applied("group_share", (("group", tx.group), ("recipient", tx.recipient.hex()),
                                                ("founded", "1" if founded else "0")))

    def _liveness(self, tx: txs.Liveness, sender: bytes, height: int, committed: bool):
        if sender not in self.members:
            raise TxError(txs.UNAUTHORIZED, "only committee members may report liveness")
        now = self.period_of(height)
        if not now - 1 <= tx.period <= now:
            raise TxError(txs.STALE, f"probe period {tx.period} is not open (now {now})")
        key = epoch_key(tx.period, sender)
        earlier = self.read(PROBE, key, committed)  # this member's report of the period so far
        known = {bytes(node_key) for node_key, _ in earlier or ()}
        added = [seen for seen in tx.up if seen.node_key not in known]
        if earlier is not None and not added:  # an addendum must name a node the report lacks
            raise TxError(txs.DUPLICATE, "this member already reported every one of these nodes for that period")
        for seen in tx.up:
            if self.read(NODE, seen.node_key, committed) is None:
                raise TxError(txs.UNKNOWN, f"node {seen.node_key.hex()[:16]} is not registered")
        applied = Applied("liveness", (("period", str(tx.period)), ("up", str(len(tx.up))),
                                       ("added", str(len(added)))))
        if committed:  # a dry run (CheckTx) stops here: its effects would be thrown away
            return [], applied
        rtts = {seen.node_key: [seen.rtt_us] for seen in added}
        effects: list[tuple[bytes, bytes, object]] = [
            (PROBE, key, sorted([[bytes(k), r] for k, r in earlier or ()] + [[s.node_key, s.rtt_us] for s in added]))]
        for other, raw in self.store.scan(PROBE):
            period = int.from_bytes(other[:8], "big")
            if period < now - 1:
                effects.append((PROBE, other, None))  # can never count again
            elif period == tx.period:
                for node_key, rtt in unpack(raw):
                    if node_key in rtts:
                        rtts[node_key].append(rtt)
        for node_key, values in sorted(rtts.items()):
            live = self.read(LIVE, node_key)
            if self.quorum(len(values)) and (live is None or live["period"] <= tx.period):
                effects.append((LIVE, node_key, {"period": tx.period, "reports": len(values),
                                                 "rtt_us": lower_median(values)}))
        return effects, applied
