"""Benchmarks: request traces, a discrete-event simulator of a worker group, and summaries.

- :mod:`~permamesh.bench.traces`: the JSONL trace format (:class:`TraceRequest`,
  :func:`load_trace`, :func:`save_trace`) and seeded generators (:data:`GENERATORS`).
- :mod:`~permamesh.bench.tokens`: the fast stand-in tokenizer (:func:`word_tokenizer` over
  :func:`chat_text`, a ChatML rendering of a request).
- :mod:`~permamesh.bench.sim`: :func:`simulate` replays a trace through the real routing
  policies (:mod:`permamesh.routing.policy`) over simulated FIFO workers with LRU prefix
  caches (real workers interleave decode steps; see docs/routing.md).
- :mod:`~permamesh.bench.stats`: :class:`RequestRecord` and :func:`summarize`.
- :mod:`~permamesh.bench.syncreplay`: the tree-sync bytes of a simulated run, replayed through
  real delta publishers.
- :mod:`~permamesh.bench.real`: the same trace against real worker processes on loopback.
- :mod:`~permamesh.bench.routing`: ``permamesh bench routing``, every policy on one trace in
  sim or real mode, and its JSON report.
- :mod:`~permamesh.bench.plot`: PNG plots of the reports.
- :mod:`~permamesh.bench.codecs`: S-IDA prep and rebuild latency per message size and codec.
- :mod:`~permamesh.bench.overlaysim`: delivery rate vs relay failure at 10,000 relays under the
  client's resend rule (and its analytic check).
- :mod:`~permamesh.bench.anonsim`: the PlanetServe-style anonymity/confidentiality simulation.
- :mod:`~permamesh.bench.overlayreal`: delivery and overhead through relay processes.
- :mod:`~permamesh.bench.overlay`: ``permamesh bench overlay`` and its JSON report;
  :mod:`~permamesh.bench.overlayplot` its PNG.

The ``permamesh bench`` command and ``benchmarks/`` scripts call these. What this package
exports (traces, tokens, sim, stats, imported on first use) touch neither the network nor a model; ``real``,
``routing``, ``syncreplay`` and ``plot`` are imported by name where needed.
"""

import importlib

# name -> the module that defines it, imported on first use (PEP 562): the CLI imports
# permamesh.bench.commands on every start, and a worker's start should not pay for numpy here
_EXPORTS = {
    "SimConfig": "sim", "simulate": "sim",
    "RequestRecord": "stats", "percentile": "stats", "summarize": "stats",
    "chat_text": "tokens", "word_tokenizer": "tokens",
    "GENERATORS": "traces", "TraceError": "traces", "TraceRequest": "traces", "load_trace": "traces",
    "save_trace": "traces",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
