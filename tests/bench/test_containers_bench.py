"""`permamesh bench containers` on a small run with real runtimes and real images."""

from __future__ import annotations

import shutil

import pytest

from permamesh.bench.containers import BUSYBOX, ContainerBench, plot_containers, run
from permamesh.bench.stats import write_report


@pytest.mark.skipif(not BUSYBOX.exists() or not (shutil.which("runc") or shutil.which("bwrap")),
                    reason="needs busybox-static and runc or bubblewrap (Debian packages)")
def test_containers_bench_summary(tmp_path):
    report = run(ContainerBench(data_mb=8, repeats=2, images=3, image_mb=1, workers=3, jobs=10), say=lambda *_: None)
    s = report["summary"]
    assert {"warm_speedup", "warm_pick_rate", "random_warm_pick_rate"} <= set(s)
    assert all(row["exit"] == 0 for row in report["routing"]["jobs"])
    assert report["routing"]["eligible"] >= 1 and 0.0 <= s["warm_pick_rate"] <= 1.0
    write_report(report, tmp_path / "c.json", tmp_path / "c.png", plot_containers)
    assert (tmp_path / "c.png").stat().st_size > 1000
