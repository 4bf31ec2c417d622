"""``permamesh bench verify``: does the committee's verification catch cheaters, spare honest
workers, and keep up?

One run, one registered model (SmolLM2 by default; a peaked tiny random model with --quick):

- **calibration**: honest answers (``same`` weights and ``bf16``-rounded ones) scored by the
  reference: the mean |reported - reference| log-prob gap per answer (the honest noise floor the
  credit's ``agree_tol`` must clear) and the typicality z of sampled answers.
- **epochs**: every node (honest nodes on fp32, bf16-rounded and optionally llama.cpp, and
  each cheater of the zoo) answers the challenges of each epoch exactly as a committee member
  plans and draws them (:mod:`permamesh.bench.verifyepochs` over ``committee/duties.py``:
  ``challenges_per_epoch`` of its reputation, scheduled times, random entries, max_tokens and
  seeds as users send them, later chat turns); each answer is teacher-forced up to a scoring
  budget drawn in [``budget_min``, ``answer_cap``]; the epoch credit is the minimum, zeroed when
  the node breaks the sampling contract; the fixed-point reputation rule updates. A node is
  excluded when untrusted.
- **adaptive dodgers**: trained on a labelled history of the same duties and user traffic,
  they also see 60 user requests an epoch; ``compute_saved`` is the share of user requests
  they answered with layers skipped times the half of compute that saves.
- **honest node-epochs**: ``honest nodes x epochs`` (the false-exclusion count).
- **throughput**: verifications per minute of scoring time, over every answer scored.

Indistinguishability of what the duties send is a test of its own, over a real worker's wire
(``tests/verify/test_indistinguishable.py``). ``--json PATH`` writes a ``summary`` with
``verifications_per_minute``, ``max_epochs_to_exclude_fulltime``,
``max_epochs_to_exclude_contract``, ``adaptive_dodger`` (epochs to exclusion, compute saved),
``false_exclusions`` and ``honest_node_epochs``.

Who calls it: :mod:`permamesh.cli` (``permamesh bench verify``) and tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from permamesh.bench.stats import write_report
from permamesh.bench.verifyepochs import Epochs, train
from permamesh.bench.verifyepochs import history as labelled_history
from permamesh.bench.verifyzoo import CHEATERS, CONTRACT, FULL_TIME, HONEST_KINDS, SAVING, Zoo, load_reference
from permamesh.committee.duties import DutyConfig
from permamesh.verify import reputation as rep
from permamesh.verify.dodger import AdaptiveDodger
from permamesh.verify.verifier import Verifier, epoch_credit
from permamesh.workers import models
from permamesh.bench.verifyplot import plot_verify

log = logging.getLogger(__name__)

__all__ = ["VerifyBench", "plot_verify", "quick_bench", "run", "run_from_args"]

TARGETS = {"fulltime_epochs": 3, "parttime_epochs": 10, "verifications_per_minute": 100, "honest_node_epochs": 1000}


@dataclasses.dataclass(frozen=True)
class VerifyBench:
    model: str = models.DEFAULT_MODEL
    epochs: int = 12  # epochs every node is challenged for
    honest_nodes: int = 4  # per honest kind
    cheater_copies: int = 1  # nodes per full-time cheater kind (they behave the same every time)
    chance_copies: int = 6  # nodes per part-time cheater and dodger, each its own seed (they cheat by chance)
    answer_cap: int = 48  # scoring budget's upper end: tokens teacher-forced per answer at most (CPU budget)
    budget_min: int = 16  # its lower end (drawn per challenge, never sent)
    llamacpp_nodes: int = 0  # honest nodes serving the GGUF through llama.cpp (real model only)
    train_epochs: int = 60  # epochs of labelled history each adaptive dodger trains on
    seed: int = 0
    quick: bool = False
    data_dir: Path | None = None
    follow_excluded: bool = False  # keep challenging excluded cheaters (to plot how they fare later)
    honest_only: bool = False  # no cheaters: a long soak for the false-exclusion count


def quick_bench(seed: int = 0, data_dir: Path | None = None) -> VerifyBench:
    return VerifyBench(model=models.TINY_RANDOM, epochs=8, honest_nodes=5, chance_copies=2, answer_cap=16,
                       budget_min=8, train_epochs=30, seed=seed, quick=True, data_dir=data_dir)


def _nodes(bench: VerifyBench, zoo: Zoo) -> dict:
    nodes = {f"honest-{kind}-{i}": zoo.honest(kind, f"honest-{kind}-{i}")
             for kind in HONEST_KINDS for i in range(bench.honest_nodes)}
    nodes.update({f"honest-llamacpp-{i}": zoo.honest("llamacpp", f"honest-llamacpp-{i}")
                  for i in range(bench.llamacpp_nodes)})
    nodes.update({f"{kind}-{i}": zoo.cheater(kind, i) for kind in (() if bench.honest_only else CHEATERS)
                  for i in range(bench.cheater_copies if kind in FULL_TIME + CONTRACT else bench.chance_copies)})
    return nodes


def run(bench: VerifyBench, say: Callable[[str], None] = print,
        checkpoint: Callable[[dict], None] | None = None) -> dict:
    """The whole benchmark; ``checkpoint`` gets the report so far after every epoch
    (``complete`` false), so a long run that is stopped still leaves its figures."""
    started = time.monotonic()
    ref = load_reference(bench.model, bench.data_dir, bench.seed)
    verifier = Verifier(ref)
    zoo = Zoo(ref, bench.seed)
    config = rep.ReputationConfig()
    nodes = _nodes(bench, zoo)
    engines = {name: "llamacpp" for name in nodes if name.startswith("honest-llamacpp-")}
    duty = DutyConfig(budget_min=bench.budget_min, budget_max=bench.answer_cap, pace=False, seed=bench.seed)
    member = Epochs(verifier, ref.name, duty, bench.seed, bench.epochs)
    dodgers = sorted(name for name, node in nodes.items() if isinstance(node, AdaptiveDodger))
    labelled = (labelled_history(sorted(nodes), dodgers, ref.name, duty, bench.seed, bench.train_epochs,
                                 fits=verifier.fits)
                if dodgers else None)
    trained = {name: train(nodes[name], sorted(nodes), labelled, bench.seed + i) for i, name in enumerate(dodgers)}
    states = {name: rep.NodeReputation.initial(config) for name in nodes}
    history: dict[str, list[dict]] = {name: [] for name in nodes}
    calibration: dict[str, list[dict]] = {kind: [] for kind in HONEST_KINDS + ("llamacpp",)}

    def calibrate(name, req, credit) -> None:
        if name.startswith("honest-"):
            calibration[name.split("-")[1]].append({"greedy": req.temperature == 0.0, "diff": credit.mean_abs_diff,
                                                    "z": credit.typicality_z, "credit": credit.credit})

    say(f"  verify: {len(nodes)} nodes on {ref.name}, {bench.epochs} epochs")
    for epoch in range(1, bench.epochs + 1):
        counts = {name: rep.challenges_per_epoch(states[name], config) for name in nodes
                  if bench.follow_excluded or rep.is_trusted(states[name], config)}
        got = member.run(epoch, nodes, engines, counts, calibrate)
        for name, credits in got.items():
            contract_ok = member.contract_ok(name, credits, engines.get(name, "torch"))
            credit = epoch_credit(credits) if contract_ok else 0
            states[name] = state = rep.update(states[name], credit, config)
            worst = min(credits, key=lambda c: c.credit).reason if credits else ""
            history[name].append({"epoch": epoch, "challenges": len(credits), "credit_ppm": credit,
                                  "credits_ppm": [c.ppm for c in credits], "reputation_ppm": state.reputation_ppm,
                                  "trusted": rep.is_trusted(state, config), "contract_ok": contract_ok,
                                  "worst": worst if contract_ok else member.verdicts.get(name, "")})
        member.close_epoch()
        out = sum(not rep.is_trusted(states[n], config) for n in nodes if not n.startswith("honest-"))
        low = min(states[n].reputation_ppm for n in nodes if n.startswith("honest-")) / 1e6
        say(f"  epoch {epoch}/{bench.epochs}: {out} cheaters excluded; lowest honest reputation {low:.2f}; "
            f"{verifier.scored} answers scored")
        if checkpoint is not None and epoch < bench.epochs:
            checkpoint(_report(bench, ref, verifier, config, calibration, history, nodes, epoch, started, trained))
    report = _report(bench, ref, verifier, config, calibration, history, nodes, bench.epochs, started, trained)
    say("summary: " + str(report["summary"]))
    return report


def _dodgers(nodes: dict, trained: dict) -> dict:
    out = {}
    for name, node in nodes.items():
        if isinstance(node, AdaptiveDodger):
            out[name] = {"trained_on": trained.get(name), "user_requests": node.users,
                         "user_requests_cheated": node.users_cheated, "challenges": node.challenges,
                         "challenges_cheated": node.challenges_cheated,
                         "compute_saved": round(node.saved * SAVING["layers-skipped"], 4)}
    return out


def _report(bench, ref, verifier, config, calibration, history, nodes, epochs_done: int, started: float,
            trained: dict | None = None) -> dict:
    report = {
        "benchmark": "verify", "quick": bench.quick, "seed": bench.seed, "model": ref.name,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(bench).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "credit_configs": {engine: dataclasses.asdict(c) for engine, c in verifier.configs.items()},
        "adaptive_dodgers": _dodgers(nodes, trained or {}),
        "reputation_config": dataclasses.asdict(config),
        "calibration": _calibration(calibration),
        "nodes": history,
        "scored": verifier.scored, "scoring_s": round(verifier.busy_s, 3),
        "epochs_done": epochs_done, "complete": epochs_done == bench.epochs,
    }
    report["summary"] = _summary(report, nodes, dataclasses.replace(bench, epochs=epochs_done))
    report["wall_s"] = round(time.monotonic() - started, 2)
    return report


def from_good_standing(p_cheat: float, detect: float, config: rep.ReputationConfig, epochs: int = 10,
                       runs: int = 20_000, seed: int = 0) -> dict:
    """A part-time cheater that turns to cheating after long good standing (R = 1, a clean
    window): each of its challenges (``challenges_per_epoch``, rising as R falls) is cheated
    with probability ``p_cheat`` and a cheated one fails with probability ``detect``; an epoch
    with a failure has credit 0, else 1. Monte Carlo over the fixed-point rule: the share
    excluded within ``epochs`` and the mean epochs to exclusion of those."""
    rng = random.Random(seed)
    start = rep.NodeReputation.initial(config)
    for _ in range(3 * config.window):
        start = rep.update(start, rep.PPM, config)
    hits = []
    for _ in range(runs):
        state = start
        for epoch in range(1, epochs + 1):
            k = rep.challenges_per_epoch(state, config)
            caught = any(rng.random() < p_cheat and rng.random() < detect for _ in range(k))
            state = rep.update(state, 0 if caught else rep.PPM, config)
            if not rep.is_trusted(state, config):
                hits.append(epoch)
                break
    return {"p_cheat": p_cheat, "detect": detect, "runs": runs, "within": epochs,
            "share_excluded": len(hits) / runs, "mean_epochs": statistics.fmean(hits) if hits else None}


def _detection(history: dict[str, list[dict]], kind: str = "layers-skipped") -> float:
    """Share of a full-time cheater's answers that failed (credit < 0.4): how often one cheated
    answer of that kind is caught."""
    credits = [c for name, rows in history.items() if name.startswith(kind) for r in rows
               for c in r.get("credits_ppm", ())]
    return sum(c < 400_000 for c in credits) / len(credits) if credits else 1.0


def _calibration(samples: dict[str, list[dict]]) -> dict:
    out = {}
    for kind, rows in samples.items():
        diffs = sorted(r["diff"] for r in rows)
        zs = sorted(r["z"] for r in rows if r["z"] is not None)
        out[kind] = {"answers": len(rows), "mean_abs_diff_p50": statistics.median(diffs) if diffs else None,
                     "mean_abs_diff_max": diffs[-1] if diffs else None,
                     "typicality_z_min": zs[0] if zs else None, "typicality_z_p50": statistics.median(zs) if zs else None,
                     "credit_min": min((r["credit"] for r in rows), default=None)}
    return out


def _excluded_at(rows: list[dict]) -> int | None:
    return next((r["epoch"] for r in rows if not r["trusted"]), None)


def _summary(report: dict, nodes: dict, bench: VerifyBench) -> dict:
    history = report["nodes"]
    per_kind: dict[str, list[int | None]] = {}
    for name in nodes:
        if not name.startswith("honest-"):
            per_kind.setdefault(name.rsplit("-", 1)[0], []).append(_excluded_at(history[name]))
    honest = [name for name in nodes if name.startswith("honest-")]
    never = bench.epochs + 1  # a node never excluded counts as "more than the run"
    minutes = report["scoring_s"] / 60.0
    honest_part = {
        "verifications_per_minute": round(report["scored"] / minutes, 1) if minutes > 0 else None,
        "false_exclusions": sum(_excluded_at(history[name]) is not None for name in honest),
        "honest_node_epochs": len(honest) * bench.epochs,
        "honest_min_credit": min(min(r["credit_ppm"] for r in history[name]) for name in honest) / 1e6,
        "model": report["model"],
    }
    if bench.honest_only:
        return honest_part
    fulltime = [e for kind in FULL_TIME for e in per_kind[kind]]
    return {**honest_part,
        "epochs_to_exclude": {kind: values for kind, values in per_kind.items()},
        "max_epochs_to_exclude_fulltime": max(never if e is None else e for e in fulltime),
        "epochs_to_exclude_parttime20": max(never if e is None else e for e in per_kind["part-time-20"]),
        "parttime20_excluded_within_10": sum(e is not None and e <= 10 for e in per_kind["part-time-20"]),
        "parttime20_nodes": len(per_kind["part-time-20"]),
        "epochs_to_exclude_dodger": max(never if e is None else e for e in per_kind["dodger"]),
        "max_epochs_to_exclude_contract": {kind: max(never if e is None else e for e in per_kind[kind])
                                           for kind in CONTRACT},
        "adaptive_dodger": {"epochs_to_exclude": per_kind["adaptive-dodger"],
                            "max_compute_saved": max((d["compute_saved"] for d in report["adaptive_dodgers"].values()),
                                                     default=None),
                            "challenges_cheated": sum(d["challenges_cheated"] for d in report["adaptive_dodgers"].values())},
        "parttime20_from_good_standing": from_good_standing(0.2, _detection(history),
                                                            rep.ReputationConfig(**report["reputation_config"]),
                                                            runs=2_000 if bench.quick else 20_000, seed=bench.seed),
    }


def add_verify_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny random model, fewer nodes (well under a minute)")
    parser.add_argument("--model", default=None, help="registered model (default: smollm2-135m; tiny-random with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per node (default: 12; 10 with --quick)")
    parser.add_argument("--honest-nodes", type=int, default=None,
                        help="honest nodes per kind (same weights, bf16-rounded weights; default: 4; 10 with --quick)")
    parser.add_argument("--answer-cap", type=int, default=None,
                        help="scoring budget's upper end, tokens teacher-forced per answer (default: 48; 16 quick)")
    parser.add_argument("--chance-copies", type=int, default=None,
                        help="nodes per part-time cheater and dodger kind (default: 6; 2 with --quick)")
    parser.add_argument("--llamacpp-nodes", type=int, default=None,
                        help="honest nodes serving the GGUF through llama.cpp (default: 0; real model only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of challenges and cheaters (default: 0)")
    parser.add_argument("--honest-only", action="store_true",
                        help="no cheaters: only honest nodes, for a long false-exclusion soak")
    parser.add_argument("--follow-excluded", action="store_true",
                        help="keep challenging cheaters after their exclusion (their later reputation is plotted)")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot of reputation over epochs here")


def run_from_args(args: argparse.Namespace, data_dir: Path) -> int:
    bench = quick_bench(args.seed, data_dir) if args.quick else VerifyBench(seed=args.seed, data_dir=data_dir)
    changes = {k: v for k, v in (("model", args.model), ("epochs", args.epochs), ("honest_nodes", args.honest_nodes),
                                 ("answer_cap", args.answer_cap), ("follow_excluded", args.follow_excluded or None),
                                 ("llamacpp_nodes", getattr(args, "llamacpp_nodes", None)),
                                 ("chance_copies", getattr(args, "chance_copies", None)),
                                 ("honest_only", args.honest_only or None))
               if v is not None}
    bench = dataclasses.replace(bench, **changes)
    if bench.answer_cap < bench.budget_min:
        bench = dataclasses.replace(bench, budget_min=bench.answer_cap)
    if bench.epochs < 1 or bench.honest_nodes < 1 or bench.answer_cap < 1:
        raise SystemExit("permamesh bench verify: --epochs, --honest-nodes and --answer-cap must be >= 1")
    report = run(bench, checkpoint=(lambda partial: write_report(partial, args.json, None, plot_verify))
                 if args.json else None)
    write_report(report, args.json, args.plot, plot_verify)
    for path in (args.json, args.plot):
        if path:
            print(f"wrote {path}")
    return 0
