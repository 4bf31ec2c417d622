"""Layers fetched from a peer over zmq on loopback: verified as written, so a lying or silent
peer leaves nothing behind; the server answers any junk with an error, never a crash."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.containers.errors import ContainerError
from permamesh.containers.store import LayerStore
from permamesh.containers.transfer import CHUNK, LayerData, LayerServer, LayerServerThread, fetch_layer


def blob(n: int, seed: int = 0) -> tuple[str, bytes]:
    data = bytes((i * 7 + seed) % 251 for i in range(n))
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


class Mallory(LayerServer):
    """Serves the right size but flips one byte of every chunk."""

    def answer(self, frame: bytes) -> LayerData:
        reply = super().answer(frame)
        if reply.data:
            flipped = bytes([reply.data[0] ^ 1]) + reply.data[1:]
            return LayerData(reply.digest, reply.offset, flipped, reply.total)
        return reply


def test_a_layer_comes_over_the_network_in_chunks(tmp_path):
    digest, data = blob(2 * CHUNK + 12345)
    a, b = LayerStore(tmp_path / "a", 10 * CHUNK), LayerStore(tmp_path / "b", 10 * CHUNK)
    a.put(digest, data, len(data))
    server = LayerServer(a)
    with LayerServerThread(server) as thread:
        fetch_layer(server.endpoint, digest, len(data), b)
        assert thread.alive()
    with b.open(digest) as got:
        assert got.read() == data
    assert server.served == 3  # three chunks


def test_a_lying_peer_leaves_nothing_stored(tmp_path):
    digest, data = blob(CHUNK // 2, seed=3)
    a, b = LayerStore(tmp_path / "a", 10 * CHUNK), LayerStore(tmp_path / "b", 10 * CHUNK)
    a.put(digest, data, len(data))
    mallory = Mallory(a)
    with LayerServerThread(mallory):
        with pytest.raises(ContainerError):
            fetch_layer(mallory.endpoint, digest, len(data), b)
        with pytest.raises(ContainerError, match="not held"):
            fetch_layer(mallory.endpoint, blob(10, seed=9)[0], 10, b)
        with pytest.raises(ContainerError):  # the right blob, but claimed with the wrong size
            fetch_layer(mallory.endpoint, digest, len(data) + 1, b)
    assert not b.has(digest) and b.holdings() == frozenset()


def test_a_silent_peer_times_out(tmp_path):
    from permamesh.transport import RouterServer  # a socket that never answers

    import asyncio

    async def bind():
        return RouterServer()

    loop = asyncio.new_event_loop()
    silent = loop.run_until_complete(bind())
    try:
        with pytest.raises(ContainerError, match="did not answer"):
            fetch_layer(silent.endpoint, blob(5)[0], 5, LayerStore(tmp_path / "b", CHUNK), timeout_s=0.3)
    finally:
        silent.close()
        loop.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_the_server_answers_junk_with_an_error(tmp_path_factory, frame):
    server = LayerServer(LayerStore(tmp_path_factory.mktemp("s"), CHUNK))
    reply = server.answer(frame)
    assert isinstance(reply, LayerData) and reply.error and not reply.data
