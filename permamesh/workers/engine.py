"""The generation engine: one model; requests decode token by token, interleaved.

Our own decode loop (rather than ``model.generate``) so that every token can be streamed,
stop strings cut exactly, per-token log-probabilities reported under the model's own
distribution (before temperature and top-p: that is what verification compares), and the
prefill step kept separate so a :class:`~permamesh.workers.prefix_cache.PrefixKVCache` can serve
the longest cached block-aligned prefix of a prompt and prefill only the rest. After each request
the KV of the prompt and of every answer token fed through the model is stored, so the next turn
of a chat (whose prompt contains this answer) hits a long prefix.

Who calls it: :class:`permamesh.workers.executor.Executor` starts a
:class:`~permamesh.workers.decoding.Decoding` per request (:meth:`Engine.start`) and steps the
active ones in turn on its engine thread; :meth:`Engine.generate` runs one request to the end
(tests, tools). Nothing here is thread-safe by itself.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Sequence

from permamesh.wire.messages import GenerateRequest
from permamesh.workers.decoding import Decoding
from permamesh.workers.errors import RequestError
from permamesh.workers.models import LoadedModel
from permamesh.workers.prefix_cache import PrefixKVCache
from permamesh.workers.sampling import Completion, SamplingParams, Step  # re-exported


log = logging.getLogger(__name__)


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

    def start(self, prompt_ids: Sequence[int], params: SamplingParams,
              on_step: Callable[[Step], None] | None = None) -> Decoding:
        """A request's decoding state, not yet run: call :meth:`Decoding.prefill`, then
        :meth:`Decoding.step` until it returns True, then :meth:`Decoding.finish`."""
        if not prompt_ids:
            raise RequestError("empty prompt")
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise RequestError(f"prompt of {len(prompt_ids)} tokens leaves no room in the {self.max_context}-token context")
        return Decoding(self, tuple(prompt_ids), dataclasses.replace(params, max_tokens=min(params.max_tokens, room)),
                        on_step)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 on_step: Callable[[Step], None] | None = None) -> Completion:
        """Run one request to the end on the calling thread."""
        run = self.start(prompt_ids, params, on_step)
        done = run.prefill()
        while not done:
            done = run.step()
        return run.finish()

    def store_prefix(self, token_ids: list[int], cache) -> None:
        """Keep the KV of ``token_ids`` for later prompts; a cache failure never costs the answer."""
        try:
            added = self.prefix_cache.store(token_ids, cache)
        except Exception:  # noqa: BLE001 - the answer is complete; log the bug and move on
            log.exception("prefix cache store failed for %d tokens", len(token_ids))
            return
        log.debug("prefix cache: %d new blocks from %d tokens", added, len(token_ids))

    def prefill_ids(self, prompt_ids: Sequence[int], past=None):
        """Run ``prompt_ids`` on top of ``past`` (a cache of the tokens before them, or None)."""
        import torch

        device = self.loaded.device
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        out = self.loaded.model(input_ids=input_ids, past_key_values=past, use_cache=True)
        return out.logits[0, -1].float(), out.past_key_values

    def decode_token(self, token: int, cache):
        import torch

        input_ids = torch.tensor([[token]], dtype=torch.long, device=self.loaded.device)
        out = self.loaded.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return out.logits[0, -1].float(), out.past_key_values

    @staticmethod
    def sample(logits, params: SamplingParams, gen) -> tuple[int, float]:
        """Pick the next token; return it with its log-probability under the raw model.

        Never raises on finite parameters: the logits are shifted so their maximum is 0 before
        dividing by the temperature (in float64), so no temperature, however small, overflows;
        a tiny one simply concentrates all mass on the likeliest tokens (greedy, ties shared).
        NaN logits count as impossible; if no logit is usable the choice falls back to argmax.
        """
        import torch

        raw = logits.detach().cpu().double()
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
