"""One request's decoding state, advanced a step at a time so requests can interleave.

A :class:`Decoding` is created by :meth:`permamesh.workers.engine.Engine.start`. The executor
calls :meth:`Decoding.prefill` once (the longest cached prefix comes from the prefix KV cache,
the rest runs through the model, and the first token is sampled and released), then
:meth:`Decoding.step` once per decode step until it returns True, then
:meth:`Decoding.finish`, which stores the prompt's and answer's KV in the prefix cache and
returns the :class:`~permamesh.workers.engine.Completion`. Each request has its own KV cache,
stop scanner and random generator, so interleaving steps of several requests gives every one
exactly the tokens it would get alone (tested at temperature 0 and with seeds).

Timing: ``prefill_s`` and ``ttft_s`` are wall seconds from the start of :meth:`prefill`;
``compute_s`` counts only the seconds spent inside this request's own calls, so measured decode
rates are not diluted by the steps of other requests in between.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from permamesh.workers.sampling import Completion, ModelCalls, SamplingParams, Step
from permamesh.workers.stops import StopScanner


log = logging.getLogger(__name__)


class Decoding:
    """The state of one request between steps; driven by a single thread."""

    def __init__(self, engine: ModelCalls, prompt_ids: tuple[int, ...], params: SamplingParams,
                 on_step: Callable[[Step], None] | None) -> None:
        import torch

        self.engine, self.prompt_ids, self.params, self.on_step = engine, prompt_ids, params, on_step
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        self.scanner = StopScanner(params.stop)
        self.ids: list[int] = []
        self.fed: list[int] = []  # answer tokens whose KV is in the cache (the last sampled one is not)
        self.lps: list[float] = []
        self.finish_reason = "length"
        self.cached_tokens = 0
        self.prefill_s = self.ttft_s = self.compute_s = 0.0
        self.decode_s = 0.0  # compute seconds of decode steps only
        self._logits = self._cache = None
        self._started = 0.0
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def prefill(self) -> bool:
        """Prefill the uncached part of the prompt and release the first token; True if done."""
        import torch

        engine = self.engine
        self._started = t0 = time.monotonic()
        with torch.inference_mode():
            matched, past = engine.prefix_cache.lookup(list(self.prompt_ids)) if engine.prefix_cache is not None else (0, None)
            self.cached_tokens = matched
            self._logits, self._cache = engine.prefill_ids(self.prompt_ids[matched:], past)
        self.prefill_s = time.monotonic() - t0
        done = self._emit(0)
        self.ttft_s = time.monotonic() - t0
        self.compute_s += self.ttft_s
        return done

    def step(self) -> bool:
        """Feed the last token, sample the next and release it; True when the answer is done."""
        import torch

        if self._done:
            return True
        t0 = time.monotonic()
        token = self.ids[-1]
        with torch.inference_mode():
            self._logits, self._cache = self.engine.decode_token(token, self._cache)
        self.fed.append(token)
        done = self._emit(len(self.ids))
        spent = time.monotonic() - t0
        self.compute_s += spent
        self.decode_s += spent
        return done

    def _emit(self, index: int) -> bool:
        token, logprob = self.engine.sample(self._logits, self.params, self.gen)
        if token in self.engine.tokenizer.eos_ids:
            self.finish_reason, self._done = "stop", True
            return True
        self.ids.append(token)
        if self.params.logprobs:
            self.lps.append(logprob)
        new_text = self.scanner.feed(self.engine.tokenizer.decode(self.ids))
        if self.on_step is not None:

            self.on_step(Step(index, new_text, token, logprob if self.params.logprobs else None))
        if self.scanner.stopped:
            self.finish_reason, self._done = "stop", True
        elif len(self.ids) >= self.params.max_tokens:
            self._done = True
        return self._done

    def finish(self) -> Completion:
        """Release held-back text, keep the KV for later prompts, and describe the answer."""
        import torch


        tail = self.scanner.finish(self.engine.tokenizer.decode(self.ids))
        if tail and self.on_step is not None:
            self.on_step(Step(len(self.ids), tail, -1, None))
        if self.engine.prefix_cache is not None:
            with torch.inference_mode():
                self.engine.store_prefix([*self.prompt_ids, *self.fed], self._cache)
        self._cache = self._logits = None  # free the KV now; the prefix cache holds its own blocks
        return Completion(
            text=self.scanner.final_text or "",
            token_ids=tuple(self.ids),
            logprobs=tuple(self.lps),
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            prefill_s=self.prefill_s,
            ttft_s=self.ttft_s,
            total_s=time.monotonic() - self._started,
            cached_tokens=self.cached_tokens,
            compute_s=self.compute_s,
            decode_s=self.decode_s,
        )

    def abandon(self) -> None:
        """Drop the KV without storing it (the request failed or was cancelled)."""
        self._cache = self._logits = None
        self._done = True
