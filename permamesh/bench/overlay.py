"""``permamesh bench overlay``: what the overlay costs and what it buys, in one report.

:func:`run` gathers, in one seeded run:

- ``delivery``: delivery rate vs relay failure rate (0-20% dead relays, 10,000 relays) for
  single-path onion and S-IDA (4,3), (5,3), (6,3) under the targeted resend of
  ``docs/paths.md`` section 6 (with and without resends), plus the whole-attempt rule for
  (4,3) for comparison (:func:`~permamesh.bench.overlaysim.simulate_delivery`); and a slot
  ``real_mesh`` for the same rows measured on a real mesh;
- ``codecs``: S-IDA prep and rebuild latency per message size (1-64 KB) for each erasure
  codec (:func:`~permamesh.bench.codecs.measure_codecs`);
- ``overhead``: end-to-end latency through the overlay vs direct (real mesh only);
- ``anonymity``: sender/trace/read/link exposure vs malicious fraction f (0.001-0.5,
  N = 10,000) for onion, Garlic-Cast-style and permamesh
  (:func:`~permamesh.bench.anonsim.simulate_anonymity`).

The real-mesh part is a callable the caller passes in: ``real(quick=, seed=, say=)`` returns
a mapping with ``"delivery"`` or ``"real_mesh"`` (rows ``{scheme, n, k, failure_rate,
delivery_rate, requests, mean_attempts}``, more keys allowed) and ``"overhead"`` (``{"overhead_ms_p50": ..., ...}``),
either may be missing or None; other keys are kept under ``real_mesh_info``. The top-level
``summary`` takes delivery from the real mesh where it has the row, else from the simulation.

Who calls it: the CLI (``permamesh bench overlay``: :func:`add_overlay_bench_arguments`,
:func:`run_from_args`) and the tests. Plots: :mod:`permamesh.bench.overlayplot`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from permamesh.bench.anonsim import simulate_anonymity
from permamesh.bench.codecs import measure_codecs
from permamesh.bench.overlaysim import DEFAULT_RESENDS, TARGETS, simulate_delivery
from permamesh.bench.stats import write_report
from permamesh.bench.traces import BenchError

log = logging.getLogger(__name__)

RealMesh = Callable[..., Mapping]  # real(quick=bool, seed=int, say=callable) -> mapping
REAL_ROW_KEYS = ("scheme", "n", "k", "failure_rate", "delivery_rate", "requests", "mean_attempts")
OVERHEAD_TARGET_MS = 15.0  # anonymity may add at most this much to the p50 end-to-end time on loopback


@dataclass(frozen=True)
class OverlaySettings:
    """Sizes of one run; :data:`SETTINGS` holds the full and quick ones."""

    relays: int = 10_000  # relays (and anonymity nodes)
    failure_rates: tuple[float, ...] = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2)
    schemes: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (5, 3), (6, 3))
    resends: int = DEFAULT_RESENDS  # rounds (targeted) or extra attempts
    delivery_requests: int = 20_000  # simulated requests per row
    fractions: tuple[float, ...] = (0.001, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
    anonymity_requests: int = 20_000
    sizes: tuple[int, ...] = (1024, 4096, 16384, 65536)  # message bytes for the codecs
    quick_codecs: bool = False  # measure_codecs(quick=...): few repeats


SETTINGS = {
    False: OverlaySettings(),
    True: OverlaySettings(delivery_requests=4000, anonymity_requests=4000, quick_codecs=True),
}


def run(quick: bool = False, seed: int = 0, real: RealMesh | None = None,
        say: Callable[[str], None] = print) -> dict:
    """The whole report (JSON-able dict with a top-level ``summary``); see the module
    docstring. ``real`` is called last, after the simulations and codec timings."""
    s = SETTINGS[quick]
    started = time.monotonic()
    say(f"overlay bench: {'quick' if quick else 'full'}, seed {seed}, {s.relays} relays")
    delivery = simulate_delivery(s.relays, s.failure_rates, s.schemes, 3, s.delivery_requests,
                                 (0, s.resends), seed)
    delivery += simulate_delivery(s.relays, s.failure_rates, [(4, 3)], 3, s.delivery_requests,
                                  [s.resends], seed, rules=["attempt"])
    say(f"  delivery: {len(delivery)} simulated rows")
    codecs = measure_codecs(sizes=s.sizes, quick=s.quick_codecs)
    say("  codecs: " + ", ".join(f"{name} 4 KB {cells['4096']['total_ms']:.3f} ms"
                                 for name, cells in codecs["results"].items() if "4096" in cells))
    anonymity = simulate_anonymity(s.relays, s.fractions, requests=s.anonymity_requests, seed=seed)
    say(f"  anonymity: {len(anonymity)} rows")
    measured = dict(real(quick=quick, seed=seed, say=say) or {}) if real is not None else {}
    real_rows = measured.pop("delivery", None)
    if real_rows is None:  # the name overlayreal.run_real uses
        real_rows = measured.pop("real_mesh", None)
    overhead = measured.pop("overhead", None)
    streaming = measured.pop("streaming", None)
    if real_rows is not None:
        real_rows = [_check_row(row) for row in real_rows]
    report = {
        "benchmark": "overlay",
        "quick": quick,
        "seed": seed,
        "settings": asdict(s),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "delivery": {"sim": delivery, "real_mesh": real_rows},
        "codecs": codecs,
        "overhead": dict(overhead) if overhead is not None else None,
        "streaming": streaming,
        "anonymity": anonymity,
        "real_mesh_info": measured or None,
    }
    report["summary"] = _summary(report, s.resends)
    report["wall_s"] = round(time.monotonic() - started, 2)
    say("summary: " + json.dumps(report["summary"]))
    return report


def _check_row(row: Mapping) -> dict:
    missing = [key for key in REAL_ROW_KEYS if key not in row]
    if missing:
        raise BenchError(f"real-mesh delivery row lacks {', '.join(missing)}: {dict(row)}")
    return dict(row)


def _pick(rows: list[dict] | None, p: float, resends: int | None = None) -> dict | None:
    """The permamesh (4,3) row at failure rate p: targeted rule (rows without a rule count
    as targeted), the given resend budget when rows carry one."""
    for row in rows or ():
        if ((row["n"], row["k"]) == (4, 3) and abs(row["failure_rate"] - p) < 1e-9
                and row.get("rule", "targeted") == "targeted"
                and (resends is None or row.get("resends", resends) == resends)):
            return row
    return None


def _summary(report: dict, resends: int) -> dict:
    sim, real_rows = report["delivery"]["sim"], report["delivery"]["real_mesh"]
    out: dict[str, object] = {}
    sources = set()
    for p, name in ((0.03, "3pct"), (0.1, "10pct")):
        simulated = _pick(sim, p, resends)["delivery_rate"]
        measured = _pick(real_rows, p)
        out[f"delivery_rate_at_{name}"] = measured["delivery_rate"] if measured else simulated
        out[f"delivery_rate_at_{name}_sim"] = simulated
        out[f"delivery_target_met_at_{name}"] = out[f"delivery_rate_at_{name}"] >= TARGETS[p]
        out[f"delivery_rate_at_{name}_sim_no_resend"] = _pick(sim, p, 0)["delivery_rate"]
        sources.add("real_mesh" if measured else "sim")
    out["delivery_source"] = sources.pop() if len(sources) == 1 else "mixed"
    cells = report["codecs"]["results"]
    out["prep_rebuild_ms_4kb"] = cells["zfec"]["4096"]["total_ms"]
    if "reedsolo" in cells:
        out["prep_rebuild_ms_4kb_reedsolo"] = cells["reedsolo"]["4096"]["total_ms"]
    overhead = report["overhead"] or {}
    out["overhead_ms_p50"] = overhead.get("overhead_ms_p50")  # paths prepared while idle (the default client)
    out["overhead_ms_p50_cold"] = overhead.get("cold_overhead_ms_p50")  # every X25519 inside the request
    out["overhead_target_met"] = (out["overhead_ms_p50"] <= OVERHEAD_TARGET_MS
                                  if out["overhead_ms_p50"] is not None else None)
    for row in report["anonymity"]:
        if abs(row["fraction"] - 0.1) < 1e-9:
            scheme = row["scheme"].replace("-", "_")
            out[f"read_at_10pct_{scheme}"] = row["read"]
            out[f"link_at_10pct_{scheme}"] = row["link"]
    return out


def write_outputs(report: dict, json_path: Path | None, plot_path: Path | None) -> None:
    def plot(report: dict, path: Path) -> None:
        from permamesh.bench.overlayplot import plot_overlay

        plot_overlay(report, path)

    write_report(report, json_path, plot_path, plot)


def add_overlay_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``permamesh bench overlay`` (the CLI adds its common ones)."""
    parser.add_argument("--quick", action="store_true",
                        help="smaller simulations and few codec repeats (well under a minute)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every simulation (default: 0)")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    parser.add_argument("--entry-model", default="tiny-random",
                        help="the real mesh's entry worker model: tiny-random (default) or smollm2-135m (llama.cpp "
                             "where built): streaming at a real model's pace")
    parser.add_argument("--stream-tokens", type=int, default=32,
                        help="tokens per streamed answer in the streaming rows (default: 32)")
    parser.add_argument("--no-real", action="store_true",
                        help="skip the real mesh: simulations and codec timings only")


def run_from_args(args: argparse.Namespace, real: RealMesh | None = None) -> int:
    """Run with parsed options; ``real`` is the real-mesh part (ignored under ``--no-real``;
    without it the report's real-mesh slots are null). Returns the exit status."""
    entry_model, stream_tokens = getattr(args, "entry_model", "tiny-random"), getattr(args, "stream_tokens", 32)
    if stream_tokens < 1:
        raise SystemExit(f"permamesh bench overlay: --stream-tokens must be >= 1, not {stream_tokens}")
    if args.no_real and (entry_model != "tiny-random" or stream_tokens != 32):
        raise SystemExit("permamesh bench overlay: --entry-model and --stream-tokens set the real mesh, "
                         "which --no-real skips")
    report = run(args.quick, args.seed, None if args.no_real else real)
    write_outputs(report, args.json, args.plot)
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0
