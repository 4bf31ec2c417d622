"""``permamesh bench committee``: how fast the ledger applies transactions and the committee commits.

The committee runs on CometBFT v0.38 (the production engine); the embedded devnet is measured
beside it with the same load (``--engines``), so its figures read as a comparison, never as
the production numbers.

- **app**: the ledger application alone, on SQLite on disk, driven through its ABCI methods:
  blocks of ``block_txs`` signed job receipts (distinct users, one worker) through
  ``FinalizeBlock`` + ``Commit``; ``tx_per_s`` is txs over that time (signature checks
  included). ``check_tx_per_s`` is ``CheckTx`` alone on the same kind of txs.
- **cometbft** / **devnet**: ``validators`` real validators on loopback (for CometBFT each is a
  ``cometbft node`` plus its ``permamesh validator`` app). Commit latency: txs sent one at a
  time, each timed from the submit call to its commit being known (CometBFT: ``broadcast_tx_sync``
  then the block that holds it). Burst: ``burst_txs`` pipelined, timed to the last commit.
- **kill drill**: one validator SIGKILLed; blocks and txs while it is down; its restart and
  the time to catch up to the height the others had when it came back.
- **agreement**: every validator's app hash at every height; ``app_hash_agree`` is true when
  all validators that hold a height hold the same hash for it.

``--json PATH`` writes a ``summary`` with CometBFT's ``commit_latency_p50_s``/``p99``,
``tx_per_s`` (ledger txs committed per second through CometBFT) and ``app_hash_agree``
(targets: p50 <= 1 s, >= 200 tx/s), the devnet's and the bare app's figures beside them;
``--quick`` finishes in about a minute.

Who calls it: :mod:`permamesh.cli` and tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import tempfile
import time
from pathlib import Path

from permamesh.bench.plot import pyplot, save
from permamesh.bench.stats import percentile, write_report
from permamesh.committee import txs
from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.app import LedgerApp
from permamesh.committee.client import CommitteeClient
from permamesh.committee.cometbft.network import CometNet, CometNetConfig
from permamesh.committee.devnet.cluster import CHAIN_ID, Devnet, DevnetConfig
from permamesh.committee.genesis import Genesis
from permamesh.identity import NodeIdentity

log = logging.getLogger(__name__)

TARGETS = {"commit_latency_p50_s": 1.0, "tx_per_s": 200}  # on CometBFT, 4 validators, loopback
ENGINES = ("cometbft", "devnet")


@dataclasses.dataclass(frozen=True)
class CommitteeBench:
    validators: int = 4
    app_blocks: int = 10  # blocks the app applies in the app measurement
    block_txs: int = 1000  # txs per block there
    latency_txs: int = 100  # txs sent one at a time to the devnet
    burst_txs: int = 2000  # txs pipelined to the devnet
    kill_drill: bool = True
    home: Path | None = None  # committee and app state (default: a temporary directory)
    engines: tuple[str, ...] = ENGINES  # the first is the summary's; the others are measured beside it

    def __post_init__(self) -> None:
        if not self.engines or any(e not in ENGINES for e in self.engines):
            raise ValueError(f"engines must be a non-empty subset of {ENGINES}, got {self.engines}")


def quick_bench() -> CommitteeBench:
    return CommitteeBench(app_blocks=3, latency_txs=30, burst_txs=400)


class _Signer:
    def __init__(self, ident: NodeIdentity | None = None, chain_id: str = CHAIN_ID) -> None:
        self.ident, self.nonce, self.chain_id = ident or NodeIdentity.generate(), 0, chain_id

    def sign(self, make, **fields) -> bytes:
        self.nonce += 1
        return txs.sign_tx(make(chain_id=self.chain_id, nonce=self.nonce, **fields), self.ident)


def _register(partner: _Signer, node: NodeIdentity) -> bytes:
    return partner.sign(txs.RegisterNode, node_key=node.public.sign_key, kex_key=node.public.kex_key,
                        role="worker", endpoint="tcp://127.0.0.1:1",
                        profile=txs.NodeProfile(0, 0, "grid-0", "isp-0", 64500))


def _receipts(users: list[_Signer], worker: bytes, rounds: int, tag: str) -> list[list[bytes]]:
    """``rounds`` rounds of one signed receipt per user (each user's nonces in order)."""
    return [[u.sign(txs.JobReceipt, worker=worker, units=1, job_id=f"{tag}-{r}-{i}".encode())
             for i, u in enumerate(users)] for r in range(rounds)]


def measure_app(bench: CommitteeBench, home: Path, say) -> dict:
    members = [NodeIdentity.generate() for _ in range(bench.validators)]
    partner = _Signer()
    genesis = Genesis(CHAIN_ID, tuple(sorted(m.public.sign_key for m in members)),
                      (partner.ident.public.sign_key,))
    app = LedgerApp(home / "app-bench.sqlite")
    try:
        app.init_chain(pb.RequestInitChain(chain_id=CHAIN_ID, app_state_bytes=genesis.to_json()))
        worker = NodeIdentity.generate()

        def block(raw: list[bytes]) -> float:
            t0 = time.perf_counter()
            resp = app.finalize_block(pb.RequestFinalizeBlock(txs=raw, height=app.store.height + 1))
            app.commit(pb.RequestCommit())
            elapsed = time.perf_counter() - t0
            failed = sum(1 for r in resp.tx_results if r.code)
            if failed:
                raise RuntimeError(f"{failed} bench txs failed: {resp.tx_results[0].log}")
            return elapsed

        block([_register(partner, worker)])
        users = [_Signer() for _ in range(bench.block_txs)]
        say(f"app: signing {bench.app_blocks} x {bench.block_txs} job receipts")
        blocks = _receipts(users, worker.public.sign_key, bench.app_blocks + 1, "app")
        times = [block(raw) for raw in blocks[:-1]]  # no tx seen before: every signature checked
        t0 = time.perf_counter()
        for raw in blocks[-1]:
            if app.check_tx(pb.RequestCheckTx(tx=raw)).code:
                raise RuntimeError("a bench tx failed CheckTx")
        check_s = time.perf_counter() - t0
    finally:
        app.close()
    total = bench.app_blocks * bench.block_txs
    result = {"txs": total, "seconds": sum(times), "tx_per_s": total / sum(times),
              "block_s": times, "check_tx_per_s": bench.block_txs / check_s}
    say(f"app: {result['tx_per_s']:.0f} tx/s applied (FinalizeBlock + Commit), "
        f"CheckTx {result['check_tx_per_s']:.0f} tx/s")
    return result


def _heights(client: CommitteeClient, endpoints: list[str]) -> list[int]:
    return [(s.height if (s := client.status_of(e, timeout_s=2.0)) else -1) for e in endpoints]


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def agreement(client: CommitteeClient, endpoints: list[str]) -> dict:
    maps = []
    for endpoint in endpoints:
        status = client.status_of(endpoint, 1, 1_000_000)
        heights, hashes = list(status.heights), list(status.app_hashes)
        while status.heights and len(status.heights) == 1000:  # pages of 1,000 heights
            status = client.status_of(endpoint, heights[-1] + 1, heights[-1] + 1000)
            heights += status.heights
            hashes += status.app_hashes
        maps.append(dict(zip(heights, hashes)))
    top = max(max(m, default=0) for m in maps)
    disagree = [h for h in range(1, top + 1) if len({m[h] for m in maps if h in m}) > 1]
    return {"heights": top, "disagreements": disagree[:20], "agree": not disagree,
            "heights_held": [len(m) for m in maps]}


def _network(engine: str, bench: CommitteeBench, home: Path) -> CometNet | Devnet:
    if engine == "cometbft":
        return CometNet(CometNetConfig(home / "cometbft", bench.validators))
    return Devnet(DevnetConfig(home / "devnet", bench.validators))


def measure_engine(engine: str, bench: CommitteeBench, home: Path, say) -> dict:
    with _network(engine, bench, home) as net:
        client = CommitteeClient(net.endpoints, timeout_s=10.0)
        try:
            partner, worker = _Signer(net.partner, net.chain_id), NodeIdentity.generate()
            if not client.submit(_register(partner, worker)).ok:
                raise RuntimeError("could not register the bench worker")
            users = [_Signer(chain_id=net.chain_id) for _ in range(bench.latency_txs)]
            latencies = []
            for raw in _receipts(users, worker.public.sign_key, 1, "lat")[0]:
                t0 = time.perf_counter()
                outcome = client.submit(raw)
                latencies.append(time.perf_counter() - t0)
                if not outcome.ok:
                    raise RuntimeError(f"latency tx failed: {outcome.log}")
            say(f"{engine}: commit latency p50 {percentile(latencies, 50):.3f} s, "
                f"p99 {percentile(latencies, 99):.3f} s")
            burst_users = [_Signer(chain_id=net.chain_id) for _ in range(max(1, bench.burst_txs // 10))]
            burst = [tx for rnd in _receipts(burst_users, worker.public.sign_key, 10, "burst")
                     for tx in rnd][: bench.burst_txs]
            t0 = time.perf_counter()
            outcomes = client.submit_many(burst, timeout_s=120.0)
            burst_s = time.perf_counter() - t0
            burst_ok = sum(o.ok for o in outcomes)
            say(f"{engine}: burst of {len(burst)} txs committed in {burst_s:.2f} s "
                f"({burst_ok / burst_s:.0f} tx/s, {burst_ok} ok)")
            drill = _kill_drill(net, client, partner, say) if bench.kill_drill else None
            agree = agreement(client, net.endpoints)
        finally:
            client.close()
    return {"latency_s": latencies, "commit_latency_p50_s": percentile(latencies, 50),
            "commit_latency_p99_s": percentile(latencies, 99), "burst_txs": len(burst),
            "burst_ok": burst_ok, "burst_s": burst_s, "tx_per_s": burst_ok / burst_s,
            "kill_drill": drill, "agreement": agree}


def _kill_drill(net: CometNet | Devnet, client: CommitteeClient, partner: _Signer, say) -> dict:
    victim = len(net.endpoints) - 1
    others = [e for i, e in enumerate(net.endpoints) if i != victim]
    net.kill(victim)
    start = max(_heights(client, others))
    t0 = time.perf_counter()
    ok = sum(client.submit(partner.sign(txs.Vouch, subject=NodeIdentity.generate().public.sign_key)).ok
             for _ in range(10))
    _wait(lambda: max(_heights(client, others)) >= start + 20, 30.0)
    down_s = time.perf_counter() - t0
    committed = max(_heights(client, others)) - start
    net.restart(victim)
    target = max(_heights(client, others))
    t1 = time.perf_counter()
    caught = _wait(lambda: _heights(client, [net.endpoints[victim]])[0] >= target, 60.0)
    catch_up_s = time.perf_counter() - t1
    say(f"kill drill ({type(net).__name__}): {committed} blocks and {ok}/10 txs committed in {down_s:.1f} s with validator "
        f"{victim} down; after restart it caught up {target} heights in {catch_up_s:.2f} s")
    return {"victim": victim, "blocks_while_down": committed, "txs_while_down_ok": ok,
            "down_s": down_s, "caught_up": caught, "catch_up_s": catch_up_s, "catch_up_to": target}


def run(bench: CommitteeBench, say=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="permamesh-committee-") as tmp:
        home = Path(bench.home or tmp)
        home.mkdir(parents=True, exist_ok=True)
        app = measure_app(bench, home, say)
        engines = {engine: measure_engine(engine, bench, home, say) for engine in bench.engines}
    main_engine = bench.engines[0]
    main = engines[main_engine]
    drill = main["kill_drill"]
    summary = {
        "engine": main_engine,
        "commit_latency_p50_s": main["commit_latency_p50_s"],
        "commit_latency_p99_s": main["commit_latency_p99_s"],
        "tx_per_s": main["tx_per_s"],
        "app_tx_per_s": app["tx_per_s"], "check_tx_per_s": app["check_tx_per_s"],
        "app_hash_agree": main["agreement"]["agree"], "heights_checked": main["agreement"]["heights"],
        "validators": bench.validators,
        "kill_drill_blocks_while_down": None if drill is None else drill["blocks_while_down"],
        "kill_drill_catch_up_s": None if drill is None else drill["catch_up_s"],
        "beside": {e: {"commit_latency_p50_s": r["commit_latency_p50_s"], "commit_latency_p99_s":
                       r["commit_latency_p99_s"], "tx_per_s": r["tx_per_s"], "app_hash_agree": r["agreement"]["agree"]}
                   for e, r in engines.items() if e != main_engine},
        "targets": TARGETS,
    }
    summary["targets_met"] = (summary["commit_latency_p50_s"] <= TARGETS["commit_latency_p50_s"]
                              and summary["tx_per_s"] >= TARGETS["tx_per_s"] and summary["app_hash_agree"])
    return {"summary": summary, "app": app, "engines": engines, "bench": dataclasses.asdict(bench) | {
        "home": str(bench.home) if bench.home else None},
        "machine": {"python": platform.python_version(), "cpus": _cpus(), "load": "the benchmark alone; loopback"}}


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def plot_committee(report: dict, path: Path) -> None:
    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for engine, result in report["engines"].items():
        lat = sorted(result["latency_s"])
        a.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=engine)
    a.axvline(TARGETS["commit_latency_p50_s"], color="grey", linestyle="--", label="p50 target")
    a.set(xlabel="submit -> committed (s)", ylabel="share of txs", title="commit latency, one tx at a time")
    a.legend()
    names = list(report["engines"])
    b.bar(names, [report["engines"][n]["tx_per_s"] for n in names])
    b.axhline(TARGETS["tx_per_s"], color="grey", linestyle="--", label="target")
    b.set(ylabel="ledger tx/s committed", title=f"burst of {report['bench']['burst_txs']} pipelined txs")
    b.legend()
    save(fig, path)


def add_committee_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer txs and blocks (about a minute)")
    parser.add_argument("--validators", type=int, default=4, help="validators of each committee (count, default: 4)")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma-separated engines to measure, the first in the summary (default: cometbft,devnet)")
    parser.add_argument("--no-kill-drill", action="store_true", help="skip the SIGKILL drill")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")


def run_from_args(args: argparse.Namespace) -> int:
    bench = quick_bench() if args.quick else CommitteeBench()
    if args.validators < 1:
        raise SystemExit("permamesh bench committee: --validators must be >= 1")
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    if not engines or any(e not in ENGINES for e in engines):
        raise SystemExit(f"permamesh bench committee: --engines takes a comma-separated subset of {', '.join(ENGINES)}")
    bench = dataclasses.replace(bench, validators=args.validators, kill_drill=not args.no_kill_drill
                                and args.validators >= 4, engines=engines)
    report = run(bench)
    write_report(report, args.json, args.plot, plot_committee)
    s = report["summary"]
    beside = "".join(f"; {e}: p50 {r['commit_latency_p50_s']:.3f} s, {r['tx_per_s']:.0f} tx/s"
                     for e, r in s["beside"].items())
    print(f"{s['engine']}: commit latency p50 {s['commit_latency_p50_s']:.3f} s, p99 {s['commit_latency_p99_s']:.3f} s, "
          f"{s['tx_per_s']:.0f} tx/s committed, app hashes agree: {s['app_hash_agree']} (bare app "
          f"{s['app_tx_per_s']:.0f} tx/s{beside})")
    if args.json:
        print(f"wrote {args.json}")
    return 0
