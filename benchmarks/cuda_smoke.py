"""CUDA smoke check of the worker engine, for a machine where torch sees a GPU.

Runs the tiny-random model on ``cuda`` and checks what the CPU tests check: greedy answers are
the same with and without the prefix KV cache (and the cache really served a prefix),
interleaved decodings (the executor's per-step scheduling) give each request the tokens it
gets alone, and the cached KV blocks live on the GPU. Prints one JSON object; exits 1 if a
check fails. Usage: ``python benchmarks/cuda_smoke.py`` (CPU-only machines: exits 2).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    import torch

    device = os.environ.get("PERMAMESH_SMOKE_DEVICE", "cuda")  # "cpu": a dry run of the checks
    if device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"cuda": False}))
        return 2
    from permamesh.routing.blocks import BlockHasher
    from permamesh.workers import models
    from permamesh.workers.engine import Engine, SamplingParams
    from permamesh.workers.prefix_cache import PrefixKVCache

    loaded = models.load(models.TINY_RANDOM, device=device, seed=0)
    plain = Engine(loaded)
    cached = Engine(loaded, prefix_cache=PrefixKVCache(BlockHasher(16, b"s" * 32), 256 * 2**20))
    tok = loaded.tokenizer
    base = tok.encode("The mesh keeps old machines useful. " * 20)
    longer = base + tok.encode("What does it keep?")
    greedy = SamplingParams(max_tokens=48)
    out: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__}

    first = cached.generate(base, greedy)
    t0 = time.perf_counter()
    again = cached.generate(longer, greedy)
    out["cached_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    reference = plain.generate(longer, greedy)
    out["cached_tokens"] = again.cached_tokens
    out["cache_equal"] = again.token_ids == reference.token_ids and first.token_ids == plain.generate(base, greedy).token_ids
    blocks_on_gpu = [t.device.type for t in _tensors(cached.prefix_cache)]
    out["cache_on_device"] = bool(blocks_on_gpu) and all(d == device for d in blocks_on_gpu)

    prompts = [tok.encode(f"question number {i} about the mesh") for i in range(3)]
    solo = [plain.generate(p, SamplingParams(max_tokens=24)).token_ids for p in prompts]
    runs = [plain.start(p, SamplingParams(max_tokens=24)) for p in prompts]
    active = [r for r in runs if not r.prefill()]
    while active:
        active = [r for r in active if not r.step()]
    out["interleaved_equal"] = [r.finish().token_ids for r in runs] == solo

    cpu = models.load(models.TINY_RANDOM, device="cpu", seed=0)
    cpu_ids = Engine(cpu).generate(longer, greedy).token_ids
    agree = sum(a == b for a, b in zip(cpu_ids, reference.token_ids))
    out["cpu_gpu_greedy_agreement"] = round(agree / max(1, max(len(cpu_ids), len(reference.token_ids))), 3)
    ok = out["cache_equal"] and out["interleaved_equal"] and out["cached_tokens"] > 0 and out["cache_on_device"]
    out["ok"] = ok
    print(json.dumps(out, indent=2))
    return 0 if ok else 1


def _tensors(cache) -> list:
    """Every tensor the prefix cache holds (its internals are private; walk them)."""
    import torch

    found, seen, stack = [], set(), [vars(cache)]
    while stack and len(found) < 64:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            stack.append(vars(item))
        elif hasattr(item, "__slots__"):
            stack.extend(getattr(item, s) for s in item.__slots__ if hasattr(item, s))
    return found


if __name__ == "__main__":
    sys.exit(main())
