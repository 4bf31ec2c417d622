"""The weights of the permacomputer formulas, and the file that sets them.

:class:`Weights` holds every constant the scoring formula (:mod:`~permamesh.scheduler.scoring`)
and the compensation formula (:mod:`~permamesh.scheduler.payments`) use. Its defaults are the
values in the packaged ``weights.toml`` (a test keeps the two equal); :func:`load_weights`
reads that file, or another one that overrides some of them. A weights file has three tables:

- ``[score]``: AGE_W, SPEED_W, EFF_W, COLOCATION_PENALTY, DISTANCE_LINK_W and the extra
  penalties SAME_DATACENTER_PENALTY <= SAME_RACK_PENALTY <= SAME_HOST_PENALTY;
- ``[payment]``: base_rate and the bonuses (in cents, see the field comments), efficiency_cap,
  and the modifiers in whole percent;
- ``[rules]``: max_paid_per_location, same_location_km, current_year.

The current year is a setting, never read from the clock: every committee member computing a
month's payments must get the same figures. An unknown table or key, or a value of the wrong
type, is a :class:`SchedulerError` that names it.

Who calls it: the scheduler's callers build a :class:`Weights` once (``load_weights()``) and
pass it to every scoring and payment function. Pure apart from reading the file.
"""

from __future__ import annotations

import logging
import math
import tomllib
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from pathlib import Path

from permamesh.scheduler.errors import SchedulerError

log = logging.getLogger(__name__)

DEFAULT_PATH = Path(__file__).with_name("weights.toml")


@dataclass(frozen=True)
class Weights:
    # [score]: node_score points
    AGE_W: float = 10.0  # points per year of silicon age
    SPEED_W: float = 0.01  # points per MHz
    EFF_W: float = 10000.0  # points x watts: EFF_W / (idle_w + loaded_w)
    COLOCATION_PENALTY: float = 50.0  # points off per peer at the same location
    DISTANCE_LINK_W: float = 0.0001  # points per km x Mbit/s to each peer elsewhere
    SAME_DATACENTER_PENALTY: float = 100.0  # extra points off per peer in the same datacenter
    SAME_RACK_PENALTY: float = 200.0  # extra, per peer in the same rack (of that datacenter)
    SAME_HOST_PENALTY: float = 400.0  # extra, per peer on the same physical machine (VMs)
    # [payment]: cents per month
    base_rate: int = 1000  # cents per paid node
    uptime_bonus: float = 5.0  # cents per percentage point of mean uptime
    distance_bonus: float = 0.05  # cents per km of mean distance to the rest of the mesh
    efficiency_bonus: float = 2000.0  # cents x W/execution: efficiency_bonus / watts_per_execution
    efficiency_cap: int = 1000  # cents; the efficiency term never pays more than this
    age_bonus: float = 20.0  # cents per year of mean silicon age
    continent_pct: int = 20  # paid nodes on two or more continents
    isp_pct: int = 10  # per unique ISP beyond the first at one location
    isp_cap_pct: int = 50  # the ISP modifier never exceeds this
    backup_pct: int = 15  # every paid node has verified backup power
    chaos_pct: int = 5  # every paid node opted in to chaos drills
    # [rules]
    max_paid_per_location: int = 2
    same_location_km: float = 0.5  # closer than this = the same location
    current_year: int = 2026  # explicit: never read from the clock

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want = int if f.type in (int, "int") else float
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SchedulerError(f"weights: {f.name}={value!r} must be a number")
            if want is int and type(value) is not int:
                raise SchedulerError(f"weights: {f.name}={value!r} must be an integer")
            if not math.isfinite(value) or value < 0:
                raise SchedulerError(f"weights: {f.name}={value!r} must be finite and >= 0")
        if not (self.SAME_DATACENTER_PENALTY <= self.SAME_RACK_PENALTY <= self.SAME_HOST_PENALTY):
            raise SchedulerError("weights: penalties must grow SAME_DATACENTER_PENALTY <= "
                                 "SAME_RACK_PENALTY <= SAME_HOST_PENALTY (closer is worse)")
        if self.max_paid_per_location < 1:
            raise SchedulerError("weights: max_paid_per_location must be >= 1")

    def exact(self, name: str) -> Fraction:
        """A payment weight as an exact fraction of its decimal text (0.05 is 1/20)."""
        return Fraction(repr(getattr(self, name)))


TABLES: dict[str, tuple[str, ...]] = {
    "score": ("AGE_W", "SPEED_W", "EFF_W", "COLOCATION_PENALTY", "DISTANCE_LINK_W",
              "SAME_DATACENTER_PENALTY", "SAME_RACK_PENALTY", "SAME_HOST_PENALTY"),
    "payment": ("base_rate", "uptime_bonus", "distance_bonus", "efficiency_bonus",
                "efficiency_cap", "age_bonus", "continent_pct", "isp_pct", "isp_cap_pct",
                "backup_pct", "chaos_pct"),
    "rules": ("max_paid_per_location", "same_location_km", "current_year"),
}


def weights_from_dict(data: dict, source: str = "weights") -> Weights:
    """A :class:`Weights` from parsed TOML tables; missing keys keep their defaults."""
    changes: dict[str, object] = {}
    types = {f.name: f.type for f in fields(Weights)}
    for table, values in data.items():
        if table not in TABLES:
            raise SchedulerError(f"{source}: unknown table [{table}]; known: {sorted(TABLES)}")
        if not isinstance(values, dict):
            raise SchedulerError(f"{source}: [{table}] must be a table")
        for key, value in values.items():
            if key not in TABLES[table]:
                raise SchedulerError(f"{source}: unknown key [{table}] {key}; known: "
                                     f"{', '.join(TABLES[table])}")
            want = int if types[key] in (int, "int") else float
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    want is int and not isinstance(value, int)):
                raise SchedulerError(f"{source}: [{table}] {key} = {value!r} must be "
                                     f"{'an integer' if want is int else 'a number'}")
            changes[key] = float(value) if want is float else value
    try:
        return replace(Weights(), **changes)
    except SchedulerError as err:
        raise SchedulerError(f"{source}: {err}") from None


def load_weights(path: str | Path | None = None) -> Weights:
    """Read a weights file (default: the packaged ``weights.toml``)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as err:
        raise SchedulerError(f"cannot read weights file {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise SchedulerError(f"weights file {path} is not valid TOML: {err}") from None
    weights = weights_from_dict(data, str(path))
    log.debug("weights loaded from %s", path)
    return weights
