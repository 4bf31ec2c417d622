"""Joining through the committee's directory: no shared registry files, no PIDs.

Real processes on loopback: a 4-validator committee (the embedded devnet engine here: the
directory logic is the same under CometBFT, whose network tests live in
tests/committee/test_cometbft_net.py), 2 tiny-random workers and 12 relays started with
``--join`` and nothing else in common with the client (their data directories differ from
the client's), and the 4 members probing every announced node. The client knows one
validator's address and nothing else.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from permamesh.client import Client
from permamesh.committee.client import CommitteeClient
from permamesh.committee.errors import CommitteeError
from permamesh.committee.devnet.cluster import Devnet, DevnetConfig
from permamesh.committee.genesis import LedgerRules
from permamesh.demo.committee import register_nodes
from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
from permamesh.directory.announce import publish_validators
from permamesh.directory.committee import CommitteeDirectory
from permamesh.directory.errors import DirectoryError
from permamesh.ops.procs import spawn, stop_all, wait_ready

from tests.conftest import wait_for

WORKERS, RELAYS = 2, 12


@pytest.fixture(scope="module")
def joined(tmp_path_factory):
    base = tmp_path_factory.mktemp("join")
    devnet = Devnet(DevnetConfig(base / "committee", rules=LedgerRules(blocks_per_epoch=50, probe_blocks=8)))
    devnet.start()
    mesh = probers = committee = None
    try:
        committee = CommitteeClient(devnet.endpoints)
        probers = None
        nodes_dir = base / "nodes"  # the nodes' keys and state: never read by the client
        register_nodes(devnet, committee, nodes_dir, [f"mesh-worker-{i}" for i in range(WORKERS)],
                       [f"mesh-relay-{i}" for i in range(RELAYS)], "tiny-random", lambda *_: None)
        chain_id = committee.query("/status")["chain_id"]
        publish_validators(committee, chain_id, devnet.partner, [devnet.identity(i) for i in range(4)],
                           devnet.endpoints)
        join = ("--join", devnet.endpoints[0])
        mesh = EmbeddedMesh(MeshConfig(nodes_dir, workers=WORKERS, model="tiny-random", device="cpu",
                                       relays=RELAYS, worker_args=join + ("--prefix-cache-mb", "64"),
                                       relay_args=join))
        mesh.start()
        probers = [spawn(f"prober-{i}", [sys.executable, "-m", "permamesh.committee.liveness",
                                         "--keys", str(devnet.vdir(i) / "keys"), "--endpoint", ep,
                                         "--timeout", "0.5"], base / "logs")
                   for i, ep in enumerate(devnet.endpoints)]
        wait_ready(probers, 60)
        running = lambda: sum(n["running"] for n in committee.query("/directory")["nodes"])  # noqa: E731
        wait_for(lambda: running() == WORKERS + RELAYS, 60, "every joined node in the running set")
        yield devnet, mesh, committee, base / "client"
    finally:
        stop_all(probers or [])
        if mesh is not None:
            mesh.stop()
        if committee is not None:
            committee.close()
        devnet.stop()


def test_every_node_published_a_descriptor_with_its_transport_key(joined):
    devnet, mesh, committee, client_dir = joined
    directory = CommitteeDirectory([devnet.endpoints[0]], client_dir / "dir.json")
    snap = directory.snapshot()
    assert snap.confirmed_by and snap.confirmed_by[0] != devnet.endpoints[0]
    workers = snap.running("worker")
    assert len(workers) == WORKERS and len(snap.running("relay")) == RELAYS
    assert {w.link for w in workers} == set(mesh.endpoints)  # READY lines name the same key-bearing endpoints
    assert all(w.rtt_us and w.rtt_us > 0 for w in workers)


def test_a_client_that_knows_one_validator_gets_answers_direct_and_anonymous(joined):
    devnet, _, _, client_dir = joined
    with Client(data_dir=client_dir, join=devnet.endpoints[1]) as client:
        direct = client.generate("hello there", max_tokens=4, temperature=0.0)
    with Client(data_dir=client_dir, join=[devnet.endpoints[2]], anonymous=True) as client:
        anonymous = client.generate("hello there", max_tokens=4, temperature=0.0)
    assert direct.completion_tokens == anonymous.completion_tokens == 4
    assert direct.text == anonymous.text


def test_the_directory_copy_on_disk_serves_while_the_committee_is_unreachable(joined, tmp_path):
    """The committee going dark is played by a client factory that always fails (stopping the
    module's committee would end the other tests); everything else is real."""
    devnet, _, _, _ = joined
    path = tmp_path / "dir.json"
    first = CommitteeDirectory([devnet.endpoints[0]], path).snapshot()

    # a stale address, but the copy on disk names the committee's validators: they answer
    moved = CommitteeDirectory(["tcp://127.0.0.1:9"], path, timeout_s=0.5)
    assert moved.snapshot(0.0).height >= first.height and moved.snapshot().confirmed_by

    def dark(endpoints, timeout_s):
        raise CommitteeError("unreachable")

    offline = CommitteeDirectory([devnet.endpoints[0]], path, client=dark)
    assert offline.snapshot(0.0).height >= first.height
    assert len(offline.workers()) == WORKERS


def test_a_killed_worker_leaves_the_running_set(joined):
    devnet, mesh, committee, _ = joined
    victim = mesh.children[-1]
    node_id = victim.node_id
    victim.kill()
    started = time.monotonic()

    def gone() -> bool:
        return not any(n["node_id"] == node_id and n["running"] for n in committee.query("/directory")["nodes"])

    wait_for(gone, 30, "the killed worker to leave the running set")
    assert time.monotonic() - started < 15.0


def test_a_wrong_committee_address_fails_with_a_clear_error(tmp_path):
    with pytest.raises(DirectoryError, match="cannot read the directory"):
        CommitteeDirectory(["tcp://127.0.0.1:9"], timeout_s=0.5).snapshot()
    done = subprocess.run([sys.executable, "-m", "permamesh", "worker", "--data-dir", str(tmp_path),
                           "--model", "tiny-random", "--join", "tcp://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "cannot read the directory" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "permamesh", "relay", "--data-dir", str(tmp_path),
                          "--join", "ftp://x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "a validator address is" in bad.stderr


def test_a_gateway_that_knows_one_validator_serves_the_mesh(joined, tmp_path):
    import json

    from permamesh.gateway.openai_api import post_chat
    from permamesh.gateway.process import build_gateway
    from permamesh.gateway.server import GatewayThread

    devnet, _, _, _ = joined
    gateway = build_gateway(tmp_path, open_access=True, join=(devnet.endpoints[3],), timeout_s=60.0)
    thread = GatewayThread(gateway)
    url = thread.start()
    try:
        body = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                "temperature": 0}
        with post_chat(url, "anything", body, timeout_s=60.0) as response:
            answer = json.loads(response.read())
    finally:
        thread.stop()  # closes the backend and its directory thread
    assert answer["usage"]["completion_tokens"] == 3


def test_a_loopback_address_is_never_published_to_a_remote_committee():
    from permamesh.directory.announce import advertised, check_reachable

    check_reachable("tcp://127.0.0.1:5600", ["http://127.0.0.1:26657"])  # one machine: fine
    check_reachable("tcp://10.1.2.3:5600", ["http://10.1.2.9:26657"])
    with pytest.raises(DirectoryError, match="cannot reach"):
        check_reachable("tcp://127.0.0.1:5600", ["http://10.1.2.9:26657"])
    with pytest.raises(DirectoryError, match="--advertise"):
        advertised("tcp://0.0.0.0:5600", None)
    assert advertised("tcp://0.0.0.0:5600?key=" + "ab" * 32, "node.example.org:7000") == "tcp://node.example.org:7000"
