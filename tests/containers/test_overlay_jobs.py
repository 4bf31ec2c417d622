"""Container jobs through the anonymous overlay on real processes: relay processes, worker
processes with ``--containers`` (tiny-random model; the container side is what is tested),
a busybox image seeded from the client, the job routed among the workers by the layers they
hold, run by runc or bubblewrap, its output streamed back as chunks (a forwarded job's through
its entry worker), its exit code and output as cloves."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from permamesh.containers.build import build_image
from permamesh.containers.errors import ContainerError
from permamesh.containers.images import load_layout
from permamesh.containers.jobs import ImageSeed, run_over_overlay, run_request
from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
from permamesh.overlay.sender import OverlayClient, OverlayConfig

from .conftest import installed_runtimes
from .test_mesh import busybox_layers


@pytest.fixture
def mesh_home(home, tmp_path):
    if not installed_runtimes():
        pytest.skip("neither runc nor bwrap installed (apt-get install -y runc bubblewrap)")
    build_image(None, home / "images", "hello", ["/bin/sh", "/app/hello.sh"], layers=busybox_layers(tmp_path))
    args = ("--containers", "--prefix-cache-mb", "0", "--group", "", "--container-jobs", "2")
    with EmbeddedMesh(MeshConfig(home, workers=3, model="tiny-random", device="cpu", relays=12,
                                 worker_args=args, threads_per_worker=1)) as mesh:
        yield home, mesh


def test_jobs_cross_the_overlay_to_the_worker_holding_the_layers(mesh_home):
    home, mesh = mesh_home
    image, blobs = load_layout(home / "images", "hello")
    workers = mesh.workers()
    assert len(workers) == 3 and all(w.layers for w in workers)
    config = OverlayConfig(ack_timeout_s=1.0, answer_grace_s=2.0, answer_timeout_s=120.0)
    with OverlayClient(mesh.relays(), workers, config, random.Random(3)) as client, \
            ImageSeed(blobs, image) as seed:
        first = run_over_overlay(client, run_request(blobs, image, sources=[seed.endpoint]), workers[0].node_id)
        assert first.exit_code == 0 and first.stdout == b"hello from permamesh\n"
        assert not first.warm and first.from_source == 2 and first.from_peers == 0
        assert first.worker_id in {w.node_id for w in workers}
        # enter at another worker: its router sends the job to the one holding both layers
        other = next(w.node_id for w in workers if w.node_id != first.worker_id)
        pieces: list[tuple[bytes, bytes]] = []  # its output, passed on by the entry worker as it came
        second = run_over_overlay(client, run_request(blobs, image, ["/bin/sh", "-c", "echo again; exit 3"]), other,
                                  on_output=lambda out, err: pieces.append((out, err)))
        assert second.worker_id == first.worker_id and second.warm and second.exit_code == 3
        assert second.stdout == b"again\n" and "holds 2 of 2 layers" in second.why
        assert b"".join(out for out, _ in pieces) == second.stdout and client.last.chunks >= 1
        late = run_over_overlay(client, run_request(blobs, image, ["/bin/sleep", "30"], timeout_s=1.0))
        assert late.timed_out and late.exit_code != 0
    blobs.close()


def test_bad_jobs_are_refused_with_the_reason(mesh_home):
    home, mesh = mesh_home
    image, blobs = load_layout(home / "images", "hello")
    config = OverlayConfig(ack_timeout_s=1.0, answer_timeout_s=60.0)
    with OverlayClient(mesh.relays(), mesh.workers(), config, random.Random(4)) as client:
        req = run_request(blobs, image)
        forged = type(req)(req.request_id, req.manifest, req.config.replace(b"hello", b"jello"))
        with pytest.raises(ContainerError, match="bad_request: bad image: config does not match"):
            run_over_overlay(client, forged)
        with pytest.raises(ContainerError, match="run_failed: layer .* is on no peer and the job gave no source"):
            run_over_overlay(client, run_request(blobs, image))  # nobody holds it, no source
    blobs.close()
    cli = subprocess.run([sys.executable, "-m", "permamesh", "run", "--data-dir", str(home), "--join",
                          ",".join(mesh.join), "hello", "--",
                          "/bin/sh", "-c", "echo from the cli; exit 7"], capture_output=True, text=True, timeout=180)
    assert cli.returncode == 7, cli.stderr
    assert cli.stdout == "from the cli\n" and "via the overlay" in cli.stderr
