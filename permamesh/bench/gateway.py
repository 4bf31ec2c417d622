"""``permamesh bench gateway``: what the OpenAI-compatible gateway costs over the overlay itself.

One embedded mesh (``workers`` tiny-random worker processes, ``relays`` relay processes) and
a gateway on a thread. The same chat job (greedy, ``max_tokens`` tokens) is sent ``requests``
times, one at a time, three ways, interleaved so that load drifts hit all three alike:

- **overlay**: :class:`~permamesh.overlay.sender.OverlayClient` directly (the baseline:
  what an anonymous client pays anyway);
- **gateway**: ``POST /v1/chat/completions`` over HTTP (the gateway sends it through the
  overlay), plain;
- **gateway_stream**: the same with ``"stream": true``, timed to the first content delta and
  to ``[DONE]``.

Then ``concurrency`` clients at once send ``requests`` jobs through the gateway and through
``concurrency`` overlay clients: jobs per second each way.

``--json PATH`` writes a ``summary``: ``gateway_overhead_ms`` (gateway p50 - overlay p50: what
HTTP, keys, credit checks and the thread hops add; target <= 25 ms, a few percent of a real
model's answer), ``gateway_overhead_ratio`` (gateway p50 / overlay p50; large here only
because tiny-random answers in tens of milliseconds), ``gateway_p50_s``, ``overlay_p50_s``,
``stream_first_delta_p50_s``, ``overlay_first_chunk_p50_s`` (the overlay client's own first
streamed text, the same job), ``stream_first_delta_excess_ms`` (their difference: target <= 50
ms), ``concurrent_throughput_ratio`` (gateway jobs/s / overlay jobs/s;
target >= 0.8).
Who calls it: :mod:`permamesh.cli`, tests.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from permamesh.bench.plot import pyplot, save
from permamesh.gateway.openai_api import post_chat

TARGETS = {"gateway_overhead_ms": 25.0, "concurrent_throughput_ratio": 0.8, "stream_first_delta_excess_ms": 50.0}
PROMPT = [{"role": "user", "content": "Say something about resilient networks."}]


@dataclass(frozen=True)
class GatewayBench:
    workers: int = 2
    relays: int = 12
    requests: int = 20
    concurrency: int = 4
    max_tokens: int = 8
    seed: int = 0


def _gateway(url: str, key: str, bench: GatewayBench) -> float:
    t0 = time.perf_counter()
    with post_chat(url, key, {"model": "tiny-random", "messages": PROMPT, "max_tokens": bench.max_tokens,
                          "temperature": 0}) as r:
        json.loads(r.read())
    return time.perf_counter() - t0


def _stream(url: str, key: str, bench: GatewayBench) -> tuple[float, float]:
    t0, first = time.perf_counter(), None
    with post_chat(url, key, {"model": "tiny-random", "messages": PROMPT, "max_tokens": bench.max_tokens,
                          "temperature": 0, "stream": True}) as r:
        for line in r:
            if first is None and line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                first = time.perf_counter() - t0
    return first or (time.perf_counter() - t0), time.perf_counter() - t0


def _p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def run(bench: GatewayBench) -> dict:
    from permamesh.gateway.accounts import KeyRing
    from permamesh.gateway.process import build_gateway
    from permamesh.gateway.server import GatewayThread
    from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
    from permamesh.overlay.sender import OverlayClient, OverlayConfig

    rng = random.Random(bench.seed)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        home = Path(tmp)
        mesh = EmbeddedMesh(MeshConfig(home, workers=bench.workers, model="tiny-random", device="cpu",
                                       relays=bench.relays, threads_per_worker=1,
                                       worker_args=("--prefix-cache-mb", "8")))
        with mesh:
            key = KeyRing(home).new_key("bench")
            thread = GatewayThread(build_gateway(home, timeout_s=120.0, join=mesh.join))
            url = thread.start()
            try:
                relays, workers = mesh.relays(), mesh.workers()
                config = OverlayConfig(answer_timeout_s=120.0)
                overlay, gateway, first, done, chunk = [], [], [], [], []
                with OverlayClient(relays, workers, config, random.Random(rng.getrandbits(64))) as client:
                    for _ in range(2):  # warm up both ways (paths, pools, caches)
                        client.generate(messages=PROMPT, max_tokens=bench.max_tokens)
                        _gateway(url, key, bench)
                    for _ in range(bench.requests):
                        t0 = time.perf_counter()
                        client.generate(messages=PROMPT, max_tokens=bench.max_tokens)
                        overlay.append(time.perf_counter() - t0)
                        gateway.append(_gateway(url, key, bench))
                        f, d = _stream(url, key, bench)
                        first.append(f)
                        done.append(d)
                        chunk.append(_first_chunk(client, bench))
                concurrent = _concurrent(url, key, bench, relays, workers, config, rng)
            finally:
                thread.stop()
    summary = {
        "gateway_p50_s": round(_p50(gateway), 4), "overlay_p50_s": round(_p50(overlay), 4),
        "gateway_overhead_ratio": round(_p50(gateway) / max(_p50(overlay), 1e-9), 3),
        "gateway_overhead_ms": round((_p50(gateway) - _p50(overlay)) * 1000, 2),
        "stream_first_delta_p50_s": round(_p50(first), 4), "stream_done_p50_s": round(_p50(done), 4),
        "overlay_first_chunk_p50_s": round(_p50(chunk), 4),
        "stream_first_delta_excess_ms": round((_p50(first) - _p50(chunk)) * 1000, 2),
        **concurrent, "targets": TARGETS,
    }
    return {"bench": "gateway", "config": asdict(bench), "summary": summary,
            "latency_s": {"overlay": overlay, "gateway": gateway, "stream_first_delta": first, "stream_done": done,
                          "overlay_first_chunk": chunk}}


def _first_chunk(client, bench: GatewayBench) -> float:
    """Seconds to the first streamed text of the same job through the overlay client itself."""
    t0, first = time.perf_counter(), []
    client.generate(messages=PROMPT, max_tokens=bench.max_tokens,
                    on_text=lambda text: first.append(time.perf_counter() - t0) if text and not first else None)
    return first[0] if first else time.perf_counter() - t0


def _concurrent(url, key, bench: GatewayBench, relays, workers, config, rng) -> dict:
    from permamesh.overlay.sender import OverlayClient

    t0 = time.perf_counter()
    with ThreadPoolExecutor(bench.concurrency) as pool:
        list(pool.map(lambda _: _gateway(url, key, bench), range(bench.requests)))
    gateway_rps = bench.requests / (time.perf_counter() - t0)
    clients = [OverlayClient(relays, workers, config, random.Random(rng.getrandbits(64)))
               for _ in range(bench.concurrency)]
    try:
        per = [bench.requests // bench.concurrency + (i < bench.requests % bench.concurrency)
               for i in range(bench.concurrency)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(bench.concurrency) as pool:
            list(pool.map(lambda cn: [cn[0].generate(messages=PROMPT, max_tokens=bench.max_tokens)
                                      for _ in range(cn[1])], zip(clients, per)))
        overlay_rps = bench.requests / (time.perf_counter() - t0)
    finally:
        for c in clients:
            c.close()
    return {"gateway_jobs_per_s": round(gateway_rps, 3), "overlay_jobs_per_s": round(overlay_rps, 3),
            "concurrent_throughput_ratio": round(gateway_rps / max(overlay_rps, 1e-9), 3)}


def plot_gateway(report: dict, path: Path) -> None:
    plt = pyplot()
    lat = report["latency_s"]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = ["overlay", "gateway", "stream_first_delta", "stream_done"]
    ax.boxplot([lat[n] for n in names], tick_labels=["overlay\n(baseline)", "gateway", "stream:\nfirst delta",
                                                "stream:\n[DONE]"])
    s = report["summary"]
    ax.set_ylabel("seconds per job")
    ax.set_title(f"gateway adds {s['gateway_overhead_ms']:.0f} ms (p50); concurrent throughput "
                 f"x{s['concurrent_throughput_ratio']:.2f} of the overlay's", fontsize=10)
    save(fig, path)


def add_gateway_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer requests (about a minute)")
    p.add_argument("--requests", type=int, default=20, help="jobs each way (count, default: 20)")
    p.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")


def run_from_args(args: argparse.Namespace) -> int:
    from permamesh.bench.stats import write_report

    bench = GatewayBench(requests=6 if args.quick else args.requests)
    report = run(bench)
    write_report(report, args.json, args.plot, plot_gateway)
    s = report["summary"]
    print(f"gateway p50 {s['gateway_p50_s']:.3f} s vs overlay {s['overlay_p50_s']:.3f} s "
          f"(+{s['gateway_overhead_ms']:.1f} ms, x{s['gateway_overhead_ratio']:.2f}); first streamed delta {s['stream_first_delta_p50_s']:.3f} s; "
          f"{s['gateway_jobs_per_s']:.1f} vs {s['overlay_jobs_per_s']:.1f} jobs/s at {bench.concurrency} at once")
    return 0
