"""``permamesh bench routing``: policies compared on one trace, in simulation or for real.

Every policy in one run sees the same trace. ``--mode sim`` replays it through the
discrete-event simulator (:mod:`permamesh.bench.sim`) at hundreds of workers, with costs
calibrated from measured worker rates; ``--mode real`` replays it against real worker
processes on loopback (:mod:`permamesh.bench.real`). The JSON report holds each policy's
summary (:func:`permamesh.bench.stats.summarize`) and a top-level ``summary`` of ratios
measured in the same run:

- ``ttft_mean_ratio_vs_round_robin``: permamesh mean TTFT / round-robin mean TTFT
- ``p99_e2e_ratio_vs_least_loaded``: permamesh p99 end-to-end / least-loaded p99 end-to-end
- ``sync_bytes_ratio_full_vs_delta``: bytes a full-tree broadcast would send / delta bytes
- ``lost_requests``: requests that failed, over all policies

Who calls it: the CLI (:mod:`permamesh.cli`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable

from permamesh.bench.stats import summarize, write_report
from permamesh.bench.traces import GENERATORS, BenchError, TraceRequest, load_trace, multi_turn
from permamesh.routing.policy import POLICY_NAMES

log = logging.getLogger(__name__)

BASELINES = ("round-robin", "least-loaded")


@dataclasses.dataclass(frozen=True)
class RoutingBench:
    mode: str = "sim"  # sim or real
    trace: Path | None = None  # a JSONL trace; None = generate one
    generator: str = "multi-turn"
    requests: int = 0  # 0 = the mode's default
    rate_per_s: float = 0.0  # arrivals per second, 0 = the mode's default
    workers: int = 0  # 0 = the mode's default
    policies: tuple[str, ...] = POLICY_NAMES
    seed: int = 0
    quick: bool = False
    data_dir: Path = Path(".")
    model: str = "smollm2-135m"
    model_path: str | None = None
    kill_at_s: float | None = None  # real mode: SIGKILL one worker this far into each run
    cache_blocks: int = 4096  # sim: blocks each worker's cache holds
    max_active: int = 4  # real: requests each worker decodes at once (1 = one at a time)


# (workers, requests, rate/s) per mode; quick variants finish in under a minute here
DEFAULTS = {
    ("sim", False): (128, 20000, 0.0),
    ("sim", True): (100, 4000, 0.0),
    ("real", False): (4, 48, 0.0),
    ("real", True): (4, 16, 0.0),
}


def _trace(b: RoutingBench, requests: int, rate: float) -> list[TraceRequest]:
    if b.trace is not None:
        return load_trace(b.trace)
    if b.mode == "real" and b.generator == "multi-turn" and b.quick:
        # A smoke run (tiny-random in-process workers by default): 4 chats of 4 turns, quick
        # replies, contexts that fit tiny-random's byte tokenizer.
        sessions = -(-requests // 4)
        return multi_turn(sessions, 4, rate * 8, b.seed, system_prompts=0, system_words=(80, 160),
                          user_words=(5, 15), answer_tokens=(8, 16), think_min_s=0.05, think_mean_s=0.15)[:requests]
    if b.mode == "real" and b.generator == "multi-turn":
        # Real mode on 2 CPU cores: chats sized for SmolLM2's speed (~180 prompt tok/s and
        # ~15 tok/s decode per single-thread worker) and its 8k context: 4 turns, each chat
        # with its own context of 300-700 words (a pasted document, a long instruction),
        # short questions and answers, quick replies.
        turns = 4
        sessions = -(-requests // turns)
        return multi_turn(sessions, turns, rate, b.seed, system_prompts=0, system_words=(300, 700),
                          user_words=(8, 30), answer_tokens=(16, 40), think_min_s=1.0, think_mean_s=3.0)[:requests]
    if b.generator not in GENERATORS:
        raise BenchError(f"unknown generator {b.generator!r}: one of {sorted(GENERATORS)}")
    return GENERATORS[b.generator](requests, rate, b.seed)


def run(b: RoutingBench, say: Callable[[str], None] = print) -> dict:
    for needed in ("permamesh", *BASELINES):
        if needed not in b.policies:
            raise BenchError(f"policies must include {needed!r} (the summary compares against it)")
    workers, requests, rate = DEFAULTS[(b.mode, b.quick)]
    workers, requests = b.workers or workers, b.requests or requests
    rate = b.rate_per_s or rate or _default_rate(b.mode, workers)
    trace = _trace(b, requests, rate)
    say(f"routing bench: mode {b.mode}, {len(trace)} requests ({b.trace or b.generator}), {workers} workers, "
        f"policies {', '.join(b.policies)}")
    started = time.monotonic()
    runs = _run_sim(b, trace, workers) if b.mode == "sim" else _run_real(b, trace, workers, say)
    by_policy = {p: r["summary"] for p, r in runs.items()}
    mesh = by_policy["permamesh"]
    sync = runs["permamesh"]["sync"]
    report = {
        "benchmark": "routing",
        "mode": b.mode,
        "trace": str(b.trace) if b.trace else b.generator,
        "requests": len(trace),
        "workers": workers,
        "seed": b.seed,
        "max_active": b.max_active if b.mode == "real" else None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "policies": by_policy,
        "sync": sync,
        "wall_s": round(time.monotonic() - started, 2),
        "summary": {
            "ttft_mean_ratio_vs_round_robin": mesh["ttft_mean_s"] / by_policy["round-robin"]["ttft_mean_s"],
            "p99_e2e_ratio_vs_least_loaded": mesh["e2e_p99_s"] / by_policy["least-loaded"]["e2e_p99_s"],
            "sync_bytes_ratio_full_vs_delta": sync.get("ratio_full_vs_delta", 0.0),
            "lost_requests": sum(s["failed"] for s in by_policy.values()),
            "cache_hit_rate_permamesh": mesh["cache_hit_rate"],
            "cache_hit_rate_round_robin": by_policy["round-robin"]["cache_hit_rate"],
        },
    }
    for policy, s in by_policy.items():
        say(f"  {policy:<13} ttft mean {s['ttft_mean_s']:.3f} s  p99 {s['ttft_p99_s']:.3f} s  "
            f"e2e p99 {s['e2e_p99_s']:.3f} s  cache hit {s['cache_hit_rate']:.2f}  failed {s['failed']}"
            + (f" ({'; '.join(s['errors'])})" if s.get("errors") else ""))
    say("summary: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in report["summary"].items()}))
    return report


def _default_rate(mode: str, workers: int) -> float:
    """Arrivals per second: sim, 70% of the capacity of workers that never hit their cache
    (a cold multi-turn request costs ~7.1 s of service); real, what 2 CPU workers sustain."""
    return 0.098 * workers if mode == "sim" else 0.12 * workers


def _run_sim(b: RoutingBench, trace: list[TraceRequest], workers: int) -> dict:
    from permamesh.bench.sim import SimConfig, simulate, word_tokenizer
    from permamesh.bench.syncreplay import replay_sync

    out = {}
    for policy in b.policies:
        cfg = SimConfig(workers=workers, policy=policy, seed=b.seed, cache_blocks_per_worker=b.cache_blocks)
        records = simulate(trace, cfg, word_tokenizer)
        sync = replay_sync(trace, records, word_tokenizer, cfg.block_size, cfg.cache_blocks_per_worker) if policy == "permamesh" else {}
        out[policy] = {"summary": summarize(records), "sync": sync}
    return out


def _run_real(b: RoutingBench, trace: list[TraceRequest], workers: int, say: Callable[[str], None]) -> dict:
    from permamesh.bench.real import RealConfig, run_policy
    from permamesh.workers import models

    if b.model_path or b.model != models.TINY_RANDOM:
        models.resolve(b.model, b.model_path, b.data_dir)  # convert once, before workers start
    threads = max(1, (os.cpu_count() or 1) // workers)
    cfg = RealConfig(b.data_dir, workers, b.model, b.model_path, threads, kill_at_s=b.kill_at_s, seed=b.seed,
                     in_process=b.quick, max_active=b.max_active)
    out = {}
    for policy in b.policies:
        result = run_policy(trace, policy, cfg, say)
        delta = sum(s.sync_delta_bytes for s in result.statuses)
        full = sum(s.sync_full_tree_bytes for s in result.statuses)
        sync = {"delta_bytes": delta, "full_tree_bytes": full, "snapshot_bytes": sum(s.sync_snapshot_bytes for s in result.statuses),
                "forwarded": sum(s.forwarded for s in result.statuses), "ratio_full_vs_delta": full / delta if delta else 0.0}
        out[policy] = {"summary": summarize(result.records, result.workers), "sync": sync}
    return out


def write_outputs(report: dict, json_path: Path | None, plot_path: Path | None) -> None:
    def plot(report: dict, path: Path) -> None:
        from permamesh.bench.plot import plot_routing

        plot_routing(report, path)

    write_report(report, json_path, plot_path, plot)
