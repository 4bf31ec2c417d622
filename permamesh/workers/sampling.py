"""What a generation job asks of the engine and what it gets back, plus the model calls a
:class:`~permamesh.workers.decoding.Decoding` makes.

:class:`SamplingParams` comes from a request (:meth:`SamplingParams.of`); :class:`Step` is what
one decode step releases to a streaming client; :class:`Completion` is the finished answer with
its timings. :class:`ModelCalls` is the interface a decoding drives; the engine
(:class:`permamesh.workers.engine.Engine`) implements it. Kept apart from both so that neither
imports the other's module for its types.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

from permamesh.wire.messages import GenerateRequest
from permamesh.workers.prefix_cache import PrefixKVCache
from permamesh.workers.tokenizer import Tokenizer

__all__ = ["Completion", "ModelCalls", "SamplingParams", "Step"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128  # new tokens at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept
    seed: int | None = None  # None = fresh randomness
    stop: tuple[str, ...] = ()
    logprobs: bool = False

    @classmethod
    def of(cls, req: GenerateRequest) -> SamplingParams:
        return cls(req.max_tokens, req.temperature, req.top_p, req.seed, tuple(req.stop), req.logprobs)


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
    compute_s: float = 0.0  # seconds spent in this request's own model calls (not others' steps)
    decode_s: float = 0.0  # the decode part of compute_s


class ModelCalls(Protocol):
    """The model side of one request's decoding; called only from the engine thread.

    ``prefill_ids`` runs prompt tokens on top of a cache of the tokens before them (or None)
    and returns the last position's logits with the new cache; ``decode_token`` does the same
    for one token; ``sample`` picks the next token and its log-probability under the raw model;
    ``store_prefix`` keeps a finished request's KV for later prompts.
    """

    prefix_cache: PrefixKVCache | None
    tokenizer: Tokenizer

    def prefill_ids(self, prompt_ids: Sequence[int], past=None): ...

    def decode_token(self, token: int, cache): ...

    def sample(self, logits, params: SamplingParams, gen) -> tuple[int, float]: ...

    def store_prefix(self, token_ids: list[int], cache) -> None: ...
