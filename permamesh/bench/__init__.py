"""Benchmarks: request traces, a discrete-event simulator of a worker group, and summaries.

- :mod:`~permamesh.bench.traces`: the JSONL trace format (:class:`TraceRequest`,
  :func:`load_trace`, :func:`save_trace`) and seeded generators (:data:`GENERATORS`).
- :mod:`~permamesh.bench.sim`: :func:`simulate` replays a trace through the real routing
  policies (:mod:`permamesh.routing.policy`) over simulated FIFO workers with LRU prefix
  caches; :func:`word_tokenizer` is its fast stand-in tokenizer.
- :mod:`~permamesh.bench.stats`: :class:`RequestRecord` and :func:`summarize`.

The ``permamesh bench`` command and ``benchmarks/`` scripts call these; nothing here touches
the network or a model.
"""

from permamesh.bench.sim import SimConfig, chat_text, simulate, word_tokenizer
from permamesh.bench.stats import RequestRecord, percentile, summarize
from permamesh.bench.traces import (
    GENERATORS,
    TraceError,
    TraceRequest,
    load_trace,
    save_trace,
)

__all__ = [
    "GENERATORS",
    "RequestRecord",
    "SimConfig",
    "TraceError",
    "TraceRequest",
    "chat_text",
    "load_trace",
    "percentile",
    "save_trace",
    "simulate",
    "summarize",
    "word_tokenizer",
]
