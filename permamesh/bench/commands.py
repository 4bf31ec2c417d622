"""``permamesh bench ...``: the benchmark subcommands, their options and their dispatch.

Each benchmark module owns its options (``add_*_bench_arguments``) and its run
(``run_from_args``); this module only puts them under ``permamesh bench`` and picks one.
Imports are lazy: the CLI's start stays fast.

Who calls it: :mod:`permamesh.cli`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from permamesh.routing.policy import POLICY_NAMES


def add_bench_parser(sub, common: Callable[[argparse.ArgumentParser], None],
                     model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``bench`` and its benchmarks to the CLI's subparsers; ``common`` and ``model_args``
    add the CLI's shared options (data dir, log level; model selection)."""
    _common, _model_args = common, model_args
    b = sub.add_parser("bench", help="benchmarks that write JSON (and PNG) reports", description="Run a benchmark; figures are ratios against baselines measured in the same run.")
    bsub = b.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    r = bsub.add_parser("routing", help="routing policies on a trace (sim or real workers)",
                        description="Compare random, round-robin, least-loaded, cache-aware and permamesh routing on one trace.")
    _common(r)
    r.add_argument("--mode", default="sim", choices=["sim", "real"], help="sim: discrete-event simulation; real: worker processes on loopback (default: sim)")
    r.add_argument("--trace", type=Path, default=None, help="a JSONL trace (format in benchmarks/README.md); default: generate one")
    r.add_argument("--generator", default="multi-turn", help="trace generator: multi-turn, system-prompt, few-shot, zipf (default: multi-turn)")
    r.add_argument("--requests", type=int, default=0, help="requests to generate (count; default: 20000 sim, 48 real)")
    r.add_argument("--rate", type=float, default=0.0, help="arrivals per second (default: scaled to the workers)")
    r.add_argument("--workers", type=int, default=0, help="workers (count; default: 128 sim, 4 real)")
    r.add_argument("--policies", default=",".join(POLICY_NAMES), help="comma-separated policies (default: all)")
    r.add_argument("--seed", type=int, default=0, help="seed for the trace and tie-breaking (default: 0)")
    r.add_argument("--quick", action="store_true", help="a smaller run that finishes in under a minute (real mode: "
                   "workers as threads of one process, tiny-random unless --model is given)")
    _model_args(r)
    r.set_defaults(model=None)
    r.add_argument("--kill-worker-at", type=float, default=None, help="real mode: SIGKILL one worker this many seconds into each policy's run")
    r.add_argument("--cache-blocks", type=int, default=4096, help="sim: prefix-cache capacity per worker (blocks, default: 4096)")
    r.add_argument("--max-active", type=int, default=4, help="real: requests each worker decodes at once, steps interleaved; "
                   "1 = one at a time (count, default: 4)")
    r.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    r.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    from permamesh.bench.overlay import add_overlay_bench_arguments

    o = bsub.add_parser("overlay", help="the anonymous overlay: delivery under relay failure, codecs, overhead, anonymity",
                        description="Delivery rate vs relay failure (simulation at 10,000 relays and a real mesh of relay "
                                    "processes), S-IDA prep/rebuild per codec and size, end-to-end overhead vs direct, "
                                    "and the anonymity simulation.")
    _common(o)
    add_overlay_bench_arguments(o)
    from permamesh.bench.verify import add_verify_bench_arguments

    v = bsub.add_parser("verify", help="verification: cheaters caught, honest workers spared, verifications per minute",
                        description="Honest workers and a zoo of cheaters answer challenges for a number of epochs; "
                                    "every answer is scored against the reference model and reputation updated.")
    _common(v)
    add_verify_bench_arguments(v)
    from permamesh.bench.gateway import add_gateway_bench_arguments

    gb = bsub.add_parser("gateway", help="the gateway: latency and throughput against the overlay itself",
                         description="The same chat job through the OpenAI-compatible gateway (plain and streamed) "
                                     "and through an OverlayClient directly, one at a time and concurrently.")
    _common(gb)
    add_gateway_bench_arguments(gb)
    from permamesh.bench.containers import add_containers_bench_arguments

    cb = bsub.add_parser("containers", help="containers: cold vs warm start, warm-worker pick rate",
                         description="Cold (layers fetched and unpacked) vs warm (rootfs cached) container starts, "
                                     "and how often routing by layers picks a worker that already holds the image.")
    _common(cb)
    add_containers_bench_arguments(cb)
    from permamesh.bench.committee import add_committee_bench_arguments

    cm = bsub.add_parser("committee", help="the committee: ledger tx/s, devnet commit latency, agreement, kill drill",
                         description="The ledger app's tx/s through FinalizeBlock + Commit; a devnet of validator "
                                     "processes: commit latency, burst throughput, a SIGKILL drill, app-hash agreement.")
    _common(cm)
    add_committee_bench_arguments(cm)
    from permamesh.bench.hosts import add_hosts_bench_arguments

    hb = bsub.add_parser("hosts", help="the mesh across simulated hosts (network namespaces; root): delivery, join "
                         "time, killed-host detection, CurveZMQ cost",
                         description="A CometBFT committee, workers and relays on separate network namespaces joined "
                                     "through the committee's directory; a client host measures delivery, join time and "
                                     "failure detection; a loopback echo measures what CurveZMQ adds per link.")
    _common(hb)
    add_hosts_bench_arguments(hb)
    from permamesh.bench.engine import add_engine_bench_arguments

    eb = bsub.add_parser("engine", help="one worker's prefill and decode tok/s at 1, 4 and 8 concurrent requests, "
                         "per engine backend, beside the memory-bandwidth ceiling",
                         description="A real worker process per backend (torch; llama.cpp where installed) and "
                                     "concurrent clients on loopback: prefill tok/s, total and decode tok/s, "
                                     "prefix-cache hits, and the bandwidth ceiling measured on this machine.")
    _common(eb)
    add_engine_bench_arguments(eb)


def run_bench(args: argparse.Namespace, data_dir: Path) -> int:
    """Run the benchmark ``args.bench`` names (the CLI's ``permamesh bench ...``)."""
    if args.bench == "engine":
        from permamesh.bench.engine import run_from_args as run_engine

        return run_engine(args, data_dir)
    if args.bench == "gateway":
        from permamesh.bench.gateway import run_from_args as run_gateway

        return run_gateway(args)
    if args.bench == "containers":
        from permamesh.bench.containers import run_from_args as run_containers

        return run_containers(args)
    if args.bench == "hosts":
        from permamesh.bench.hosts import run_from_args as run_hosts_bench

        return run_hosts_bench(args)
    if args.bench == "committee":
        from permamesh.bench.committee import run_from_args as run_committee

        return run_committee(args)
    if args.bench == "verify":
        from permamesh.bench.verify import run_from_args as run_verify

        return run_verify(args, data_dir)
    if args.bench == "overlay":
        from permamesh.bench.overlay import run_from_args
        from permamesh.bench.overlayreal import RealOverlayConfig, quick_config, run_real

        import dataclasses

        def real(quick: bool, seed: int, say):
            cfg = quick_config(seed) if quick else RealOverlayConfig(seed=seed)
            return run_real(dataclasses.replace(cfg, model=args.entry_model, stream_tokens=args.stream_tokens,
                                                data_dir=data_dir), say)

        return run_from_args(args, real=real)
    from permamesh.bench import routing

    bench = routing.RoutingBench(
        mode=args.mode, trace=args.trace, generator=args.generator, requests=args.requests, rate_per_s=args.rate,
        workers=args.workers, policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()), seed=args.seed,
        quick=args.quick, data_dir=data_dir, model_path=args.model_path,
        model=args.model or ("tiny-random" if args.quick and args.mode == "real" else "smollm2-135m"),
        kill_at_s=args.kill_worker_at, cache_blocks=args.cache_blocks, max_active=args.max_active)
    report = routing.run(bench)
    routing.write_outputs(report, args.json, args.plot)
    if args.json:
        print(f"wrote {args.json}")
    return 0
