"""Metrics never take down what they observe.

A devnet validator serves /metrics on the metrics server's threads. The story: sixteen scrapers
arrive at once, then a hundred connections that sent half a request hang up together; the
validator is still running afterwards, still serves its metrics, and still commits blocks.
Below it, the two pieces that make this so: the validator's figures are read by one owner
thread (a zmq socket is never shared across threads), and the server answers a bounded number
of scrapes at once.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from permamesh.committee.client import CommitteeClient
from permamesh.committee.devnet.cluster import Devnet, DevnetConfig
from permamesh.ops import metrics
from permamesh.ops.metrics import Figure, Gauges, discover_metrics, new_registry, serve


def get(url: str, timeout_s: float = 30.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as answer:
        return answer.read().decode()


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_crowd_of_scrapes_and_half_open_connections_leave_the_validator_committing(home):
    with Devnet(DevnetConfig(home / "devnet", validators=1)) as devnet, \
            CommitteeClient(devnet.endpoints, timeout_s=5.0) as client:
        url = wait_for(lambda: [r.url for r in discover_metrics(home) if r.role == "validator"],
                       what="the validator's metrics record")[0]
        with ThreadPoolExecutor(16) as pool:  # sixteen at once, three times over
            for _ in range(3):
                texts = list(pool.map(lambda _: get(url), range(16)))
        assert all("permamesh_metrics_age_seconds" in t for t in texts)

        half_open = []
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", int(url.split(":")[2].split("/")[0])), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            half_open.append(sock)
        for sock in half_open:  # all hang up together
            sock.close()

        time.sleep(1.0)
        child = devnet.children[0]
        assert child.alive(), f"the validator died: {child.log_tail()}"
        before = client.status().height
        wait_for(lambda: client.status().height >= before + 3, what="commits after the scrapes")
        text = wait_for(lambda: get(url), what="metrics still served")
        assert "permamesh_chain_height" in text
        assert "Assertion failed" not in child.log_path.read_text()


class RecordingClient:
    """Stands in for a CommitteeClient; records which threads used it."""

    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.closed = False

    def status(self):
        self.threads.add(threading.get_ident())
        from permamesh.committee.client import CommitteeStatus

        return CommitteeStatus(7, b"", (), (), 0, 0)

    def query(self, path):
        self.threads.add(threading.get_ident())
        return {}

    def close(self):
        self.closed = True


def test_scrapes_read_a_snapshot_and_never_touch_the_client():
    from permamesh.committee.telemetry import FigureCache

    made: list[RecordingClient] = []
    cache = FigureCache(lambda: made.append(RecordingClient()) or made[-1], interval_s=0.05).start()
    try:
        wait_for(lambda: any(f.name == "permamesh_chain_height" for f in cache.figures()), what="a snapshot")
        with ThreadPoolExecutor(16) as pool:
            snapshots = list(pool.map(lambda _: cache.figures(), range(64)))
    finally:
        cache.close()
    assert len(made) == 1 and made[0].closed
    assert len(made[0].threads) == 1 and threading.get_ident() not in made[0].threads
    assert all(any(f.name == "permamesh_chain_height" and f.value == 7 for f in s) for s in snapshots)


def test_the_metrics_server_answers_a_bounded_number_of_scrapes_at_once():
    registry, lock = new_registry(), threading.Lock()
    running = {"now": 0, "most": 0}

    def slow():
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        time.sleep(0.2)
        with lock:
            running["now"] -= 1
        return [Figure("permamesh_ok", "fine", 1.0)]

    Gauges(slow, registry)
    server = serve(registry)
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: _try_get(server.url), range(16)))
    finally:
        server.close()
    assert running["most"] <= metrics.MAX_SCRAPES
    assert sum(1 for a in answers if a and "permamesh_ok" in a) >= metrics.MAX_SCRAPES


def _try_get(url: str) -> str | None:
    try:
        return get(url, timeout_s=10)
    except OSError:  # refused while busy: allowed, the process stays up
        return None
