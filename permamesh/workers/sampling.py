"""What a generation job asks of an engine, what it gets back, and how tokens are picked.

:class:`SamplingParams` comes from a request (:meth:`SamplingParams.of`); :class:`Step` is what
one decode step releases to a streaming client; :class:`Completion` is the finished answer with
its timings; :class:`StepReport` is what one batched engine step did. :func:`sample_token` is
the one sampling rule of every backend (its log-probabilities are the raw model's, as
verification needs); :class:`Sampler` is what a :class:`~permamesh.workers.decoding.Decoding`
asks of its engine. Kept apart from the engines and the decoding so that no one imports
another's module for its types.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

from permamesh.wire.messages import GenerateRequest
from permamesh.workers.tokenizer import Tokenizer

__all__ = ["Completion", "SamplingParams", "Sampler", "Step", "StepReport", "apply_penalties", "raw_logprob",
           "sample_token", "top_alternatives"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128  # new tokens at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept
    seed: int | None = None  # None = fresh randomness
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    presence_penalty: float = 0.0  # subtracted from the logit of each token the answer holds
    frequency_penalty: float = 0.0  # subtracted per occurrence in the answer
    top_logprobs: int = 0  # likeliest alternatives reported per position (with logprobs)
    grammar_kind: str = ""  # constrained decoding (permamesh.workers.constraints); "" = none
    grammar: str = ""

    @classmethod
    def of(cls, req: GenerateRequest) -> SamplingParams:
        return cls(req.max_tokens, req.temperature, req.top_p, req.seed, tuple(req.stop), req.logprobs,
                   req.presence_penalty, req.frequency_penalty, req.top_logprobs, req.grammar_kind, req.grammar)

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclasses.dataclass(frozen=True)
class Step:
    """What one decode step releases to a streaming client."""

    index: int  # position of this token in the answer
    text: str  # newly releasable text (may be "" while held back)
    token_id: int
    logprob: float | None


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # empty unless asked for
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    prefill_s: float  # seconds of prefill
    ttft_s: float  # seconds to the first token
    total_s: float  # seconds for the whole request
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (not prefilled)
    tokens: tuple[str, ...] = ()  # each token's text, when logprobs were asked for
    top_logprobs: tuple[tuple[tuple[str, float], ...], ...] = ()  # per token, when top_logprobs > 0
    compute_s: float = 0.0  # seconds spent in this request's own model calls (not others' steps)
    decode_s: float = 0.0  # the decode part of compute_s


class Sampler(Protocol):
    """What a :class:`~permamesh.workers.decoding.Decoding` needs to pick tokens: the tokenizer
    (end-of-sequence ids, decoding for stop strings) and :func:`sample_token`."""

    tokenizer: Tokenizer

    def sample(self, logits, params: SamplingParams, gen) -> tuple[int, float]: ...


def sample_token(logits, params: SamplingParams, gen) -> tuple[int, float]:
    """Pick the next token from one position's logits (a 1-D tensor); return it with its
    log-probability under the raw model (before temperature and top-p: what verification compares).

    Never raises on finite parameters: the logits are shifted so their maximum is 0 before
    dividing by the temperature (in float64), so no temperature, however small, overflows;
    a tiny one simply concentrates all mass on the likeliest tokens (greedy, ties shared).
    NaN logits count as impossible; if no logit is usable the choice falls back to argmax.
    """
    import torch

    logits = logits.detach().cpu().float()
    if params.temperature <= 0.0 and not bool(torch.isnan(logits).any()):
        # greedy over usable logits: the same token and log-probability as the general path below
        # (argmax keeps the first maximum either way), without its float64 copies of the vocabulary
        token = int(torch.argmax(logits))
        if not math.isfinite(float(logits[token])):  # only +inf/-inf left
            return token, 0.0
        logprob = float(torch.log_softmax(logits, dim=-1)[token])
        return token, min(0.0, max(logprob, -1e30)) if math.isfinite(logprob) else -1e30
    raw = logits.double()
    raw = torch.where(torch.isnan(raw), torch.full_like(raw, -math.inf), raw)
    top = float(raw.max())
    if params.temperature <= 0.0 or not math.isfinite(top):  # greedy, or only +inf/-inf left
        token = int(torch.argmax(raw))
    else:
        probs = torch.exp((raw - top) / params.temperature)  # in [0, 1]; the max is exactly 1
        if params.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < params.top_p * float(sorted_p.sum())
            keep[0] = True
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        token = int(torch.multinomial(probs, 1, generator=gen))
    logprob = float(torch.log_softmax(raw.float(), dim=-1)[token]) if math.isfinite(top) else 0.0
    return token, min(0.0, max(logprob, -1e30)) if math.isfinite(logprob) else -1e30  # always encodes


def apply_penalties(logits, counts: dict[int, int], params: SamplingParams):
    """``logits`` less the presence and frequency penalties of the tokens the answer holds
    (``counts``: token id -> occurrences), as OpenAI documents them and vLLM applies them:
    ``logit - frequency * count - presence * (count > 0)``; a new tensor (the raw logits
    stay for the log-probabilities)."""
    import torch

    if not counts or not params.penalized:
        return logits
    ids = torch.tensor(list(counts), dtype=torch.long)
    occurrences = torch.tensor(list(counts.values()), dtype=logits.dtype)
    out = logits.detach().cpu().float().clone()
    out[ids] -= params.frequency_penalty * occurrences + params.presence_penalty
    return out


def top_alternatives(logits, k: int) -> list[tuple[int, float]]:
    """The ``k`` likeliest tokens of the raw ``logits`` with their log-probabilities."""
    import torch

    logp = torch.log_softmax(torch.nan_to_num(logits.detach().cpu().float(), nan=-math.inf), dim=-1)
    values, ids = torch.topk(logp, min(k, logp.numel()))
    return [(int(i), max(-1e30, min(0.0, float(v)))) for v, i in zip(values, ids)]


def raw_logprob(logits, token: int) -> float:
    """``token``'s log-probability under the raw ``logits`` (clamped so that it always encodes)."""
    import torch

    value = float(torch.log_softmax(torch.nan_to_num(logits.detach().cpu().float(), nan=-math.inf), dim=-1)[token])
    return min(0.0, max(value, -1e30)) if math.isfinite(value) else -1e30


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What one engine step did (the executor learns its rates from these)."""

    prefill_tokens: int  # prompt tokens fed
    decode_tokens: int  # answer tokens fed (one per decoding request)
    seconds: float  # wall seconds of the step (forward and sampling)
    failed: tuple = ()  # (Decoding, exception) of requests whose own part failed; they are over
