"""The physics check: can a node be where it claims, given how fast it answered?

A probe at a known place measures a node's round-trip time. No answer travels faster than
light in fibre (about 200 km per ms, two thirds of c), so the node is at most
``(rtt_ms + slack_ms) / 2 * fibre_km_per_ms`` km from the probe. A claimed location farther
than that from any probe is impossible: the node answered faster than light could travel
(:func:`check_location`). ``slack_ms`` (1 ms, i.e. 100 km) absorbs timer jitter and the
imprecision of the probes' own coordinates; it only ever makes us more lenient.

The check is one-sided. A node can always add delay, never remove it, so a far-away node can
pretend to be farther still but never nearer. One probe that contradicts a claim proves it
false; probes that do not contradict it prove nothing alone, so we call a claim "possible"
with confidence only when at least :data:`MIN_PROBES` (3) distinct probe locations agree
(otherwise the verdict says the probes are insufficient). Probes may be named (``names``, e.g.
"member 1a2b..."), so a refutation says whose round trip refuted it; the verdict's
``worst_probe`` is the index of that measurement. The probes the mesh uses are the committee
members' own liveness round trips (``docs/placement.md`` section 4); the check on the other side
(a node much slower than its claimed neighbours) is future work.

:func:`triangulate` asks whether any point on Earth satisfies every probe at once (a grid
search, conservative: a cell is kept when some point within it might satisfy all probes), so
mutually inconsistent measurements (a node, or a relay in front of it, "near" two distant
probes) show up even without a claim.

Who calls it: the committee's query layer (:mod:`permamesh.committee.queries`: the ``physics``
verdict of every ``/registry`` row, from the members' round trips), which the scheduler then
reads (:func:`permamesh.scheduler.profile.refuted`); tests. Pure: no clock, no network.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from permamesh.scheduler.errors import SchedulerError
from permamesh.scheduler.profile import haversine_km

log = logging.getLogger(__name__)

FIBRE_KM_PER_MS = 200.0  # light in glass, one way
SLACK_MS = 1.0  # added to every RTT before the bound is computed
MIN_PROBES = 3  # distinct probe locations needed to call a claim possible with confidence
KM_PER_DEGREE = 111.2  # along a meridian

Point = tuple[float, float]  # (lat, lon) in degrees
Measurement = tuple[Point, float]  # (probe location, rtt_ms)


@dataclass(frozen=True)
class PhysicsVerdict:
    possible: bool  # False only when some probe proves the claim false
    why: str
    worst_violation_km: float  # how far beyond light's reach from the worst probe; 0.0 if none
    probes: int = 0  # distinct probe locations
    insufficient: bool = False  # possible, but fewer than MIN_PROBES distinct probes
    worst_probe: int = -1  # index of the measurement that refutes the claim most; -1 if none


@dataclass(frozen=True)
class Triangulation:
    feasible: bool  # some grid cell may satisfy every probe
    cells: int  # cells that may
    of: int  # cells searched
    example: Point | None  # the centre of one such cell (the first in lat, lon order)
    why: str


def _point(value: object, what: str) -> Point:
    try:
        lat, lon = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise SchedulerError(f"{what} must be a (lat, lon) pair, got {value!r}") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise SchedulerError(f"{what} ({lat}, {lon}) is outside the globe")
    return lat, lon


def _checked(measurements: Sequence[Measurement]) -> list[tuple[Point, float]]:
    out = []
    for i, item in enumerate(measurements):
        try:
            probe, rtt = item
        except (TypeError, ValueError):
            raise SchedulerError(f"measurement {i} must be ((lat, lon), rtt_ms)") from None
        if isinstance(rtt, bool) or not isinstance(rtt, (int, float)) or not (
                math.isfinite(rtt) and rtt >= 0):
            raise SchedulerError(f"measurement {i}: rtt_ms={rtt!r} must be finite and >= 0")
        out.append((_point(probe, f"measurement {i} probe"), float(rtt)))
    return out


def reach_km(rtt_ms: float, fibre_km_per_ms: float = FIBRE_KM_PER_MS,
             slack_ms: float = SLACK_MS) -> float:
    """The farthest a node answering in ``rtt_ms`` can be from the probe."""
    return (rtt_ms + slack_ms) / 2 * fibre_km_per_ms


def check_location(claimed: Point, measurements: Sequence[Measurement],
                   fibre_km_per_ms: float = FIBRE_KM_PER_MS,
                   slack_ms: float = SLACK_MS, names: Sequence[str] = ()) -> PhysicsVerdict:
    """Is ``claimed`` consistent with every probe's RTT? See the module docstring. ``names``,
    if given, names each measurement's probe in the verdict's ``why`` (one per measurement)."""
    claim = _point(claimed, "claimed location")
    checked = _checked(measurements)
    if names and len(names) != len(checked):
        raise SchedulerError(f"{len(names)} probe names for {len(checked)} measurements")
    probes = len({(round(p[0], 3), round(p[1], 3)) for p, _ in checked})
    worst, worst_text, worst_probe = 0.0, "", -1
    for i, (probe, rtt) in enumerate(checked):
        km, reach = haversine_km(claim, probe), reach_km(rtt, fibre_km_per_ms, slack_ms)
        if km - reach > worst:
            worst, worst_probe = km - reach, i
            who = f"{names[i]}'s probe" if names else "the probe"
            worst_text = (f"impossible: {who} at ({probe[0]:.3f}, {probe[1]:.3f}) got an "
                          f"answer in {rtt:g} ms, so the node is within {reach:.0f} km of it "
                          f"(light in fibre at {fibre_km_per_ms:g} km/ms, {slack_ms:g} ms "
                          f"slack), but the claim is {km:.0f} km away: {worst:.0f} km too far")
    if worst > 0:
        log.debug("physics: claim (%.3f, %.3f) refuted by %.0f km", *claim, worst)
        return PhysicsVerdict(False, worst_text, worst, probes, False, worst_probe)  # one suffices
    if probes < MIN_PROBES:
        return PhysicsVerdict(True, f"insufficient probes: none of {probes} distinct probe "
                              f"location(s) contradicts the claim, but at least {MIN_PROBES} are "
                              "needed to call it possible", 0.0, probes, True)
    return PhysicsVerdict(True, f"possible: consistent with all {probes} distinct probe locations",
                          0.0, probes, False)


def triangulate(measurements: Sequence[Measurement], fibre_km_per_ms: float = FIBRE_KM_PER_MS,
                slack_ms: float = SLACK_MS, step_deg: float = 2.0) -> Triangulation:
    """Grid-search the globe for points within light's reach of every probe at once."""
    checked = _checked(measurements)
    if not (0 < step_deg <= 30):
        raise SchedulerError("step_deg must be in (0, 30]")
    # any point of a cell is within this of its centre, so the search never misses a region
    margin = step_deg / 2 * math.sqrt(2) * KM_PER_DEGREE * 1.01
    limits = [(p, reach_km(rtt, fibre_km_per_ms, slack_ms) + margin) for p, rtt in checked]
    limits.sort(key=lambda item: item[1])  # tightest probe first: most cells fail at once
    rows, cols = math.ceil(180 / step_deg), math.ceil(360 / step_deg)
    cells, example = 0, None
    for i in range(rows):
        lat = min(90.0, -90 + (i + 0.5) * step_deg)
        for j in range(cols):
            centre = (lat, min(180.0, -180 + (j + 0.5) * step_deg))
            if all(haversine_km(centre, p) <= limit for p, limit in limits):
                cells += 1
                example = example or centre
    if cells:
        why = (f"{cells} of {rows * cols} cells of {step_deg:g} degrees fit all "
               f"{len(checked)} probes")
    else:
        why = (f"no point on Earth is within light's reach of all {len(checked)} probes: "
               "the measurements contradict each other")
    return Triangulation(cells > 0, cells, rows * cols, example, why)
