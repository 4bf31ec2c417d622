"""A relay under load from one upstream keeps serving the others.

Mallory has valid cells (she built real onions for the relay) and a lot of them; or she has
throwaway signing keys and attaches them as clients. Either way the relay's memory stays
bounded, and Alice, on another connection, still gets her cells through and her replies back.
"""

from __future__ import annotations

import os
import time

from permamesh.identity import NodeIdentity
from permamesh.overlay.messages import CloveDrop, RelayAttach, RelayCell, RelayDelivery
from permamesh.overlay.reply import build_reply_block, open_reply, seal_reply
from permamesh.overlay.relay import current_epoch
from permamesh.wire import decode, encode

from tests.overlay.test_relay import TIMEOUT_S, cell_frame, forward, mesh, wait_until

CAP = 200  # replay tags the relay may hold in these tests


def test_a_flood_of_valid_cells_is_shed_and_the_guard_stays_bounded():
    with mesh(1, replay_capacity=CAP) as net:
        mallory, alice = net.dealer(0), net.dealer(0)
        flood = 3 * CAP
        for i in range(flood):
            mallory.send(cell_frame(forward(net, [0], b"mallory %d" % i)))
        wait_until(lambda: net.stats(0).cells_in == flood, "mallory's cells read")
        stats = net.stats(0)
        assert stats.replay_tags <= CAP  # the guard's memory is bounded by its cap
        assert stats.dropped_by_reason.get("shed", 0) >= flood - CAP  # counted, per reason
        assert stats.exited + stats.dropped == flood

        mine = [b"alice %d" % i + os.urandom(8) for i in range(10)]
        for payload in mine:
            alice.send(cell_frame(forward(net, [0], payload)))
        wait_until(lambda: net.stats(0).cells_in == flood + len(mine), "alice's cells read")
        frames = net.sink.wait(stats.exited + len(mine))
        got = {decode(f).msg for f in frames}
        assert all(CloveDrop(p) in got for p in mine), "alice's cells must still go through"
        assert net.stats(0).replay_tags <= CAP


def test_a_relay_alone_with_one_upstream_still_serves_it_up_to_the_soft_limit():
    with mesh(1, replay_capacity=CAP) as net:
        sender = net.dealer(0)
        for i in range(CAP // 2):
            sender.send(cell_frame(forward(net, [0], b"clove %d" % i)))
        wait_until(lambda: net.stats(0).exited == CAP // 2, "every cell below the soft limit passes")
        assert net.stats(0).dropped == 0


def _attach(dealer, key: NodeIdentity) -> bytes:
    client_id = key.node_id.encode("ascii")
    dealer.send(encode(RelayAttach(client_id), key))
    return client_id


def _reply(net, client_id: bytes, answer: bytes):
    block, keys = build_reply_block([net.hop(2), net.hop(1), net.hop(0)], client_id, epoch=current_epoch())
    _, cell = seal_reply(block, answer)
    net.dealer(2).send(encode(RelayCell(cell), NodeIdentity.generate()))
    return keys


def test_a_flood_of_attaches_does_not_evict_a_client_in_use():
    with mesh(3, max_clients=32) as net:
        alice_key = NodeIdentity.generate()
        alice = net.dealer(0)
        alice_id = _attach(alice, alice_key)
        wait_until(lambda: net.stats(0).attached == 1, "alice's attach")
        keys = _reply(net, alice_id, b"first answer")
        frame = alice.recv(TIMEOUT_S)
        assert frame is not None and open_reply(keys, decode(frame).msg.payload) == b"first answer"

        # mallory: 64 connections, two throwaway client ids each, four times the table
        flooders = []
        for _ in range(64):
            flooder = net.dealer(0)
            for _ in range(2):
                _attach(flooder, NodeIdentity.generate())
            flooder.send(b"junk")  # answered bad_frame after the attaches before it (one connection is FIFO)
            flooders.append(flooder)
        assert all(f.recv(TIMEOUT_S) is not None for f in flooders), "every flood frame was read"
        assert net.stats(0).attached == 32  # bounded

        keys = _reply(net, alice_id, b"second answer")
        frame = alice.recv(TIMEOUT_S)
        assert frame is not None, "alice's attachment was evicted by the flood"
        msg = decode(frame).msg
        assert isinstance(msg, RelayDelivery) and open_reply(keys, msg.payload) == b"second answer"
        assert net.stats(0).dropped_by_reason.get("unknown_client", 0) == 0


def test_one_connection_may_attach_only_its_budget_of_client_ids():
    with mesh(1, max_attach_per_peer=4) as net:
        flooder = net.dealer(0)
        for _ in range(10):
            _attach(flooder, NodeIdentity.generate())
        wait_until(lambda: net.stats(0).dropped_by_reason.get("attach_budget", 0) == 6, "six refused")
        assert net.stats(0).attached == 4
        other = net.dealer(0)  # another connection has its own budget
        _attach(other, NodeIdentity.generate())
        wait_until(lambda: net.stats(0).attached == 5, "the other connection's attach")


def test_a_table_full_of_clients_in_use_refuses_new_attaches():
    with mesh(3, max_clients=2) as net:
        dealers = [net.dealer(0) for _ in range(2)]
        for dealer in dealers:
            key = NodeIdentity.generate()
            client_id = _attach(dealer, key)
            _attach(dealer, key)  # a re-attach marks it in use
            dealer.send(b"junk")  # its bad_frame answer comes after both attaches were handled
            assert dealer.recv(TIMEOUT_S) is not None
        assert net.stats(0).attached == 2
        _attach(net.dealer(0), NodeIdentity.generate())
        wait_until(lambda: net.stats(0).dropped_by_reason.get("attach_full", 0) == 1, "the third refused")
        keys = _reply(net, client_id, b"still here")
        frame = dealers[-1].recv(TIMEOUT_S)
        assert frame is not None and open_reply(keys, decode(frame).msg.payload) == b"still here"


def test_a_members_liveness_probe_gets_a_signed_answer_not_a_bad_frame():
    """Committee members probe every relay with a signed StatusRequest; the relay answers with a
    frame signed by its own key (the proof of life) and does not count it as a bad frame."""
    from permamesh.wire import ErrorReply, StatusRequest

    with mesh(1) as net:
        prober = net.dealer(0)
        prober.send(encode(StatusRequest("probe-1"), NodeIdentity.generate()))
        frame = prober.recv(TIMEOUT_S)
        assert frame is not None
        received = decode(frame)
        assert isinstance(received.msg, ErrorReply) and received.msg.code == "not_a_worker"
        assert received.msg.request_id == "probe-1"
        assert received.sender == net.relays[0].server.identity.public.sign_key
        assert net.stats(0).bad_frames == 0
