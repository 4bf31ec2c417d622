"""`permamesh bench overlay` end to end in quick mode: the report a harness reads, the plot,
the CLI options, and how a real-mesh part fills its slots."""

from __future__ import annotations

import argparse
import json
import time

import pytest

from permamesh.bench import overlay
from permamesh.bench.traces import BenchError

SUMMARY_KEYS = {"delivery_rate_at_3pct", "delivery_rate_at_10pct", "delivery_rate_at_3pct_sim",
                "delivery_rate_at_10pct_sim", "prep_rebuild_ms_4kb", "overhead_ms_p50"}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_report():
    start = time.perf_counter()
    report = overlay.run(quick=True, seed=0, say=lambda line: None)
    return report, time.perf_counter() - start


def test_a_quick_run_is_fast_and_its_summary_is_plausible(quick_report):
    report, wall_s = quick_report
    assert wall_s < 20
    s = report["summary"]
    assert SUMMARY_KEYS <= set(s)
    assert s["delivery_source"] == "sim" and s["overhead_ms_p50"] is None
    assert s["delivery_rate_at_3pct"] == s["delivery_rate_at_3pct_sim"] >= 0.995
    assert s["delivery_rate_at_10pct"] == s["delivery_rate_at_10pct_sim"] >= 0.97
    assert s["delivery_target_met_at_3pct"] and s["delivery_target_met_at_10pct"]
    assert s["delivery_rate_at_10pct_sim_no_resend"] < s["delivery_rate_at_10pct_sim"]
    assert 0 < s["prep_rebuild_ms_4kb"] < 50  # zfec: well under a millisecond on a quiet core
    assert s["prep_rebuild_ms_4kb_reedsolo"] > s["prep_rebuild_ms_4kb"]
    assert s["read_at_10pct_permamesh"] < s["read_at_10pct_garlic_cast"] < s["read_at_10pct_onion"]
    assert s["link_at_10pct_permamesh"] < s["link_at_10pct_onion"]
    assert report["delivery"]["real_mesh"] is None and report["overhead"] is None


def test_the_report_covers_every_scheme_rate_codec_and_size(quick_report):
    report, _ = quick_report
    sim = report["delivery"]["sim"]
    assert {r["scheme"] for r in sim} == {"onion", "sida(4,3)", "sida(5,3)", "sida(6,3)"}
    assert {r["failure_rate"] for r in sim} >= {0.0, 0.03, 0.1, 0.2}
    assert {r["rule"] for r in sim} == {"targeted", "attempt"}
    assert set(report["codecs"]["results"]) == {"zfec", "reedsolo"}
    for cells in report["codecs"]["results"].values():
        assert set(cells) == {"1024", "4096", "16384", "65536"}
    assert {r["scheme"] for r in report["anonymity"]} == {"onion", "garlic-cast", "permamesh"}
    assert {r["fraction"] for r in report["anonymity"]} >= {0.001, 0.1, 0.5}
    assert {r["n_nodes"] for r in report["anonymity"]} == {10_000}


def test_json_and_plot_are_written(quick_report, tmp_path):
    report, _ = quick_report
    overlay.write_outputs(report, tmp_path / "o.json", tmp_path / "plots" / "o.png")
    assert json.loads((tmp_path / "o.json").read_text())["summary"] == json.loads(
        json.dumps(report["summary"]))
    assert (tmp_path / "plots" / "o.png").read_bytes()[:8] == PNG


def fake_real(rate_at_3pct=0.999, rows_at=(0.03, 0.1)):
    def real(quick, seed, say):
        say("fake mesh")
        rows = [{"scheme": "sida(4,3)", "n": 4, "k": 3, "failure_rate": p,
                 "delivery_rate": rate_at_3pct if p == 0.03 else 0.96, "requests": 50,
                 "mean_attempts": 1.2} for p in rows_at]
        # the rows under "real_mesh", as overlayreal.run_real returns them
        return {"real_mesh": rows, "overhead": {"overhead_ms_p50": 12.5, "direct_ms_p50": 3.0},
                "relays": 30}
    return real


def test_a_real_mesh_part_fills_its_slots_and_the_headline(monkeypatch, tmp_path):
    monkeypatch.setitem(overlay.SETTINGS, True, overlay.OverlaySettings(
        delivery_requests=500, anonymity_requests=200, sizes=(4096,), quick_codecs=True))
    lines = []
    report = overlay.run(quick=True, seed=1, real=fake_real(), say=lines.append)
    s = report["summary"]
    assert "fake mesh" in lines and s["delivery_source"] == "real_mesh"
    assert s["delivery_rate_at_3pct"] == 0.999 and s["delivery_rate_at_10pct"] == 0.96
    assert not s["delivery_target_met_at_10pct"]  # judged on the real figure
    assert s["overhead_ms_p50"] == 12.5 and report["real_mesh_info"] == {"relays": 30}
    overlay.write_outputs(report, None, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG
    # a real mesh that measured only 3%: the 10% figure comes from the simulation
    report = overlay.run(quick=True, seed=1, real=fake_real(rows_at=(0.03,)), say=lines.append)
    assert report["summary"]["delivery_source"] == "mixed"
    bad = lambda quick, seed, say: {"delivery": [{"scheme": "onion", "n": 1}]}  # noqa: E731
    with pytest.raises(BenchError, match="failure_rate"):
        overlay.run(quick=True, seed=1, real=bad, say=lines.append)


def test_cli_options_and_no_real(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(overlay.SETTINGS, True, overlay.OverlaySettings(
        delivery_requests=300, anonymity_requests=200, sizes=(4096,), quick_codecs=True))
    parser = argparse.ArgumentParser()
    overlay.add_overlay_bench_arguments(parser)
    out = tmp_path / "o.json"
    args = parser.parse_args(["--quick", "--seed", "2", "--json", str(out), "--no-real"])
    called = []
    assert overlay.run_from_args(args, real=lambda **kw: called.append(kw)) == 0
    assert called == [] and json.loads(out.read_text())["seed"] == 2
    args = parser.parse_args(["--quick", "--json", str(out)])
    assert overlay.run_from_args(args, real=fake_real()) == 0
    assert json.loads(out.read_text())["summary"]["overhead_ms_p50"] == 12.5
    assert f"wrote {out}" in capsys.readouterr().out
