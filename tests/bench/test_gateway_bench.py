"""The gateway benchmark on a small real mesh (1 worker process, 12 relays): every figure is
measured and the summary has the ratios its docstring promises, written as JSON with a plot."""

from __future__ import annotations

import json
import statistics

import pytest

from permamesh.bench.gateway import GatewayBench, plot_gateway, run
from permamesh.bench.stats import write_report


@pytest.mark.slow  # ~20 s on 2 cores: the gateway's paths are tested in tests/gateway; this checks the bench's report
def test_a_small_gateway_run_reports_its_ratios(tmp_path):
    report = run(GatewayBench(workers=1, requests=3, concurrency=2, max_tokens=4))
    s = report["summary"]
    assert len(report["latency_s"]["gateway"]) == len(report["latency_s"]["overlay"]) == 3
    assert 0 < s["overlay_p50_s"] and 0 < s["gateway_p50_s"]
    lat = report["latency_s"]
    ratio = statistics.median(lat["gateway"]) / statistics.median(lat["overlay"])
    assert s["gateway_overhead_ratio"] == pytest.approx(ratio, abs=1e-3)
    assert 0 < s["stream_first_delta_p50_s"] <= s["stream_done_p50_s"]
    assert s["gateway_jobs_per_s"] > 0 and s["overlay_jobs_per_s"] > 0 and s["concurrent_throughput_ratio"] > 0
    write_report(report, tmp_path / "g.json", tmp_path / "g.png", plot_gateway)
    assert json.loads((tmp_path / "g.json").read_text())["summary"]["targets"]["gateway_overhead_ms"] == 25.0
    assert (tmp_path / "g.png").stat().st_size > 5000
