"""A container job's output streamed as it is written, in one process: real relays on loopback
and an entry worker (tiny-random model; the container side is what is tested) running busybox
jobs under runc or bubblewrap. Through the overlay, stdout and stderr come back as chunks over
the request's chunk blocks while the job runs, in order, and join to the signed RunResult;
straight to the worker, as RunOutput messages before the result. Skipped, saying why, without
runc or bubblewrap and busybox."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from permamesh.containers.images import load_layout
from permamesh.containers.jobs import ImageSeed, run_over_overlay, run_request
from permamesh.containers.build import build_image
from permamesh.containers.messages import RunOutput, RunResult
from permamesh.containers.service import ContainerService, ServiceConfig
from permamesh.identity import NodeIdentity
from permamesh.overlay.sender import OverlayClient
from permamesh.transport import DealerClient
from permamesh.wire import Accepted, decode, encode
from tests.overlay.test_overlay_e2e import FAST, overlay_mesh

from .conftest import installed_runtimes
from .test_mesh import busybox_layers

JOB = ["/bin/sh", "-c", "echo first; echo careful >&2; sleep 1.5; echo second; exit 4"]


@pytest.fixture
def entry(home, tiny_loaded, tmp_path):
    """(relay records, worker record, worker server, image, blobs, seed endpoint)."""
    if not installed_runtimes():
        pytest.skip("neither runc nor bwrap installed (apt-get install -y runc bubblewrap)")
    build_image(None, home / "images", "hello", ["/bin/sh", "/app/hello.sh"], layers=busybox_layers(tmp_path))
    image, blobs = load_layout(home / "images", "hello")
    with overlay_mesh(tiny_loaded, set()) as (records, worker, server, _, _):
        server.containers = ContainerService(server, ServiceConfig(root=tmp_path / "containers"))
        with ImageSeed(blobs, image) as seed:
            yield records, worker, server, image, blobs, seed.endpoint
    blobs.close()


def test_a_jobs_output_streams_through_the_overlay_while_it_runs(entry):
    records, worker, server, image, blobs, source = entry
    pieces: list[tuple[float, bytes, bytes, int]] = []  # (when, stdout, stderr, answers the entry had made)
    t0 = time.monotonic()

    def on_output(out: bytes, err: bytes) -> None:
        pieces.append((time.monotonic() - t0, out, err, server.inbox.counts["answers"]))

    with OverlayClient(records, [worker], FAST, random.Random(5)) as client:
        result = run_over_overlay(client, run_request(blobs, image, JOB, [source], timeout_s=20.0),
                                  worker.node_id, on_output=on_output)
        delivery = client.last
    assert result.exit_code == 4 and result.stdout == b"first\nsecond\n" and result.stderr == b"careful\n"
    assert b"".join(p[1] for p in pieces) == result.stdout and b"".join(p[2] for p in pieces) == result.stderr
    first = next(p for p in pieces if p[1])
    assert first[1] == b"first\n" and first[3] == 0  # before the job ended, let alone answered
    assert server.inbox.counts["chunks"] >= 2 and delivery.chunks >= 2


def test_a_direct_job_sends_its_output_before_its_result(entry):
    _, worker, server, image, blobs, source = entry
    req = run_request(blobs, image, JOB, [source], timeout_s=20.0)
    messages = []
    with DealerClient(worker.endpoint) as sock:
        sock.send(encode(dataclasses.replace(req, stream=True), NodeIdentity.generate()))
        while not messages or not isinstance(messages[-1], RunResult):
            frame = sock.recv(60.0)
            assert frame is not None, messages
            messages.append(decode(frame).msg)
    assert isinstance(messages[0], Accepted)
    outputs, result = [m for m in messages if isinstance(m, RunOutput)], messages[-1]
    assert next(m for m in outputs if m.stdout).stdout == b"first\n"  # stderr's piece may come first
    assert b"".join(m.stdout for m in outputs) == result.stdout == b"first\nsecond\n"
    assert b"".join(m.stderr for m in outputs) == result.stderr == b"careful\n"
