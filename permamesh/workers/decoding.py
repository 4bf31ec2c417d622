"""One request's decoding state between engine steps; the same for every backend.

A :class:`Decoding` is created by an engine's ``start`` (:class:`permamesh.workers.engine.Engine`
or :class:`permamesh.workers.llamacpp.LlamaEngine`), which also fills ``cached_tokens`` (the
prompt prefix whose KV the engine reused) and ``seq`` (the engine's own handle on the request's
KV). Each engine step asks every active decoding what to feed (:meth:`Decoding.next_tokens`: a
chunk of the prompt while prefilling, else the last sampled token), runs one forward over all
of them, then reports back (:meth:`Decoding.fed`) and, where the fed tokens end at a position
that needs a next token, hands it the logits (:meth:`Decoding.take`), which samples, streams and
decides whether the answer is done. The engine's ``finish`` then calls :meth:`Decoding.complete`.

Sampling features live here, so both engines have them alike: presence and frequency
penalties over the answer's tokens, a grammar's mask
(:class:`~permamesh.workers.constraints.Constraint`, compiled when the request starts), the
top log-probabilities and each token's text; the log-probabilities reported are always the
raw model's (before penalties, mask, temperature and top-p), as verification compares them.

Each request has its own stop scanner and random generator, and sampling reads only its own
logits, so sharing steps with other requests gives every one the tokens it would get alone
(greedy, and sampled with a seed), up to float rounding of the batched forward.

Timing: ``ttft_s`` is wall seconds from the start to the first token; ``prefill_s`` and
``decode_s`` are the seconds of the engine steps this request took part in while prefilling
and while decoding (a step shared with others counts whole: it is what this request waited).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

from permamesh.workers.sampling import (Completion, SamplingParams, Sampler, Step, apply_penalties, generator,
                                        raw_logprob, top_alternatives)
from permamesh.workers.stops import StopScanner

log = logging.getLogger(__name__)


class Decoding:
    """The state of one request between steps; driven by the engine thread only."""

    def __init__(self, sampler: Sampler, prompt_ids: tuple[int, ...], params: SamplingParams,
                 on_step: Callable[[Step], None] | None) -> None:
        self.sampler, self.prompt_ids, self.params, self.on_step = sampler, prompt_ids, params, on_step
        self.gen = generator(params.seed)
        self.scanner = StopScanner(params.stop)
        self.seq: object = None  # the engine's handle on this request's KV
        self.ids: list[int] = []  # sampled answer tokens (EOS excluded)
        self.fed: list[int] = []  # answer tokens whose KV is held (the last sampled one is not)
        self.lps: list[float] = []
        self.counts: dict[int, int] = {}  # answer token -> occurrences (the penalties' input)
        self.tops: list[tuple[tuple[str, float], ...]] = []  # alternatives per token (top_logprobs)
        self.constraint = None
        if params.grammar_kind:  # compiled here, so a bad grammar fails the request before any step
            from permamesh.workers.constraints import Constraint

            self.constraint = Constraint(sampler.tokenizer, sampler.vocab_size, params.grammar_kind, params.grammar)
        self.finish_reason = "length"
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.prefilled = 0  # prompt tokens whose KV is held (cached ones included)
        self.prefill_s = self.decode_s = self.ttft_s = 0.0
        self.started = time.monotonic()
        self.done = False

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt_ids)

    @property
    def length(self) -> int:
        """Positions whose KV is held."""
        return self.prefilled + len(self.fed)

    def next_tokens(self, budget: int) -> list[int]:
        """What to feed in the next step, at positions ``length`` onwards: up to ``budget``
        prompt tokens while prefilling, else the last sampled token."""
        if self.prefilling:
            return list(self.prompt_ids[self.prefilled: self.prefilled + max(budget, 0)])
        return [self.ids[-1]] if self.ids and not self.done else []

    def fed_tokens(self, count: int, seconds: float) -> bool:
        """``count`` tokens from :meth:`next_tokens` went through a step of ``seconds``; True
        when the step's logits at the last of them are wanted (a next token is due)."""
        if self.prefilling:
            self.prefilled += count
            self.prefill_s += seconds
            return not self.prefilling
        self.fed.append(self.ids[-1])
        self.decode_s += seconds
        return True

    def take(self, logits) -> bool:
        """Sample the next token from ``logits`` (the model's, for the position after the last
        fed token), stream it; True when the answer is done."""
        params = self.params
        if (params.penalized and self.counts) or self.constraint is not None:
            chosen = apply_penalties(logits, self.counts, params)
            if self.constraint is not None:
                chosen = self.constraint.mask(chosen)
            token, _ = self.sampler.sample(chosen, params, self.gen)
            logprob = raw_logprob(logits, token)  # the model's own, as verification compares
        else:
            token, logprob = self.sampler.sample(logits, params, self.gen)
        if not self.ids:
            self.ttft_s = time.monotonic() - self.started
        if token in self.sampler.tokenizer.eos_ids:
            self.finish_reason, self.done = "stop", True
            return True
        self.ids.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        if self.constraint is not None:
            self.constraint.advance(token)
        if params.logprobs:
            self.lps.append(logprob)
        if params.top_logprobs:
            decode = self.sampler.tokenizer.decode
            self.tops.append(tuple((token_text(decode, i), lp) for i, lp in top_alternatives(logits, params.top_logprobs)))
        new_text = self.scanner.feed(self.sampler.tokenizer.decode(self.ids))
        if self.on_step is not None:
            self.on_step(Step(len(self.ids) - 1, new_text, token, logprob if params.logprobs else None,
                              token_text(self.sampler.tokenizer.decode, token) if params.logprobs else "",
                              self.tops[-1] if params.top_logprobs else ()))
        if self.scanner.stopped or (self.constraint is not None and self.constraint.stopped):
            self.finish_reason, self.done = "stop", True
        elif len(self.ids) >= self.params.max_tokens:
            self.done = True
        return self.done

    def complete(self) -> Completion:
        """Release held-back text and describe the answer (the engine keeps or frees the KV)."""
        tail = self.scanner.finish(self.sampler.tokenizer.decode(self.ids))
        if tail and self.on_step is not None:
            self.on_step(Step(len(self.ids), tail, -1, None))
        return Completion(
            text=self.scanner.final_text or "",
            token_ids=tuple(self.ids),
            logprobs=tuple(self.lps),
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            prefill_s=self.prefill_s,
            ttft_s=self.ttft_s,
            total_s=time.monotonic() - self.started,
            cached_tokens=self.cached_tokens,
            tokens=tuple(token_text(self.sampler.tokenizer.decode, i) for i in self.ids) if self.params.logprobs else (),
            top_logprobs=tuple(self.tops),
            compute_s=self.prefill_s + self.decode_s,
            decode_s=self.decode_s,
        )


def run_alone(engine, prompt_ids: Sequence[int], params: SamplingParams,
              on_step: Callable[[Step], None] | None = None) -> Completion:
    """One request to the end on the calling thread, through ``engine``'s batched interface
    (``start``, ``step``, ``finish``, ``abandon``): what both engines' ``generate`` do."""
    run = engine.start(prompt_ids, params, on_step)
    try:
        while not run.done:
            report = engine.step([run])
            if report.failed:
                raise report.failed[0][1]
        return engine.finish(run)
    finally:
        engine.abandon(run)


def token_text(decode, token: int) -> str:
    """One token's text as a result carries it (cut to the wire's bound)."""
    from permamesh.wire.messages import MAX_TOKEN_TEXT

    return decode([token])[:MAX_TOKEN_TEXT]


def plan_step(runs: Sequence[Decoding], step_tokens: int) -> list[tuple[Decoding, list[int], bool]]:
    """What one engine step feeds: ``(request, tokens, whether a next token is due after them)``.

    Every decoding request's one token first (decoding never waits behind a prefill), then
    chunks of the prompts still prefilling, in the order given (admission order), until
    ``step_tokens`` tokens are planned: a long prompt takes several steps, and the others'
    decoding goes on meanwhile (chunked prefill)."""
    plan, budget = [], step_tokens
    for run in runs:
        if not run.done and not run.prefilling:
            plan.append((run, run.next_tokens(1), True))
    budget -= len(plan)
    for run in runs:
        if run.done or not run.prefilling or budget <= 0:
            continue
        tokens = run.next_tokens(budget)
        budget -= len(tokens)
        plan.append((run, tokens, run.prefilled + len(tokens) == len(run.prompt_ids)))
    return [(run, tokens, due) for run, tokens, due in plan if tokens]
