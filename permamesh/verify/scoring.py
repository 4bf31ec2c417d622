"""Teacher-forced scoring: what the reference model says about an answer, in one forward pass.

A validator holds the registered model (the *reference*). For a challenge's prompt and the
worker's answer tokens it runs ``prompt + answer`` through the reference once and reads, at
every answer position, from the exact log-softmax over the whole vocabulary (no top-K):

- the log-probability of the token the worker sent (``reference_logprobs``);
- the reference's own greedy token there (``greedy_match``: does the worker's token equal it);
- the expected log-probability and its variance of a token *sampled* from the request's
  sampling distribution (temperature, top-p) there, so a sampled answer can be checked for
  typicality (an impostor's tokens are less likely under the reference than the reference's
  own samples would be);
- after the last token: the log-probability of ending (any end-of-sequence id) and whether
  ending is the greedy choice, so a truncated answer that claims ``stop`` is caught.

A request with a grammar (``grammar_kind``, ``grammar``: structured output, tool calls) was
sampled from the model's logits under the grammar's mask (:mod:`permamesh.workers.constraints`),
so the reference applies the same mask, walked over the answer's tokens, to everything it
compares with the *sampling*: the greedy token, the sampling distribution (typicality, argmax
excess), the seed's replay and the ending (an answer whose grammar is complete ends there, as
the worker's decoding does). The log-probabilities compared with the worker's stay the raw
model's, before the mask, as workers report them, and are compared only where the model
chose (:func:`_model_chosen`): where the grammar forced a token the model gave little mass,
its raw log-prob lies in the tail, where quantized engines differ most. An answer token the
grammar refuses is an error (:class:`VerifyError`: credit 0): an honest worker never sends one.

Only this module imports torch (lazily); :mod:`~permamesh.verify.credit` turns a
:class:`TokenEvidence` into a credit with pure arithmetic.

Who calls it: :class:`~permamesh.verify.verifier.Verifier` (``score``) and the calibration
in the verification benchmark.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

from permamesh.verify.errors import VerifyError

log = logging.getLogger(__name__)

__all__ = ["TokenEvidence", "teacher_forced"]


@dataclasses.dataclass(frozen=True)
class TokenEvidence:
    """The reference model's view of one answer (one entry per answer token)."""

    reference_logprobs: tuple[float, ...]  # log p_ref(token_i | prompt, tokens_<i)
    greedy_match: tuple[bool, ...]  # token_i == argmax p_ref(. | ...)
    expected_logprob: tuple[float, ...]  # E[log p_ref(x)] for x drawn from the sampling distribution
    logprob_variance: tuple[float, ...]  # Var[log p_ref(x)] under the same draw
    end_logprob: float  # log p_ref(end of sequence | prompt, answer)
    end_is_greedy: bool  # ending is the reference's greedy choice after the answer
    temperature: float
    top_p: float
    end_gap: float = math.inf  # nats from the reference's best next token down to its best ending
    argmax_prob: tuple[float, ...] = ()  # P(the sampled token is the reference's argmax) per position
    seed_match: tuple[bool, ...] = ()  # seeded and sampled: token_i == the reference's replay of the seed's draw
    seed_gap: tuple[float, ...] = ()  # the same positions: nats of race score token_i finished behind the replay's winner
    compared: tuple[bool, ...] = ()  # positions whose reported log-prob is compared (empty: all)
    greedy_gap: tuple[float, ...] = ()  # nats from the reference's argmax down to token_i (0 where it is the argmax)

    @property
    def tokens(self) -> int:
        return len(self.reference_logprobs)


#: Positions raced at once by the typicality and replay arithmetic (bounds its memory: each
#: array is ``rows x vocabulary`` float32, ~10 MB for 48 rows of SmolLM2's 49k vocabulary).
ROWS_AT_ONCE = 64
NO_RACE = 1e30  # a race gap where the token had no weight at all


def _race_weights(logits, temperature: float, top_p: float):
    """Each position's weights in the worker's race (:func:`~permamesh.workers.sampling.race_weights`,
    the arithmetic every backend samples with), a float32 numpy array, :data:`ROWS_AT_ONCE`
    rows at a time; None at temperature 0 or when a row has no finite maximum (not from a real
    model: those positions are scored one by one, as the worker picks)."""
    import numpy as np

    from permamesh.workers.sampling import race_weights

    rows = logits.detach().cpu().float().numpy()
    if temperature <= 0.0 or not len(rows) or not np.isfinite(rows.max(axis=1)).all():
        return None
    return np.concatenate([race_weights(rows[first:first + ROWS_AT_ONCE], temperature, top_p)
                           for first in range(0, len(rows), ROWS_AT_ONCE)])


def _sampling_probs(logits, weights):
    """The per-position distribution the worker samples from: ``weights`` normalised, or where
    there are none (greedy, or rows without a finite maximum) the first maximum's one-hot."""
    import numpy as np
    import torch

    if weights is None:
        probs = torch.zeros_like(logits)
        probs.scatter_(-1, torch.nan_to_num(logits, nan=-math.inf).argmax(dim=-1, keepdim=True), 1.0)
        return probs
    probs = weights / weights.sum(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    return torch.from_numpy(probs).to(logits.device)


def seeded_replay(logits, weights, answer: Sequence[int], temperature: float, top_p: float,
                  seed: int) -> tuple[bool, ...]:
    """Whether each answer token is the seed's replayed draw (:func:`seeded_race_gaps` == 0)."""
    return tuple(g == 0.0 for g in seeded_race_gaps(logits, weights, answer, temperature, top_p, seed))


def seeded_race_gaps(logits, weights, answer: Sequence[int], temperature: float, top_p: float,
                     seed: int) -> tuple[float, ...]:
    """Replay the seed's draws over the reference's logits, teacher-forced on ``answer``: per
    position, how far (nats of race score, log(weight / Exp)) the answer's token finished behind
    the replay's winner: 0 where it won, 1e30 where the reference gives it no weight (outside
    its nucleus). The sampling contract of every backend is
    :func:`~permamesh.workers.sampling.sample_token` with one
    :func:`~permamesh.workers.sampling.generator` seeded with ``seed`` per request, one
    exponential race per token, so an honest answer's token i wins replay i except where the
    worker's own logits (other hardware, bf16, llama.cpp's 8-bit activations) tip a close race,
    and then it finishes a hair behind (the generator's state does not depend on the
    probabilities, so one such flip does not desynchronise the rest); a token drawn without the
    seed finishes anywhere. The draws do not depend on the tokens, so every position races at
    once over ``weights`` (:func:`_race_weights`), drawing, row by row, the numbers the worker
    drew one token at a time; without weights, one :func:`sample_token` per position (0 or
    1e30)."""
    import numpy as np

    from permamesh.workers.sampling import SamplingParams, generator, race_scores, sample_token

    gen = generator(int(seed))
    if weights is None:
        params = SamplingParams(max_tokens=max(1, len(answer)), temperature=temperature, top_p=top_p, seed=int(seed))
        return tuple(0.0 if sample_token(logits[i], params, gen)[0] == int(t) else NO_RACE
                     for i, t in enumerate(answer))
    scores = race_scores(weights, gen)  # float32, rows x vocabulary: read two entries a row, no copy
    mine = scores[np.arange(len(answer)), np.asarray([int(t) for t in answer], dtype=np.int64)].astype(np.float64)
    best = scores.max(axis=1).astype(np.float64)
    with np.errstate(divide="ignore"):
        gaps = np.where(mine >= best, 0.0, np.log(best) - np.log(mine))
    return tuple(float(g) if np.isfinite(g) else NO_RACE for g in gaps)


def grammar_masked(logits, answer: Sequence[int], kind: str, grammar: str, tokenizer):
    """``logits`` (one row per answer position and one after it) with each row masked as the
    grammar allowed at that point of ``answer``; and whether the grammar is complete after it.
    Raises VerifyError when the grammar does not compile or refuses an answer token."""
    import torch

    from permamesh.workers.constraints import Constraint
    from permamesh.workers.errors import WorkerError

    try:
        constraint = Constraint(tokenizer, int(logits.shape[-1]), kind, grammar)
    except WorkerError as exc:
        raise VerifyError(f"the request's grammar: {exc}") from None
    rows = []
    for i, token in enumerate(answer):
        rows.append(constraint.mask(logits[i]))
        if not torch.isfinite(rows[-1][int(token)]) or not constraint.matcher.consume_token(int(token)):
            raise VerifyError(f"answer token {i} ({int(token)}) is outside the request's grammar")
    stopped = constraint.stopped
    rows.append(logits[len(answer)].detach().cpu().float().clone() if stopped else constraint.mask(logits[len(answer)]))
    return torch.stack(rows).to(logits.device), stopped


#: Under a grammar, a position's reported log-prob is compared only where the tokens the grammar
#: allowed hold at least this share of the reference's probability (the model chose there).
GRAMMAR_CHOICE_MASS = 0.5


def _model_chosen(logp, masked_logp) -> tuple[bool, ...]:
    """Per position: did the model choose the token, rather than the grammar force it? Where the
    grammar forbade most of what the model would say, the token it allows sits in the model's
    tail, where a quantized engine's log-probs stray furthest from the fp32 reference (an
    honest llama.cpp worker: 0.1-0.4 nats per token on short JSON answers, against 0.03-0.05
    unconstrained); those positions still count for the greedy, typicality and seed checks."""
    import torch

    finite = torch.where(torch.isfinite(masked_logp), logp, torch.full_like(logp, -math.inf))
    allowed = torch.logsumexp(finite, dim=-1)  # log of the reference's mass on the allowed tokens
    return tuple(bool(x) for x in (allowed >= math.log(GRAMMAR_CHOICE_MASS)).tolist())


def teacher_forced(model, prompt_ids: Sequence[int], answer_ids: Sequence[int], *,
                   eos_ids: frozenset[int] | set[int], temperature: float = 0.0, top_p: float = 1.0,
                   device: str = "cpu", seed: int | None = None, grammar: tuple[str, str] | None = None,
                   tokenizer=None) -> TokenEvidence:
    """Score ``answer_ids`` after ``prompt_ids`` under ``model`` in one forward pass (and, for a
    seeded sampled request, replay the seed's draws: :func:`seeded_replay`); ``grammar``:
    the request's ``(grammar_kind, grammar)``, masked as the worker did (needs ``tokenizer``)."""
    import torch

    prompt, answer = [int(t) for t in prompt_ids], [int(t) for t in answer_ids]
    if not prompt:
        raise VerifyError("cannot score an answer to an empty prompt")
    if not eos_ids:
        raise VerifyError("the reference tokenizer names no end-of-sequence id")
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if any(not 0 <= t < vocab for t in answer):
        raise VerifyError(f"answer holds token ids outside the reference vocabulary of {vocab}")
    ids = torch.tensor([prompt + answer], dtype=torch.long, device=device)
    with torch.inference_mode():
        # logits only where the answer is predicted (the LM head over the prompt would be wasted)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(answer) + 1).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)  # (len(answer) + 1, vocab), exact: what workers report
    n = len(answer)
    complete = False  # the grammar admits nothing more: the answer ends there
    sampled = logits  # what the worker sampled from (the grammar's mask applied)
    if grammar is not None and grammar[0]:
        sampled, complete = grammar_masked(logits, answer, grammar[0], grammar[1], tokenizer)
    slogp = torch.log_softmax(sampled, dim=-1) if sampled is not logits else logp
    tokens = torch.tensor(answer, dtype=torch.long, device=logp.device)
    ref = logp[:n].gather(-1, tokens[:, None])[:, 0] if n else logp[:0, 0]
    greedy = slogp[:n].argmax(dim=-1) == tokens if n else torch.zeros(0, dtype=torch.bool)
    chosen = slogp[:n].gather(-1, tokens[:, None])[:, 0] if n else slogp[:0, 0]
    greedy_gap = (slogp[:n].max(dim=-1).values - chosen).clamp(min=0.0) if n else slogp[:0, 0]
    weights = _race_weights(sampled[:n], temperature, top_p)
    probs = _sampling_probs(sampled[:n], weights)
    finite = torch.where(torch.isfinite(logp[:n]), logp[:n], torch.zeros_like(logp[:n]))
    mean = (probs * finite).sum(dim=-1)
    var = (probs * (finite - mean[:, None]) ** 2).sum(dim=-1).clamp(min=0.0)
    top = probs.gather(-1, slogp[:n].argmax(dim=-1, keepdim=True))[:, 0] if n else probs[:0, 0]
    seed_gap = (seeded_race_gaps(sampled, weights, answer, temperature, top_p, seed)
                if seed is not None and temperature > 0 else ())
    last = slogp[n]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=last.device)
    end_logprob = 0.0 if complete else float(torch.logsumexp(last[eos], dim=0))
    evidence = TokenEvidence(
        reference_logprobs=tuple(max(float(x), -1e30) for x in ref.tolist()),
        greedy_match=tuple(bool(x) for x in greedy.tolist()),
        expected_logprob=tuple(float(x) for x in mean.tolist()),
        logprob_variance=tuple(float(x) for x in var.tolist()),
        end_logprob=end_logprob if math.isfinite(end_logprob) else -1e30,
        end_is_greedy=complete or int(last.argmax()) in eos_ids,
        temperature=float(temperature),
        top_p=float(top_p),
        end_gap=0.0 if complete else max(0.0, float(last.max() - last[eos].max())),
        argmax_prob=tuple(float(x) for x in top.tolist()),
        seed_match=tuple(g == 0.0 for g in seed_gap),
        seed_gap=seed_gap,
        compared=_model_chosen(logp[:n], slogp[:n]) if sampled is not logits else (),
        greedy_gap=tuple(float(x) if math.isfinite(x) else 1e30 for x in greedy_gap.tolist()),
    )
    log.debug("scored %d answer tokens after %d prompt tokens", n, len(prompt))
    return evidence
