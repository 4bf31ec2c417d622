"""Per-request benchmark records and their summary.

:mod:`permamesh.bench.sim` (and the live benchmark harness) produce one
:class:`RequestRecord` per request; :func:`summarize` turns a run into the numbers reported in
``benchmarks/``. Percentiles are nearest-rank, so a summary is a deterministic function of
its records and every reported value is one that was observed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestRecord:
    """How one request went."""

    request_id: str
    session: str
    worker: str  # "" if it was never placed
    arrival_s: float  # seconds from the start of the trace
    ttft_s: float  # arrival to first token
    e2e_s: float  # arrival to last token
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the worker's prefix cache
    ok: bool = True
    error: str = ""


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank ``p``-th percentile (0 < p <= 100) of ``values``; NaN when empty."""
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {p!r}")
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1]


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def summarize(
    records: Iterable[RequestRecord], workers: Iterable[str] = ()
) -> dict[str, object]:
    """The summary of one run.

    Latencies are over successful requests, in seconds; ``ttft_mean_s_first_turns`` covers
    each session's earliest request (nothing of it can be cached), ``..._later_turns`` the rest.
    ``cache_hit_rate`` is cached prompt
    tokens over all prompt tokens. ``per_worker`` counts successful requests per worker;
    ``workers`` names members that may have received none, so they count as 0 in the
    imbalance figures (``max`` and ``max / mean`` of those counts).
    """
    records = list(records)
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_s for r in ok]
    e2e = [r.e2e_s for r in ok]
    per_worker = dict.fromkeys(workers, 0)
    for record in ok:
        per_worker[record.worker] = per_worker.get(record.worker, 0) + 1
    counts = list(per_worker.values())
    mean_load = _mean(counts)
    prompt = sum(r.prompt_tokens for r in ok)
    firsts = {}  # session -> its earliest request: a conversation's first turn
    for r in records:
        if r.session not in firsts or r.arrival_s < firsts[r.session].arrival_s:
            firsts[r.session] = r
    first_ids = {id(r) for r in firsts.values()}
    return {
        "count": len(records),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if not r.ok})[:10],  # why they failed, distinct, at most 10
        "ttft_mean_s": _mean(ttft),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "e2e_mean_s": _mean(e2e),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p99_s": percentile(e2e, 99),
        "ttft_mean_s_first_turns": _mean([r.ttft_s for r in ok if id(r) in first_ids]),
        "ttft_mean_s_later_turns": _mean([r.ttft_s for r in ok if id(r) not in first_ids]),
        "cache_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        "per_worker": dict(sorted(per_worker.items())),
        "load_max": max(counts, default=0),
        "load_mean": mean_load,
        "load_imbalance": max(counts) / mean_load if counts and mean_load else math.nan,
    }


def write_report(report: dict, json_path, plot_path, plot) -> None:
    """Write ``report`` as sorted, indented JSON to ``json_path`` and draw it with
    ``plot(report, plot_path)``; either path may be None (skipped)."""
    import json

    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if plot_path is not None:
        plot(report, plot_path)
