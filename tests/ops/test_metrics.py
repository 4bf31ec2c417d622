"""Every process exposes Prometheus text metrics: worker, relay and validator processes started
for real, each found in DATA_DIR/run/metrics, fetched with curl (as an operator would) and
parsed with prometheus_client's own parser, so the text must be valid exposition format."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from permamesh.committee.devnet.cluster import Devnet, DevnetConfig
from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
from permamesh.ops.metrics import Figure, Gauges, discover_metrics, new_registry, serve
from permamesh.overlay.sender import OverlayClient, OverlayConfig


def scrape(url: str) -> dict[str, list]:
    if shutil.which("curl"):
        text = subprocess.run(["curl", "-sf", url], capture_output=True, text=True, timeout=30, check=True).stdout
    else:  # pragma: no cover - curl is in the base image
        import urllib.request

        text = urllib.request.urlopen(url, timeout=30).read().decode()
    families = {}
    for family in text_string_to_metric_families(text):  # raises on invalid exposition text
        families[family.name] = family.samples
    return families


def value(families, name: str, sample: str = "", **labels) -> float:
    """The sum of family ``name``'s samples (named ``sample`` when given) with ``labels``."""
    return sum(s.value for s in families[name] if (not sample or s.name == sample)
               and all(s.labels.get(k) == v for k, v in labels.items()))


def test_every_process_serves_valid_prometheus_text(home):
    devnet = Devnet(DevnetConfig(home / "devnet", validators=1))
    with devnet, EmbeddedMesh(MeshConfig(home, workers=1, model="tiny-random", device="cpu", relays=12,
                                         threads_per_worker=1, worker_args=("--prefix-cache-mb", "8"),
                                         committee=devnet)) as mesh:
        config = OverlayConfig(ack_timeout_s=1.0, answer_timeout_s=60.0)
        with OverlayClient(mesh.relays(), mesh.workers(), config, random.Random(1)) as client:
            for _ in range(2):
                client.generate("the same prompt, twice, for the prefix cache" * 3, max_tokens=3)
        records = {r.node_id: r for r in discover_metrics(home)}
        roles = sorted(r.role for r in records.values())
        assert roles == ["relay"] * 12 + ["validator", "worker"]
        worker = scrape(next(r.url for r in records.values() if r.role == "worker"))
        assert value(worker, "permamesh_requests", kind="generate") == 2
        assert value(worker, "permamesh_request_latency_seconds", "permamesh_request_latency_seconds_count",
                     kind="generate") == 2
        assert value(worker, "permamesh_queue_length") == 0
        assert 0 < value(worker, "permamesh_prefix_cache_hit_ratio") < 1
        assert value(worker, "permamesh_overlay_events", event="requests") == 2
        assert "permamesh_cloves_lost" in worker and "process_resident_memory_bytes" in worker
        exited = sum(value(scrape(r.url), "permamesh_relay_cells", event="exited")
                     for r in records.values() if r.role == "relay")
        assert exited >= 2 * config.k  # every request's cloves left the overlay at some exit relay
        validator = scrape(next(r.url for r in records.values() if r.role == "validator"))
        assert value(validator, "permamesh_chain_height") >= 1
        assert value(validator, "permamesh_mempool_txs") == 0 and "permamesh_misbehaviour" in validator
    assert not list((home / "run" / "metrics").glob("*.json")), "stopped processes remove their metrics records"


def test_a_failing_reader_leaves_the_scrape_valid():
    registry = new_registry()

    def broken():
        raise RuntimeError("component gone")

    Gauges(broken, registry)
    Gauges(lambda: [Figure("permamesh_ok", "fine", 1.0)], registry)
    server = serve(registry)
    try:
        families = scrape(server.url)
    finally:
        server.close()
    assert value(families, "permamesh_ok") == 1.0 and "process_cpu_seconds" in families


@pytest.mark.parametrize("bad", [["--metrics-port", "70000"]])
def test_a_bad_metrics_port_is_refused_clearly(home, bad):
    out = subprocess.run([sys.executable, "-m", "permamesh", "relay", "--data-dir", str(home), *bad], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "port" in out.stderr.lower()
