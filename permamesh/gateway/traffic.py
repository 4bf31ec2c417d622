"""The gateway's traffic as the dashboard shows it: rates over the time between two looks.

:class:`TrafficMeter` reads the gateway's own Prometheus registry (requests by route and
status, the latency and time-to-first-token histograms, answer tokens) and reports what
changed since its previous reading: requests and errors per second, mean latency of the
``/v1/`` routes, mean time to first token of streamed jobs, answer tokens per second. A
reading less than a second after the previous one reports over the longer window, so a
flood of dashboard refreshes cannot shrink the window to nothing.

Who calls it: :mod:`permamesh.gateway.server` (``GET /api/mesh``).
"""

from __future__ import annotations

import threading
import time

MIN_WINDOW_S = 1.0


class TrafficMeter:
    def __init__(self, registry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._mark: tuple[float, dict] = (time.monotonic(), {})

    def totals(self) -> dict[str, float]:
        totals = {"requests": 0.0, "errors": 0.0, "latency_sum": 0.0, "latency_count": 0.0, "ttft_sum": 0.0,
                  "ttft_count": 0.0, "tokens": 0.0}
        for family in self.registry.collect():
            for sample in family.samples:
                name, labels = sample.name, sample.labels
                api = labels.get("route", "").startswith("/v1/")
                if name == "permamesh_gateway_requests_total":
                    totals["requests"] += sample.value
                    totals["errors"] += sample.value if labels.get("status", "").startswith(("4", "5")) else 0.0
                elif name == "permamesh_gateway_request_latency_seconds_sum" and api:
                    totals["latency_sum"] += sample.value
                elif name == "permamesh_gateway_request_latency_seconds_count" and api:
                    totals["latency_count"] += sample.value
                elif name in ("permamesh_gateway_ttft_seconds_sum", "permamesh_gateway_ttft_seconds_count"):
                    totals["ttft_" + name.rsplit("_", 1)[1]] += sample.value
                elif name == "permamesh_gateway_tokens_total" and labels.get("kind") == "completion":
                    totals["tokens"] += sample.value
        return totals

    def rates(self) -> dict:
        now, totals = time.monotonic(), self.totals()
        with self._lock:
            then, before = self._mark
            if now - then >= MIN_WINDOW_S:
                self._mark = (now, totals)
        seconds = max(now - then, 1e-9)
        delta = {k: totals[k] - before.get(k, 0.0) for k in totals}

        def mean(kind: str) -> float | None:
            count = delta[f"{kind}_count"]
            return round(delta[f"{kind}_sum"] / count, 4) if count else None

        return {"window_s": round(seconds, 1), "requests_per_s": round(delta["requests"] / seconds, 3),
                "errors_per_s": round(delta["errors"] / seconds, 3), "latency_s": mean("latency"),
                "ttft_s": mean("ttft"), "tokens_per_s": round(delta["tokens"] / seconds, 2),
                "requests": int(totals["requests"]), "errors": int(totals["errors"])}
