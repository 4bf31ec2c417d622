"""Grammar-constrained decoding on CPU: what a JSON schema costs per token.

1. The three libraries the issue names (llguidance, xgrammar, outlines-core), each on
   SmolLM2's tokenizer (49,152 tokens): compile time of one JSON schema, then the mean time
   per token to compute the allowed-token mask, apply it to the logits and advance by the
   token, over the tokens of a valid instance (the work a constrained step adds).
2. The worker's own path (llguidance, :mod:`permamesh.workers.constraints`) on the llama.cpp
   engine: decode tok/s of the same greedy requests with and without the schema.

Run: ``.venv/bin/python benchmarks/constrained.py [--out benchmarks/results/constrained.json]``.
A library that is not installed is reported as such, not measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "tags": ["mathematics", "engines", "poetry"],
            "address": {"city": "London", "zip": "W1"}}


def per_token(name, setup, steps, tokens) -> dict:
    try:
        started = time.perf_counter()
        state = setup()
        compile_s = time.perf_counter() - started
    except ImportError as exc:
        return {"library": name, "error": f"not installed: {exc}"}
    started = time.perf_counter()
    for token in tokens:
        steps(state, token)
    per = (time.perf_counter() - started) / len(tokens)
    return {"library": name, "compile_ms": round(compile_s * 1000, 2), "per_token_ms": round(per * 1000, 4),
            "tokens": len(tokens)}


def libraries(hf, n_vocab: int, eos: int) -> list[dict]:
    import torch

    text = json.dumps(INSTANCE, separators=(",", ":"))
    tokens = list(hf.encode(text, add_special_tokens=False))
    schema = json.dumps(SCHEMA)
    logits = torch.zeros(n_vocab)
    out = []

    def ll_setup():
        from permamesh.workers.constraints import Constraint
        from permamesh.workers.tokenizer import HFTokenizer

        return Constraint(HFTokenizer(hf), n_vocab, "json_schema", schema)

    def ll_step(c, token):
        c.mask(logits)
        c.advance(token)

    out.append(per_token("llguidance", ll_setup, ll_step, tokens))

    def xg_setup():
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=n_vocab, stop_token_ids=[eos])
        matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(schema, any_whitespace=False, separators=(",", ":")))
        return xgr, matcher, xgr.allocate_token_bitmask(1, n_vocab)

    def xg_step(state, token):
        xgr, matcher, bitmask = state
        matcher.fill_next_token_bitmask(bitmask)
        masked = logits.clone().unsqueeze(0)
        xgr.apply_token_bitmask_inplace(masked, bitmask)
        assert matcher.accept_token(token)

    out.append(per_token("xgrammar", xg_setup, xg_step, tokens))

    def oc_setup():
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        vocab: dict[str, list[int]] = {}
        for token_text, i in hf.get_vocab().items():
            if i != eos and i < n_vocab:
                vocab.setdefault(token_text, []).append(i)
        regex = build_regex_from_schema(schema, r"")
        return Guide(Index(regex, Vocabulary(eos, vocab)))

    def oc_step(guide, token):
        allowed = torch.tensor(guide.get_tokens(), dtype=torch.long)
        masked = torch.full_like(logits, -torch.inf)
        masked[allowed] = logits[allowed]
        guide.advance(token)

    try:
        out.append(per_token("outlines-core", oc_setup, oc_step, tokens))
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        out.append({"library": "outlines-core", "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return out


def engine_rates(engine, requests: int = 3, max_tokens: int = 64) -> dict:
    """Greedy requests with and without the schema, alternated (so both see the same load),
    and the time the grammar itself took per constrained token (mask and advance)."""
    from permamesh.wire import ChatMessage
    from permamesh.workers import constraints
    from permamesh.workers.sampling import SamplingParams

    spent = [0.0, 0]
    mask, advance = constraints.Constraint.mask, constraints.Constraint.advance

    def timed_mask(self, logits):
        t0 = time.perf_counter()
        try:
            return mask(self, logits)
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += 1

    def timed_advance(self, token):
        t0 = time.perf_counter()
        try:
            return advance(self, token)
        finally:
            spent[0] += time.perf_counter() - t0

    constraints.Constraint.mask, constraints.Constraint.advance = timed_mask, timed_advance
    prompt = engine.tokenizer.chat_ids([ChatMessage("user", "Describe a person as JSON with name, age, tags and "
                                                            "address (city, zip).")])
    kinds = {"free": {}, "json_schema": {"grammar_kind": "json_schema", "grammar": json.dumps(SCHEMA)}}
    tally = {label: [0, 0.0, ""] for label in kinds}
    for label, extra in kinds.items():
        engine.generate(prompt, SamplingParams(max_tokens=4, **extra))  # warm
    spent[:] = [0.0, 0]
    for _ in range(requests):
        for label, extra in kinds.items():
            done = engine.generate(prompt, SamplingParams(max_tokens=max_tokens, **extra))
            tally[label][0] += len(done.token_ids) - 1  # after the first token: forward, sampling, mask
            tally[label][1] += done.total_s - done.ttft_s
            tally[label][2] = done.text
    constraints.Constraint.mask, constraints.Constraint.advance = mask, advance
    out = {label: {"tokens": n, "tok_per_s": round(n / max(sec, 1e-9), 1), "sample": text[:160]}
           for label, (n, sec, text) in tally.items()}
    out["json_schema"]["grammar_ms_per_token"] = round(1000 * spent[0] / max(spent[1], 1), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/constrained.json")
    ap.add_argument("--requests", type=int, default=3, help="greedy requests per engine measurement")
    args = ap.parse_args()
    from permamesh.workers import backends

    engine = backends.load_engine("llamacpp", max_active=2)
    hf = engine.tokenizer._tok
    import os

    report = {"load_before": os.getloadavg()[0], "libraries": libraries(hf, engine.vocab_size, min(engine.tokenizer.eos_ids)),
              "engine": engine_rates(engine, args.requests)}
    report["load_after"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
