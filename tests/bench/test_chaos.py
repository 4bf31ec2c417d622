"""`permamesh chaos` on a small embedded mesh (3 real worker processes) and a small simulated
one: every failure mode is drilled, the placement spreads the workers so no single domain holds
more than a third, and no job is lost (the client resubmits). Recovery times are reported, not
asserted (they are benchmark figures)."""

from __future__ import annotations

import json

import pytest

from permamesh.bench.chaos import ChaosDrill, plot_chaos, run
from permamesh.bench.stats import write_report


@pytest.mark.slow  # ~40 s on 2 cores; the default run drills failures in test_failover.py and the demo's test
def test_chaos_drill_small_mesh(tmp_path):
    drill = ChaosDrill(tmp_path / "mesh", workers=3, loops=2, window_s=1.0, quick=True, sim_nodes=300)
    report = run(drill, say=lambda *_: None)
    s = report["summary"]
    kinds = {r["kind"] for r in report["scenarios"]}
    assert kinds == {"power outage", "ISP outage", "software bug", "network partition",
                     "hardware failure", "DDoS"}
    assert s["max_capacity_loss_share"] <= 0.34 and s["jobs_lost"] == 0 and s["jobs"] > 10
    assert all(r["recovery_s"] < float("inf") for r in report["scenarios"])  # every loop completed again
    assert s["win_conditions"]["no_job_lost"] and s["distinct_grids"] == 3
    assert "max_recovery_s" in s and s["sim"]["jobs_lost"] == 0
    write_report(report, tmp_path / "c.json", tmp_path / "c.png", plot_chaos)
    assert json.loads((tmp_path / "c.json").read_text())["summary"]["jobs_lost"] == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
