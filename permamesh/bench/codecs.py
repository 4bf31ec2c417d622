"""S-IDA cost per message for each erasure codec: preparing cloves and rebuilding from them.

:func:`measure_codecs` times, per codec and message size, with ``time.perf_counter``:

- ``prep_ms``: :func:`~permamesh.overlay.sida.split` (key, encryption, erasure code,
  Shamir, fingerprints) plus :func:`~permamesh.overlay.clove.encode_clove` of all n;
- ``rebuild_ms``: :func:`~permamesh.overlay.clove.decode_clove` plus
  :meth:`~permamesh.overlay.sida.Rebuilder.add` of the last k cloves, i.e. the first
  n-k are lost, so the codec must really decode from parity (the worst case);

and, for the codec alone, ``encode_ms`` and ``decode_ms`` (from the last k shares) of a
ciphertext-sized input. Each is the median of ``repeats`` runs after one warm-up run.
reedsolo is pure Python and thousands of times slower than zfec, so it gets far fewer
repeats. The result is a JSON-able dict; ``quick=True`` keeps the whole call to a few
seconds (for tests and smoke runs). Callers: ``benchmarks/`` scripts and the tests; the CLI
may expose it as ``permamesh bench codecs``.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Sequence

from permamesh.overlay.clove import decode_clove, encode_clove
from permamesh.overlay.erasure import CODECS, get_codec
from permamesh.overlay.sida import Rebuilder, split

logger = logging.getLogger(__name__)

DEFAULT_SIZES = (1024, 4096, 16384, 65536)  # bytes of plaintext
# median over this many timed runs, by codec: (normal, quick)
DEFAULT_REPEATS = {"zfec": (200, 20), "reedsolo": (3, 1)}


def _time_one(message: bytes, n: int, k: int, codec_name: str) -> tuple[float, float]:
    codec = get_codec(codec_name)
    start = time.perf_counter()
    wire = [encode_clove(c) for c in split(message, n=n, k=k, codec=codec)]
    prepared = time.perf_counter()
    rebuilder = Rebuilder()
    result = None
    for frame in wire[n - k :]:
        result = rebuilder.add(decode_clove(frame))
    done = time.perf_counter()
    if result != message:
        raise RuntimeError(f"{codec_name}: rebuilt message differs ({len(message)} bytes)")
    return (prepared - start) * 1e3, (done - prepared) * 1e3


def _time_codec(data: bytes, n: int, k: int, codec_name: str) -> tuple[float, float]:
    codec = get_codec(codec_name)
    start = time.perf_counter()
    shares = codec.encode(data, k, n)
    encoded = time.perf_counter()
    result = codec.decode({i: shares[i] for i in range(n - k, n)}, k, n, len(data))
    done = time.perf_counter()
    if result != data:
        raise RuntimeError(f"{codec_name}: decoded data differs ({len(data)} bytes)")
    return (encoded - start) * 1e3, (done - encoded) * 1e3


def measure_codecs(
    sizes: Sequence[int] = DEFAULT_SIZES,
    n: int = 4,
    k: int = 3,
    repeats: int | None = None,
    quick: bool = False,
    codecs: Sequence[str] = tuple(CODECS),
) -> dict:
    """Median prep and rebuild milliseconds per codec and size, as a JSON-able dict.

    ``repeats`` overrides the per-codec defaults (:data:`DEFAULT_REPEATS`) for every codec.
    Returns ``{"n", "k", "quick", "machine", "results": {codec: {str(size): {...}}},
    "summary": {...}}`` where each cell holds ``prep_ms``, ``rebuild_ms``, ``total_ms``,
    ``encode_ms``, ``decode_ms``, ``repeats`` and ``clove_bytes`` (one framed clove).
    """
    results: dict[str, dict[str, dict[str, float | int]]] = {}
    for name in codecs:
        count = repeats if repeats is not None else DEFAULT_REPEATS.get(name, (20, 3))[quick]
        results[name] = {}
        for size in sizes:
            message = os.urandom(size)
            _time_one(message, n, k, name)  # warm caches (codec matrices, GF tables)
            ciphertext = os.urandom(size + 16)  # what split erasure-codes
            times: list[tuple[float, float, float, float]] = []
            for _ in range(max(1, count)):
                times.append(
                    _time_one(message, n, k, name) + _time_codec(ciphertext, n, k, name)
                )
            prep_ms, rebuild_ms, encode_ms, decode_ms = (
                statistics.median(column) for column in zip(*times)
            )
            clove_bytes = len(encode_clove(split(message, n=n, k=k, codec=get_codec(name))[0]))
            results[name][str(size)] = {
                "prep_ms": round(prep_ms, 4),
                "rebuild_ms": round(rebuild_ms, 4),
                "total_ms": round(prep_ms + rebuild_ms, 4),
                "encode_ms": round(encode_ms, 4),
                "decode_ms": round(decode_ms, 4),
                "repeats": max(1, count),
                "clove_bytes": clove_bytes,
            }
            logger.info("%s %d B: prep %.3f ms, rebuild %.3f ms", name, size, prep_ms, rebuild_ms)
    summary = {}
    if "zfec" in results and "reedsolo" in results:
        for size in results["zfec"]:
            if size in results["reedsolo"]:
                slow, fast = results["reedsolo"][size], results["zfec"][size]
                for metric in ("total_ms", "decode_ms"):
                    ratio = slow[metric] / max(fast[metric], 1e-6)
                    summary[f"reedsolo_over_zfec_{metric[:-3]}_{size}"] = round(ratio, 1)
    return {
        "n": n,
        "k": k,
        "quick": quick,
        "rebuild_from": list(range(n - k, n)),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "results": results,
        "summary": summary,
    }
