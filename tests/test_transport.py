"""Encrypted links: a server with a transport key speaks only CurveZMQ and is authenticated
by the key its endpoint names. Real sockets on loopback, a real echo server."""

from __future__ import annotations

import pytest

from permamesh.bench.hosts import EchoServer
from permamesh.identity import NodeIdentity
from permamesh.transport import (
    DealerClient,
    RouterServer,
    ServingThread,
    TransportError,
    split_endpoint,
    with_key,
)


@pytest.fixture
def alice():
    return NodeIdentity.generate()


@pytest.fixture
def curve_echo(alice):
    server = EchoServer(alice.transport.private_bytes())
    with ServingThread(server, "echo") as thread:
        yield thread, alice


def test_the_endpoint_names_the_servers_transport_key(curve_echo):
    thread, alice = curve_echo
    address, key = split_endpoint(thread.server.endpoint)
    assert key == alice.transport.public_bytes
    assert address.startswith("tcp://127.0.0.1:") and "?" not in address
    with DealerClient(thread.server.endpoint) as sock:
        sock.send(b"hello")
        assert sock.recv(5.0) == b"hello"


def test_a_client_expecting_another_key_hears_nothing(curve_echo):
    thread, _ = curve_echo
    address, _ = split_endpoint(thread.server.endpoint)
    mallory = NodeIdentity.generate()
    with DealerClient(with_key(address, mallory.transport.public_bytes)) as sock:
        sock.send(b"hello")
        assert sock.recv(1.0) is None


def test_a_plaintext_client_gets_no_answer_from_an_encrypted_server(curve_echo):
    thread, _ = curve_echo
    address, _ = split_endpoint(thread.server.endpoint)
    with DealerClient(address) as sock:
        sock.send(b"hello")
        assert sock.recv(1.0) is None


def test_plain_servers_still_serve_plain_clients():
    server = EchoServer(None)
    with ServingThread(server, "echo") as thread:
        assert split_endpoint(thread.server.endpoint)[1] is None
        with DealerClient(thread.server.endpoint) as sock:
            sock.send(b"x")
            assert sock.recv(5.0) == b"x"


@pytest.mark.parametrize("bad", ["tcp://h:1?key=", "tcp://h:1?key=zz" + "0" * 62, "tcp://h:1?key=" + "A" * 64,
                                 "tcp://h:1?key=" + "0" * 63])
def test_malformed_keys_are_refused(bad):
    with pytest.raises(TransportError):
        split_endpoint(bad)
    with pytest.raises(TransportError):
        DealerClient(bad)


def test_the_transport_key_is_stable_and_distinct(tmp_path):
    a = NodeIdentity.load_or_create(tmp_path, "w")
    b = NodeIdentity.load_or_create(tmp_path, "w")
    assert a.transport.public_bytes == b.transport.public_bytes
    assert a.transport.public_bytes not in (a.kex.public_bytes, NodeIdentity.generate().transport.public_bytes)
