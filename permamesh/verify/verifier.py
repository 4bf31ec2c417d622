"""The validator's scorer: a (request, answer) pair in, a :class:`~permamesh.verify.credit.Credit` out.

A :class:`Verifier` holds the registered model as its reference (a
:class:`~permamesh.workers.models.LoadedModel`: the same weights, tokenizer and chat template
the worker claims to serve). :meth:`Verifier.score` re-derives the prompt's token ids the way
a worker must (chat template or raw text), checks what it can without the model (the answer
names the claimed model, its text is what its tokens decode to, its counts add up), runs one
teacher-forced pass (:func:`~permamesh.verify.scoring.teacher_forced`) and returns the credit.
:func:`epoch_credit` folds one node's challenge credits of an epoch into C(T): the minimum, so
one failed challenge makes the epoch abnormal (a part-time cheater is caught in an epoch with
probability ``1 - (1 - p)^challenges``).

Bad answers are expected here (that is the point): every malformed field is a zero credit with
its reason, never an exception; only a bad *request* (the validator's own input) raises
:class:`~permamesh.verify.errors.VerifyError`.

``budget`` (tokens): only the answer's first ``budget`` tokens are teacher-forced, so the
cost of one verification is bounded whatever max_tokens the challenge asked (challenges ask
what users ask, up to 512); ``engine``: the engine the worker's descriptor names, whose
:class:`~permamesh.verify.credit.CreditConfig` applies (:func:`~permamesh.verify.credit.config_for`).

Who calls it: validators (the committee issue's process), the verification benchmark and tests.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable

from permamesh.verify.credit import ENGINE_CONFIGS, Credit, CreditConfig, answer_credit, config_for, to_ppm
from permamesh.verify.errors import VerifyError
from permamesh.verify.scoring import teacher_forced
from permamesh.wire.messages import GenerateRequest, GenerateResult

log = logging.getLogger(__name__)

__all__ = ["Verifier", "epoch_credit", "zero_credit"]


def zero_credit(reason: str) -> Credit:
    """Credit 0 for an answer that fails before the model is consulted."""
    return Credit(0.0, 0.0, 0.0, 0.0, 0.0, float("inf"), None, None, reason)


def epoch_credit(credits: Iterable[Credit | float]) -> int:
    """C(T) in ppm from one node's challenge credits of an epoch (the minimum; 0 if none
    answered: a node that answers no challenge earns nothing)."""
    values = [c.credit if isinstance(c, Credit) else float(c) for c in credits]
    return to_ppm(min(values)) if values else 0


class Verifier:
    """Scores answers against ``reference`` (a LoadedModel of the registered model)."""

    def __init__(self, reference, config: CreditConfig | None = None, claimed: str | None = None,
                 configs: dict[str, CreditConfig] | None = None) -> None:
        from permamesh.workers.engine import Engine  # the worker's own prompt rendering

        self.reference = reference
        self.configs = dict(ENGINE_CONFIGS if configs is None else configs)
        if config is not None:
            self.configs["torch"] = config
        self.config = self.configs["torch"]
        self.claimed = claimed if claimed is not None else reference.name
        self._engine = Engine(reference)
        self.scored = 0
        self.busy_s = 0.0  # seconds spent in score(), for the verifications-per-minute figure

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        return self._engine.prompt_ids(request)

    def fits(self, request: GenerateRequest) -> bool:
        """Whether the registered model can serve ``request`` at all (its prompt leaves room for
        an answer in the context): a member never sends a challenge no honest worker can answer."""
        try:
            return len(self.prompt_ids(request)) < self._engine.max_context
        except Exception:  # noqa: BLE001 - a prompt the template refuses fits nowhere
            return False

    def score(self, request: GenerateRequest, result: object, *, budget: int | None = None,
              engine: str = "torch") -> Credit:
        """The credit of ``result`` as an answer to ``request`` from a worker on ``engine``,
        teacher-forcing at most ``budget`` of its tokens (None: all)."""
        if budget is not None and not (isinstance(budget, int) and budget >= 1):
            raise VerifyError(f"a scoring budget is a token count >= 1, not {budget!r}")
        started = time.monotonic()
        try:
            return self._score(request, result, budget, str(engine))
        finally:
            self.scored += 1
            self.busy_s += time.monotonic() - started

    def _score(self, request: GenerateRequest, result: object, budget: int | None, engine: str) -> Credit:
        config = config_for(engine, self.configs)
        if not isinstance(request, GenerateRequest):
            raise VerifyError(f"a challenge must be a GenerateRequest, not {type(request).__name__}")
        if not isinstance(result, GenerateResult):
            return zero_credit(f"answer is a {type(result).__name__}, not a result")
        if result.request_id != request.request_id:
            return zero_credit("answer is for another request")
        if self.claimed and result.model and result.model not in (self.claimed, f"{self.claimed}@{engine}"):
            return zero_credit(f"answer names model {result.model!r}, not {self.claimed!r}")
        ids = list(result.token_ids)
        if result.completion_tokens != len(ids):
            return zero_credit(f"completion_tokens {result.completion_tokens} for {len(ids)} token ids")
        tok = self.reference.tokenizer
        try:
            decoded = tok.decode(ids)
        except Exception as exc:  # noqa: BLE001 - ids from a peer may be anything
            return zero_credit(f"token ids do not decode: {exc}")
        stop_hit = any(s in decoded for s in request.stop)
        if not decoded.startswith(result.text.rstrip()) and not stop_hit:
            return zero_credit("text is not what the token ids decode to")
        # penalties reshape the sampling distribution by the answer so far: no seeded replay, no
        # contract sums; a grammar's mask is applied in the reference (scoring.grammar_masked), so
        # a constrained answer is checked like any other, against what its worker sampled from
        penalized = bool(request.presence_penalty or request.frequency_penalty)
        scored = ids if budget is None else ids[:budget]
        try:
            prompt = self.prompt_ids(request)
        except Exception as exc:  # noqa: BLE001 - the validator's own request: report, score 0
            return zero_credit(f"prompt does not render: {exc}")
        max_tokens = request.max_tokens
        if result.finish_reason == "length" and len(prompt) + len(ids) >= self._engine.max_context:
            max_tokens = len(ids)  # the context ran out first: an honest "length" short of max_tokens
        try:
            evidence = teacher_forced(self.reference.model, prompt, scored, eos_ids=tok.eos_ids,
                                      temperature=request.temperature, top_p=request.top_p,
                                      device=self.reference.device, seed=None if penalized else request.seed,
                                      grammar=(request.grammar_kind, request.grammar), tokenizer=tok)
        except VerifyError as exc:
            return zero_credit(str(exc))
        credit = answer_credit(evidence, result.logprobs, finish_reason=result.finish_reason,
                               max_tokens=max_tokens, stop_hit=stop_hit, config=config,
                               answer_tokens=len(ids))
        if penalized:
            credit = dataclasses.replace(credit, sampling=None)
        log.debug("credit %.3f for %s (%s)", credit.credit, request.request_id, credit.reason or "ok")
        return credit

    def rate_per_minute(self) -> float:
        """Verifications per minute of scoring time so far."""
        return 60.0 * self.scored / self.busy_s if self.busy_s > 0 else 0.0
