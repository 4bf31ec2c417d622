"""Prometheus text metrics for every process: workers, relays, validators and the gateway.

Each process (or each server embedded in a test process) owns one
:class:`prometheus_client.CollectorRegistry` from :func:`new_registry`, which already holds
the process collector (CPU seconds, resident memory, open files, start time: what the
health checks read), and serves it over HTTP at ``/metrics`` (``--metrics-port``; 0 = any
free port). :class:`Exporter` does both and records the endpoint in
``DATA_DIR/run/metrics/<node id>.json`` (:func:`discover_metrics` lists them: the health
checks and the dashboard scrape every process found there).

Most figures already live in a component's own counters, so instead of instrumenting hot
paths twice, a component hands :class:`Gauges` a function returning its figures, read at
scrape time. Latency histograms are real :class:`prometheus_client.Histogram` objects,
observed when a job ends.

Who calls it: :mod:`permamesh.workers.process`, :mod:`permamesh.overlay.relayproc`,
:mod:`permamesh.committee.validator` and :mod:`permamesh.gateway`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from permamesh.directory.workers import read_records, write_record

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def new_registry() -> CollectorRegistry:
    """A registry of one component, with the process collector in it."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


def histogram(registry: CollectorRegistry, name: str, doc: str, labels: tuple[str, ...] = ()) -> Histogram:
    return Histogram(name, doc, labels, registry=registry, buckets=LATENCY_BUCKETS)


@dataclass(frozen=True)
class Figure:
    """One sample read at scrape time: ``kind`` is "gauge" or "counter"."""

    name: str
    doc: str
    value: float
    kind: str = "gauge"
    labels: dict[str, str] = field(default_factory=dict)


class Gauges(Collector):
    """Figures read from ``read()`` at every scrape (a component's own counters)."""

    def __init__(self, read: Callable[[], Iterable[Figure]], registry: CollectorRegistry | None = None) -> None:
        self.read = read
        if registry is not None:
            registry.register(self)

    def describe(self):  # no fixed set: the figures (and their labels) come at scrape time
        return []

    def collect(self):
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        try:
            figures = list(self.read())
        except Exception:  # noqa: BLE001 - a scrape must not take the process down
            log.exception("reading metrics failed")
            return
        for f in figures:
            family = families.get(f.name)
            if family is None:
                cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
                family = families[f.name] = cls(f.name, f.doc, labels=sorted(f.labels))
            family.add_metric([f.labels[k] for k in sorted(f.labels)], float(f.value))
        yield from families.values()


class MetricsServer:
    """``/metrics`` of ``registry`` over HTTP on ``host:port`` (0 = any free port)."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server, self._thread = start_http_server(port, host, registry)
        self.url = f"http://{host}:{self._server.server_port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def serve(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
    server = MetricsServer(registry, host, port)
    log.info("metrics on %s", server.url)
    return server


@dataclass(frozen=True)
class MetricsRecord:
    """Where one process's metrics are: ``DATA_DIR/run/metrics/<node_id>.json``."""

    node_id: str
    role: str  # worker, relay, validator, gateway
    url: str  # http://host:port/metrics
    pid: int


def _metrics_dir(data_dir) -> Path:
    return Path(data_dir) / "run" / "metrics"


def register_metrics(data_dir, record: MetricsRecord) -> None:
    write_record(_metrics_dir(data_dir), record)


def unregister_metrics(data_dir, node_id: str) -> None:
    (_metrics_dir(data_dir) / f"{node_id}.json").unlink(missing_ok=True)


def discover_metrics(data_dir) -> list[MetricsRecord]:
    """The metrics endpoints of live processes registered under ``data_dir``."""
    return read_records(_metrics_dir(data_dir), MetricsRecord, what="metrics record")


class Exporter:
    """A process's metrics: serve ``registry`` and register the endpoint; ``close`` undoes both."""

    def __init__(self, registry: CollectorRegistry, data_dir, node_id: str, role: str, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.server = serve(registry, host, port)
        self.data_dir, self.node_id = data_dir, node_id
        register_metrics(data_dir, MetricsRecord(node_id, role, self.server.url, os.getpid()))

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        unregister_metrics(self.data_dir, self.node_id)
        self.server.close()
