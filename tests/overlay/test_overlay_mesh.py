"""The overlay on real processes: relay processes (`permamesh relay`) and a worker process
(`permamesh worker`, tiny-random) started by the embedded mesh, joined through its own
one-validator devnet committee; relays SIGKILLed mid-run leave the running set."""

from __future__ import annotations

import random
import subprocess
import sys

from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
from permamesh.overlay.sender import OverlayClient, OverlayConfig


def test_requests_cross_relay_processes_and_survive_killed_relays(home):
    mesh = EmbeddedMesh(MeshConfig(home, workers=1, model="tiny-random", device="cpu", relays=16))
    with mesh:
        relays, workers = mesh.relays(), mesh.workers()
        assert len(relays) == 16 and len(workers) == 1
        config = OverlayConfig(ack_timeout_s=0.5, answer_grace_s=1.0, answer_timeout_s=60.0)
        with OverlayClient(relays, workers, config, random.Random(5)) as client:
            first = client.generate("hello relays", max_tokens=4)
            assert first.completion_tokens >= 1 and client.last.paths_failed == 0
            index = {child.node_id: i for i, child in enumerate(mesh.relay_children)}
            killed = tuple(path[1] for path in client.last.paths[:2])
            for node_id in killed:  # on the session's kept paths; its relay list still holds them
                mesh.kill_relay(index[node_id])
            failed = 0
            for i in range(5):
                assert client.generate(f"after the kill {i}", max_tokens=2).completion_tokens >= 1
                failed += client.last.paths_failed
        mesh.wait_running(30.0, gone=killed)  # the members' probes drop them: no PID is read
        assert {r.node_id for r in mesh.relays()} == {r.node_id for r in relays} - set(killed)
        cli = subprocess.run([sys.executable, "-m", "permamesh", "submit", "--data-dir", str(home / "cli"), "--prompt", "hi",
                              "--max-tokens", "3", "--join", ",".join(mesh.join)], capture_output=True, text=True,
                             timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "via the overlay" in cli.stderr
    assert failed >= 1  # the kept paths crossed killed relays, and every request arrived
