"""Failure drill on real processes: a worker group on loopback loses a member to SIGKILL
while it holds queued jobs; every submitted job still completes (re-routed by entry workers
or resubmitted by clients)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from permamesh.client.blocking import Client
from permamesh.demo.mesh import EmbeddedMesh, MeshConfig


def test_killing_a_worker_mid_load_loses_no_job(home, caplog):
    caplog.set_level("WARNING", logger="permamesh.client.blocking")
    mesh = EmbeddedMesh(MeshConfig(home, workers=3, model="tiny-random", device="cpu", threads_per_worker=1,
                                   worker_args=("--group", "drill")))
    with mesh:
        endpoints = mesh.endpoints
        with Client(endpoints) as c:  # wait until the group has formed (state read over zmq)
            deadline = time.monotonic() + 30
            while not all(s.members == 2 for s in c.status()):
                assert time.monotonic() < deadline, "group did not form"
                time.sleep(0.1)
        victim = endpoints[0]
        killed = threading.Event()

        def job(i: int):
            ring = endpoints[i % 3:] + endpoints[: i % 3]
            with Client(ring, timeout_s=3.0, accept_timeout_s=2.0) as client:
                return client.generate(f"job {i} " * 40, max_tokens=300, temperature=1.0, seed=i)

        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(job, i) for i in range(24)]
            with Client([victim], accept_timeout_s=5.0) as probe:
                deadline = time.monotonic() + 60
                while not killed.is_set():
                    (st,) = probe.status()
                    if st.busy:  # it holds work (decoding, perhaps more queued): now it dies
                        mesh.kill(0)
                        killed.set()
                    assert time.monotonic() < deadline, "the victim never held queued work"
            results = [f.result(timeout=120) for f in futures]
        assert killed.is_set()
        assert len(results) == 24 and all(r.completion_tokens >= 1 for r in results)
        dead_id = mesh.children[0].node_id
        assert any(r.worker_id != dead_id for r in results)
        logs = "".join(p.read_text() for p in (home / "run" / "logs").glob("*.log"))
    # The victim held work when it died; each held job came back by one of the two paths.
    resubmitted = sum("resubmitting elsewhere" in r.getMessage() for r in caplog.records)
    rerouted = logs.count("re-routing")
    assert resubmitted + rerouted >= 1
