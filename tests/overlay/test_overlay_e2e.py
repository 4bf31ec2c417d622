"""End to end through the overlay in one process: real relays (RelayThread) on loopback zmq
sockets, a real tiny-random worker with its inbox, and the OverlayClient. Relay processes
and SIGKILL drills are covered by tests/overlay/test_overlay_mesh.py and the overlay benchmark; here
"dead" relays are RelayConfig(drop_all=True): they read every frame and forward nothing. The
in-process nodes find each other in an in-memory table standing in for the committee's
directory (joining through a committee is tested in tests/directory/test_join.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time

import pytest

from permamesh.client.blocking import Client
from permamesh.identity import NodeIdentity
from permamesh.directory.workers import WorkerRecord
from permamesh.demo.enroll import relay_placement
from permamesh.directory.relays import CachedLookup, RelayRecord
from permamesh.overlay.envelope import encode_envelope
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.messages import CloveDrop
from permamesh.overlay.relay import RelayConfig, RelayServer, RelayThread
from permamesh.overlay.sender import OverlayClient, OverlayConfig
from permamesh.overlay.sida import split
from permamesh.transport import DealerClient
from permamesh.wire import StatusRequest, StatusReply, decode, encode
from permamesh.workers.engine import Engine
from permamesh.workers.inbox import Inbox
from permamesh.workers.server import ServerThread, WorkerServer
from tests.conftest import wait_for

FAST = OverlayConfig(ack_timeout_s=0.5, answer_grace_s=1.0, answer_timeout_s=30.0)


def _start_relays(links: dict, count: int, dead: set[int]) -> tuple[list[RelayThread], list[RelayRecord]]:
    """``links``: the directory stand-in, node id bytes -> endpoint (relays and workers)."""
    threads, records = [], []
    for i in range(count):
        identity = NodeIdentity.generate()
        server = RelayServer(identity, RelayConfig(drop_all=i in dead),
                             CachedLookup(lambda: links, 0.0), CachedLookup(lambda: links, 0.0))
        thread = RelayThread(server)
        endpoint = thread.start()
        isp, grid, location = relay_placement(i)
        record = RelayRecord(identity.node_id, endpoint, identity.public.sign_key.hex(), identity.public.kex_key.hex(),
                             isp, grid, location)
        links[record.node_id_bytes] = endpoint
        threads.append(thread)
        records.append(record)
    return threads, records


@contextlib.contextmanager
def overlay_mesh(loaded, dead: set[int]):
    """16 in-process relays (``dead`` drop everything) and an entry worker serving ``loaded``:
    (relay records, worker record, worker server, worker thread, relay threads)."""
    links: dict[bytes, str] = {}
    relay_threads, records = _start_relays(links, 16, dead)
    server = WorkerServer(Engine(loaded), NodeIdentity.generate())
    server.inbox = Inbox(server, CachedLookup(lambda: links, 0.0))
    worker_thread = ServerThread(server)
    endpoint = worker_thread.start()
    record = WorkerRecord(server.worker_id, endpoint, server.identity.public.sign_key.hex(), server.engine.loaded.name)
    links[server.worker_id.encode("ascii")] = endpoint
    try:
        yield records, record, server, worker_thread, relay_threads
    finally:
        worker_thread.stop()
        for thread in relay_threads:
            thread.stop()


def hold_after_second_step(server: WorkerServer, first, timeout_s: float = 30.0):
    """The worker's decoding waits after its second step until ``first`` (a threading.Event) is
    set, at most ``timeout_s``: "the client had a piece before the answer existed" then does not
    depend on how busy the machine is. Returns a function that undoes it."""
    step, steps = server.engine.step, [0]

    def held(runs):
        steps[0] += 1
        if steps[0] > 2:
            first.wait(timeout_s)
        return step(runs)

    server.engine.step = held
    return lambda: setattr(server.engine, "step", step)


@pytest.fixture
def overlay(home, tiny_loaded, request):
    """(relay records, worker record, worker server); ``request.param`` = indices of dead relays."""
    with overlay_mesh(tiny_loaded, getattr(request, "param", set())) as (records, record, server, _, _):
        yield records, record, server


def test_an_answer_through_the_overlay_equals_the_direct_one(overlay):
    records, worker, server = overlay
    with OverlayClient(records, [worker], FAST, random.Random(1)) as client:
        via = client.generate("hello overlay", max_tokens=12)
        delivery = client.last
    with Client([worker.endpoint]) as direct:
        straight = direct.generate("hello overlay", max_tokens=12)
    assert via.token_ids == straight.token_ids and via.text == straight.text
    assert delivery.cloves_sent == 4 and delivery.paths_failed == 0
    assert all(len(path) == 3 for path in delivery.paths)
    flat = [relay for path in delivery.paths for relay in path]
    assert len(set(flat)) == len(flat)  # disjoint paths
    assert server.inbox.counts["requests"] == 1 and server.inbox.counts["answers"] == 1


@pytest.mark.parametrize("overlay", [{0, 5, 10}], indirect=True)
def test_requests_arrive_despite_dead_relays_by_resending_over_fresh_paths(overlay):
    records, worker, _ = overlay
    failed = 0
    with OverlayClient(records, [worker], FAST, random.Random(7)) as client:
        for i in range(6):
            result = client.generate(f"question {i}", max_tokens=3)
            assert result.completion_tokens >= 1
            failed += client.last.paths_failed
            for path, acked in zip(client.last.paths, client.last.acked):
                if acked:  # a path that worked holds no dead relay
                    assert not {records[d].node_id for d in (0, 5, 10)} & set(path)
        time.sleep(FAST.ack_timeout_s)  # the rule's own timeout: silent paths are judged after it
        client.settle_paths()
        failed += client.late.failed  # paths judged after their request had already returned
    assert failed >= 1  # some paths did cross a dead relay, and the requests still arrived


@pytest.mark.parametrize("overlay", [set(range(0, 16, 2))], indirect=True)
def test_when_too_few_paths_survive_the_client_gets_a_clear_error(overlay):
    records, worker, _ = overlay
    config = OverlayConfig(ack_timeout_s=0.3, resends=1, answer_timeout_s=20.0)
    with OverlayClient(records, [worker], config, random.Random(3)) as client:
        outcomes = []
        for i in range(4):
            try:
                client.generate(f"q{i}", max_tokens=2)
                outcomes.append("ok")
            except OverlayError as exc:
                assert "not delivered" in str(exc) or "no fresh path" in str(exc)
                outcomes.append("error")
    assert "error" in outcomes


def test_the_worker_drops_bad_cloves_and_keeps_serving(overlay):
    records, worker, server = overlay
    me = NodeIdentity.generate()
    cloves = split(b"not a request frame", n=4, k=3)
    forged = dataclasses.replace(cloves[0], data_share=b"x" * len(cloves[0].data_share))
    with DealerClient(worker.endpoint) as sock:
        sock.send(encode(CloveDrop(b"\x01garbage"), me))
        sock.send(encode(CloveDrop(encode_envelope(forged, None, None)), me))
        for clove in cloves[1:]:  # three valid cloves of something that is not a request
            sock.send(encode(CloveDrop(encode_envelope(clove, None, None)), me))
        wait_for(lambda: server.inbox.counts["bad_request"] == 1, what="the rebuilt non-request to be refused")
        sock.send(encode(StatusRequest("s"), me))
        status = decode(sock.recv(5.0)).msg
    assert isinstance(status, StatusReply)
    assert server.inbox.counts["bad_envelope"] == 1 and server.inbox.counts["bad_clove"] == 1
    with OverlayClient(records, [worker], FAST) as client:
        assert client.generate("still there?", max_tokens=2).completion_tokens >= 1
