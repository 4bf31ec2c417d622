"""The committee's part of ``permamesh demo``: a 4-validator committee the mesh's routing reads.

- :func:`start_committee`: four CometBFT v0.38 nodes, each driving its own copy of the ledger
  application over ABCI (or, with ``engine="devnet"``, the embedded devnet: 4 validator
  processes running our Tendermint over zmq, a fast local stand-in);
  the mesh's nodes then join through it (:mod:`permamesh.demo.enroll`), and routing reads
  their reputations from it.
- :func:`verification_epoch`: every member's duty once: challenges through the overlay
  (they look like user traffic), answers scored against the reference model, signed reports
  (member 3 lies, to show the median ignores it), the epoch closed by the ledger, the
  reputations and the trusted list read back with committee queries.
- :func:`credit_round`: a job admitted by credit (the scheduler's admission reads `/account`),
  paid by a signed receipt; a job bigger than the credit left refused with the reason.
- :func:`validator_drill`: SIGKILL one validator; the others keep committing; it restarts
  and catches up from its block store and its peers.

Who calls it: :mod:`permamesh.demo.run`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from permamesh.committee import txs
from permamesh.committee.client import CommitteeClient
from permamesh.committee.cometbft.network import CometNet, CometNetConfig
from permamesh.committee.devnet.cluster import Devnet, DevnetConfig
from permamesh.committee.duties import DutyConfig, Member, score_workers
from permamesh.committee.genesis import LedgerRules
from permamesh.committee.trust import node_id_of
from permamesh.identity import NodeIdentity

log = logging.getLogger(__name__)

BLOCKS_PER_EPOCH = 20  # a demo epoch is about 7 s of blocks (CometBFT commits ~3 a second when idle)
ENGINES = ("cometbft", "devnet")
Committee = CometNet | Devnet


def start_committee(data_dir: Path, say, engine: str = "cometbft") -> tuple[Committee, CommitteeClient]:
    started = time.monotonic()
    rules = LedgerRules(blocks_per_epoch=BLOCKS_PER_EPOCH)
    if engine == "cometbft":
        net: Committee = CometNet(CometNetConfig(Path(data_dir) / "cometbft", rules=rules))
        what = "CometBFT v0.38 nodes, each driving its own ledger app over ABCI"
    elif engine == "devnet":
        net = Devnet(DevnetConfig(Path(data_dir) / "devnet", rules=rules))
        what = "the embedded devnet: a local stand-in for CometBFT"
    else:
        raise ValueError(f"committee engine {engine!r} is not one of {ENGINES}")
    net.start()
    client = CommitteeClient(net.endpoints, timeout_s=10.0)
    height = client.status().height
    say(f"committee: {len(net.endpoints)} validators ({what}) at height {height}, ready in "
        f"{time.monotonic() - started:.1f} s")
    return net, client


def recent_blocks(net: Committee, client: CommitteeClient, say, count: int = 5) -> None:
    """Print the last ``count`` committed blocks: height, txs and the app hash the validators agree on."""
    last = client.status().height
    first = max(1, last - count + 1)
    hashes = {}
    for endpoint in net.endpoints:
        status = client.status_of(endpoint, first, last)
        if status is not None:
            hashes[endpoint] = dict(zip(status.heights, status.app_hashes))
    engine = "CometBFT" if isinstance(net, CometNet) else "the devnet"
    for height in range(first, last + 1):
        seen = {h[height] for h in hashes.values() if height in h}
        txs_in = ""
        if isinstance(net, CometNet):
            from permamesh.committee.cometbft.rpc import CometRPC

            with CometRPC(net.endpoints[0]) as rpc:
                txs_in = f", {len(rpc.block(height).txs)} txs"
        agreed = next(iter(seen)).hex()[:16] if len(seen) == 1 else "DISAGREE"
        say(f"  block {height} committed by {engine}{txs_in}; app hash {agreed} on "
            f"{sum(height in h for h in hashes.values())} of {len(net.endpoints)} validators")


def _reputations(client: CommitteeClient) -> dict[str, dict]:
    """The workers' registry rows by node id (what verification scores)."""
    return {node_id_of(row["node"]): row for row in client.query("/registry") if row["role"] == "worker"}


def verification_epoch(client: CommitteeClient, devnet: Committee, overlay, reference, pool,
                       model: str, say) -> None:
    from permamesh.verify.verifier import Verifier

    say("\n== the committee: one verification epoch ==")
    before = _reputations(client)
    started = time.monotonic()
    scores = score_workers(client, Verifier(reference), pool,
                           lambda req, node_id: overlay.submit(req, entry=node_id),
                           DutyConfig(pace=False, answer_cap=16), model)  # a demo: at once, short answers
    say(f"  {scores.challenges} challenges sent through the overlay and scored against the reference "
        f"in {time.monotonic() - started:.1f} s (epoch {scores.epoch})")
    members = [Member(devnet.identity(i), devnet.chain_id, lie=(i == 3)) for i in range(len(devnet.endpoints))]
    started = time.monotonic()
    outcomes = _report_together(client, members, scores)
    refused = [f"member {i}: {o.log}" for i, o in enumerate(outcomes) if not o.ok]
    say(f"  {len(members) - len(refused)} signed score reports committed in {time.monotonic() - started:.1f} s "
        "(member 3 lies: reports 1 - credit)" + (f"; refused: {'; '.join(refused)}" if refused else ""))
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline and not any(
            e["epoch"] == scores.epoch for e in client.query("/epochs")):
        time.sleep(0.2)
    record = next((e for e in client.query("/epochs") if e["epoch"] == scores.epoch), None)
    if record is None:
        say("  the epoch did not close within 60 s")
        return
    say(f"  epoch {scores.epoch} closed by the ledger: {record['reports']} reports, {record['scored']} workers "
        "scored (lower median of the members' reports)")
    for node_id, row in sorted(_reputations(client).items()):
        credit = scores.credits.get(bytes.fromhex(row["node"]))
        old = before.get(node_id, {}).get("reputation_ppm")
        say(f"  worker {node_id[:8]}: credit {credit / 1e6 if credit is not None else '-'}, reputation "
            f"{old / 1e6 if old else '-'} -> {row['reputation_ppm'] / 1e6:.2f}"
            f"{' EXCLUDED' if row['excluded'] else ''}  ({row['profile']['grid']}, {row['profile']['isp']})")
    trusted = client.query("/trusted")
    say(f"  trusted list (what routing reads, every 2 s, in each worker): {len(trusted)} nodes")


def _report_together(client: CommitteeClient, members: list[Member], scores) -> list:
    """Every member's signed report, pipelined so that they land in the same block or two.

    One after another, each waiting for its commit, the later reports missed the epoch's
    report window on a loaded machine (a CI run: blocks keep coming every ~0.3 s). A report
    whose nonce another tx of its member took first is signed and sent again on its own."""
    if not scores.credits:
        return [member.report(client, scores) for member in members]  # each says: no workers
    raw = [m.report_tx(scores, client.next_nonce(m.identity.public.sign_key)) for m in members]
    outcomes = client.submit_many(raw, timeout_s=30.0)
    return [member.report(client, scores) if outcome.code == txs.BAD_NONCE else outcome
            for member, outcome in zip(members, outcomes)]


def validator_drill(devnet: Committee, client: CommitteeClient, say) -> None:
    say("\n== drill: one validator killed (SIGKILL) ==")
    victim = len(devnet.endpoints) - 1
    others = [e for i, e in enumerate(devnet.endpoints) if i != victim]
    devnet.kill(victim)
    start = client.status_of(others[0]).height
    partner = devnet.partner
    tx = txs.Vouch(chain_id=devnet.chain_id, nonce=client.next_nonce(partner.public.sign_key),
                   subject=NodeIdentity.generate().public.sign_key)
    outcome = client.submit(txs.sign_tx(tx, partner))
    time.sleep(1.0)  # let the three survivors show progress (a demo pause, not synchronization)
    now = client.status_of(others[0]).height
    say(f"  3 of 4 validators committed {now - start} blocks in 1 s; a tx committed at height "
        f"{outcome.height} (code {outcome.code})")
    devnet.restart(victim)
    t0, target = time.monotonic(), client.status_of(others[0]).height
    while time.monotonic() - t0 < 30 and (s := client.status_of(devnet.endpoints[victim])) and s.height < target:
        time.sleep(0.05)
    heights = [client.status_of(e).height for e in devnet.endpoints]
    hashes = {client.status_of(e, min(heights), min(heights)).app_hashes for e in devnet.endpoints}
    say(f"  restarted: caught up to height {target} in {time.monotonic() - t0:.2f} s; all 4 validators "
        f"agree on the app hash at height {min(heights)}: {len(hashes) == 1}")


def credit_round(client: CommitteeClient, overlay, data_dir: Path, max_tokens: int, say) -> None:
    """A researcher's job admitted by credit, paid by a signed receipt; an oversized one refused."""
    from permamesh.scheduler.admission import Admission, OutOfCredit, prompt_bound

    say("\n== credit: admission, a receipt, a refusal ==")
    user = NodeIdentity.load_or_create(Path(data_dir) / "keys", "demo-user")
    admission = Admission(client.query, client.query("/status")["chain_id"])
    prompt = "Why do community networks last?"
    admitted = admission.admit(user.public.sign_key, prompt_bound(prompt), max_tokens)
    result = overlay.generate(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)
    keys = {node_id_of(row["node"]): bytes.fromhex(row["node"]) for row in client.query("/registry")}
    units = min(admitted.cost, result.prompt_tokens + result.completion_tokens)
    outcome = client.submit(admission.receipt(user, keys[result.worker_id], units))
    account = admission.account(user.public.sign_key)
    say(f"  admitted (up to {admitted.cost} units, {admitted.available} available); answered by "
        f"{result.worker_id[:8]}; receipt for {units} units committed at height {outcome.height} "
        f"(code {outcome.code}); balance now {account['balance']}, available {account['available']}")
    try:
        admission.admit(user.public.sign_key, 0, account["available"] + 1)
    except OutOfCredit as exc:
        say(f"  a job bigger than the credit left is refused before it runs: {exc}")


def payouts(client: CommitteeClient, say) -> None:
    """Service payouts from the ledger, then the scheduler's monthly partner payment, computed
    from the committee's registry (``permamesh payouts`` prints it in full)."""
    from permamesh.scheduler.payouts import registry_payments
    from permamesh.scheduler.weights import load_weights

    rows = client.query("/payouts")
    for row in rows[-4:]:
        say(f"  service payout, epoch {row['epoch']}, to {node_id_of(row['node'])[:8]}: {row['payout']} "
            f"(why: {row['why']})")
    for partner, pay in registry_payments(client.query, load_weights()).items():
        paid = sum(1 for n in pay.nodes if n.paid)
        say(f"  the scheduler, from the committee's registry: partner {partner[:8]} is paid "
            f"{pay.total / 100:,.2f} a month for {paid} of {len(pay.nodes)} nodes")
        for reason in pay.why[:6]:
            say(f"    why: {reason}")
        say("    (permamesh payouts prints every figure and node)")
