"""The honest noise floor the credit's tolerance must clear: the same SmolLM2 weights give
slightly different log-probs in another batch (padded next to a longer sequence) and on other
hardware (weights rounded to bfloat16). Both gaps must sit well inside ``agree_tol``, or honest
partners would lose credit. (The benchmark reports the same for its honest nodes.)"""

from __future__ import annotations

import copy

import pytest
import torch

from permamesh.bench.verifyzoo import bf16_rounded
from permamesh.verify.credit import CreditConfig
from permamesh.verify.scoring import teacher_forced
from permamesh.wire.messages import ChatMessage, GenerateRequest
from permamesh.workers.engine import Engine, SamplingParams

pytestmark = pytest.mark.model

PROMPTS = ["Explain why the sky is blue in two sentences.", "List three uses of copper.",
           "What should I pack for a weekend of hiking in the rain?"]


def _answers(loaded):
    engine = Engine(loaded)
    out = []
    for i, text in enumerate(PROMPTS):
        ids = engine.prompt_ids(GenerateRequest(f"p{i}", messages=(ChatMessage("user", text),)))
        done = engine.generate(ids, SamplingParams(max_tokens=24, logprobs=True))
        out.append((ids, list(done.token_ids), list(done.logprobs)))
    return out


def _batched(model, prompt, answer, other):
    """Log-probs of ``answer`` computed in a right-padded batch of two (with a longer neighbour)."""
    seq, neighbour = prompt + answer, other + other
    width = max(len(seq), len(neighbour))
    ids = torch.zeros((2, width), dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for row, tokens in enumerate((seq, neighbour)):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[0].float(), dim=-1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer)]


def test_other_batches_and_other_hardware_stay_inside_the_tolerance(smollm2_loaded):
    tol = CreditConfig().agree_tol
    other = copy.copy(smollm2_loaded)
    other.model = bf16_rounded(smollm2_loaded.model)
    gaps = {"batch": [], "bf16": []}
    for prompt, answer, reported in _answers(smollm2_loaded):
        assert answer, "SmolLM2 answered nothing"
        ev = teacher_forced(other.model, prompt, answer, eos_ids=smollm2_loaded.tokenizer.eos_ids)
        gaps["bf16"].append(sum(abs(a - b) for a, b in zip(ev.reference_logprobs, reported)) / len(answer))
        batched = _batched(smollm2_loaded.model, prompt, answer, prompt * 2)  # a longer neighbour
        gaps["batch"].append(sum(abs(a - b) for a, b in zip(batched, reported)) / len(answer))
    worst = {k: max(v) for k, v in gaps.items()}
    assert worst["batch"] < tol / 3 and worst["bf16"] < tol / 2, worst
