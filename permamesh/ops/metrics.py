"""Prometheus text metrics for every process: workers, relays, validators and the gateway.

Each process (or each server embedded in a test process) owns one
:class:`prometheus_client.CollectorRegistry` from :func:`new_registry`, which already holds
the process collector (CPU seconds, resident memory, open files, start time: what the
health checks read), and serves it over HTTP at ``/metrics`` (``--metrics-port``; 0 = any
free port). :class:`Exporter` does both and records the endpoint in
``DATA_DIR/run/metrics/<node id>.json`` (:func:`discover_metrics` lists them: the health
checks and the dashboard scrape every process found there). These records tell local
operators' tools where to scrape; they never select a node for work, and nothing judges a
process alive by them: a record whose endpoint does not answer is a node that is down (a
process killed without its clean exit leaves its record, and the health check reports it
down until its launcher or an operator removes it).

Most figures already live in a component's own counters, so instead of instrumenting hot
paths twice, a component hands :class:`Gauges` a function returning its figures, read at
scrape time. Latency histograms are real :class:`prometheus_client.Histogram` objects,
observed when a job ends.

Who calls it: :mod:`permamesh.workers.process`, :mod:`permamesh.overlay.relayproc`,
:mod:`permamesh.committee.validator` and :mod:`permamesh.gateway`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


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


MAX_SCRAPES = 4  # scrapes computed at once; more wait up to ADMIT_WAIT_S, then get 503
MAX_CONNECTIONS = 64  # connections handled at once (reading a request head, or waiting for a slot)
ADMIT_WAIT_S = 1.0  # seconds a connection (or a scrape) waits for room before it is refused
HEAD_TIMEOUT_S = 2.0  # seconds a connection may take to send its request and read the answer


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def _limited(app, slots: threading.BoundedSemaphore):
    """``app`` computed by at most ``slots`` requests at once; the rest get 503 after
    :data:`ADMIT_WAIT_S`. A slot is held only while an answer is computed, never while a peer
    dawdles over its request head, so stalled connections cannot starve real scrapes."""
    def limited(environ, start_response):
        if not slots.acquire(timeout=ADMIT_WAIT_S):
            start_response("503 Service Unavailable", [("Content-Type", "text/plain"), ("Retry-After", "1")])
            return [b"busy\n"]
        try:
            return list(app(environ, start_response))
        finally:
            slots.release()
    return limited


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most :data:`MAX_CONNECTIONS` of them, each with a
    :data:`HEAD_TIMEOUT_S` deadline; the answers themselves are limited by :func:`_limited`.

    prometheus_client's own server starts a thread for every connection, with no timeout: a
    crowd of scrapers or half-open connections becomes as many threads. Here a connection
    waits briefly for room and is closed (and counted) if none frees up, and a slow or silent
    peer is dropped after its deadline."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *args, **kwargs) -> None:
        self.connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0  # connections closed because every slot stayed busy
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self.connections.acquire(timeout=ADMIT_WAIT_S):
            self.refused += 1
            if self.refused & (self.refused - 1) == 0:  # 1, 2, 4, ...: a line, not a flood
                log.warning("metrics server busy: %d connections refused so far", self.refused)
            self.shutdown_request(request)
            return
        try:
            request.settimeout(HEAD_TIMEOUT_S)
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request, client_address) -> None:  # a peer that hung up or stalled
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class MetricsServer:
    """``/metrics`` of ``registry`` over HTTP on ``host:port`` (0 = any free port), serving at
    most :data:`MAX_SCRAPES` requests at once (:class:`_BoundedServer`)."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> None:
        server_class = type("_Server", (_BoundedServer,),
                            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        app = _limited(make_wsgi_app(registry), threading.BoundedSemaphore(MAX_SCRAPES))
        self._server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        self.url = f"http://{host}:{self._server.server_port}/metrics"

    @property
    def refused(self) -> int:
        """Connections closed because the server was busy."""
        return self._server.refused

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


def _metrics_dir(data_dir) -> Path:
    return Path(data_dir) / "run" / "metrics"


def register_metrics(data_dir, record: MetricsRecord) -> None:
    """Write ``record`` atomically: a temporary file of this process renamed into place."""
    directory = _metrics_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{record.node_id}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"node_id": record.node_id, "role": record.role, "url": record.url}))
    os.replace(tmp, directory / f"{record.node_id}.json")


def unregister_metrics(data_dir, node_id: str) -> None:
    (_metrics_dir(data_dir) / f"{node_id}.json").unlink(missing_ok=True)


def discover_metrics(data_dir) -> list[MetricsRecord]:
    """Every metrics endpoint recorded under ``data_dir``, sorted by node id (unreadable
    records skipped with a warning)."""
    directory, found = _metrics_dir(data_dir), []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            fields = json.loads(path.read_text())
            record = MetricsRecord(str(fields["node_id"]), str(fields["role"]), str(fields["url"]))
            if path.stem != record.node_id:
                raise ValueError(f"file name does not match node id {record.node_id}")
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignoring unreadable metrics record %s: %s", path, exc)
            continue
        found.append(record)
    return found


class Exporter:
    """A process's metrics: serve ``registry`` and register the endpoint; ``close`` undoes both."""

    def __init__(self, registry: CollectorRegistry, data_dir, node_id: str, role: str, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.server = serve(registry, host, port)
        self.data_dir, self.node_id = data_dir, node_id
        register_metrics(data_dir, MetricsRecord(node_id, role, self.server.url))

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        unregister_metrics(self.data_dir, self.node_id)
        self.server.close()
