"""The baseline of ``permamesh bench engine`` for the llama.cpp backend: llama.cpp itself,
measured in the same run on the same GGUF, with nothing of permamesh around it.

For each concurrency c, a child process (so that the benchmark's own process never holds a
second copy of the model, and a crash in native code costs only the figure) makes one
llama.cpp context like the worker's (:class:`~permamesh.workers.llamacpp.LlamaConfig`: one
unified KV cache, the same batch size and threads), prefills c prompts of ``prompt_tokens``
tokens, then times ``steps`` calls of ``llama_decode`` with one next token per sequence and
logits for each: the batch decode rate an engine on llama.cpp could reach if its own work
between steps (sampling, streaming, scheduling, sockets) cost nothing. The worker's decode
rate over this one is the engine's efficiency (``decode_vs_raw`` in the report).

Who calls it: :func:`permamesh.bench.engine.run`, before it starts the llama.cpp worker and
after it stops it (so nothing else competes for the cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_CHILD = """
import ctypes, json, sys, time
import llama_cpp as L
from permamesh.workers.llamacpp import LlamaConfig
from permamesh.workers.llamalog import route_native_log

path, levels, prompt, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = LlamaConfig()
route_native_log(L)
L.llama_backend_init()
model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
vocab_tokens = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
out = {}
for c in levels:
    params = L.llama_context_default_params()
    params.n_ctx = (c + 1) * config.ctx_per_seq
    params.n_batch = params.n_ubatch = config.step_tokens
    params.n_seq_max, params.kv_unified = c + 1, True
    params.n_threads = params.n_threads_batch = config.threads or __import__("os").cpu_count() or 1
    ctx = L.llama_init_from_model(model, params)
    batch = L.llama_batch_init(config.step_tokens, 0, 1)

    def decode(items):
        for n, (token, pos, seq, logits) in enumerate(items):
            batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, logits
            batch.seq_id[n][0] = seq
        batch.n_tokens = len(items)
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    for seq in range(c):  # each prompt alone: c * prompt may exceed one batch
        decode([(1000 + (seq * 7919 + k) % (vocab_tokens - 1000), k, seq, k == prompt - 1) for k in range(prompt)])
    started = time.perf_counter()
    for step in range(steps):
        decode([(500 + step, prompt + step, seq, True) for seq in range(c)])
    out[str(c)] = round(c * steps / (time.perf_counter() - started), 1)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
print(json.dumps(out))
"""


def raw_decode_tok_per_s(gguf: Path, levels: list[int], prompt_tokens: int = 40, steps: int = 64,
                         timeout_s: float = 600.0) -> dict[int, float]:
    """llama.cpp's own batch decode rate (tok/s) at each concurrency in ``levels``, after
    prompts of ``prompt_tokens``; ``{}`` with a warning on stderr if it cannot run here."""
    cmd = [sys.executable, "-c", _CHILD, str(gguf), json.dumps(sorted(set(levels))), str(prompt_tokens), str(steps)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print("bench engine: the raw llama.cpp baseline timed out", file=sys.stderr)
        return {}
    if done.returncode != 0:
        print(f"bench engine: the raw llama.cpp baseline failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return {}
    return {int(c): rate for c, rate in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def baseline_for(gguf: Path | None, levels, say) -> dict[int, float]:
    """The raw rates on ``gguf`` (what a llama.cpp worker computes with); nothing without one."""
    if gguf is None:
        return {}
    raw = raw_decode_tok_per_s(gguf, list(levels))
    say(f"raw llama.cpp batch decode on {gguf.name} (context and threads as the worker's, no engine around it): "
        + ", ".join(f"x{c} {rate:.1f} tok/s" for c, rate in sorted(raw.items())))
    return raw
