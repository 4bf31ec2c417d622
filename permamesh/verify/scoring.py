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

    @property
    def tokens(self) -> int:
        return len(self.reference_logprobs)


def _sampling_probs(logits, temperature: float, top_p: float):
    """The per-position distribution the worker samples from (as :class:`Engine` does)."""
    import torch

    if temperature <= 0.0:
        probs = torch.zeros_like(logits)
        probs.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
        return probs
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, dim=-1)
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < top_p
        keep[..., 0] = True
        kept = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        kept = kept / kept.sum(dim=-1, keepdim=True)
        probs = torch.zeros_like(probs).scatter(-1, order, kept)
    return probs


def seeded_replay(logits, answer: Sequence[int], temperature: float, top_p: float, seed: int) -> tuple[bool, ...]:
    """Replay the seed's draws over the reference's logits, teacher-forced on ``answer``: the
    sampling contract of every backend is :func:`~permamesh.workers.sampling.sample_token` with
    one CPU ``torch.Generator`` seeded with ``seed`` per request, one draw per token, so an
    honest answer's token i is the replay's draw i except where the worker's own logits (other
    hardware, bf16) put the draw across a boundary of the cumulative distribution (rare: the
    generator's state does not depend on the probabilities, so one such flip does not
    desynchronise the rest). Each draw consumes the generator as the worker's does."""
    import torch

    from permamesh.workers.sampling import SamplingParams, sample_token

    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    params = SamplingParams(max_tokens=max(1, len(answer)), temperature=temperature, top_p=top_p, seed=int(seed))
    return tuple(sample_token(logits[i], params, gen)[0] == int(t) for i, t in enumerate(answer))


def teacher_forced(model, prompt_ids: Sequence[int], answer_ids: Sequence[int], *,
                   eos_ids: frozenset[int] | set[int], temperature: float = 0.0, top_p: float = 1.0,
                   device: str = "cpu", seed: int | None = None) -> TokenEvidence:
    """Score ``answer_ids`` after ``prompt_ids`` under ``model`` in one forward pass (and, for a
    seeded sampled request, replay the seed's draws: :func:`seeded_replay`)."""
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
    logp = torch.log_softmax(logits, dim=-1)  # (len(answer) + 1, vocab), exact
    n = len(answer)
    tokens = torch.tensor(answer, dtype=torch.long, device=logp.device)
    ref = logp[:n].gather(-1, tokens[:, None])[:, 0] if n else logp[:0, 0]
    greedy = logp[:n].argmax(dim=-1) == tokens if n else torch.zeros(0, dtype=torch.bool)
    probs = _sampling_probs(logits[:n], temperature, top_p)
    finite = torch.where(torch.isfinite(logp[:n]), logp[:n], torch.zeros_like(logp[:n]))
    mean = (probs * finite).sum(dim=-1)
    var = (probs * (finite - mean[:, None]) ** 2).sum(dim=-1).clamp(min=0.0)
    top = probs.gather(-1, logp[:n].argmax(dim=-1, keepdim=True))[:, 0] if n else probs[:0, 0]
    replay = seeded_replay(logits, answer, temperature, top_p, seed) if seed is not None and temperature > 0 else ()
    last = logp[n]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=last.device)
    end_logprob = float(torch.logsumexp(last[eos], dim=0))
    evidence = TokenEvidence(
        reference_logprobs=tuple(max(float(x), -1e30) for x in ref.tolist()),
        greedy_match=tuple(bool(x) for x in greedy.tolist()),
        expected_logprob=tuple(float(x) for x in mean.tolist()),
        logprob_variance=tuple(float(x) for x in var.tolist()),
        end_logprob=end_logprob if math.isfinite(end_logprob) else -1e30,
        end_is_greedy=int(last.argmax()) in eos_ids,
        temperature=float(temperature),
        top_p=float(top_p),
        end_gap=max(0.0, float(last.max() - last[eos].max())),
        argmax_prob=tuple(float(x) for x in top.tolist()),
        seed_match=replay,
    )
    log.debug("scored %d answer tokens after %d prompt tokens", n, len(prompt))
    return evidence
