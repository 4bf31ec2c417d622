"""``permamesh bench verify``: does the committee's verification catch cheaters, spare honest
workers, and keep up?

One run, one registered model (SmolLM2 by default; a peaked tiny random model with --quick):

- **calibration**: honest answers (``same`` weights and ``bf16``-rounded ones) scored by the
  reference: the mean |reported - reference| log-prob gap per answer (the honest noise floor the
  credit's ``agree_tol`` must clear) and the typicality z of sampled answers.
- **epochs**: every node (honest nodes of both kinds, and each cheater of the zoo) answers the
  challenges of each epoch: ``challenges_per_epoch`` of its reputation (3 at good standing, up
  to 9 when low), drawn from a :class:`ChallengePool` shaped by the user-traffic model. Each
  answer is scored for real (teacher-forced pass of the reference), the epoch credit is the
  minimum, and the fixed-point reputation rule updates. A node is excluded when untrusted.
- **honest node-epochs**: ``honest_nodes x epochs`` (the false-exclusion count).
- **throughput**: verifications per minute of scoring time, over every answer scored.

Answers are capped at ``answer_cap`` tokens (their max_tokens otherwise come from the traffic
model) so the CPU can afford hundreds of node-epochs; indistinguishability of the challenges
themselves is a test of its own (tests/verify/test_challenges.py). ``--json PATH`` writes a
``summary`` with ``verifications_per_minute``, ``max_epochs_to_exclude_fulltime``,
``epochs_to_exclude_parttime20``, ``false_exclusions`` and ``honest_node_epochs``.

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
from permamesh.bench.verifyzoo import CHEATERS, FULL_TIME, HONEST_KINDS, Zoo, load_reference
from permamesh.verify import reputation as rep
from permamesh.verify.challenges import ChallengePool
from permamesh.verify.profile import TrafficProfile
from permamesh.verify.traffic import user_requests
from permamesh.verify.verifier import Verifier, epoch_credit
from permamesh.workers import models
from permamesh.bench.plot import pyplot, save

log = logging.getLogger(__name__)

TARGETS = {"fulltime_epochs": 3, "parttime_epochs": 10, "verifications_per_minute": 100, "honest_node_epochs": 1000}


@dataclasses.dataclass(frozen=True)
class VerifyBench:
    model: str = models.DEFAULT_MODEL
    epochs: int = 12  # epochs every node is challenged for
    honest_nodes: int = 4  # per honest kind
    cheater_copies: int = 1  # nodes per full-time cheater kind (they behave the same every time)
    chance_copies: int = 6  # nodes per part-time cheater and dodger, each its own seed (they cheat by chance)
    answer_cap: int = 32  # tokens per answer at most (CPU budget)
    seed: int = 0
    quick: bool = False
    data_dir: Path | None = None
    follow_excluded: bool = False  # keep challenging excluded cheaters (to plot how they fare later)
    honest_only: bool = False  # no cheaters: a long soak for the false-exclusion count


def quick_bench(seed: int = 0, data_dir: Path | None = None) -> VerifyBench:
    return VerifyBench(model=models.TINY_RANDOM, epochs=10, honest_nodes=10, chance_copies=3, answer_cap=12, seed=seed,
                       quick=True, data_dir=data_dir)


def _pool(seed: int) -> tuple[ChallengePool, TrafficProfile]:
    traffic = [req for _, req in user_requests(600, seed, 1.0)]
    profile = TrafficProfile.observe(traffic)
    pool = ChallengePool(profile)
    for req in traffic[::3]:  # consented samples from other traffic than what workers are tested on
        pool.add_consented(req)
    return pool, profile


def run(bench: VerifyBench, say: Callable[[str], None] = print,
        checkpoint: Callable[[dict], None] | None = None) -> dict:
    """The whole benchmark; ``checkpoint`` gets the report so far after every epoch
    (``complete`` false), so a long run that is stopped still leaves its figures."""
    started = time.monotonic()
    ref = load_reference(bench.model, bench.data_dir, bench.seed)
    verifier = Verifier(ref)
    zoo = Zoo(ref, bench.seed)
    pool, _ = _pool(bench.seed)
    rng = random.Random(bench.seed)
    config = rep.ReputationConfig()
    nodes = {f"honest-{kind}-{i}": zoo.honest(kind, f"honest-{kind}-{i}")
             for kind in HONEST_KINDS for i in range(bench.honest_nodes)}
    nodes.update({f"{kind}-{i}": zoo.cheater(kind, i) for kind in (() if bench.honest_only else CHEATERS)
                  for i in range(bench.cheater_copies if kind in FULL_TIME else bench.chance_copies)})
    states = {name: rep.NodeReputation.initial(config) for name in nodes}
    history: dict[str, list[dict]] = {name: [] for name in nodes}
    calibration: dict[str, list[dict]] = {kind: [] for kind in HONEST_KINDS}
    say(f"  verify: {len(nodes)} nodes on {ref.name}, {bench.epochs} epochs")
    for epoch in range(1, bench.epochs + 1):
        for name, node in nodes.items():
            state = states[name]
            if not bench.follow_excluded and not rep.is_trusted(state, config):
                continue  # its exclusion epoch is known; challenging it further only costs time
            credits = []
            for _ in range(rep.challenges_per_epoch(state, config)):
                challenge = pool.draw(rng)
                req = dataclasses.replace(challenge.request,
                                          max_tokens=min(challenge.request.max_tokens, bench.answer_cap))
                answer = node(req)
                credit = verifier.score(req, answer)
                credits.append(credit)
                if name.startswith("honest-"):
                    kind = name.split("-")[1]
                    calibration[kind].append({"greedy": req.temperature == 0.0, "diff": credit.mean_abs_diff,
                                              "z": credit.typicality_z, "credit": credit.credit})
            states[name] = state = rep.update(state, epoch_credit(credits), config)
            history[name].append({"epoch": epoch, "challenges": len(credits), "credit_ppm": epoch_credit(credits),
                                  "credits_ppm": [c.ppm for c in credits],
                                  "reputation_ppm": state.reputation_ppm, "trusted": rep.is_trusted(state, config),
                                  "worst": min(credits, key=lambda c: c.credit).reason if credits else ""})
        out = sum(not rep.is_trusted(states[n], config) for n in nodes if not n.startswith("honest-"))
        low = min(states[n].reputation_ppm for n in nodes if n.startswith("honest-")) / 1e6
        say(f"  epoch {epoch}/{bench.epochs}: {out} cheaters excluded; lowest honest reputation {low:.2f}; "
            f"{verifier.scored} answers scored")
        if checkpoint is not None and epoch < bench.epochs:
            checkpoint(_report(bench, ref, verifier, config, calibration, history, nodes, epoch, started))
    report = _report(bench, ref, verifier, config, calibration, history, nodes, bench.epochs, started)
    say("summary: " + str(report["summary"]))
    return report


def _report(bench, ref, verifier, config, calibration, history, nodes, epochs_done: int, started: float) -> dict:
    report = {
        "benchmark": "verify", "quick": bench.quick, "seed": bench.seed, "model": ref.name,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(bench).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "credit_config": dataclasses.asdict(verifier.config),
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
        "parttime20_from_good_standing": from_good_standing(0.2, _detection(history),
                                                            rep.ReputationConfig(**report["reputation_config"]),
                                                            runs=2_000 if bench.quick else 20_000, seed=bench.seed),
    }


def plot_verify(report: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(12, 6))
    floor = report["reputation_config"]["floor_ppm"] / 1e6
    start = report["reputation_config"]["initial_ppm"] / 1e6
    for name, rows in sorted(report["nodes"].items()):
        honest = name.startswith("honest-")
        if (honest or "part-time" in name or "dodger" in name) and not name.endswith("-0"):
            continue  # one line per kind keeps the plot readable (the JSON has every node)
        ax.plot([0] + [r["epoch"] for r in rows], [start] + [r["reputation_ppm"] / 1e6 for r in rows],
                marker="" if honest else "o", linewidth=2.5 if honest else 1.2, label=name.removesuffix("-0"))
    ax.axhline(floor, color="red", linestyle="--", label=f"trust floor {floor:g}")
    ax.set_xlabel("epoch (a cheater's line ends when it is excluded)")
    ax.set_ylabel("reputation R(T)")
    ax.set_ylim(0, 1.02)
    s = report["summary"]
    caught = (f"full-time cheaters out by epoch {s['max_epochs_to_exclude_fulltime']}, 20% part-time by "
              f"{s['epochs_to_exclude_parttime20']},\n" if "max_epochs_to_exclude_fulltime" in s else "honest only: ")
    ax.set_title(f"verification bench, {report['model']} ({'quick' if report['quick'] else 'full'}): {caught}"
                 f"{s['false_exclusions']} false exclusions in {s['honest_node_epochs']} honest node-epochs, "
                 f"{s['verifications_per_minute']} verifications/min", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, path)


def add_verify_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny random model, fewer nodes (well under a minute)")
    parser.add_argument("--model", default=None, help="registered model (default: smollm2-135m; tiny-random with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per node (default: 12; 10 with --quick)")
    parser.add_argument("--honest-nodes", type=int, default=None,
                        help="honest nodes per kind (same weights, bf16-rounded weights; default: 4; 10 with --quick)")
    parser.add_argument("--answer-cap", type=int, default=None, help="tokens per answer at most (default: 32; 16 quick)")
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
                                 ("honest_only", args.honest_only or None))
               if v is not None}
    bench = dataclasses.replace(bench, **changes)
    if bench.epochs < 1 or bench.honest_nodes < 1 or bench.answer_cap < 1:
        raise SystemExit("permamesh bench verify: --epochs, --honest-nodes and --answer-cap must be >= 1")
    report = run(bench, checkpoint=(lambda partial: write_report(partial, args.json, None, plot_verify))
                 if args.json else None)
    write_report(report, args.json, args.plot, plot_verify)
    for path in (args.json, args.plot):
        if path:
            print(f"wrote {path}")
    return 0
