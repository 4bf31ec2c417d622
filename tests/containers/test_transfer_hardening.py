"""A layer server and a peer that asks and never reads: a 150-byte request must not buy the
peer a queued MiB. What the server queues for it stays bounded, the excess is dropped and
counted, and an honest peer still fetches its layer meanwhile."""

from __future__ import annotations

import hashlib
import time

import zmq

from permamesh.containers.store import LayerStore
from permamesh.containers.transfer import CHUNK, LayerRequest, LayerServer, LayerServerThread, fetch_layer
from permamesh.identity import NodeIdentity
from permamesh.transport import split_endpoint
from permamesh.wire import encode

ASKS = 300  # 1 MiB chunks mallory asks for and never reads


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _deaf_peer(endpoint: str) -> zmq.Socket:
    """A DEALER that lets (almost) nothing in: one frame of queue and a tiny kernel buffer."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    address, server_key = split_endpoint(endpoint)
    sock.curve_serverkey = server_key
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.connect(address)
    return sock


def test_a_peer_that_never_reads_gets_a_bounded_queue_and_others_are_served(tmp_path):
    data = bytes(i % 251 for i in range(2 * CHUNK))
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    store = LayerStore(tmp_path / "a", 10 * CHUNK)
    store.put(digest, data, len(data))
    server = LayerServer(store)
    with LayerServerThread(server):
        mallory = _deaf_peer(server.endpoint)
        try:
            me = NodeIdentity.generate()
            ask = encode(LayerRequest(digest, 0, CHUNK), me)
            assert len(ask) < 400
            rss_before = _rss_bytes()
            for _ in range(ASKS):
                mallory.send(ask)
            deadline = time.monotonic() + 30
            while server.served < ASKS and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.served == ASKS
            time.sleep(0.3)
            grown = _rss_bytes() - rss_before
            assert grown < 64 * CHUNK, f"{grown >> 20} MiB held for a peer that never reads"
            assert server.dropped >= ASKS - 64  # beyond its queue, mallory's answers are dropped, counted

            honest = LayerStore(tmp_path / "b", 10 * CHUNK)
            fetch_layer(server.endpoint, digest, len(data), honest)  # while mallory still hangs on
            assert honest.has(digest)
        finally:
            mallory.close(0)
