"""Container jobs end to end on real runtimes: a busybox image built from directories, routed by
the layers each worker holds (the hash-radix tree), layers fetched from a peer or the source and
verified, the rootfs cached, the command run isolated."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from permamesh.containers.errors import ContainerError
from permamesh.containers.host import ContainerMesh
from permamesh.containers.build import build_image
from permamesh.containers.images import load_layout
from permamesh.containers.limits import Limits

from .conftest import APPLETS, BUSYBOX


def busybox_layers(tmp: Path) -> list[Path]:
    if not BUSYBOX.exists():
        pytest.skip(f"{BUSYBOX} missing (apt-get install -y busybox-static)")
    base, app = tmp / "base", tmp / "app"
    (base / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, base / "bin" / "busybox")
    for applet in APPLETS:
        (base / "bin" / applet).symlink_to("busybox")
    (app / "app").mkdir(parents=True)
    (app / "app" / "hello.sh").write_text("echo hello from $(cat /app/name)\n")
    (app / "app" / "name").write_text("permamesh\n")
    return [base, app]


@pytest.fixture
def image(tmp_path):
    layout = tmp_path / "layout"
    build_image(None, layout, "hello", ["/bin/sh", "/app/hello.sh"], layers=busybox_layers(tmp_path))
    return load_layout(layout, "hello")


def test_routed_job_runs_and_the_warm_worker_is_picked_again(tmp_path, image, runtime):
    img, blobs = image
    mesh = ContainerMesh(tmp_path / "mesh", workers=3)
    first = mesh.run(img, source=blobs, runtime=runtime)
    assert first.result.exit_code == 0 and first.result.stdout == b"hello from permamesh\n"
    assert first.from_source == 2 and not first.warm
    second = mesh.run(img, source=blobs, runtime=runtime)
    assert second.worker == first.worker and second.warm and second.choice.matched_layers == 2
    assert "holds 2 of 2 layers" in second.choice.why
    # a job on another worker fetches the layers from the peer that holds them, not the source
    other = next(w.name for w in mesh.workers if w.name != first.worker)
    third = mesh.run(img, source=None, runtime=runtime, worker=other)
    assert third.from_peers == 2 and third.from_source == 0 and third.result.exit_code == 0


def test_busy_warm_worker_loses_to_an_idle_one_when_fetching_is_cheap(tmp_path, image, runtime):
    img, blobs = image
    mesh = ContainerMesh(tmp_path / "mesh", workers=2, job_s=60.0)
    warm = mesh.run(img, source=blobs, runtime=runtime).worker
    assert mesh.choose(img).worker == warm
    assert mesh.choose(img, busy={warm: 3}).worker != warm


def test_a_layer_with_a_wrong_digest_is_refused(tmp_path, image, runtime):
    img, blobs = image
    blob = Path(blobs.root) / "blobs" / "sha256" / img.layers[1].digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    mesh = ContainerMesh(tmp_path / "mesh", workers=1)
    with pytest.raises(ContainerError, match="refusing|digest"):
        mesh.run(img, source=blobs, runtime=runtime)
    assert not mesh.workers[0].store.has(img.layers[1].digest)


def test_a_job_that_runs_too_long_is_killed_and_reported(tmp_path, image, runtime):
    img, blobs = image
    mesh = ContainerMesh(tmp_path / "mesh", workers=1)
    out = mesh.run(img, ["/bin/sleep", "30"], source=blobs, limits=Limits(timeout_s=1.0), runtime=runtime)
    assert out.result.timed_out and out.result.exit_code != 0


def test_peers_serve_layers_over_the_network(tmp_path, image, runtime):
    """With serving workers, a job on a cold worker fetches both layers from the warm one over
    zmq (the router's tree names it), verified as written; nothing comes from the source."""
    img, blobs = image
    with ContainerMesh(tmp_path / "mesh", workers=2, serve=True) as mesh:
        assert all(w.endpoint and w.endpoint.startswith("tcp://127.0.0.1:") for w in mesh.workers)
        first = mesh.run(img, source=blobs, runtime=runtime)
        other = next(w for w in mesh.workers if w.name != first.worker)
        out = mesh.run(img, source=None, runtime=runtime, worker=other.name)
        assert out.from_peers == 2 and out.from_source == 0 and out.result.exit_code == 0
        server = next(w for w in mesh.workers if w.name == first.worker)._server.server
        assert server.served >= 2
