"""A worker's Prometheus metrics: requests, latency, queue, prefix-cache hits, overlay cloves,
container jobs.

Counters that the worker keeps anyway (served, rejected frames, tokens, the inbox's clove
counts, the container service's runs) are read at scrape time; latency histograms are
observed when a job ends (``observe_generate`` from the event loop, container jobs from the
service's threads: prometheus_client's objects are thread-safe).

Who calls it: :mod:`permamesh.workers.process` builds one per worker process and hands
``server.telemetry`` to the server, which calls ``observe_generate``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from permamesh.ops.metrics import Figure, Gauges, histogram, new_registry

if TYPE_CHECKING:
    from permamesh.workers.server import WorkerServer

log = logging.getLogger(__name__)


class WorkerTelemetry:
    def __init__(self, server: WorkerServer) -> None:
        self.server = server
        self.registry = new_registry()
        self.latency = histogram(self.registry, "permamesh_request_latency_seconds",
                                 "Seconds from the start of a job's work to its last token (or exit)", ("kind",))
        self.ttft = histogram(self.registry, "permamesh_time_to_first_token_seconds",
                              "Seconds from the start of a generation job's work to its first token")
        Gauges(self.figures, self.registry)

    def observe_generate(self, total_s: float, ttft_s: float) -> None:
        self.latency.labels("generate").observe(total_s)
        self.ttft.observe(ttft_s)

    def observe_container(self, total_s: float) -> None:
        self.latency.labels("container").observe(total_s)

    def figures(self) -> list[Figure]:
        s = self.server
        st = s.status()
        out = [
            Figure("permamesh_requests_total", "Jobs completed", st.served, "counter", {"kind": "generate"}),
            Figure("permamesh_queue_length", "Jobs waiting, not counting those running", st.queue_length),
            Figure("permamesh_busy", "1 while the engine is working", 1.0 if st.busy else 0.0),
            Figure("permamesh_rejected_frames_total", "Malformed or forged frames refused", st.rejected_frames, "counter"),
            Figure("permamesh_prompt_tokens_total", "Prompt tokens served", st.prompt_tokens_total, "counter"),
            Figure("permamesh_cached_tokens_total", "Prompt tokens the prefix cache supplied", st.cached_tokens_total,
                   "counter"),
            Figure("permamesh_prefix_cache_hit_ratio", "Cached over prompt tokens since start",
                   st.cached_tokens_total / st.prompt_tokens_total if st.prompt_tokens_total else 0.0),
            Figure("permamesh_forwarded_total", "Jobs handed to another group member", st.forwarded, "counter"),
            Figure("permamesh_group_members", "Group members this worker hears from", st.members),
            Figure("permamesh_decode_tokens_per_second", "Measured decode rate", st.decode_tok_per_s),
            Figure("permamesh_prefill_tokens_per_second", "Measured prefill rate", st.prefill_tok_per_s),
            Figure("permamesh_uptime_seconds", "Seconds since the worker started", st.uptime_s),
        ]
        if s.inbox is not None:
            counts = dict(s.inbox.counts)
            for key in sorted(counts):
                out.append(Figure("permamesh_overlay_events_total", "Inbox events: cloves in, requests rebuilt, "
                                  "answers, replies, drops by reason", counts[key], "counter", {"event": key}))
            lost = sum(counts.get(k, 0) for k in ("bad_envelope", "bad_clove", "unknown_first_hop", "seal_failed",
                                                  "dropped_closing"))
            out.append(Figure("permamesh_cloves_lost_total", "Cloves dropped or replies that could not be sent",
                              lost, "counter"))
        c = s.containers
        if c is not None:
            stats = c.worker.store.stats()
            out += [
                Figure("permamesh_container_jobs", "Container jobs held (queued or running)", c.jobs),
                Figure("permamesh_requests_total", "Jobs completed", c.ran, "counter", {"kind": "container"}),
                Figure("permamesh_container_failures_total", "Container jobs that could not run", c.failed, "counter"),
                Figure("permamesh_container_forwarded_total", "Container jobs run by another worker", c.forwarded,
                       "counter"),
                Figure("permamesh_layer_store_bytes", "Bytes of layers held", c.worker.store.used_bytes()),
                Figure("permamesh_layer_store_hits_total", "Layer lookups that found the layer", stats.hits, "counter"),
                Figure("permamesh_layer_store_misses_total", "Layer lookups that did not", stats.misses, "counter"),
            ]
        return out
