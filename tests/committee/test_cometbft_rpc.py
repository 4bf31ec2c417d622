"""The CometBFT RPC client against a tiny local HTTP server that plays a node, honest or not.

A node's RPC is an untrusted peer: good answers parse into their dataclasses, and everything
else (not JSON, not JSON-RPC, a field missing or of the wrong type, bad hex or base64, a body
too large, a wrong id) is a ProtocolError that says why; never a KeyError or a crash. A node
that stops answering is RPCUnreachable, and the CommitteeClient fails over from a node that
answers garbage to one that answers well. Over TLS the node is pinned to its key: one that
holds another key is refused after the handshake and never sees a request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.committee.client import CommitteeClient
from permamesh.committee.cometbft import answers, tls
from permamesh.committee.cometbft.rpc import CometRPC, RPCError, RPCUnreachable
from permamesh.committee.errors import CommitteeError, ProtocolError
from permamesh.identity import NodeIdentity

HASH = "AB" * 32
STATUS = {"node_info": {"id": "527513ee8d924c457ddbb4cd6657d3cc92823527", "network": "permamesh-x",
                        "version": "0.38.25"},
          "sync_info": {"latest_block_hash": HASH, "latest_app_hash": "CD" * 32,
                        "latest_block_height": "7", "catching_up": False}}
TX = b"a signed tx"
RESULTS = {"height": "7", "txs_results": [{"code": 3, "log": "bad nonce", "codespace": "permamesh"}],
           "app_hash": base64.b64encode(b"\x01" * 32).decode()}
BLOCK = {"block_id": {"hash": HASH}, "block": {"header": {"height": "7", "app_hash": "EF" * 32},
                                               "data": {"txs": [base64.b64encode(TX).decode()]}}}
QUERY = {"response": {"code": 0, "log": "", "value": base64.b64encode(b'{"ok": 1}').decode(),
                      "height": "7"}}
GOOD = {"status": STATUS, "block": BLOCK, "block_results": RESULTS, "abci_query": QUERY,
        "num_unconfirmed_txs": {"n_txs": "2"},
        "blockchain": {"last_height": "7", "block_metas": [
            {"header": {"height": str(h), "app_hash": f"{h:02X}" * 32}, "num_txs": "0"}
            for h in (7, 6, 5)]}}


class FakeNode:
    """An HTTP server on 127.0.0.1 answering each JSON-RPC request with ``answer(request)``:
    a result object (wrapped as JSON-RPC), or raw ``bytes`` sent as the body. Given an
    ``identity``, it serves TLS with that identity's key, as a CometNet validator does."""

    def __init__(self, answer, drop_idle: bool = False, identity: NodeIdentity | None = None) -> None:
        self.answer, self.requests = answer, []
        node = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                batch = request if isinstance(request, list) else [request]
                node.requests += batch
                bodies = [node.wrap(r, node.answer(r)) for r in batch]
                # as CometBFT: a batch of one is answered unwrapped
                body = bodies[0] if len(bodies) == 1 else b"[" + b",".join(bodies) + b"]"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                # drop_idle: close the kept-alive connection without saying so, as a node
                # closing idle connections does between two of our requests
                self.close_connection = drop_idle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        if identity is not None:
            self.server.socket = server_context(identity).wrap_socket(self.server.socket, server_side=True)
            self.url = f"https://127.0.0.1:{self.server.server_address[1]}?key={identity.public.sign_key.hex()}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    @staticmethod
    def wrap(request: dict, answer) -> bytes:
        if isinstance(answer, bytes):
            return answer
        return json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": answer}).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def server_context(identity: NodeIdentity) -> ssl.SSLContext:
    """A TLS server context holding ``identity``'s key and its certificate (:mod:`...tls`)."""
    with tempfile.TemporaryDirectory() as scratch:
        cert, key = Path(scratch) / "cert.pem", Path(scratch) / "key.pem"
        cert.write_bytes(tls.certificate(identity))
        key.write_bytes(ed25519.Ed25519PrivateKey.from_private_bytes(identity.signing.private_bytes()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
    return ctx


@pytest.fixture
def fake():
    nodes = []

    def make(answer, drop_idle: bool = False, identity: NodeIdentity | None = None) -> FakeNode:
        nodes.append(FakeNode(answer, drop_idle, identity))
        return nodes[-1]

    yield make
    for node in nodes:
        node.close()


def honest(request):
    return GOOD[request["method"]]


def test_good_answers_parse_into_dataclasses(fake):
    node = fake(honest)
    with CometRPC(node.url, timeout_s=5.0) as rpc:
        status = rpc.status()
        assert (status.height, status.network, status.block_hash) == (7, "permamesh-x", bytes.fromhex(HASH))
        block = rpc.block(7)
        assert block.txs == (TX,) and block.app_hash == b"\xef" * 32
        results = rpc.block_results(7)
        assert results.tx_results[0] == answers.TxResult(3, "bad nonce", "permamesh")
        assert results.app_hash == b"\x01" * 32
        assert rpc.abci_query("/registry", b"\x01\xab").value == b'{"ok": 1}'
        assert [h.height for h in rpc.headers(5, 7)] == [5, 6, 7]
        assert rpc.num_unconfirmed_txs() == 2
    # what went on the wire: int64 as decimal strings, HexBytes as hex, every call JSON-RPC 2.0
    by_method = {r["method"]: r["params"] for r in node.requests}
    assert by_method["block"] == {"height": "7"}
    assert by_method["abci_query"] == {"path": "/registry", "data": "01AB", "height": "0", "prove": False}
    assert all(r["jsonrpc"] == "2.0" for r in node.requests)


def test_broadcast_and_tx_use_base64_and_a_missing_tx_is_none(fake):
    def answer(request):
        if request["method"] == "broadcast_tx_sync":
            tx = base64.b64decode(request["params"]["tx"])
            return {"code": 0, "log": "", "codespace": "", "hash": hashlib.sha256(tx).hexdigest().upper()}
        return json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": {
            "code": -32603, "message": "Internal error", "data": "tx (00) not found"}}).encode()

    with CometRPC(fake(answer).url) as rpc:
        assert rpc.broadcast_tx_sync(TX).hash == hashlib.sha256(TX).digest()
        assert [b.hash for b in rpc.broadcast_many([b"x%d" % i for i in range(12)])] == \
            [hashlib.sha256(b"x%d" % i).digest() for i in range(12)]
        assert rpc.tx(b"\x00") is None


def test_a_json_rpc_error_is_an_rpc_error_with_its_data(fake):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "error": {
        "code": -32603, "message": "Internal error", "data": "tx already exists in cache"}}).encode()
    with CometRPC(fake(lambda r: body).url) as rpc, pytest.raises(RPCError) as caught:
        rpc.broadcast_tx_sync(TX)
    assert caught.value.code == -32603 and "already exists in cache" in caught.value.data


def _status_with(**sync) -> dict:
    return {**STATUS, "sync_info": {**STATUS["sync_info"], **sync}}


MALFORMED = [
    ("status", b"<html>502 Bad Gateway</html>", "not JSON"),
    ("status", b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    ("status", json.dumps({"id": 1, "result": STATUS}).encode(), "JSON-RPC"),
    ("status", {"node_info": STATUS["node_info"]}, "sync_info"),
    ("status", _status_with(latest_block_height="seven"), "latest_block_height"),
    ("status", _status_with(latest_block_height="-3"), "latest_block_height"),
    ("status", _status_with(latest_block_height=True), "latest_block_height"),
    ("status", _status_with(latest_block_hash="not hex"), "latest_block_hash"),
    ("status", [1, 2, 3], "expected an object"),
    ("block", {**BLOCK, "block": {**BLOCK["block"], "data": {"txs": ["!!not base64!!"]}}}, "base64"),
    ("block", {"block_id": {"hash": HASH}}, "missing field 'block'"),
    ("block_results", {**RESULTS, "txs_results": {"code": 0}}, "txs_results"),
    ("block_results", {**RESULTS, "txs_results": [{"code": "x"}]}, "code"),
    ("abci_query", {"response": {"code": 0, "value": 12}}, "value"),
]


@pytest.mark.parametrize("method,body,reason", MALFORMED, ids=[f"{m}-{r}" for m, _, r in MALFORMED])
def test_malformed_answers_are_protocol_errors_that_say_why(fake, method, body, reason):
    node = fake(lambda request: body)
    with CometRPC(node.url) as rpc, pytest.raises(ProtocolError, match=reason):
        {"status": rpc.status, "block": lambda: rpc.block(1), "block_results": lambda: rpc.block_results(1),
         "abci_query": lambda: rpc.abci_query("/status")}[method]()


def test_an_answer_to_another_request_is_refused(fake):
    body = json.dumps({"jsonrpc": "2.0", "id": 999, "result": STATUS}).encode()
    with CometRPC(fake(lambda r: body).url) as rpc, pytest.raises(ProtocolError, match="id"):
        rpc.status()


def test_a_batch_answer_that_does_not_match_is_refused(fake):
    with CometRPC(fake(lambda r: json.dumps([{"jsonrpc": "2.0", "id": 1, "result": {}}]).encode()).url) as rpc:
        with pytest.raises(ProtocolError, match="batch"):
            rpc.broadcast_many([b"a", b"b"])


def test_an_oversized_answer_is_refused_before_it_is_read(fake, monkeypatch):
    from permamesh.committee.cometbft import rpc as rpc_module

    monkeypatch.setattr(rpc_module, "MAX_ANSWER_BYTES", 1000)
    with CometRPC(fake(lambda r: b" " * 5000).url) as rpc, pytest.raises(ProtocolError, match="refused"):
        rpc.status()


def test_a_silent_or_absent_node_is_unreachable():
    import socket

    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with CometRPC(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.3) as rpc:
            with pytest.raises(RPCUnreachable):
                rpc.status()
        port = silent.getsockname()[1]
    with CometRPC(f"http://127.0.0.1:{port}", timeout_s=1.0) as rpc, pytest.raises(RPCUnreachable):
        rpc.status()  # nothing listens there any more
    with pytest.raises(CommitteeError, match=r"https://HOST:PORT\?key=HEX"):
        CometRPC("tcp://127.0.0.1:1")


@pytest.mark.parametrize("identity", [None, NodeIdentity.generate()], ids=["http", "tls"])
def test_a_kept_alive_connection_the_node_closed_is_reopened_once(fake, identity):
    node = fake(honest, drop_idle=True, identity=identity)
    with CometRPC(node.url) as rpc:
        assert [rpc.status().height for _ in range(3)] == [7, 7, 7]


def test_a_tls_node_holding_another_key_than_the_pin_gets_no_request(fake):
    member, mallory = NodeIdentity.generate(), NodeIdentity.generate()
    node = fake(honest, identity=member)
    with CometRPC(node.url) as rpc:
        assert [rpc.status().height for _ in range(3)] == [7, 7, 7]
        assert rpc._conn.sock.version() == "TLSv1.3"
    impostor = fake(honest, identity=mallory)  # a node at the address, with a key of its own
    pinned = f"{impostor.url.partition('?')[0]}?key={member.public.sign_key.hex()}"
    with CometRPC(pinned) as rpc, pytest.raises(tls.PinMismatch, match="not the pinned key"):
        rpc.status()
    with CommitteeClient([pinned, node.url], timeout_s=5.0) as client:  # fails over to the member
        assert client.status().height == 7
    assert impostor.requests == []  # refused after the handshake, before any request
    plain = fake(honest)  # no TLS there: the handshake fails, and says so
    with CometRPC(f"https://127.0.0.1:{plain.server.server_address[1]}?key={member.public.sign_key.hex()}",
                  timeout_s=2.0) as rpc, pytest.raises(RPCUnreachable, match="TLS"):
        rpc.status()


PARSERS = [answers.parse_status, answers.parse_broadcast, answers.parse_tx, answers.parse_query,
           answers.parse_block, answers.parse_block_results, answers.parse_headers,
           answers.parse_num_unconfirmed]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PARSERS), JSON)
def test_parsers_raise_only_protocol_errors_on_any_json(parser, value):
    try:
        parser(value)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(PARSERS), st.sampled_from(list(GOOD.values()) + [RESULTS, BLOCK]), st.data())
def test_parsers_raise_only_protocol_errors_on_mutated_good_answers(parser, good, data):
    """Replace one field somewhere in a good answer with arbitrary JSON."""
    value = json.loads(json.dumps(good))
    node = value
    while isinstance(node, dict) and node:
        key = data.draw(st.sampled_from(sorted(node)))
        if not isinstance(node[key], dict) or data.draw(st.booleans()):
            node[key] = data.draw(JSON)
            break
        node = node[key]
    try:
        parser(value)
    except ProtocolError:
        pass


def test_the_client_fails_over_from_a_node_that_answers_garbage(fake):
    mallory = fake(lambda request: b'{"jsonrpc": "2.0", "id": 1, "result": {"response": "no"}}')
    good = fake(honest)
    with CommitteeClient([mallory.url, good.url], timeout_s=5.0) as client:
        assert client.query("/status") == {"ok": 1}
        status = client.status(6, 7)
        assert status.height == 7 and status.mempool == 2
        assert status.heights == (6, 7) and status.app_hashes == (b"\x07" * 32, b"\x01" * 32)
        assert client.status_of(mallory.url) is None  # garbage reads as no answer
    with CommitteeClient([mallory.url], timeout_s=5.0) as client, pytest.raises(CommitteeError, match="response"):
        client.query("/status")


def test_a_node_that_answers_a_broadcast_with_another_hash_is_not_believed(fake):
    def answer(request):
        if request["method"] == "broadcast_tx_sync":
            return {"code": 0, "log": "", "codespace": "", "hash": "00" * 32}
        return honest(request)

    with CommitteeClient([fake(answer).url], timeout_s=5.0) as client:
        with pytest.raises(CommitteeError, match="hash"):
            client.submit(TX)
        assert client.submit_many([TX])[0].code == -1


def test_replays_and_refusals_read_as_the_devnet_answers_them(fake):
    """A tx in the node's cache or refused for its nonce, whose bytes are committed, is
    'already committed at height H'; a node that refuses a tx outright gives code 20."""
    cached, stale, refused = b"in the cache", b"old nonce", b"no room"
    committed = {hashlib.sha256(cached).digest(): 5, hashlib.sha256(stale).digest(): 4}

    def error(request, data):
        return json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": {
            "code": -32603, "message": "Internal error", "data": data}}).encode()

    def answer(request):
        params = request["params"]
        if request["method"] == "broadcast_tx_sync":
            tx = base64.b64decode(params["tx"])
            if tx == cached:
                return error(request, "tx already exists in cache")
            if tx == refused:
                return error(request, "mempool is full: number of txs 5000 (max: 5000)")
            return {"code": 3, "log": "nonce 1, expected 2", "hash": hashlib.sha256(tx).hexdigest()}
        if request["method"] == "tx":
            height = committed.get(base64.b64decode(params["hash"]))
            if height is None:
                return error(request, "tx (..) not found")
            return {"hash": base64.b64decode(params["hash"]).hex(), "height": str(height), "index": 0,
                    "tx_result": {"code": 0, "log": ""}}
        if request["method"] == "abci_info":
            return {"response": {"last_block_height": "7"}}
        return honest(request)

    with CommitteeClient([fake(answer).url], timeout_s=5.0) as client:
        outcomes = client.submit_many([cached, stale, refused, b"never sent before"])
    assert [(o.code, o.height, o.committed) for o in outcomes] == [(0, 5, True), (0, 4, True), (20, 0, False),
                                                                  (3, 0, False)]
    assert outcomes[0].log == "already committed at height 5" and "mempool is full" in outcomes[2].log
