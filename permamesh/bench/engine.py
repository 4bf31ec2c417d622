"""``permamesh bench engine``: prefill and decode tok/s of one worker at 1, 4 and 8 concurrent
requests, for each engine backend, beside the machine's memory-bandwidth ceiling.

For each backend (torch, and llama.cpp where it is installed) a real worker process serves the
model on loopback (its own WorkerServer, executor and engine, ``max_active`` 8, a 1 GiB prefix
cache); concurrent clients (one thread and one ``Client`` each, all released at once) then run,
for each concurrency level c:

- **prefill**: c distinct prompts of ~``prompt_tokens`` tokens, one answer token each; prefill
  tok/s = uncached prompt tokens / wall seconds from the release to the last answer.
- **decode**: c distinct chat requests for a long story, ``max_tokens`` each at temperature 0
  (or ``--temperature``/``--top-p``, each request with its own seed);
  total tok/s = answer tokens / wall seconds (the figure the issue's Done-when names), and
  decode tok/s = answer tokens after the first / the span from the earliest first token to
  the last answer (first tokens placed with the worker's own ttft).
- **prefix cache**: c requests sharing a long system prompt that one earlier request left in
  the cache: prompt tokens served from the cache, and time to first token against the cold one.

Afterwards every decode answer (asked with log-probabilities) is scored as the committee scores
it (:class:`~permamesh.verify.verifier.Verifier`, the fp32 torch reference, with the credit
config of the backend's engine): an honest backend's credits must stay far above the abnormal threshold (0.4), and the
mean |reported - reference| log-prob gap per answer is the tolerance verification needs for it.

The baseline (llama.cpp backend): llama.cpp itself on the same GGUF, context shape and threads,
timed in the same run just before the worker starts and just after it stops
(:mod:`permamesh.bench.engineraw`; this shared machine's speed drifts by a quarter over
minutes); each level reports the worker's decode rate over the mean of the two
(``decode_vs_raw``): what the engine's own work between steps, the executor and the sockets cost.

The ceiling: one request's decode reads every weight once per token, so its rate is at most
memory bandwidth / weight bytes; the bandwidth is measured here (a large tensor copy, best of
five) and the weight bytes are the fp32 parameters (torch) or the GGUF file (llama.cpp).
Batching several requests shares that read, so totals above the one-request ceiling are
possible. The report says which machine and which load it ran under (load averages before
and after: other work on the machine lowers every figure).

Who calls it: :mod:`permamesh.bench.commands`; the worker side runs as
``python -m permamesh.bench.engine --serve BACKEND ...`` (a child of the benchmark).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from permamesh.bench.enginephases import ask_all, prose, run_level, score_answers
from permamesh.workers import models

log = logging.getLogger(__name__)

# Figures of the issue (issue 20, measured on this machine kind with SmolLM2-135M): the
# interleaved engine before continuous batching and llama.cpp through llama-cpp-python.
PREVIOUS = {
    "torch-interleaved": {"prefill_tok_per_s_512": 456, "total_tok_per_s": {"1": 16.3, "4": 15.0, "8": 14.8}},
    "llama-cpp-python": {"prefill_tok_per_s_512": 303, "total_tok_per_s": {"1": 116, "4": 177, "8": 175}},
}


@dataclasses.dataclass(frozen=True)
class EngineBench:
    backends: tuple[str, ...] = ("auto",)  # "auto" = every backend available here
    concurrency: tuple[int, ...] = (1, 4, 8)
    prompt_tokens: int = 512  # about; the worker counts them
    max_tokens: int = 128
    max_active: int = 8
    model: str = models.DEFAULT_MODEL
    model_path: str | None = None
    data_dir: Path = Path(".")
    seed: int = 0
    temperature: float = 0.0  # of the decode requests (each with its own seed when > 0)
    top_p: float = 1.0
    gguf_weights: str = "fast"  # llama.cpp: the file or a copy it computes with (workers/ggufweights.py MODES)


def measure_bandwidth_gb_s(megabytes: int = 256, tries: int = 5) -> float:
    """Memory bandwidth (GB/s, read + write) of a large tensor copy, best of ``tries``."""
    import torch

    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def run_backend(backend: str, bench: EngineBench, say=print) -> dict:
    """Start a worker process for ``backend``, run every level, stop it."""
    from permamesh.ops.procs import spawn, stop_all, wait_ready

    cmd = [sys.executable, "-m", "permamesh.bench.engine", "--serve", backend, "--model", bench.model,
           "--data-dir", str(bench.data_dir), "--max-active", str(bench.max_active)]
    if backend == "llamacpp":
        cmd += ["--gguf-weights", bench.gguf_weights]
    if bench.model_path:
        cmd += ["--model-path", bench.model_path]
    logs = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    child = spawn(f"worker-{backend}", cmd, logs)
    try:
        wait_ready([child], timeout_s=600.0)
        rng = random.Random(bench.seed)
        # warm up as a worker that has served a while: a batch as large as the largest level
        # (the first requests of a fresh llama.cpp worker ran ~15% slower, measured over 5 rounds)
        ask_all(child.endpoint, [dict(prompt=prose(rng, 64), max_tokens=32) for _ in range(max(bench.concurrency))])
        rows, scored = [], []
        for c in bench.concurrency:
            before = os.getloadavg()[0]
            rows.append(run_level(child.endpoint, c, bench, rng, scored))
            rows[-1]["load_average_1min"] = [round(before, 2), round(os.getloadavg()[0], 2)]  # at start and end
            r = rows[-1]
            say(f"{backend:>8} x{c}: prefill {r['prefill_tok_per_s']:7.1f} tok/s  total {r['total_tok_per_s']:6.1f} tok/s  "
                f"decode {r['decode_tok_per_s']} tok/s  cached {r['prefix_cache']['cached_tokens']}/"
                f"{r['prefix_cache']['prompt_tokens']} prompt tokens; load {r['load_average_1min']}")
        from permamesh.client.blocking import Client

        with Client([child.endpoint]) as client:
            (status,) = client.status()
    finally:
        stop_all([child])
    verification = score_answers(scored, bench, backend)
    for row in rows:
        row["verification"] = verification.get(row["concurrency"])
    return {"backend": backend, "levels": rows, "worker_model": status.model,
            "worker_rates": {"prefill_tok_per_s": status.prefill_tok_per_s, "decode_tok_per_s": status.decode_tok_per_s}}


def computed_gguf(bench: EngineBench) -> tuple[Path | None, Path | None]:
    """The GGUF file the model serves from, and the one llama.cpp computes with (the same file,
    or its copy for ``gguf_weights``): the worker's choice, so that the raw baseline runs on the same weights."""
    from permamesh.workers import ggufweights
    from permamesh.workers.backends import gguf_of

    gguf = gguf_of(bench.model, bench.model_path)
    if gguf is None:
        return None, None
    return gguf, ggufweights.weights_for(gguf, bench.gguf_weights, Path(bench.data_dir) / "models")


def weight_bytes(bench: EngineBench, gguf: Path | None) -> int:
    """Bytes one decode step reads at least: the GGUF llama.cpp computes with, or fp32 parameters."""
    if gguf is not None:
        return gguf.stat().st_size
    loaded = models.load(bench.model, bench.model_path, bench.data_dir, "cpu")
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters())


def run(bench: EngineBench, say=print) -> dict:
    from permamesh.bench.engineraw import baseline_for
    from permamesh.workers.backends import BACKENDS, llamacpp_missing

    backends = [b for b in bench.backends if b != "auto"]
    if "auto" in bench.backends:
        backends += [b for b in BACKENDS if b not in backends and (b != "llamacpp" or llamacpp_missing() is None)]
    load_before = os.getloadavg()
    bandwidth = measure_bandwidth_gb_s()
    say(f"memory bandwidth {bandwidth:.1f} GB/s; load average {load_before[0]:.2f}")
    results, summary = [], {}
    for backend in backends:
        source, computed = computed_gguf(bench) if backend == "llamacpp" else (None, None)
        ceiling = bandwidth * 1e9 / weight_bytes(bench, computed)
        raw = baseline_for(computed, bench.concurrency, say)  # before the worker
        result = run_backend(backend, bench, say)
        after = baseline_for(computed, bench.concurrency, say) if raw else {}
        if computed is not None and computed != source:  # what the file itself gives, in the same run
            result["gguf_weights"] = {"file": source.name, "computed_with": computed.name,
                                      "raw_file_decode_tok_per_s": {str(c): r for c, r in
                                                                   baseline_for(source, bench.concurrency, say).items()}}
        result["one_request_ceiling_tok_per_s"] = round(ceiling, 1)
        results.append(result)
        by_c = {row["concurrency"]: row for row in result["levels"]}
        summary[backend] = {f"total_tok_per_s_{c}": row["total_tok_per_s"] for c, row in by_c.items()}
        for c, row in by_c.items():
            if c in raw and c in after and row.get("decode_tok_per_s"):  # this machine's speed drifts: both sides
                row["raw_llamacpp_decode_tok_per_s"] = [raw[c], after[c]]
                row["decode_vs_raw"] = summary[backend][f"decode_vs_raw_{c}"] = \
                    round(2 * row["decode_tok_per_s"] / (raw[c] + after[c]), 3)
        summary[backend]["prefill_tok_per_s"] = max(row["prefill_tok_per_s"] for row in result["levels"])
        summary[backend]["one_request_ceiling_tok_per_s"] = round(ceiling, 1)
        checks = [row["verification"] for row in result["levels"] if row.get("verification")]
        if checks:
            summary[backend]["honest_credit_min"] = min(v["credit_min"] for v in checks)
            summary[backend]["logprob_gap_max_nats"] = max(v["logprob_gap_max_nats"] for v in checks)
        if 1 in by_c and 8 in by_c:
            summary[backend]["speedup_8_vs_1"] = round(by_c[8]["total_tok_per_s"] / by_c[1]["total_tok_per_s"], 2)
    return {
        "summary": summary,
        "backends": results,
        "previous": PREVIOUS,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(bench).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpu": _cpu_model(), "memory_bandwidth_gb_s": round(bandwidth, 1),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "load": "one worker process and the benchmark's clients on loopback; "
                            "other processes on the machine as the load averages say"},
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def plot_engine(report: dict, path: Path) -> None:
    from permamesh.bench.plot import pyplot, save

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, result in enumerate(report["backends"]):
        color = f"C{i}"
        xs = [row["concurrency"] for row in result["levels"]]
        a.plot(xs, [row["total_tok_per_s"] for row in result["levels"]], "o-", color=color, label=result["backend"])
        a.axhline(result["one_request_ceiling_tok_per_s"], color=color, ls=":", lw=1,
                  label=f"{result['backend']}: one-request bandwidth ceiling")
        b.plot(xs, [row["prefill_tok_per_s"] for row in result["levels"]], "o-", color=color, label=result["backend"])
    old = report["previous"]["torch-interleaved"]["total_tok_per_s"]
    a.plot([int(c) for c in old], list(old.values()), "x--", color="grey", label="torch, interleaved (before)")
    a.set(xlabel="concurrent requests", ylabel="answer tokens / s (all requests)", title="decode")
    b.set(xlabel="concurrent requests", ylabel="uncached prompt tokens / s", title="prefill (~512-token prompts)")
    for ax in (a, b):
        ax.set_xticks(sorted({row["concurrency"] for r in report["backends"] for row in r["levels"]}))
        ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"one worker, {m['cpus']} CPUs, {m['memory_bandwidth_gb_s']} GB/s; load {m['load_average_before'][0]}", fontsize=9)
    save(fig, path)


def add_engine_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", default="auto", help="comma-separated: torch, llamacpp, auto = every one "
                   "available here (default: auto)")
    p.add_argument("--concurrency", default="1,4,8", help="concurrent requests per level (default: 1,4,8)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prefill prompt length (tokens, about; default: 512)")
    p.add_argument("--max-tokens", type=int, default=128, help="answer tokens per decode request (default: 128)")
    p.add_argument("--max-active", type=int, default=8, help="requests the worker batches at once (default: 8)")
    p.add_argument("--temperature", type=float, default=0.0, help="decode requests' temperature; above 0 each "
                   "has its own seed, and the scoring replays it (default: 0, greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="decode requests' top-p, with --temperature (default: 1)")
    p.add_argument("--gguf-weights", default="fast", choices=["fast", "exact", "file"], help="what the llama.cpp worker "
                   "computes with, as `permamesh worker --gguf-weights` (default: fast = a Q8_0 copy of a Q4_1 file; "
                   "the file's own raw rate is then measured too)")
    p.add_argument("--quick", action="store_true", help="levels 1 and 4, 256-token prompts, 32-token answers")
    p.add_argument("--model", default=models.DEFAULT_MODEL, help=f"model name (default: {models.DEFAULT_MODEL})")
    p.add_argument("--model-path", default=None, help="a local model directory or .gguf file")
    p.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")


def run_from_args(args: argparse.Namespace, data_dir: Path) -> int:
    import signal

    from permamesh.bench.stats import write_report

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the worker process is stopped, not left
    if not 0.0 <= args.temperature <= 2.0 or not 0.0 < args.top_p <= 1.0:
        raise SystemExit("bench engine: --temperature must be in [0, 2] and --top-p in (0, 1]")
    if args.top_p < 1.0 and args.temperature == 0.0:
        raise SystemExit("bench engine: --top-p has no effect at temperature 0; give --temperature too")

    bench = EngineBench(
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        concurrency=(1, 4) if args.quick else tuple(int(c) for c in args.concurrency.split(",")),
        prompt_tokens=256 if args.quick else args.prompt_tokens, max_tokens=32 if args.quick else args.max_tokens,
        max_active=args.max_active, model=args.model, model_path=args.model_path, data_dir=data_dir,
        temperature=args.temperature, top_p=args.top_p, gguf_weights=args.gguf_weights)
    report = run(bench)
    write_report(report, args.json, args.plot, plot_engine)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _serve(argv: list[str]) -> int:
    """The worker side: load ``--serve BACKEND``'s engine and serve it until SIGTERM."""
    p = argparse.ArgumentParser(prog="python -m permamesh.bench.engine")
    p.add_argument("--serve", required=True)
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--model-path", default=None)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--max-active", type=int, default=8)
    p.add_argument("--gguf-weights", default="fast")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uuid

    from permamesh.identity import NodeIdentity
    from permamesh.routing.blocks import BlockHasher
    from permamesh.transport import serve_until_signalled
    from permamesh.workers.backends import load_engine
    from permamesh.workers.prefix_cache import PrefixKVCache
    from permamesh.workers.server import ServerConfig, WorkerServer

    engine = load_engine(args.serve, args.model, args.model_path, args.data_dir, "cpu", max_active=args.max_active,
                         prefix_cache=PrefixKVCache(BlockHasher(16, uuid.uuid4().bytes), 2**30),
                         gguf_weights=args.gguf_weights)
    identity = NodeIdentity.generate()
    server = WorkerServer(engine, identity, ServerConfig(max_active=args.max_active))
    serve_until_signalled(server, identity.node_id, lambda endpoint: None, lambda: None)
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
