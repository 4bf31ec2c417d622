"""When challenges go out: :class:`ChallengeSchedule`, send times spread like user arrivals.

Who calls what: a validator builds one schedule (flat, or :meth:`ChallengeSchedule.from_arrivals`
from observed user arrival times), asks :meth:`ChallengeSchedule.send_times` (or
:meth:`ChallengeSchedule.plan`) for an epoch's send times, with a count that
:func:`~permamesh.verify.reputation.challenges_per_epoch` raises for nodes of low reputation,
and calls :meth:`~permamesh.verify.challenges.ChallengePool.draw` at each. Pure: every method
takes its ``random.Random``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from permamesh.verify.errors import VerifyError


@dataclass(frozen=True)
class ChallengeSchedule:
    """When challenges go out: each epoch's count (an input; validators raise it for nodes of
    low reputation) at times spread like user arrivals, a Poisson process with the traffic's
    rate conditioned on the count, so never at fixed offsets."""

    epoch_s: float = 60.0
    rates: tuple[float, ...] = ()  # relative user arrival rate in equal bins of period_s; () = flat
    period_s: float = 86400.0  # s, the cycle of ``rates`` (a day)
    floor: float = 0.05  # no bin's rate below this share of the mean: quiet hours get fewer, not none

    def __post_init__(self) -> None:
        if not (0 < self.epoch_s < math.inf and 0 < self.period_s < math.inf):
            raise VerifyError(f"epoch_s and period_s must be > 0, not {self.epoch_s!r}, {self.period_s!r}")
        if not all(isinstance(r, (int, float)) and math.isfinite(r) and r >= 0 for r in self.rates):
            raise VerifyError("rates must be finite and >= 0")
        if self.rates and not sum(self.rates) > 0:
            raise VerifyError("rates must not all be zero")

    @classmethod
    def from_arrivals(cls, arrivals: list[float], *, epoch_s: float = 60.0, period_s: float = 86400.0,
                      bins: int = 24) -> ChallengeSchedule:
        """A schedule following the rate of observed user arrival times (s)."""
        if bins < 1 or not arrivals or not all(isinstance(t, (int, float)) and math.isfinite(t) for t in arrivals):
            raise VerifyError("from_arrivals needs finite arrival times and bins >= 1")
        counts = [0] * bins
        for t in arrivals:
            counts[min(int((t % period_s) / period_s * bins), bins - 1)] += 1
        return cls(epoch_s, tuple(float(c) for c in counts), period_s)

    def _rate(self, t: float) -> float:
        mean = sum(self.rates) / len(self.rates)
        return max(self.rates[min(int((t % self.period_s) / self.period_s * len(self.rates)), len(self.rates) - 1)],
                   self.floor * mean)

    def send_times(self, epoch: int, count: int, rng: random.Random) -> tuple[float, ...]:
        """``count`` sorted send times (s) in ``[epoch * epoch_s, (epoch + 1) * epoch_s)``."""
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(count, int) and 0 <= count <= 100_000):
            raise VerifyError(f"need an epoch >= 0 and a count in 0..100000, not {epoch!r}, {count!r}")
        if not isinstance(rng, random.Random):
            raise VerifyError("send_times() needs a random.Random")
        start, end = epoch * self.epoch_s, (epoch + 1) * self.epoch_s
        cuts = [start]
        if self.rates:
            step = self.period_s / len(self.rates)
            cuts += [k * step for k in range(math.floor(start / step) + 1, math.ceil(end / step))]
        cuts.append(end)
        segments = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
        weights = [(b - a) * (self._rate(a) if self.rates else 1.0) for a, b in segments]
        times = []
        for a, b in rng.choices(segments, weights, k=count):
            times.append(min(a + rng.random() * (b - a), math.nextafter(end, start)))
        return tuple(sorted(times))

    def plan(self, counts: list[int], rng: random.Random, *, first_epoch: int = 0) -> list[float]:
        """Send times for consecutive epochs, ``counts[i]`` in epoch ``first_epoch + i``."""
        return [t for i, count in enumerate(counts) for t in self.send_times(first_epoch + i, count, rng)]
