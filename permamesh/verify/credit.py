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
  Two-sided: ``z`` far *above* 0 (``z_high_good`` to ``z_high_zero``) is a worker whose tokens
  are likelier than a sampler's (argmax at temperature > 0); one answer is weak evidence of
  that, so the bounds are loose and :mod:`~permamesh.verify.contract` judges the sums.
- **perplexity** (PlanetServe's ``min(1, 1/PPL)``): computed and reported for comparison but
  not part of C, because a blander impostor scores better and honest sampled answers of
  coherent text score below its 0.4 threshold.

``C = structure x min(agreement, greedy or typicality)``. Validators report it in parts per
million (:func:`to_ppm`); the committee aggregates integers only.

A validator may teacher-force only the first tokens of a long answer (its scoring budget; the
worker cannot know how many): ``answer_tokens`` is then the answer's full length, the counts
and ``length`` are checked on the whole answer, agreement and behaviour on the scored prefix,
and the end-of-answer check is skipped (the end was not scored).

Engines: an honest worker's log-probs differ from the fp32 reference by its engine's numeric
noise (torch fp32/bf16: <= 0.014 nats per answer; llama.cpp on the GGUF: ~0.04), so each
engine gets its own config: :func:`config_for` (calibration in ``docs/verification.md`` 5).

Who calls it: :class:`~permamesh.verify.verifier.Verifier` and the benchmark's calibration.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from permamesh.verify.contract import Tally
from permamesh.verify.errors import VerifyError
from permamesh.verify.scoring import TokenEvidence

__all__ = ["ENGINE_CONFIGS", "Credit", "CreditConfig", "answer_credit", "config_for", "perplexity_credit", "ramp",
           "to_ppm"]

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
    greedy_tie_nats: float = 0.05  # greedy: a token this close to the reference's argmax counts as a match
    seed_tie_nats: float = 0.0  # seeded: a token this close behind the replay's race winner counts as its draw
    #                                (a near-tie other numerics may order the other way)
    agree_min_tokens: int = 8  # a mean over fewer tokens is noisier: tolerance x sqrt(this / n), at most
    #                            halfway to agree_zero (llama.cpp's 2-token answers: 0.13 nats)
    z_high_good: float = 6.0  # typicality z still fully credited from above (one answer: loose)
    z_high_zero: float = 10.0  # z worth 0 from above

    def __post_init__(self) -> None:
        if not (0 <= self.agree_tol < self.agree_zero and 0 <= self.greedy_zero < self.greedy_good <= 1
                and self.z_zero < self.z_good < self.z_high_good < self.z_high_zero
                and 0 < self.min_end_prob < 1 and self.end_tie_nats >= 0 and self.greedy_tie_nats >= 0
                and self.seed_tie_nats >= 0):
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
    sampling: Tally | None = None  # temperature > 0: this answer's sums for the sampling contract
    scored_tokens: int = 0  # answer tokens teacher-forced (the budget may stop short of the answer)

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
                  max_tokens: int, stop_hit: bool, config: CreditConfig = CreditConfig(),
                  answer_tokens: int | None = None) -> Credit:
    """The credit of one answer; ``stop_hit``: the answer's text ended at a stop string;
    ``answer_tokens``: the answer's length when ``evidence`` covers only its first tokens."""
    n = evidence.tokens
    total = n if answer_tokens is None else answer_tokens
    if total < n:
        raise VerifyError(f"evidence of {n} tokens for an answer of {total}")
    greedy = evidence.temperature <= 0.0
    problems = []
    if len(reported_logprobs) != total:
        problems.append(f"{len(reported_logprobs)} log-probs reported for {total} tokens")
    if total > max_tokens:
        problems.append(f"{total} tokens for max_tokens {max_tokens}")
    if finish_reason == "length" and total != max_tokens:
        problems.append(f"'length' after {total} of {max_tokens} tokens (truncated)")
    elif finish_reason == "stop" and not stop_hit and total > n:
        pass  # the end lies beyond the scored prefix: not checked (the worker cannot know where it ends)
    elif finish_reason == "stop" and not stop_hit:
        if greedy and not evidence.end_is_greedy and evidence.end_gap > config.end_tie_nats:
            problems.append(f"'stop' where the reference model would go on, its ending {evidence.end_gap:.2f} nats "
                            "behind its best token (truncated)")
        if not greedy and evidence.end_logprob < math.log(config.min_end_prob):
            problems.append(f"'stop' where ending has p = {math.exp(evidence.end_logprob):.1e} (truncated)")
    elif finish_reason not in ("stop", "length"):
        problems.append(f"unknown finish reason {finish_reason!r}")
    if n == 0 and finish_reason != "stop":
        problems.append("an empty answer")
    structure = 0.0 if problems else 1.0

    reported = [float(x) for x in reported_logprobs][:n] if len(reported_logprobs) == total else []
    compared = evidence.compared[:n] if len(evidence.compared) >= n else (True,) * n  # a grammar's forced tokens: not
    m = sum(compared)
    if n and len(reported) == n and all(math.isfinite(x) for x in reported):
        pairs = [(a, b) for a, b, keep in zip(reported, evidence.reference_logprobs, compared) if keep]
        diff = sum(abs(a - b) for a, b in pairs) / m if m else 0.0
    else:
        diff = 0.0 if n == 0 else math.inf
    tol = config.agree_tol
    if 0 < m < config.agree_min_tokens:
        tol = min(tol * math.sqrt(config.agree_min_tokens / m), (tol + config.agree_zero) / 2)
    agreement = ramp(-diff, -config.agree_zero, -tol) if math.isfinite(diff) else 0.0

    greedy_share = typicality_z = sampling = None
    if greedy:
        gaps = evidence.greedy_gap if len(evidence.greedy_gap) == n else (math.inf,) * n
        matched = sum(m or g <= config.greedy_tie_nats for m, g in zip(evidence.greedy_match, gaps))
        greedy_share = matched / n if n else 1.0
        behaviour = ramp(greedy_share, config.greedy_zero, config.greedy_good)
    else:
        spread = math.sqrt(sum(evidence.logprob_variance) + 1e-6)
        typicality_z = (sum(evidence.reference_logprobs) - sum(evidence.expected_logprob)) / spread
        behaviour = min(ramp(typicality_z, config.z_zero, config.z_good),
                        ramp(-typicality_z, -config.z_high_zero, -config.z_high_good))
        sampling = _sampling_tally(evidence, config.seed_tie_nats)
    if not problems and agreement < 1.0:
        problems.append(f"reported log-probs differ by {diff:.3g} nats per token")
    if not problems and behaviour < 1.0:
        problems.append(f"greedy match {greedy_share:.2f}" if greedy else f"typicality z {typicality_z:.2f}")
    return Credit(structure * min(agreement, behaviour), structure, agreement, behaviour,
                  perplexity_credit(evidence.reference_logprobs), diff, greedy_share, typicality_z,
                  problems[0] if problems else "", sampling, n)


def _sampling_tally(evidence: TokenEvidence, seed_tie_nats: float = 0.0) -> Tally:
    """The answer's sums for the sampling contract; a seeded token that lost the replay's race by
    at most ``seed_tie_nats`` counts as the replay's draw (a near-tie other numerics tipped)."""
    n = evidence.tokens
    probs = evidence.argmax_prob if len(evidence.argmax_prob) == n else ()
    gaps = evidence.seed_gap if len(evidence.seed_gap) == len(evidence.seed_match) else (math.inf,) * len(evidence.seed_match)
    return Tally(
        tokens=n if probs else 0,
        argmax_hits=sum(evidence.greedy_match) if probs else 0,
        argmax_expected=sum(probs), argmax_variance=sum(p * (1 - p) for p in probs),
        typicality_sum=sum(evidence.reference_logprobs) - sum(evidence.expected_logprob),
        typicality_variance=sum(evidence.logprob_variance),
        seeded_tokens=len(evidence.seed_match),
        seed_mismatches=sum(not m and g > seed_tie_nats for m, g in zip(evidence.seed_match, gaps)))


#: The config of each engine a worker may serve with (its signed descriptor names it). llama.cpp
#: computes on the GGUF's quantized blocks with its own kernels: its honest log-probs sit
#: 0.02-0.074 nats per token from the fp32 reference on answers of 8+ tokens (p50 0.049;
#: benchmarks/results/verify-llamacpp-calibration.json, docs/verification.md 5.2): tolerance
#: 0.1 (1.35x the worst seen); agree_zero stays at 0.2, so 5% weight noise (>= 0.23) and
#: skipped layers still score 0 on either engine. Its greedy answers part from the reference's
#: argmax at near-ties (an honest 4-token answer matched 2: credit 0 in a soak): a token within
#: 0.3 nats of the argmax counts as a match, as an ending within 0.3 nats does. Its seeded
#: draws lose the replay's race on 3.7-4.6% of tokens (8-bit activations tip near-ties), 88% of
#: those by at most 0.5 nats of race score; a token drawn without the seed loses on ~53%, 9% of
#: those within 0.5 (2026-12-06, 60 seeded answers, 2,400 tokens each way, Q4_1 file and Q8_0
#: copy): a loss within 0.5 nats counts as the draw, leaving honest 0.4-0.6% against 49%.
ENGINE_CONFIGS: dict[str, CreditConfig] = {
    "torch": CreditConfig(),
    "llamacpp": CreditConfig(agree_tol=0.1, end_tie_nats=0.3, greedy_tie_nats=0.3, seed_tie_nats=0.5),
}


def config_for(engine: str, configs: dict[str, CreditConfig] | None = None) -> CreditConfig:
    """The credit config for a worker serving with ``engine`` (an unknown engine gets torch's,
    the strictest: a worker must not loosen its own checks by naming an engine)."""
    table = ENGINE_CONFIGS if configs is None else configs
    return table.get(engine, table["torch"])
