"""`permamesh bench committee` on a small run: real app on SQLite, real devnet processes."""

from __future__ import annotations

import json

from permamesh.bench.committee import CommitteeBench, plot_committee, run
from permamesh.bench.stats import write_report


def test_committee_bench_summary_and_outputs(tmp_path):
    bench = CommitteeBench(app_blocks=2, block_txs=40, latency_txs=5, burst_txs=40,
                           kill_drill=False, home=tmp_path / "state")
    report = run(bench, say=lambda *_: None)
    s = report["summary"]
    for key in ("commit_latency_p50_s", "tx_per_s", "app_hash_agree", "devnet_tx_per_s"):
        assert key in s
    assert s["app_hash_agree"] is True and s["heights_checked"] >= 1
    assert report["devnet"]["burst_ok"] == 40  # every pipelined tx committed
    assert report["app"]["txs"] == 80 and s["tx_per_s"] > 0
    write_report(report, tmp_path / "c.json", tmp_path / "c.png", plot_committee)
    assert json.loads((tmp_path / "c.json").read_text())["summary"]["validators"] == 4
    assert (tmp_path / "c.png").stat().st_size > 1000
