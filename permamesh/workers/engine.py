"""The generation engine: one model, one request at a time, token by token.

Our own decode loop (rather than ``model.generate``) so that every token can be streamed,
stop strings cut exactly, per-token log-probabilities reported under the model's own
distribution (before temperature and top-p: that is what verification compares), and the
prefill step kept separate so a :class:`~permamesh.workers.prefix_cache.PrefixKVCache` can serve
the longest cached block-aligned prefix of a prompt and prefill only the rest. After each request
the KV of the prompt and of every answer token fed through the model is stored, so the next turn
of a chat (whose prompt contains this answer) hits a long prefix.

Who calls it: :class:`permamesh.workers.server.WorkerServer` runs :meth:`Engine.generate` on
its engine thread, one request after another. Nothing here is thread-safe by itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Sequence

from permamesh.wire.messages import GenerateRequest
from permamesh.workers.errors import RequestError
from permamesh.workers.models import LoadedModel
from permamesh.workers.prefix_cache import PrefixKVCache
from permamesh.workers.stops import StopScanner

log = logging.getLogger(__name__)


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


class Engine:
    def __init__(self, loaded: LoadedModel, prefix_cache: PrefixKVCache | None = None) -> None:
        self.loaded = loaded
        self.prefix_cache = prefix_cache
        self.tokenizer = loaded.tokenizer
        config = getattr(loaded.model, "config", None)
        self.max_context = int(getattr(config, "max_position_embeddings", 2048) or 2048)

    def prompt_ids(self, req: GenerateRequest) -> list[int]:
        if req.messages:
            return self.tokenizer.chat_ids(req.messages)
        return self.tokenizer.encode(req.prompt or "")

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 on_step: Callable[[Step], None] | None = None) -> Completion:
        import torch

        if not prompt_ids:
            raise RequestError("empty prompt")
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise RequestError(f"prompt of {len(prompt_ids)} tokens leaves no room in the {self.max_context}-token context")
        max_tokens = min(params.max_tokens, room)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        scanner = StopScanner(params.stop)
        started = time.monotonic()
        with torch.inference_mode():
            matched, past = self.prefix_cache.lookup(prompt_ids) if self.prefix_cache is not None else (0, None)
            logits, cache = self._prefill(prompt_ids[matched:], past)
            prefill_s = time.monotonic() - started
            ids: list[int] = []
            fed: list[int] = []  # answer tokens whose KV is in `cache` (the last sampled one is not)
            lps: list[float] = []
            ttft_s = 0.0
            finish = "length"
            for index in range(max_tokens):
                token, logprob = self._sample(logits, params, gen)
                if index == 0:
                    ttft_s = time.monotonic() - started
                if token in self.tokenizer.eos_ids:
                    finish = "stop"
                    break
                ids.append(token)
                if params.logprobs:
                    lps.append(logprob)
                new_text = scanner.feed(self.tokenizer.decode(ids))
                if on_step is not None:
                    on_step(Step(index, new_text, token, logprob if params.logprobs else None))
                if scanner.stopped:
                    finish = "stop"
                    break
                if index + 1 < max_tokens:
                    logits, cache = self._decode(token, cache)
                    fed.append(token)
            tail = scanner.finish(self.tokenizer.decode(ids))
            if tail and on_step is not None:
                on_step(Step(len(ids), tail, -1, None))
            if self.prefix_cache is not None:
                self._store([*prompt_ids, *fed], cache)
        return Completion(
            text=scanner.final_text or "",
            token_ids=tuple(ids),
            logprobs=tuple(lps),
            finish_reason=finish,
            prompt_tokens=len(prompt_ids),
            prefill_s=prefill_s,
            ttft_s=ttft_s,
            total_s=time.monotonic() - started,
            cached_tokens=matched,
        )

    def _store(self, token_ids: list[int], cache) -> None:
        """Keep the KV of ``token_ids`` for later prompts; a cache failure never costs the answer."""
        try:
            added = self.prefix_cache.store(token_ids, cache)
        except Exception:  # noqa: BLE001 - the answer is complete; log the bug and move on
            log.exception("prefix cache store failed for %d tokens", len(token_ids))
            return
        log.debug("prefix cache: %d new blocks from %d tokens", added, len(token_ids))

    def _prefill(self, prompt_ids: Sequence[int], past=None):
        """Run ``prompt_ids`` on top of ``past`` (a cache of the tokens before them, or None)."""
        import torch

        device = self.loaded.device
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        out = self.loaded.model(input_ids=input_ids, past_key_values=past, use_cache=True)
        return out.logits[0, -1].float(), out.past_key_values

    def _decode(self, token: int, cache):
        import torch

        input_ids = torch.tensor([[token]], dtype=torch.long, device=self.loaded.device)
        out = self.loaded.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return out.logits[0, -1].float(), out.past_key_values

    @staticmethod
    def _sample(logits, params: SamplingParams, gen) -> tuple[int, float]:
        """Pick the next token; return it with its log-probability under the raw model."""
        import torch

        logits = logits.cpu()
        logp = torch.log_softmax(logits, dim=-1)
        if params.temperature <= 0.0:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / params.temperature, dim=-1)
            if params.top_p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < params.top_p
                keep[0] = True
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            token = int(torch.multinomial(probs, 1, generator=gen))
        return token, max(float(logp[token]), -1e30)  # finite, so it always encodes
