"""`permamesh bench committee` on a small run: real app on SQLite, a real 4-node CometBFT
committee and the devnet beside it, both under the same load."""

from __future__ import annotations

import json

import pytest

from permamesh.bench.committee import CommitteeBench, plot_committee, run
from permamesh.bench.stats import write_report


def test_committee_bench_summary_and_outputs(tmp_path):
    bench = CommitteeBench(app_blocks=2, block_txs=40, latency_txs=5, burst_txs=40,
                           kill_drill=False, home=tmp_path / "state")
    report = run(bench, say=lambda *_: None)
    s = report["summary"]
    assert s["engine"] == "cometbft" and set(s["beside"]) == {"devnet"}
    for key in ("commit_latency_p50_s", "commit_latency_p99_s", "tx_per_s", "app_tx_per_s", "app_hash_agree"):
        assert key in s
    assert s["app_hash_agree"] is True and s["heights_checked"] >= 1
    for engine in ("cometbft", "devnet"):
        assert report["engines"][engine]["burst_ok"] == 40  # every pipelined tx committed
        assert report["engines"][engine]["agreement"]["agree"] is True
    assert report["app"]["txs"] == 80 and s["app_tx_per_s"] > 0 and s["tx_per_s"] > 0
    assert 0 < s["commit_latency_p50_s"] <= s["commit_latency_p99_s"]
    write_report(report, tmp_path / "c.json", tmp_path / "c.png", plot_committee)
    assert json.loads((tmp_path / "c.json").read_text())["summary"]["validators"] == 4
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_unknown_engines_are_refused():
    with pytest.raises(ValueError, match="engines"):
        CommitteeBench(engines=("tendermint",))
