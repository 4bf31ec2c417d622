"""The torch engine: one batched forward per step over every active request (continuous batching).

Each :meth:`Engine.step` packs the next tokens of every request it is given into one row: the
last sampled token of each decoding request first, then chunks of prompts still prefilling (in
admission order) up to ``step_tokens`` tokens in all, so a long prompt is prefilled over several
steps while the others keep decoding (chunked prefill, as in vLLM and llama.cpp's server). Their
keys and values live in one :class:`~permamesh.workers.kvpool.KVPool`; a 4D attention mask and
per-token position ids make every request see only its own tokens, so its logits are those it
would get alone and the per-token log-probabilities stay the raw model's (what verification
compares). Logits are computed only where a next token is due (``logits_to_keep``). Requests
join (:meth:`Engine.start`) and leave (:meth:`Engine.finish`, :meth:`Engine.abandon`) between
steps.

The prefix cache (:class:`~permamesh.workers.prefix_cache.PrefixKVCache`) serves a new request
the KV of its longest cached block-aligned prefix (copied into the pool at :meth:`start`); a
prompt's KV is stored as soon as its prefill ends (so requests that arrive while it decodes
already hit), and the answer's at :meth:`finish` (so the next turn of a chat hits a long prefix).

Who calls it: :class:`permamesh.workers.executor.Executor` on its engine thread (``start``,
``step`` over the active requests, ``finish``/``abandon``); :meth:`Engine.generate` runs one
request to the end (tests, the verifier's reference, tools). Nothing here is thread-safe.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Sequence

from permamesh.wire.messages import GenerateRequest
from permamesh.workers.decoding import Decoding, plan_step, run_alone
from permamesh.workers.errors import ContextLengthError, ModelError, RequestError
from permamesh.workers.models import LoadedModel
from permamesh.workers.prefix_cache import PrefixKVCache
from permamesh.workers.sampling import Completion, SamplingParams, Step, StepReport, sample_token  # re-exported

log = logging.getLogger(__name__)

__all__ = ["Completion", "Engine", "EngineConfig", "SamplingParams", "Step", "StepReport"]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    step_tokens: int = 256  # tokens one forward takes at most: decode tokens first, then prompt chunks


class Engine:
    """Continuous batching over a transformers causal LM (full attention, sdpa or eager)."""

    backend = "torch"

    def __init__(self, loaded: LoadedModel, prefix_cache: PrefixKVCache | None = None,
                 config: EngineConfig = EngineConfig()) -> None:
        if config.step_tokens < 1:
            raise ValueError("step_tokens must be >= 1")
        self.loaded = loaded
        self.prefix_cache = prefix_cache  # may be set later (the worker learns its group's salt first)
        self.config = config
        self.tokenizer = loaded.tokenizer
        model_config = getattr(loaded.model, "config", None)
        self.max_context = int(getattr(model_config, "max_position_embeddings", 2048) or 2048)
        self.vocab_size = int(getattr(model_config, "vocab_size", 0) or 0)  # the logits' width
        self._attention = _attention_kind(model_config)
        self._pool = None  # made at the first start (it needs torch and the model's shapes)

    sample = staticmethod(sample_token)

    def prompt_ids(self, req: GenerateRequest) -> list[int]:
        if req.messages:
            return self.tokenizer.chat_ids(req.messages)
        return self.tokenizer.encode(req.prompt or "")

    # ------------------------------------------------------------------ requests join
    def start(self, prompt_ids: Sequence[int], params: SamplingParams,
              on_step: Callable[[Step], None] | None = None) -> Decoding:
        """A request's decoding state, its cached prefix already in the pool: pass it to
        :meth:`step` until ``done``, then to :meth:`finish` (or :meth:`abandon`)."""
        import torch

        if not prompt_ids:
            raise RequestError("empty prompt")
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise ContextLengthError(f"prompt of {len(prompt_ids)} tokens leaves no room in the {self.max_context}-token context")
        run = Decoding(self, tuple(prompt_ids), dataclasses.replace(params, max_tokens=min(params.max_tokens, room)),
                       on_step)
        with torch.inference_mode():
            pool = self._kv_pool()
            run.seq = pool.open()
            try:
                if self.prefix_cache is not None:
                    matched, past = self.prefix_cache.lookup(list(prompt_ids))
                    if matched:
                        pool.load(run.seq, past)
                    run.cached_tokens = run.prefilled = matched
            except BaseException:
                pool.close(run.seq)
                raise
        return run

    def _kv_pool(self):
        if self._pool is None:
            import torch

            from permamesh.workers.kvpool import KVPool

            c = self.loaded.model.config
            heads = int(c.num_attention_heads)
            head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
            dtype = next(self.loaded.model.parameters()).dtype
            with torch.inference_mode():
                self._pool = KVPool(int(c.num_hidden_layers), int(getattr(c, "num_key_value_heads", None) or heads),
                                    head_dim, dtype, self.loaded.device)
        return self._pool

    # ------------------------------------------------------------------ one step
    def step(self, runs: Sequence[Decoding]) -> StepReport:
        """One forward over the next tokens of ``runs`` (active, not done); each request whose
        fed tokens make a next token due samples and streams it. A failure of one request's own
        part (a streaming callback, say) is returned in ``failed``; a failure of the forward
        raises, and then every request of the step is over (abandon them)."""
        import torch

        t0 = time.monotonic()
        plan = plan_step(runs, self.config.step_tokens)
        if not plan:
            return StepReport(0, 0, 0.0)
        with torch.inference_mode():
            logits = self._forward(plan)
        seconds = time.monotonic() - t0
        decode = sum(1 for run, _, _ in plan if not run.prefilling)
        prefill = sum(len(tokens) for _, tokens, _ in plan) - decode
        failed, row = [], 0
        for run, tokens, due in plan:
            run.fed_tokens(len(tokens), seconds)
            if not due:
                continue
            try:
                run.take(logits[row])
            except Exception as exc:  # noqa: BLE001 - this request is over; the others go on
                failed.append((run, exc))
            row += 1
            if run.prefilled == len(run.prompt_ids) and not run.fed and self.prefix_cache is not None:
                self._store_prompt(run)
        return StepReport(prefill, decode, time.monotonic() - t0, tuple(failed))

    def _forward(self, plan):
        """Run the packed tokens of ``plan``; the logits of the due positions, in plan order."""
        import torch

        from permamesh.workers.kvpool import PoolCache

        pool, device = self._pool, self.loaded.device
        ids, seqs, positions, slots, keep = [], [], [], [], []
        for run, tokens, due in plan:
            start = pool.length(run.seq)
            if start != run.length:
                raise RuntimeError(f"KV pool holds {start} positions of a request that has {run.length}")
            slots.append(pool.reserve(run.seq, len(tokens)))
            ids.extend(tokens)
            seqs.extend([run.seq] * len(tokens))
            positions.extend(range(start, start + len(tokens)))
            if due:
                keep.append(len(ids) - 1)
        used = pool.used()
        query_seq = torch.tensor(seqs, dtype=torch.long, device=device)
        query_pos = torch.tensor(positions, dtype=torch.long, device=device)
        mask = pool.mask(query_seq, query_pos, used, None if self._attention == "sdpa" else pool.dtype)
        out = self.loaded.model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=device),
            position_ids=query_pos[None],
            attention_mask=mask,
            cache=PoolCache(pool, torch.cat(slots), used),
            use_cache=True,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device),
        )
        return out.logits[0].float()

    # ------------------------------------------------------------------ requests leave
    def finish(self, run: Decoding) -> Completion:
        """A done request: release its held-back text, keep its KV for later prompts, free it."""
        import torch

        try:
            done = run.complete()
            if self.prefix_cache is not None:
                with torch.inference_mode():
                    self.store_prefix([*run.prompt_ids, *run.fed], self._pool.gather(run.seq))
            return done
        finally:
            self.abandon(run)

    def abandon(self, run: Decoding) -> None:
        """Free the request's KV without storing it (it failed or was cancelled)."""
        run.done = True
        if self._pool is not None and run.seq is not None:
            import torch

            with torch.inference_mode():
                self._pool.close(run.seq)
            run.seq = None

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 on_step: Callable[[Step], None] | None = None) -> Completion:
        """Run one request to the end on the calling thread."""
        return run_alone(self, prompt_ids, params, on_step)

    # ------------------------------------------------------------------ prefix cache
    def _store_prompt(self, run: Decoding) -> None:
        """The prompt's prefill just ended: keep its KV now, if it adds a block."""
        size = self.prefix_cache.block_size
        if len(run.prompt_ids) // size > run.cached_tokens // size and run.seq is not None:
            import torch

            with torch.inference_mode():
                self.store_prefix(list(run.prompt_ids), self._pool.gather(run.seq))

    def store_prefix(self, token_ids: list[int], cache) -> None:
        """Keep the KV of ``token_ids`` for later prompts; a cache failure never costs the answer."""
        try:
            added = self.prefix_cache.store(token_ids, cache)
        except Exception:  # noqa: BLE001 - the answer is complete; log the bug and move on
            log.exception("prefix cache store failed for %d tokens", len(token_ids))
            return
        log.debug("prefix cache: %d new blocks from %d tokens", added, len(token_ids))


def _attention_kind(config) -> str:
    """``sdpa`` or ``eager`` (the kinds that take an arbitrary 4D mask); refuse models whose
    layers are not all full attention (a pooled KV cannot hold a sliding window)."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(config, "use_sliding_window", False):
        raise ModelError(f"the batched torch engine needs full-attention layers only, not {sorted(kinds)}")
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in ("sdpa", "eager"):
        raise ModelError(f"the batched torch engine needs sdpa or eager attention (a 4D mask), not {attention!r}")
    return attention
