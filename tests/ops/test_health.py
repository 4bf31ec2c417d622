"""The free health checks against real HTTP metrics endpoints: a live relay process is up with
its uptime and memory; a killed one is down; a node whose endpoint turns slow, whose memory is
over the limit or whose container jobs fail raises the matching alert; `permamesh health`
prints the verdicts and exits 1 when a node is down."""

from __future__ import annotations

import subprocess
import sys
import threading

from permamesh.ops.health import HealthConfig, HealthMonitor
from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
from permamesh.ops.metrics import Figure, Gauges, MetricsRecord, new_registry, register_metrics, serve


def test_live_and_killed_processes(home):
    mesh = EmbeddedMesh(MeshConfig(home, workers=0, relays=2))
    with mesh:
        monitor = HealthMonitor(home)
        first = monitor.check()
        relays = [n for n in first["nodes"] if n["role"] == "relay"]
        assert [n["status"] for n in first["nodes"]] == ["up"] * 3 and first["down"] == 0  # 2 relays, 1 validator
        node = relays[0]
        assert node["uptime_s"] >= 0 and node["rss_mb"] > 10 and node["latency_ms"] > 0
        assert monitor.check()["nodes"][0]["cpu"] is not None  # a second check has a CPU share
        victim = mesh.relay_children[0]
        victim.kill()
        victim.proc.wait(10)
        after = {n["node"]: n for n in monitor.check()["nodes"]}
        assert after[victim.node_id]["status"] == "down" and "did not answer" in after[victim.node_id]["alerts"][0]
        cli = subprocess.run([sys.executable, "-m", "permamesh", "health", "--data-dir", str(home)],
                             capture_output=True, text=True, timeout=60)
    # a fresh `permamesh health` still reports the killed relay down (no PID decides it is gone)
    assert cli.returncode == 1 and "3 nodes, 1 down" in cli.stdout, cli.stdout


class Node:
    """A real metrics endpoint whose figures and speed the test controls."""

    def __init__(self, home, name: str):
        self.delay = threading.Event()
        self.failures = 0
        self.release = threading.Event()
        registry = new_registry()
        Gauges(self.figures, registry)
        self.server = serve(registry)
        register_metrics(home, MetricsRecord(name, "worker", self.server.url))

    def figures(self):
        if self.delay.is_set():
            self.release.wait(0.3)  # a slow node: every scrape takes 0.3 s
        return [Figure("permamesh_container_failures_total", "failed", self.failures, "counter"),
                Figure("permamesh_container_jobs", "jobs", 0)]


def test_anomalies_raise_alerts(home):
    node = Node(home, "n1")
    dead = MetricsRecord("n2", "relay", "http://127.0.0.1:9/metrics")  # nothing listening
    register_metrics(home, dead)
    try:
        monitor = HealthMonitor(home, HealthConfig(min_history=3, latency_factor=5.0, memory_limit_mb=1e9, cpu_limit=1e9))
        for _ in range(3):
            result = monitor.check()
        by = {n["node"]: n for n in result["nodes"]}
        assert by["n1"]["status"] == "up" and by["n1"]["containers"] is True
        assert by["n2"]["status"] == "down" and result["down"] == 1
        node.delay.set()
        node.failures = 2
        slow = {n["node"]: n for n in monitor.check()["nodes"]}["n1"]
        assert slow["status"] == "degraded"
        assert any(a.startswith("latency:") for a in slow["alerts"])
        assert "container jobs could not run: 2 since the last check" in slow["alerts"]
        tight = HealthMonitor(home, HealthConfig(memory_limit_mb=1.0, cpu_limit=1e9)).check()
        assert any(a.startswith("memory:") for a in {n["node"]: n for n in tight["nodes"]}["n1"]["alerts"])
    finally:
        node.release.set()
        node.server.close()


def test_nodes_of_the_directory_are_probed_and_their_uptime_measured(home):
    """A node with no metrics record here (another machine, another namespace) is checked by
    connecting to its advertised endpoint: listening, it is up; not, it is down; each node's
    answered share of the checks is its measured uptime."""
    import socket

    from permamesh.ops.health import Target

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    targets = [Target("far-relay", "relay", f"tcp://127.0.0.1:{port}"),
               Target("dead-relay", "relay", f"tcp://127.0.0.1:{dead.getsockname()[1]}"),
               Target("never-announced", "worker", "")]
    monitor = HealthMonitor(home, HealthConfig(timeout_s=1.0))
    try:
        first = {n["node"]: n for n in monitor.check(targets)["nodes"]}
        assert first["far-relay"]["status"] == "up" and first["far-relay"]["latency_ms"] > 0
        assert first["dead-relay"]["status"] == "down" and "did not accept" in first["dead-relay"]["alerts"][0]
        assert first["never-announced"]["status"] == "down"
        server.close()
        second = monitor.check(targets)
        assert second["down"] == 3
        assert monitor.availability() == {"far-relay": 0.5, "dead-relay": 0.0, "never-announced": 0.0}
    finally:
        server.close()
        dead.close()
