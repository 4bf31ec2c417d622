"""Every link from a node to a validator is encrypted, and the validator authenticated by a key
the endpoint names.

Stories, with real processes: a one-validator CometBFT network whose RPC serves TLS with the
member's own identity key, and a one-validator devnet whose ROUTER is a CurveZMQ server with
the member's transport key.

- A client pinned to the member's key gets answers, over one kept-alive TLS 1.3 connection.
- A client pinned to another key is refused with an error that says so, on both engines (the
  devnet at once, not after its timeout); so is a devnet client that names no key.
- The RPC port no longer answers plain HTTP with ledger data.
- Plain links to another host are refused before a packet is sent, saying what to write.
- A member published in the directory is found again as the pinned endpoint the launcher printed.
"""

from __future__ import annotations

import http.client
import json
import time

import pytest

from permamesh.committee.client import CommitteeClient
from permamesh.committee.cometbft import tls
from permamesh.committee.cometbft.binary import CometBFTMissing, find_cometbft
from permamesh.committee.cometbft.network import CometNet, CometNetConfig
from permamesh.committee.cometbft.rpc import CometRPC
from permamesh.committee.devnet.cluster import Devnet, DevnetConfig, devnet_endpoints
from permamesh.committee.endpoints import EndpointError, parse_endpoint
from permamesh.committee.errors import CommitteeError, ProtocolError
from permamesh.directory.announce import publish_validators
from permamesh.directory.committee import CommitteeDirectory
from permamesh.directory.errors import DirectoryError
from permamesh.identity import NodeIdentity

MALLORY = NodeIdentity.generate()  # holds keys, but not the member's


def repinned(endpoint: str, key: bytes) -> str:
    return f"{parse_endpoint(endpoint).address}?key={key.hex()}"


@pytest.fixture(scope="module")
def comet(tmp_path_factory):
    try:
        find_cometbft()
    except CometBFTMissing as exc:
        pytest.skip(f"CometBFT is not installed: {exc}")
    net = CometNet(CometNetConfig(tmp_path_factory.mktemp("tls") / "cometnet", validators=1))
    net.start()
    try:
        yield net
    finally:
        net.stop()


@pytest.fixture(scope="module")
def devnet(tmp_path_factory):
    net = Devnet(DevnetConfig(tmp_path_factory.mktemp("curve") / "devnet", validators=1))
    net.start()
    try:
        yield net
    finally:
        net.stop()


# ------------------------------------------------------------------------------ CometBFT

def test_a_client_pinned_to_the_members_key_gets_answers_over_one_tls_connection(comet):
    member = comet.identity(0).public.sign_key
    endpoint = comet.endpoints[0]
    assert endpoint.startswith("https://") and parse_endpoint(endpoint).key == member
    assert tls.certificate_key(comet.cert_file(0).read_bytes()) == member  # the member's own key
    with CommitteeClient([endpoint], timeout_s=10.0) as client:
        assert client.status().height >= 1
        assert client.query("/status")["members"] == [member.hex()]
    with CometRPC(endpoint) as rpc:
        rpc.status()
        sock = rpc._conn.sock
        assert sock.version() == "TLSv1.3"
        for _ in range(20):
            rpc.status()
        assert rpc._conn.sock is sock  # kept alive: one handshake for all 21 calls


def test_a_client_pinned_to_another_key_is_refused(comet):
    wrong = repinned(comet.endpoints[0], MALLORY.public.sign_key)
    with CometRPC(wrong, timeout_s=5.0) as rpc, pytest.raises(tls.PinMismatch, match="not the pinned key"):
        rpc.status()
    with CommitteeClient([wrong], timeout_s=5.0) as client, \
            pytest.raises(CommitteeError, match="not the pinned key") as refused:
        client.status()
    assert comet.identity(0).public.sign_key.hex()[:16] in str(refused.value)  # says whose key it met


def test_the_rpc_port_does_not_answer_plain_http(comet):
    record = comet.records[0]
    conn = http.client.HTTPConnection(record.host, record.rpc_port, timeout=5.0)
    try:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "status", "params": {}})
        conn.request("POST", "/", body, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        data = answer.read()
    finally:
        conn.close()
    assert answer.status == 400 and b"jsonrpc" not in data and b"latest_app_hash" not in data
    with CometRPC(f"http://{record.host}:{record.rpc_port}", timeout_s=5.0) as rpc, \
            pytest.raises(ProtocolError, match="not JSON"):
        rpc.status()


def test_a_published_member_is_found_again_by_its_pinned_endpoint(comet):
    with CommitteeClient(comet.endpoints, timeout_s=10.0) as client:
        publish_validators(client, comet.chain_id, comet.partner, [comet.identity(0)], comet.endpoints)
    snap = CommitteeDirectory([comet.endpoints[0]], confirm=False).snapshot()
    assert snap.validators("https") == comet.endpoints
    with pytest.raises(DirectoryError, match="not validator"):  # checked before anything is sent
        publish_validators(None, comet.chain_id, comet.partner, [comet.identity(0)],
                           [repinned(comet.endpoints[0], MALLORY.public.sign_key)])


# ------------------------------------------------------------------------------ devnet

def test_a_devnet_client_naming_the_transport_key_gets_answers(devnet):
    endpoint = devnet.endpoints[0]
    assert parse_endpoint(endpoint).key == devnet.identity(0).transport.public_bytes
    assert devnet_endpoints(devnet.home) == devnet.endpoints  # what `permamesh validator --query` uses
    with CommitteeClient([endpoint], timeout_s=10.0) as client:
        assert client.status().height >= 0
        assert client.query("/status")["members"] == [devnet.identity(0).public.sign_key.hex()]


@pytest.mark.parametrize("key, reason", [(MALLORY.transport.public_bytes, "does not hold the transport key"),
                                         (None, "speaks CurveZMQ")])
def test_a_devnet_client_with_another_key_or_none_is_refused_at_once(devnet, key, reason):
    address = parse_endpoint(devnet.endpoints[0]).address
    endpoint = address if key is None else f"{address}?key={key.hex()}"
    started = time.monotonic()
    with CommitteeClient([endpoint], timeout_s=30.0) as client, pytest.raises(CommitteeError, match=reason):
        client.status()
    assert time.monotonic() - started < 10.0  # the failed handshake is heard, not timed out


# ------------------------------------------------------------------------------ policy

@pytest.mark.parametrize("endpoint, reason", [
    ("http://10.1.2.3:26657", r"only to this machine .* https://HOST:PORT\?key=HEX"),
    ("tcp://10.1.2.3:5600", r"CurveZMQ: use tcp://HOST:PORT\?key=HEX"),
    ("tcp://validator.example.org:5600", "CurveZMQ"),
    ("https://10.1.2.3:26657", "needs the validator's key"),
    ("https://10.1.2.3:26657?key=abc", "64 hex characters"),
    ("tcp://10.1.2.3:5600?key=" + "g" * 64, "64 hex characters"),
    ("http://127.0.0.1:26657?key=" + "ab" * 32, "cannot be pinned"),
    ("ftp://10.1.2.3:1", "a validator address is"),
    ("https://10.1.2.3:26657/rpc?key=" + "ab" * 32, "nothing more"),
    ("https://10.1.2.3:99999?key=" + "ab" * 32, "HOST:PORT"),
])
def test_plain_or_malformed_links_to_another_host_are_refused_before_a_packet(endpoint, reason):
    with pytest.raises(EndpointError, match=reason):
        parse_endpoint(endpoint)
    with pytest.raises(EndpointError, match=reason):
        CommitteeClient([endpoint])
    if endpoint.startswith("http"):
        with pytest.raises(EndpointError, match=reason):
            CometRPC(endpoint)


def test_plain_links_stay_allowed_on_this_machine_and_keys_read_in_either_case():
    for endpoint in ("http://127.0.0.1:26657", "http://localhost:26657", "tcp://127.0.0.1:5600",
                     "http://[::1]:26657"):
        assert str(parse_endpoint(endpoint)) == endpoint
    upper = "https://node.example.org:26657?key=" + "AB" * 32
    assert str(parse_endpoint(upper)) == upper.lower()
