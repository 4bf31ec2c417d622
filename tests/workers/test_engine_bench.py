"""``permamesh bench engine`` end to end on the tiny model: a real worker process, concurrent
clients, every figure of the report present and sane, the JSON and the PNG written."""

from __future__ import annotations

import json

from permamesh.bench.engine import EngineBench, plot_engine, run
from permamesh.bench.stats import write_report


def test_the_engine_bench_reports_every_level_with_its_ceiling(home, tmp_path):
    bench = EngineBench(backends=("torch",), concurrency=(1, 3), prompt_tokens=40, max_tokens=6,
                        max_active=4, model="tiny-random", data_dir=home)
    report = run(bench, say=lambda line: None)
    (torch,) = report["backends"]
    assert [row["concurrency"] for row in torch["levels"]] == [1, 3]
    for row in torch["levels"]:
        assert row["prefill_tok_per_s"] > 0 and row["total_tok_per_s"] > 0
        assert row["answer_tokens"] >= row["concurrency"]
        assert row["prefix_cache"]["cached_tokens"] > 0  # the shared system prompt was reused
        assert row["verification"]["credit_min"] > 0.9  # an honest fp32 worker scores as the reference
    assert torch["one_request_ceiling_tok_per_s"] > 0
    assert report["machine"]["memory_bandwidth_gb_s"] > 0 and len(report["machine"]["load_average_before"]) == 3
    write_report(report, tmp_path / "engine.json", tmp_path / "engine.png", plot_engine)
    assert json.loads((tmp_path / "engine.json").read_text())["summary"]["torch"]["total_tok_per_s_3"] > 0
    assert (tmp_path / "engine.png").stat().st_size > 1000


def test_the_raw_llamacpp_baseline_decodes_every_level():
    """The llama.cpp baseline (``engineraw``) runs llama.cpp itself on SmolLM2's GGUF in a child
    process: a decode rate per concurrency, more tokens per second with 4 sequences than with 1
    (one batched decode shares the weight reads); nothing without a GGUF (the torch backend)."""
    import pytest

    from permamesh.bench.engineraw import baseline_for, raw_decode_tok_per_s
    from permamesh.workers import backends, models

    if backends.llamacpp_missing():
        pytest.skip(backends.llamacpp_missing())
    rates = raw_decode_tok_per_s(models.smollm2_gguf(), [4, 1], prompt_tokens=16, steps=16)
    assert set(rates) == {1, 4} and 0 < rates[1] < rates[4]
    assert baseline_for(None, [1], print) == {}
