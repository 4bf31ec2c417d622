"""`permamesh bench routing` end to end in sim mode: the report a harness reads, and the trace
file path through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from permamesh.bench import routing
from permamesh.bench.traces import GENERATORS, save_trace

SUMMARY_KEYS = {"ttft_mean_ratio_vs_round_robin", "p99_e2e_ratio_vs_least_loaded",
                "sync_bytes_ratio_full_vs_delta", "lost_requests"}


def test_the_sim_report_has_every_policy_and_the_summary_ratios(tmp_path):
    bench = routing.RoutingBench(mode="sim", requests=600, workers=16, seed=3)
    report = routing.run(bench, say=lambda line: None)
    assert set(report["policies"]) == {"random", "round-robin", "least-loaded", "cache-aware", "permamesh"}
    assert SUMMARY_KEYS <= set(report["summary"])
    assert report["summary"]["lost_requests"] == 0
    mesh, rr = report["policies"]["permamesh"], report["policies"]["round-robin"]
    assert report["summary"]["ttft_mean_ratio_vs_round_robin"] == mesh["ttft_mean_s"] / rr["ttft_mean_s"]
    assert report["sync"]["delta_bytes"] > 0 and report["sync"]["full_tree_bytes"] > report["sync"]["delta_bytes"]
    routing.write_outputs(report, tmp_path / "r.json", tmp_path / "r.png")
    assert json.loads((tmp_path / "r.json").read_text())["summary"] == json.loads(json.dumps(report["summary"]))
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_runs_a_trace_file_and_refuses_a_bad_one(tmp_path):
    trace = tmp_path / "t.jsonl"
    save_trace(trace, GENERATORS["zipf"](300, 2.0, 1))
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "permamesh", "bench", "routing", "--trace", str(trace), "--workers", "8", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["requests"] == 300
    trace.write_text('{"session": "s", "t": -1, "prompt": "x", "max_tokens": 1}\n')
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "t.jsonl:1" in bad.stderr


def test_the_summary_needs_its_baselines():
    with pytest.raises(routing.BenchError, match="round-robin"):
        routing.run(routing.RoutingBench(policies=("permamesh", "random")), say=lambda line: None)


@pytest.mark.slow  # ~25 s on 2 cores: routing over real sockets is tested in tests/routing and test_failover.py
def test_the_real_mode_smoke_run_answers_every_request_through_real_sockets(tmp_path):
    """`--mode real --quick`: real WorkerServers with group links on loopback (threads of this
    process, tiny-random); every request answered, the summary complete, sync bytes counted."""
    bench = routing.RoutingBench(mode="real", quick=True, model="tiny-random", data_dir=tmp_path,
                                 policies=("round-robin", "least-loaded", "permamesh"))
    report = routing.run(bench, say=lambda line: None)
    assert SUMMARY_KEYS <= set(report["summary"]) and report["summary"]["lost_requests"] == 0
    assert report["requests"] == 16 and all(p["count"] == 16 for p in report["policies"].values())
    assert report["sync"]["delta_bytes"] > 0 and report["policies"]["permamesh"]["cache_hit_rate"] > 0
