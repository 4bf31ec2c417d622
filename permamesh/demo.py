"""``permamesh demo``: the whole mesh on one machine, with real answers and real figures.

Starts an :class:`~permamesh.mesh.EmbeddedMesh` (two workers by default, SmolLM2 on CPU),
streams a few answers one by one, then sends a concurrent burst to show queueing across the
workers, prints latency figures and each worker's status, and stops every process, also on
Ctrl-C. ``--serve`` keeps the mesh up afterwards so ``permamesh submit`` can talk to it.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from permamesh.client import Client
from permamesh.mesh import EmbeddedMesh, MeshConfig
from permamesh.workers import models

log = logging.getLogger(__name__)

PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about why old computers are worth keeping.",
)
BURST = (
    "What is 2 + 2?",
    "What color is the sky on a clear day?",
    "Say hello in Spanish.",
    "What is the largest planet in our solar system?",
)


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    data_dir: Path
    workers: int = 2
    model: str = models.DEFAULT_MODEL
    model_path: str | None = None
    device: str = "auto"
    max_tokens: int = 48  # per answer
    serve: bool = False  # keep running until Ctrl-C


def run_demo(opts: DemoOptions, out: TextIO = sys.stdout) -> int:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say(f"permamesh demo: {opts.workers} workers serving {opts.model_path or opts.model}")
    if opts.model_path or opts.model != models.TINY_RANDOM:
        started = time.monotonic()
        say("preparing the model (the first run converts the GGUF, ~20 s; later runs reuse the cache)...")
        models.resolve(opts.model, opts.model_path, opts.data_dir)
        say(f"model ready in {time.monotonic() - started:.1f} s")
    mesh = EmbeddedMesh(MeshConfig(opts.data_dir, opts.workers, opts.model, opts.model_path, opts.device))
    started = time.monotonic()
    say("starting workers...")
    try:
        endpoints = mesh.start()
        say(f"{len(endpoints)} workers ready in {time.monotonic() - started:.1f} s: {', '.join(endpoints)}")
        with Client(endpoints) as client:
            say("\n== one at a time, streamed ==")
            for prompt in PROMPTS:
                say(f"\n> {prompt}")
                out.write("  ")
                result = client.generate(messages=[{"role": "user", "content": prompt}], max_tokens=opts.max_tokens,
                                         on_text=lambda t: (out.write(t.replace("\n", "\n  ")), out.flush()))
                say(f"\n  [{result.worker_id}] ttft {result.ttft_s * 1000:.0f} ms, total {result.total_s:.2f} s, "
                    f"{result.completion_tokens} tokens, {_rate(result.completion_tokens, result.total_s):.1f} tok/s")
            _burst(endpoints, opts.max_tokens, say)
            say("\n== worker status ==")
            for st in client.status():
                say(f"  {st.worker_id} {st.model} on {st.device}: served {st.served}, queue {st.queue_length}, "
                    f"prefill {st.prefill_tok_per_s:.0f} tok/s, decode {st.decode_tok_per_s:.1f} tok/s, "
                    f"group {st.group or '-'} ({st.members} peers, forwarded {st.forwarded}), "
                    f"prefix cache {st.cached_tokens_total}/{st.prompt_tokens_total} prompt tokens")
        if opts.serve:
            say("\nmesh is up. In another shell: permamesh submit --prompt 'Hello'   (Ctrl-C here to stop)")
            threading.Event().wait()
    except KeyboardInterrupt:
        say("\ninterrupted; stopping the mesh")
    finally:
        mesh.stop()
        say("mesh stopped; no worker process left running")
    return 0


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _burst(endpoints: list[str], max_tokens: int, say) -> None:
    say(f"\n== a burst of {len(BURST)} concurrent requests ==")

    def one(i_prompt: tuple[int, str]):
        i, prompt = i_prompt
        with Client(endpoints[i % len(endpoints):] + endpoints[: i % len(endpoints)]) as c:
            sent = time.monotonic()
            r = c.generate(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)
            return prompt, r, time.monotonic() - sent

    with ThreadPoolExecutor(len(BURST)) as pool:
        results = list(pool.map(one, enumerate(BURST)))
    for prompt, r, e2e in results:
        say(f"> {prompt}\n  {r.text.strip()}\n  [{r.worker_id}] queued {r.queue_wait_s:.2f} s, end-to-end {e2e:.2f} s")
    lat = sorted(e2e for _, _, e2e in results)
    say(f"end-to-end latency: p50 {statistics.median(lat):.2f} s, max {lat[-1]:.2f} s over {len(lat)} requests")
