"""Credit C in [0, 1] for one answer: pure arithmetic over the reference model's evidence.

The checks, each a number in [0, 1] (``docs/verification.md`` gives the calibration):

- **structure**: the answer is internally consistent: one reported log-prob per token, no
  more tokens than asked, ``length`` only at ``max_tokens``, ``stop`` only where the model
  would stop (greedy: ending is the reference's argmax, or within ``end_tie_nats`` of it, since
  a bf16 worker can see a near-tie the other way; sampled: ending has probability at
  least ``min_end_prob``) or a stop string was hit. A violation (e.g. a truncated answer) is
  credit 0: honest workers never produce one.
- **agreement**: the worker's reported log-probs against the reference's, per token, mean
  absolute difference ``d``. 1 up to ``agree_tol`` (the honest noise floor times a margin),
  falling linearly to 0 at ``agree_zero``. Only a worker that ran the registered model on
  this very prompt and answer can report them.
- **greedy** (temperature 0): the share of answer tokens equal to the reference's argmax;
  1 from ``greedy_good`` up, 0 at ``greedy_zero`` and below.
- **typicality** (temperature > 0): ``z = (sum of log p_ref(token) - sum of its expectation
  under the sampling distribution) / sqrt(sum of variances)``; 1 from ``z_good`` up, 0 at
  ``z_zero`` and below. A cheap model's tokens are less likely under the reference than the
  reference's own samples, so ``z`` sinks; honest answers give ``z`` around 0.
- **perplexity** (PlanetServe's ``min(1, 1/PPL)``): computed and reported for comparison but
  not part of C, because a blander impostor scores better and honest sampled answers of
  coherent text score below its 0.4 threshold.

``C = structure x min(agreement, greedy or typicality)``. Validators report it in parts per
million (:func:`to_ppm`); the committee aggregates integers only.

Who calls it: :class:`~permamesh.verify.verifier.Verifier` and the benchmark's calibration.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from permamesh.verify.errors import VerifyError
from permamesh.verify.scoring import TokenEvidence

__all__ = ["Credit", "CreditConfig", "answer_credit", "perplexity_credit", "ramp", "to_ppm"]

PPM = 1_000_000


@dataclasses.dataclass(frozen=True)
class CreditConfig:
    agree_tol: float = 0.03  # nats, mean |reported - reference| still fully credited (honest bf16: <= 0.009)
    agree_zero: float = 0.2  # nats, mean |difference| worth 0 (5% weight noise: 0.23-0.54)
    greedy_good: float = 0.9  # share of greedy matches fully credited
    greedy_zero: float = 0.5  # share worth 0
    z_good: float = -4.0  # typicality z fully credited (honest answers sit near 0)
    z_zero: float = -8.0  # z worth 0
    min_end_prob: float = 1e-4  # a sampled answer that claims "stop" needs at least this p(end)
    end_tie_nats: float = 0.1  # greedy: an ending this close to the argmax is a near-tie, not truncation

    def __post_init__(self) -> None:
        if not (0 <= self.agree_tol < self.agree_zero and 0 <= self.greedy_zero < self.greedy_good <= 1
                and self.z_zero < self.z_good and 0 < self.min_end_prob < 1 and self.end_tie_nats >= 0):
            raise VerifyError(f"credit config out of range: {self}")


@dataclasses.dataclass(frozen=True)
class Credit:
    """One answer's credit and the parts it came from (the "why" of the score)."""

    credit: float  # C in [0, 1]
    structure: float
    agreement: float
    behaviour: float  # greedy match credit at temperature 0, typicality credit above
    perplexity: float  # PlanetServe's min(1, 1/PPL), reported only
    mean_abs_diff: float  # nats, reported vs reference log-probs (inf if none reported)
    greedy_share: float | None  # temperature 0 only
    typicality_z: float | None  # temperature > 0 only
    reason: str  # "" when every check passed, else the first that did not

    @property
    def ppm(self) -> int:
        return to_ppm(self.credit)


def to_ppm(value: float) -> int:
    """``value`` in [0, 1] as integer parts per million (what validators sign)."""
    if not math.isfinite(value):
        raise VerifyError(f"credit {value!r} is not finite")
    return max(0, min(PPM, int(round(value * PPM))))


def ramp(x: float, zero: float, good: float) -> float:
    """0 at ``zero`` (and beyond it), 1 at ``good`` (and beyond), linear between."""
    if good == zero:
        return 1.0 if x >= good else 0.0
    t = (x - zero) / (good - zero)
    return max(0.0, min(1.0, t))


def perplexity_credit(reference_logprobs: Sequence[float]) -> float:
    """PlanetServe's ``min(1, 1/PPL)`` of the answer under the reference model."""
    if not reference_logprobs:
        return 0.0
    mean_nll = -sum(reference_logprobs) / len(reference_logprobs)
    return min(1.0, math.exp(-mean_nll))


def answer_credit(evidence: TokenEvidence, reported_logprobs: Sequence[float], *, finish_reason: str,
                  max_tokens: int, stop_hit: bool, config: CreditConfig = CreditConfig()) -> Credit:
    """The credit of one answer; ``stop_hit``: the answer's text ended at a stop string."""
    n = evidence.tokens
    greedy = evidence.temperature <= 0.0
    problems = []
    if len(reported_logprobs) != n:
        problems.append(f"{len(reported_logprobs)} log-probs reported for {n} tokens")
    if n > max_tokens:
        problems.append(f"{n} tokens for max_tokens {max_tokens}")
    if finish_reason == "length" and n != max_tokens:
        problems.append(f"'length' after {n} of {max_tokens} tokens (truncated)")
    elif finish_reason == "stop" and not stop_hit:
        if greedy and not evidence.end_is_greedy and evidence.end_gap > config.end_tie_nats:
            problems.append("'stop' where the reference model would go on (truncated)")
        if not greedy and evidence.end_logprob < math.log(config.min_end_prob):
            problems.append(f"'stop' where ending has p = {math.exp(evidence.end_logprob):.1e} (truncated)")
    elif finish_reason not in ("stop", "length"):
        problems.append(f"unknown finish reason {finish_reason!r}")
    if n == 0 and finish_reason != "stop":
        problems.append("an empty answer")
    structure = 0.0 if problems else 1.0

    reported = [float(x) for x in reported_logprobs]
    if n and len(reported) == n and all(math.isfinite(x) for x in reported):
        diff = sum(abs(a - b) for a, b in zip(reported, evidence.reference_logprobs)) / n
    else:
        diff = 0.0 if n == 0 else math.inf
    agreement = ramp(-diff, -config.agree_zero, -config.agree_tol) if math.isfinite(diff) else 0.0

    greedy_share = typicality_z = None
    if greedy:
        greedy_share = sum(evidence.greedy_match) / n if n else 1.0
        behaviour = ramp(greedy_share, config.greedy_zero, config.greedy_good)
    else:
        spread = math.sqrt(sum(evidence.logprob_variance) + 1e-6)
        typicality_z = (sum(evidence.reference_logprobs) - sum(evidence.expected_logprob)) / spread
        behaviour = ramp(typicality_z, config.z_zero, config.z_good)
    if not problems and agreement < 1.0:
        problems.append(f"reported log-probs differ by {diff:.3g} nats per token")
    if not problems and behaviour < 1.0:
        problems.append(f"greedy match {greedy_share:.2f}" if greedy else f"typicality z {typicality_z:.2f}")
    return Credit(structure * min(agreement, behaviour), structure, agreement, behaviour,
                  perplexity_credit(evidence.reference_logprobs), diff, greedy_share, typicality_z,
                  problems[0] if problems else "")
