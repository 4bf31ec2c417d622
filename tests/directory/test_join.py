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
from permamesh.committee.endpoints import parse_endpoint
from permamesh.committee.genesis import LedgerRules
from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
from permamesh.directory.committee import CommitteeDirectory, parse_join
from permamesh.directory.errors import DirectoryError
from permamesh.directory.snapshot import parse_directory
from permamesh.identity import NodeIdentity

from tests.conftest import wait_for

WORKERS, RELAYS = 2, 12


@pytest.fixture(scope="module")
def joined(tmp_path_factory):
    base = tmp_path_factory.mktemp("join")
    devnet = Devnet(DevnetConfig(base / "committee", rules=LedgerRules(blocks_per_epoch=50, probe_blocks=8)))
    devnet.start()
    mesh = committee = None
    try:
        # the nodes' keys and state live under nodes/, never read by the client; the mesh
        # enrolls them (the seed partner registers them, the members are published in the
        # directory and probe), starts each with --join and nothing else, and waits until the
        # committee counts every one running
        mesh = EmbeddedMesh(MeshConfig(base / "nodes", workers=WORKERS, model="tiny-random", device="cpu",
                                       relays=RELAYS, worker_args=("--prefix-cache-mb", "64"), committee=devnet,
                                       start_timeout_s=120.0))
        mesh.start()
        assert all(join == str(parse_endpoint(join)) and parse_endpoint(join).key for join in mesh.join)
        committee = CommitteeClient(devnet.endpoints)
        running = lambda: sum(n["running"] for n in committee.query("/directory")["nodes"])  # noqa: E731
        wait_for(lambda: running() == WORKERS + RELAYS, 60, "every joined node in the running set")
        yield devnet, mesh, committee, base / "client"
    finally:
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
    assert {w.worker_record().engine for w in workers} == {"torch"}  # tiny-random is no GGUF: torch serves it


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
    assert {w.worker_record() for w in offline.snapshot(0.0).running("worker")} \
        == {w.worker_record() for w in first.running("worker")}  # engines and all
    assert len(offline.workers()) == WORKERS


def test_a_validator_named_with_another_key_is_refused_with_the_reason(joined):
    devnet = joined[0]
    wrong = f"{parse_endpoint(devnet.endpoints[0]).address}?key={NodeIdentity.generate().transport.public_bytes.hex()}"
    with pytest.raises(DirectoryError, match="does not hold the transport key"):
        CommitteeDirectory([wrong], timeout_s=5.0).snapshot()


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


def test_join_takes_pinned_validator_addresses_and_says_what_is_wrong():
    key = "AB" * 32
    assert parse_join([f"https://10.1.2.3:26657?key={key}, tcp://10.1.2.4:5600?key={key}"]) == [
        f"https://10.1.2.3:26657?key={key.lower()}", f"tcp://10.1.2.4:5600?key={key.lower()}"]
    assert parse_join("http://127.0.0.1:26657") == ["http://127.0.0.1:26657"]  # local tooling
    with pytest.raises(DirectoryError, match="the key must be 64 hex characters"):
        parse_join("https://10.1.2.3:26657?key=abc")
    with pytest.raises(DirectoryError, match=r"only to this machine.*https://HOST:PORT\?key=HEX"):
        parse_join("http://10.1.2.3:26657")
    with pytest.raises(DirectoryError, match="needs the validator's key"):
        parse_join("https://10.1.2.3:26657")
    with pytest.raises(DirectoryError, match="CurveZMQ"):
        parse_join("tcp://10.1.2.4:5600")


def test_the_directory_lists_its_validators_pinned_to_the_keys_their_rows_hold():
    local, remote = NodeIdentity.generate(), NodeIdentity.generate()

    def row(ident: NodeIdentity, endpoint: str) -> dict:
        return {"node": ident.public.sign_key.hex(), "kex_key": ident.public.kex_key.hex(), "role": "validator",
                "transport_key": ident.transport.public_bytes.hex(), "endpoint": endpoint}

    rows = [row(local, "tcp://127.0.0.1:26657"), row(remote, "tcp://10.1.2.3:26657")]
    order = sorted([local, remote], key=lambda i: i.public.sign_key)  # entries come sorted by node key
    snap = parse_directory({"height": 1, "app_hash": "00", "nodes": rows})
    host = {local.node_id: "127.0.0.1:26657", remote.node_id: "10.1.2.3:26657"}
    assert snap.validators("tcp") == [f"tcp://{host[i.node_id]}?key={i.transport.public_bytes.hex()}" for i in order]
    assert snap.validators("https") == [f"https://{host[i.node_id]}?key={i.public.sign_key.hex()}" for i in order]
    # a plain-HTTP reader (local tooling) keeps plain links on this machine only
    assert snap.validators("http") == [f"http://{host[i.node_id]}" if i is local else
                                       f"https://{host[i.node_id]}?key={i.public.sign_key.hex()}" for i in order]
