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
           "generator", "nucleus_rows", "race", "race_weights", "sample_token", "top_alternatives"]


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
    token: str = ""  # this token's own text, when logprobs were asked for
    top: tuple[tuple[str, float], ...] = ()  # its likeliest alternatives, when top_logprobs > 0


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


NUCLEUS_FIRST_K = 64  # top-p looks at this many likeliest tokens before sorting more of the vocabulary
_TINY_TEMPERATURE = 1e-30  # below this (or above its inverse), weights are computed in float64


def generator(seed: int | None):
    """A request's source of randomness for :func:`sample_token`: seeded (``0 <= seed < 2**63``,
    as the wire allows), or fresh from the OS. The worker makes one per request
    (:class:`~permamesh.workers.decoding.Decoding`) and the committee's seeded replay makes the
    same one, so both draw the same numbers."""
    import numpy as np

    return np.random.Generator(np.random.SFC64(seed))


def sample_token(logits, params: SamplingParams, gen) -> tuple[int, float]:
    """Pick the next token from one position's logits (a 1-D tensor) with ``gen`` (from
    :func:`generator`); return it with its log-probability under the raw model (before
    temperature and top-p: what verification compares).

    The rule, the same for every backend and for the committee's seeded replay
    (:func:`permamesh.verify.scoring.seeded_replay`): NaN logits count as impossible; at
    temperature 0, or when a logit is infinite, the first maximum (greedy). Otherwise weights
    ``exp((logit - max) / temperature)`` (the maximum's weight is exactly 1, so no temperature,
    however small, overflows; a tiny one leaves only the likeliest tokens, ties shared), top-p
    keeping the likeliest tokens whose mass before each is under ``top_p`` of the total; then
    an exponential race: one float32 uniform ``u`` per vocabulary entry from ``gen``, and the
    largest ``weight / -log(u)`` wins, which picks each token with probability weight / total
    (up to float32 resolution; what ``torch.multinomial`` does, with a generator ten times
    faster). Every draw takes as many numbers as the vocabulary holds, whatever the weights,
    and a small change of the weights changes the winner only where two race closely, so a
    worker whose logits differ a little (bf16, another engine) stays in step with the replay.
    Per token on one CPU core, SmolLM2's 49k vocabulary: ~0.07 ms greedy, ~0.25 ms sampled,
    ~0.5 ms with top-p (``torch.multinomial`` and a full sort took 1.3 and 5.3 ms).
    """
    import numpy as np

    with np.errstate(over="ignore", divide="ignore"):  # extreme logits and temperatures overflow to inf, as meant
        return _sample(_vector(logits), params, gen)


def _sample(logits, params: SamplingParams, gen) -> tuple[int, float]:
    import numpy as np

    top = float(logits.max())
    if math.isnan(top):  # NaN propagates through max: clean them, once
        logits = np.nan_to_num(logits, nan=-np.inf, posinf=np.inf, neginf=-np.inf)
        top = float(logits.max())
    if not math.isfinite(top):  # only +inf/-inf left (or an +inf): the first maximum, certain
        return int(logits.argmax()), 0.0
    logprob_of = _raw_logprobs(logits, top)
    if params.temperature <= 0.0:
        token = int(logits.argmax())
        return token, logprob_of(token)
    token = int(race(race_weights(logits[None, :], params.temperature, params.top_p), gen)[0])
    return token, logprob_of(token)


def race_weights(rows, temperature: float, top_p: float):
    """The weights :func:`sample_token`'s race gives each token: ``rows`` a 2-D float32 numpy
    array of logits, one position per row, each with a finite maximum; ``temperature`` > 0.
    Each row's maximum weighs exactly 1; top-p zeroes what the nucleus leaves out
    (:func:`nucleus_rows`). The worker calls it with one row per token; the committee's
    replay and typicality with every answer position at once, by the same arithmetic."""
    import numpy as np

    shifted = rows - rows.max(axis=1, keepdims=True)
    with np.errstate(over="ignore", divide="ignore"):
        if not _TINY_TEMPERATURE < temperature < 1 / _TINY_TEMPERATURE:  # 1 / T overflows or vanishes in float32
            weights = np.exp(shifted.astype(np.float64) / temperature).astype(np.float32)
        else:
            weights = np.exp(shifted * np.float32(1.0 / temperature))  # in [0, 1]; the maximum's is exactly 1
    if top_p < 1.0:
        weights = np.where(nucleus_rows(weights, top_p), weights, np.float32(0.0))
    return weights


def race_scores(weights, gen):
    """Each entry's score in its row's exponential race over ``weights`` (2-D, from
    :func:`race_weights`): weight / Exp(1), one float32 uniform per entry from ``gen``, rows in
    order, so that racing rows one call at a time or all in one call draws the same numbers.
    The committee's replay reads how far the worker's token finished behind the winner."""
    import numpy as np

    with np.errstate(divide="ignore"):
        exponentials = -np.log(gen.random(weights.shape, dtype=np.float32))  # never 0 (u = 0: inf, loses)
    return weights / exponentials


def race(weights, gen):
    """The winner of each row's exponential race (:func:`race_scores`)."""
    import numpy as np

    return np.argmax(race_scores(weights, gen), axis=1)


def _vector(logits):
    """One position's logits as a float32 numpy vector (a view where it can be: a CPU tensor's
    memory, or llama.cpp's buffer)."""
    import numpy as np

    if hasattr(logits, "detach"):  # a torch tensor
        logits = logits.detach().cpu().float().numpy()
    return np.asarray(logits, dtype=np.float32).reshape(-1)


def _raw_logprobs(logits, top: float):
    """``token -> log-probability`` under finite-maximum ``logits`` (a float32 numpy vector),
    clamped so that it always encodes."""
    import numpy as np

    log_total = top + math.log(float(np.exp(logits - np.float32(top)).sum(dtype=np.float64)))

    def of(token: int) -> float:
        value = float(logits[token]) - log_total
        return min(0.0, max(value, -1e30)) if math.isfinite(value) else -1e30

    return of


def nucleus_rows(weights, top_p: float):
    """What top-p keeps in each row of ``weights`` (2-D float32 numpy, one position per row), as
    a boolean mask: the likeliest tokens whose mass before each is under ``top_p`` of the row's
    total (at least one). Looks at the :data:`NUCLEUS_FIRST_K` likeliest first, then 16 times
    as many, and so on, for the rows whose nucleus is longer (a CPU core takes ~0.1 ms a row
    for the first look, 4 ms to sort 49k tokens whole; with SmolLM2 at temperature 0.8, top-p
    0.95 the nucleus is ~5 tokens, and over 64 for one token in eight)."""
    import numpy as np
    import torch

    mask = np.zeros(weights.shape, dtype=bool)
    limits = top_p * weights.sum(axis=1, dtype=np.float64)
    todo, vocab = np.arange(weights.shape[0]), weights.shape[1]
    k = min(NUCLEUS_FIRST_K, vocab)
    while todo.size:
        rows = torch.from_numpy(weights if todo.size == weights.shape[0] else weights[todo])
        values, ids = torch.topk(rows, k, dim=1) if k < vocab else torch.sort(rows, dim=1, descending=True)
        before = torch.cumsum(values, 1, dtype=torch.float64) - values.double()
        keep = (before < torch.from_numpy(limits[todo])[:, None]).numpy()
        keep[:, 0] = True
        done = ~keep[:, -1] | (k >= vocab)
        kept = keep[done]
        mask[np.repeat(todo[done], kept.sum(axis=1)), ids.numpy()[done][kept]] = True
        todo, k = todo[~done], min(k * 16, vocab)
    return mask


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
    """``token``'s log-probability under the raw ``logits`` (clamped so that it always encodes),
    as :func:`sample_token` reports it."""
    import numpy as np

    logits = np.nan_to_num(_vector(logits), nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    top = float(logits.max())
    if not math.isfinite(top):
        return 0.0 if float(logits[token]) == top else -1e30
    with np.errstate(over="ignore"):
        return _raw_logprobs(logits, top)(token)


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What one engine step did (the executor learns its rates from these)."""

    prefill_tokens: int  # prompt tokens fed
    decode_tokens: int  # answer tokens fed (one per decoding request)
    seconds: float  # wall seconds of the step (forward and sampling)
    failed: tuple = ()  # (Decoding, exception) of requests whose own part failed; they are over
