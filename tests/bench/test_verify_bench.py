"""The verification benchmark end to end on the tiny model (a short run): the report has its
summary keys, honest nodes stay trusted, full-time cheaters are out, JSON and PNG get written."""

from __future__ import annotations

import dataclasses
import json

from permamesh.bench import verify
from permamesh.cli import main


def test_a_short_verify_run_reports_exclusions_and_no_false_ones(tmp_path):
    bench = dataclasses.replace(verify.quick_bench(seed=1, data_dir=tmp_path), epochs=4, honest_nodes=2, chance_copies=1)
    report = verify.run(bench, say=lambda _: None)
    s = report["summary"]
    for key in ("verifications_per_minute", "max_epochs_to_exclude_fulltime", "epochs_to_exclude_parttime20",
                "false_exclusions", "honest_node_epochs"):
        assert key in s
    assert s["false_exclusions"] == 0 and s["honest_node_epochs"] == 2 * 2 * 4
    assert s["max_epochs_to_exclude_fulltime"] <= 3
    dodger = s["adaptive_dodger"]
    assert all(e is not None for e in dodger["epochs_to_exclude"]) or dodger["max_compute_saved"] < 0.05
    assert set(s["max_epochs_to_exclude_contract"]) == {"argmax-only", "seed-ignoring"}
    assert report["calibration"]["bf16"]["answers"] > 0 and s["verifications_per_minute"] > 0
    verify.plot_verify(report, tmp_path / "v.png")
    assert (tmp_path / "v.png").stat().st_size > 10_000


def test_the_cli_writes_json(tmp_path):
    out = tmp_path / "v.json"
    assert main(["bench", "verify", "--quick", "--epochs", "2", "--honest-nodes", "1", "--data-dir", str(tmp_path),
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["summary"]["honest_node_epochs"] == 4


def test_an_honest_only_soak_has_no_cheaters_and_counts_node_epochs(tmp_path):
    bench = dataclasses.replace(verify.quick_bench(seed=2, data_dir=tmp_path), epochs=2, honest_nodes=2,
                                honest_only=True)
    report = verify.run(bench, say=lambda _: None)
    assert all(name.startswith("honest-") for name in report["nodes"])
    assert report["summary"]["honest_node_epochs"] == 8 and report["summary"]["false_exclusions"] == 0
    verify.plot_verify(report, tmp_path / "soak.png")
