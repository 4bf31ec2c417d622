"""The sampling contract, checked over many answers: a worker samples as it is asked.

One answer's credit (:mod:`~permamesh.verify.credit`) catches a worker whose tokens are
*unlikely* under the registered model. Two cheaters pass that check on every answer:

- **argmax-only**: ignores temperature, top_p and seed and always answers the likeliest token
  (it saves the sampling and gets a cache-friendly, deterministic answer). Its tokens are
  *too* likely: the reference's argmax every time, where an honest sampler at temperature
  0.7 picks it perhaps two times in three;
- **seed-ignoring**: samples with fresh randomness even when the request names a seed, so a
  user who re-runs a seeded request does not get the same answer.

Both show only in aggregate, so this module keeps, per node, sums over its sampled answers
(temperature > 0) of the last ``window_epochs`` epochs and judges them each epoch:

- **argmax excess** ``z_max = (hits - sum p) / sqrt(sum p (1 - p))``, ``hits`` the answer tokens
  equal to the reference's argmax, ``p`` the probability that a token drawn from the request's
  sampling distribution is the argmax. An honest sampler's hits are a sum of Bernoulli(p)
  draws, so ``z_max`` is about N(0, 1); argmax-only has every hit. Fails above ``max_z``.
- **typicality, two-sided**: the per-answer typicality numerators and variances summed
  (``z = sum(log p_ref - E) / sqrt(sum Var)``). An honest sampler is about N(0, 1); a cheap
  model sinks it, argmax-only lifts it. Fails outside ``+-typicality_z``.
- **seeded replay**: for a seeded request the validator replays the seed's draws over its own
  logits (:func:`~permamesh.verify.scoring.seeded_replay`); an honest answer differs from the
  replay only where other numerics move a draw across a boundary (rare). Fails when the
  window's mismatched seeded tokens exceed ``seed_slack`` of them plus ``seed_grace``.

Thresholds are set so that an honest worker (fp32, bf16, llama.cpp) essentially never fails
(a normal tail beyond 6 sigma is 1e-9 a judgement) while a cheater's statistic grows like the
square root of its sampled tokens: see ``docs/verification.md`` section 3.8.

Who calls it: :mod:`permamesh.committee.duties` and the verification benchmark, once per node
and epoch (:func:`tally` of its credits, then :func:`update` and :func:`judge`). Pure.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import Protocol

from permamesh.verify.errors import VerifyError


log = logging.getLogger(__name__)

__all__ = ["ENGINE_CONTRACTS", "ContractConfig", "ContractState", "Tally", "Verdict", "contract_for", "judge", "tally",
           "update"]


@dataclasses.dataclass(frozen=True)
class ContractConfig:
    max_z: float = 6.0  # argmax excess z above which the worker is not sampling
    typicality_z: float = 6.0  # |aggregated typicality z| beyond which it is not the model's sampler
    seed_slack: float = 0.05  # share of seeded tokens that may differ from the replay...
    seed_grace: int = 2  # ...plus this many (honest boundary flips: bf16 torch 0.3% of seeded tokens)
    window_epochs: int = 10  # epochs whose sums are judged together
    min_tokens: int = 16  # sampled tokens in the window before argmax and typicality are judged

    def __post_init__(self) -> None:
        if not (self.max_z > 0 and self.typicality_z > 0 and 0 <= self.seed_slack < 1 and self.seed_grace >= 0
                and self.window_epochs >= 1 and self.min_tokens >= 1):
            raise VerifyError(f"contract config out of range: {self}")


# Per engine, as the credit configs are (verify.credit.ENGINE_CONFIGS): where a worker's logits
# sit further from the fp32 reference, more seeded draws land across a boundary of the replay's
# cumulative distribution. Measured against SmolLM2's fp32 reference (80 seeded sampled answers
# each, 3,100 tokens): bf16 torch 0.32% of seeded tokens, llama.cpp (the wheel's GGUF) 3.3-4.6%,
# up to 5 of 40 in one answer, and 7 of 39 in one node's first two epochs of a soak: a contract
# break for an honest worker. Most of llama.cpp's flips lose the race by a hair: counted only
# beyond its ``seed_tie_nats`` (0.5, verify.credit.ENGINE_CONFIGS) they are 0.4-0.6% of seeded
# tokens, and llama.cpp's allowance is torch's with one more token of grace. It keeps an honest
# worker's chance of failing a window near 1e-4 at 16 seeded tokens (binomial tail) and far below
# at more; a seed-ignoring worker misses about half its draws beyond any tie and fails within its
# first seeded answers.
ENGINE_CONTRACTS: dict[str, "ContractConfig"] = {}


def contract_for(engine: str, table: dict[str, "ContractConfig"] | None = None) -> "ContractConfig":
    """The contract config for a worker serving with ``engine`` (an unknown engine gets torch's,
    the strictest: a worker must not loosen its own checks by naming an engine)."""
    table = ENGINE_CONTRACTS if table is None else table
    return table.get(engine, table["torch"])


@dataclasses.dataclass(frozen=True)
class Tally:
    """Sums over one node's sampled answers of one epoch (add them: :meth:`plus`)."""

    tokens: int = 0  # sampled answer tokens scored
    argmax_hits: int = 0
    argmax_expected: float = 0.0  # sum of p
    argmax_variance: float = 0.0  # sum of p (1 - p)
    typicality_sum: float = 0.0  # sum of (log p_ref - its expectation)
    typicality_variance: float = 0.0
    seeded_tokens: int = 0
    seed_mismatches: int = 0

    def plus(self, other: Tally) -> Tally:
        return Tally(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclasses.dataclass(frozen=True)
class ContractState:
    """One node's tallies of its last ``window_epochs`` epochs, oldest first."""

    epochs: tuple[Tally, ...] = ()

    def total(self) -> Tally:
        out = Tally()
        for t in self.epochs:
            out = out.plus(t)
        return out


@dataclasses.dataclass(frozen=True)
class Verdict:
    ok: bool
    argmax_z: float | None  # None: too few sampled tokens yet
    typicality_z: float | None
    seed_mismatches: int
    seeded_tokens: int
    reason: str  # "" when the contract holds


ENGINE_CONTRACTS.update({"torch": ContractConfig(), "llamacpp": ContractConfig(seed_slack=0.05, seed_grace=3)})


class _Sampled(Protocol):
    """What :func:`tally` reads of a :class:`~permamesh.verify.credit.Credit` (which imports this
    module, so it is not imported here)."""

    @property
    def sampling(self) -> Tally | None: ...


def tally(credits: Iterable[_Sampled]) -> Tally:
    """One epoch's sums from its answers' credits (only sampled answers with evidence count)."""
    out = Tally()
    for c in credits:
        s = c.sampling
        if s is not None:
            out = out.plus(s)
    return out


def update(state: ContractState, epoch: Tally, config: ContractConfig = ContractConfig()) -> ContractState:
    """``state`` with ``epoch``'s tally added and epochs beyond the window dropped."""
    if not isinstance(state, ContractState) or not isinstance(epoch, Tally):
        raise VerifyError("update() takes a ContractState and a Tally")
    return ContractState((state.epochs + (epoch,))[-config.window_epochs:])


def judge(state: ContractState, config: ContractConfig = ContractConfig()) -> Verdict:
    """Does the node keep the sampling contract over its window?"""
    t = state.total()
    argmax_z = typ_z = None
    reasons = []
    if t.tokens >= config.min_tokens:
        if t.argmax_variance > 0:
            argmax_z = (t.argmax_hits - t.argmax_expected) / math.sqrt(t.argmax_variance)
            if argmax_z > config.max_z:
                reasons.append(f"argmax excess z {argmax_z:.1f} over {t.tokens} sampled tokens (not sampling)")
        if t.typicality_variance > 0:
            typ_z = t.typicality_sum / math.sqrt(t.typicality_variance)
            if abs(typ_z) > config.typicality_z:
                reasons.append(f"aggregated typicality z {typ_z:+.1f} over {t.tokens} sampled tokens")
    if t.seed_mismatches > config.seed_slack * t.seeded_tokens + config.seed_grace:
        reasons.append(f"{t.seed_mismatches} of {t.seeded_tokens} seeded tokens differ from the seed's replay")
    if reasons:
        log.debug("sampling contract broken: %s", reasons[0])
    return Verdict(not reasons, argmax_z, typ_z, t.seed_mismatches, t.seeded_tokens, reasons[0] if reasons else "")
