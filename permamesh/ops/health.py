"""The seed's free health checks, for every node this machine can see.

:class:`HealthMonitor` scrapes the metrics endpoint of every process registered under
``DATA_DIR/run/metrics`` (workers, relays, validators, the gateway) and judges each node on
the seed's list:

- **connectivity**: the scrape answered, and how long it took (the latency check);
- **uptime**: seconds since the process started (``process_start_time_seconds``);
- **resource use**: resident memory and CPU share since the last check
  (``process_resident_memory_bytes``, ``process_cpu_seconds_total``);
- **container health** (container workers): jobs that could not run since the last check;
- **anomaly alerts**: down (the endpoint does not answer, or a node checked before is no
  longer registered: its process exited); a scrape latency over ``latency_factor`` x the node's own median
  of the last checks (after ``min_history`` of them); memory over ``memory_limit_mb``; CPU
  over ``cpu_limit``; cloves lost since the last check; verification excluding a node.

Nodes elsewhere (another machine, another network namespace: no metrics record here) come
from the committee's directory (``targets``: :func:`directory_targets`): each is checked by
opening a TCP connection to its advertised endpoint; a node that does not accept one in
``timeout_s`` is **down**, whatever the committee last said of it. Every node's answered
share of the checks since this monitor first saw it is its **measured uptime**
(``availability``; payouts use it).

Each check returns ``{"checked_at", "nodes": [{"node", "role", "status", "latency_ms",
"uptime_s", "rss_mb", "cpu", "availability", "alerts": [...]}...]}``; ``status`` is ``up``,
``degraded`` (alerts) or ``down``. History (for the anomaly rules) is kept in memory per node.

Who calls it: the gateway (``/api/health``, the dashboard) and ``permamesh health``.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import socket
import statistics
import threading
import time
import urllib.request
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from permamesh.ops.metrics import discover_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthConfig:
    timeout_s: float = 2.0  # a scrape slower than this is a failed connectivity check
    latency_factor: float = 5.0  # alert when a scrape takes this many times the node's median
    min_history: int = 5  # checks before the latency rule applies
    history: int = 30  # checks remembered per node
    memory_limit_mb: float = 8192.0
    cpu_limit: float = 0.95  # share of one core, averaged since the last check


@dataclass(frozen=True)
class Target:
    """A node to check that has no metrics record on this machine: its advertised endpoint."""

    node_id: str
    role: str
    endpoint: str  # tcp://HOST:PORT ("" = never announced: down)


def directory_targets(snapshot) -> list[Target]:
    """Every announced node of a directory :class:`~permamesh.directory.snapshot.Snapshot`."""
    return [Target(e.node_id, e.role, e.endpoint) for e in snapshot.entries if e.role != "validator" or e.endpoint]


def cached_targets(data_dir: Path) -> list[Target]:
    """The nodes of the newest directory copy kept on disk under ``DATA_DIR/directory`` (what
    ``permamesh health`` checks beyond the local metrics records); [] without one."""
    from permamesh.directory.snapshot import parse_directory

    best = None
    for path in sorted((Path(data_dir) / "directory").glob("*.json")):
        try:
            snap = parse_directory(json.loads(path.read_text())["snapshot"], str(path))
        except Exception as exc:  # noqa: BLE001 - an unreadable copy is skipped, not fatal
            log.debug("directory copy %s unusable: %s", path, exc)
            continue
        if best is None or snap.height > best.height:
            best = snap
    return directory_targets(best) if best is not None else []


def probe(endpoint: str, timeout_s: float) -> float:
    """Seconds to open a TCP connection to ``tcp://HOST:PORT`` (raises when none opens)."""
    hostport = endpoint.removeprefix("tcp://").split("?", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a tcp://HOST:PORT endpoint: {endpoint[:80]!r}")
    started = time.monotonic()
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
        return time.monotonic() - started


def scrape(url: str, timeout_s: float) -> dict[str, list]:
    """Samples by metric family name (raises on an unreachable or invalid endpoint)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read(8 << 20).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(families: dict, name: str, **labels) -> float | None:
    samples = [s for s in families.get(name, []) if s.name in (name, name + "_total")
               and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(s.value for s in samples) if samples else None


class HealthMonitor:
    def __init__(self, data_dir: Path, config: HealthConfig = HealthConfig()) -> None:
        self.data_dir, self.config = Path(data_dir), config
        self._latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=config.history))
        self._last: dict[str, tuple[float, dict]] = {}  # node -> (when, families) of its last scrape
        self._seen: dict[str, str] = {}  # node -> role, of every node ever checked
        self._answered: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # node -> [checks answered, checks]
        self._lock = threading.Lock()

    def check(self, targets: list[Target] | tuple = ()) -> dict:
        """Check every local metrics endpoint, and every one of ``targets`` that has none here."""
        records = discover_metrics(self.data_dir)
        local = {r.node_id for r in records}
        remote = {t.node_id: t for t in targets if t.node_id not in local}
        jobs = [(self._check_one, r) for r in records] + [(self._probe_one, t) for t in remote.values()]
        with concurrent.futures.ThreadPoolExecutor(max(1, min(16, len(jobs)))) as pool:
            nodes = list(pool.map(lambda job: job[0](job[1]), jobs))
        present = local | set(remote)
        with self._lock:
            gone = sorted((n, role) for n, role in self._seen.items() if n not in present)
            self._seen.update({r.node_id: r.role for r in records})
            self._seen.update({t.node_id: t.role for t in remote.values()})
        nodes += [{"node": n, "role": role, "url": "", "status": "down",
                   "alerts": ["down: no longer registered (its process exited)"]} for n, role in gone]
        with self._lock:
            for n in nodes:
                tally = self._answered[n["node"]]
                tally[0] += n["status"] != "down"
                tally[1] += 1
                n["availability"] = round(tally[0] / tally[1], 4)
        return {"checked_at": time.time(), "nodes": nodes,
                "alerts": sum(len(n["alerts"]) for n in nodes), "down": sum(n["status"] == "down" for n in nodes)}

    def availability(self) -> dict[str, float]:
        """Each node's measured uptime: its answered share of the checks since first seen."""
        with self._lock:
            return {node: a / n for node, (a, n) in self._answered.items() if n}

    def _probe_one(self, target: Target) -> dict:
        out = {"node": target.node_id, "role": target.role, "url": target.endpoint, "alerts": [], "remote": True}
        try:
            latency = probe(target.endpoint, self.config.timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure is the connectivity check failing
            out.update(status="down", alerts=[f"down: {target.endpoint or 'no endpoint'} did not accept a connection "
                                              f"({type(exc).__name__})"])
            return out
        out.update(status="up", latency_ms=round(latency * 1000, 3), uptime_s=None, rss_mb=None, cpu=None)
        return out

    def _check_one(self, record) -> dict:
        cfg = self.config
        started = time.monotonic()
        out = {"node": record.node_id, "role": record.role, "url": record.url, "alerts": []}
        try:
            families = scrape(record.url, cfg.timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure is the connectivity check failing
            out.update(status="down", alerts=[f"down: metrics endpoint did not answer ({type(exc).__name__})"])
            return out
        now = time.monotonic()
        latency = now - started
        alerts = out["alerts"]
        with self._lock:
            history = self._latency[record.node_id]
            if len(history) >= cfg.min_history:
                median = statistics.median(history)
                if latency > cfg.latency_factor * max(median, 1e-3):
                    alerts.append(f"latency: {latency * 1000:.1f} ms, {latency / median:.1f}x its median")
            history.append(latency)
            previous = self._last.get(record.node_id)
            self._last[record.node_id] = (now, families)
        started_at = _value(families, "process_start_time_seconds")
        rss = _value(families, "process_resident_memory_bytes")
        cpu_s = _value(families, "process_cpu_seconds")
        cpu = None
        if previous is not None and cpu_s is not None:
            before = _value(previous[1], "process_cpu_seconds")
            if before is not None and now > previous[0]:
                cpu = max(0.0, (cpu_s - before) / (now - previous[0]))
        out.update(latency_ms=round(latency * 1000, 3), uptime_s=round(time.time() - started_at, 1) if started_at else None,
                   rss_mb=round(rss / 2**20, 1) if rss is not None else None,
                   cpu=round(cpu, 3) if cpu is not None else None)
        if rss is not None and rss / 2**20 > cfg.memory_limit_mb:
            alerts.append(f"memory: {rss / 2**20:.0f} MiB resident, over {cfg.memory_limit_mb:.0f}")
        if cpu is not None and cpu > cfg.cpu_limit:
            alerts.append(f"cpu: {cpu:.0%} of a core since the last check")
        for name, what in (("permamesh_container_failures", "container jobs could not run"),
                           ("permamesh_cloves_lost", "cloves lost"), ("permamesh_relay_dropped", "cells dropped")):
            now_v = _value(families, name)
            before_v = _value(previous[1], name) if previous is not None else None
            if now_v is not None and before_v is not None and now_v > before_v:
                alerts.append(f"{what}: {now_v - before_v:.0f} since the last check")
        if record.role == "worker":
            out["containers"] = _value(families, "permamesh_container_jobs") is not None
            out["queue"] = _value(families, "permamesh_queue_length")
            out["decode_tok_s"] = _value(families, "permamesh_decode_tokens_per_second")
        excluded = [s.labels.get("node") for s in families.get("permamesh_verification_excluded", []) if s.value]
        if excluded:
            alerts.append(f"verification excluded {len(excluded)} node(s): {', '.join(sorted(excluded)[:4])}")
        out["status"] = "degraded" if alerts else "up"
        return out


def format_health(result: dict) -> str:
    lines = []
    for n in result["nodes"]:
        figures = "" if n["status"] == "down" else (
            f" latency {n['latency_ms']:.1f} ms" + (" (remote: TCP probe)" if n.get("remote") else
                                                    f", up {n['uptime_s'] or 0:.0f} s, rss {n['rss_mb'] or 0:.0f} MiB")
            + (f", cpu {n['cpu']:.0%}" if n.get("cpu") is not None else ""))
        if n.get("availability") is not None:
            figures += f", answered {n['availability']:.0%} of checks"
        lines.append(f"{n['role']:9} {n['node'][:16]:16} {n['status']:8}{figures}")
        lines += [f"    alert: {a}" for a in n["alerts"]]
    lines.append(f"{len(result['nodes'])} nodes, {result['down']} down, {result['alerts']} alerts")
    return "\n".join(lines)


def run_health(watch_s: float, as_json: bool, data_dir: Path) -> int:
    """``permamesh health``: one check (exit 1 if a node is down), or one every ``watch_s``;
    the local metrics endpoints and every node of the directory copy kept on disk."""
    monitor = HealthMonitor(data_dir)
    while True:
        result = monitor.check(cached_targets(data_dir))
        print(json.dumps(result, indent=1) if as_json else format_health(result), flush=True)
        if watch_s <= 0:
            return 1 if result["down"] else 0
        time.sleep(watch_s)
