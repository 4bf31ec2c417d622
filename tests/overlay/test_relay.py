"""Relays on loopback: a clove crosses three of them to an entry worker, a reply comes back to
an attached client, and a mallory's forged, replayed, cut or flooded cells are dropped and
counted while the relay keeps forwarding good ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.identity import NodeIdentity
from permamesh.overlay.cells import MAX_CELL_BYTES
from permamesh.directory.relays import CachedLookup, RelayRecord
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.messages import CloveDrop, RelayAttach, RelayCell, RelayDelivery
from permamesh.overlay.onion import HopInfo, build_forward
from permamesh.overlay.relay import RelayConfig, RelayServer, RelayThread, current_epoch
from permamesh.overlay.reply import build_reply_block, open_reply, seal_reply
from permamesh.transport import DealerClient
from permamesh.wire import ErrorReply, decode, encode
from permamesh.wire.codec import DOMAIN, PROTOCOL_VERSION

WORKER_ID = b"0123456789abcdef"  # the entry worker's node id, as an exit command
TIMEOUT_S = 5.0


def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Sink:
    """A fake entry worker (or a wiretap): a bound ROUTER that records every frame it receives."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.frames: list[bytes] = []

    def wait(self, n: int, timeout_s: float = TIMEOUT_S) -> list[bytes]:
        deadline = time.monotonic() + timeout_s
        while len(self.frames) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise AssertionError(f"sink got {len(self.frames)} frames, expected {n}")
            self.frames.append(self.sock.recv_multipart()[-1])
        return self.frames

    def close(self) -> None:
        self.sock.close(0)


@dataclass
class Net:
    relays: list[RelayThread]
    table: dict[bytes, str]  # what every relay's directory() returns
    workers: dict[bytes, str]  # what every relay's workers() returns
    sink: Sink  # the entry worker WORKER_ID
    dealers: list[DealerClient]

    def hop(self, i: int) -> HopInfo:
        return HopInfo.from_identity(self.relays[i].server.identity.public)

    def stats(self, i: int):
        return self.relays[i].server.stats()

    def dealer(self, i: int) -> DealerClient:
        self.dealers.append(DealerClient(self.relays[i].server.endpoint))
        return self.dealers[-1]


@contextmanager
def mesh(n: int, **config: object) -> Iterator[Net]:
    net = Net([], {}, {}, Sink(), [])
    net.workers[WORKER_ID] = net.sink.endpoint
    try:
        for _ in range(n):
            server = RelayServer(NodeIdentity.generate(), RelayConfig(**config), lambda: net.table, lambda: net.workers)
            net.relays.append(RelayThread(server))
            net.table[server.node_id.encode("ascii")] = net.relays[-1].start()
        yield net
    finally:
        for dealer in net.dealers:
            dealer.close()
        for relay in net.relays:
            relay.stop()
        net.sink.close()


ME = NodeIdentity.generate()  # the test's own signing key (a client's session key)


def cell_frame(cell: bytes) -> bytes:
    return encode(RelayCell(cell), ME)


def forward(net: Net, hops: list[int], payload: bytes, **kw) -> bytes:
    _, cell = build_forward([net.hop(i) for i in hops], WORKER_ID, payload, epoch=current_epoch(), **kw)
    return cell


def test_three_relays_carry_a_clove_to_the_entry_worker():
    with mesh(3) as net:
        payload = os.urandom(3000)
        net.dealer(0).send(cell_frame(forward(net, [0, 1, 2], payload)))
        received = decode(net.sink.wait(1)[0])
        assert received.msg == CloveDrop(payload)
        assert received.sender is None  # cells and clove drops travel unsigned (see messages.py)
        wait_until(lambda: [(net.stats(i).forwarded, net.stats(i).exited) for i in range(3)]
                   == [(1, 0), (1, 0), (0, 1)], "the counters")
        assert all(net.stats(i).dropped == 0 for i in range(3))


def test_what_a_relay_forwards_never_holds_the_payload():
    """Wiretaps stand between the relays: each records the frame and passes it on."""
    with mesh(3) as net:
        taps = [Sink(), Sink()]
        try:
            for i, tap in zip((1, 2), taps):
                net.table[net.hop(i).node_id] = tap.endpoint
            payload = os.urandom(4000)
            net.dealer(0).send(cell_frame(forward(net, [0, 1, 2], payload)))
            seen = []
            for i, tap in zip((1, 2), taps):
                frame = tap.wait(1)[0]
                seen.append(frame)
                received = decode(frame)
                assert received.sender is None
                assert isinstance(received.msg, RelayCell)
                net.dealer(i).send(frame)
            assert decode(net.sink.wait(1)[0]).msg == CloveDrop(payload)
            for frame in seen:
                assert not any(payload[j : j + 16] in frame for j in range(0, len(payload) - 16, 16))
        finally:
            for tap in taps:
                tap.close()


def test_a_reply_block_brings_the_answer_back_to_the_attached_client():
    with mesh(3) as net:
        client_key = NodeIdentity.generate()
        client_id = client_key.node_id.encode("ascii")
        client = net.dealer(0)
        client.send(encode(RelayAttach(client_id), client_key))
        wait_until(lambda: net.stats(0).attached == 1, "the attach")
        block, keys = build_reply_block([net.hop(2), net.hop(1), net.hop(0)], client_id, epoch=current_epoch())
        answer = b"the answer, sealed for the client alone " * 20
        first_hop, cell = seal_reply(block, answer)
        assert first_hop == net.hop(2).node_id
        net.dealer(2).send(encode(RelayCell(cell), NodeIdentity.generate()))  # the entry worker
        frame = client.recv(TIMEOUT_S)
        assert frame is not None, "no delivery"
        received = decode(frame)
        assert isinstance(received.msg, RelayDelivery) and received.msg.reply_id == keys.reply_id
        assert received.sender is None  # deliveries are unsigned: open_reply authenticates them
        assert answer not in received.msg.payload
        assert open_reply(keys, received.msg.payload) == answer
        wait_until(lambda: net.stats(0).delivered == 1, "the delivery count")


def _raw_frame(tag: str, fields: dict, signer: NodeIdentity) -> bytes:
    """A correctly signed frame whose body no honest encoder would produce (too big, say)."""
    body = msgpack.packb(fields, use_bin_type=True)
    sig = signer.sign(DOMAIN + tag.encode() + b"\x00" + body)
    return msgpack.packb([PROTOCOL_VERSION, tag, body, signer.public.sign_key, sig], use_bin_type=True)


def _flip(data: bytes, i: int, mask: int = 0x40) -> bytes:
    return data[:i] + bytes([data[i] ^ mask]) + data[i + 1 :]


def _mallory(net: Net, name: str) -> list[bytes]:
    """Frames for relay 0 that must all be dropped, under reason ``name``."""
    good = forward(net, [0], b"clove")
    if name == "forged":  # made for relay 0's id but another relay's key
        stranger = NodeIdentity.generate()
        _, cell = build_forward([HopInfo(net.hop(0).node_id, stranger.kex.public_bytes)], WORKER_ID, b"x")
        return [cell_frame(cell)]
    if name == "forged_payload":
        return [cell_frame(_flip(good, len(good) - 1))]
    if name == "replayed":
        return [cell_frame(good), cell_frame(good)]
    if name == "truncated":
        return [cell_frame(good[:700])]
    if name == "bad_size":
        return [cell_frame(good + bytes(100))]
    if name == "stale":
        return [cell_frame(build_forward([net.hop(0)], WORKER_ID, b"x", epoch=current_epoch() - 5)[1])]
    if name == "unknown_next_hop":
        stranger = HopInfo.from_identity(NodeIdentity.generate().public)
        return [cell_frame(build_forward([net.hop(0), stranger], WORKER_ID, b"x", epoch=current_epoch())[1])]
    if name == "unknown_worker":
        return [cell_frame(build_forward([net.hop(0)], b"f" * 16, b"x", epoch=current_epoch())[1])]
    if name == "unknown_client":
        block, _ = build_reply_block([net.hop(0)], b"c" * 16, epoch=current_epoch())
        return [cell_frame(seal_reply(block, b"nobody listens")[1])]
    raise AssertionError(name)


@pytest.mark.parametrize("reason", ["forged", "forged_payload", "replayed", "truncated", "bad_size", "stale",
                                    "unknown_next_hop", "unknown_worker", "unknown_client"])
def test_bad_cells_are_dropped_and_counted_and_good_ones_still_pass(reason):
    with mesh(1) as net:
        mallory = net.dealer(0)
        frames = _mallory(net, reason)
        for frame in frames:
            mallory.send(frame)
        wait_until(lambda: net.stats(0).dropped == 1, f"a drop for {reason}")
        stats = net.stats(0)
        assert dict(stats.dropped_by_reason) == {reason: 1}
        assert stats.cells_in == len(frames) and stats.bad_frames == 0
        assert mallory.recv(0.05) is None  # a dropped cell is never answered
        mallory.send(cell_frame(forward(net, [0], b"a good clove")))
        assert decode(net.sink.wait(len(frames))[-1]).msg == CloveDrop(b"a good clove")


def test_undecodable_frames_are_answered_bad_frame_and_counted():
    with mesh(1) as net:
        mallory = net.dealer(0)
        oversized = _raw_frame(RelayCell.TAG, {"cell": bytes(MAX_CELL_BYTES + 1)}, ME)
        wrong_type = encode(ErrorReply("", "bad_frame", "not for a relay"), ME)
        frames = [[b"garbage"], [oversized], [wrong_type], [b"two", b"parts"], [json.dumps({"cell": 1}).encode()]]
        for parts in frames:
            mallory.send_parts(parts)
            reply = mallory.recv(TIMEOUT_S)
            assert reply is not None
            received = decode(reply)
            assert received.msg.code == "bad_frame"
            assert received.sender == net.relays[0].server.identity.public.sign_key
        assert net.stats(0).bad_frames == len(frames) and net.stats(0).cells_in == 0
        mallory.send(cell_frame(forward(net, [0], b"still here")))
        assert decode(net.sink.wait(1)[0]).msg == CloveDrop(b"still here")


def test_fuzzed_frames_and_flipped_cells_never_get_through():
    with mesh(1) as net:
        mallory = net.dealer(0)

        @settings(max_examples=40, deadline=None)
        @given(st.lists(st.binary(max_size=700), min_size=1, max_size=3))
        def random_frames(parts):
            before = net.stats(0).bad_frames
            mallory.send_parts(parts)
            reply = mallory.recv(TIMEOUT_S)
            assert reply is not None and decode(reply).msg.code == "bad_frame"
            assert net.stats(0).bad_frames == before + 1

        good = forward(net, [0], b"the one good clove")

        @settings(max_examples=60, deadline=None)
        @given(st.integers(0, len(good) - 1), st.integers(1, 255))
        def flipped(i, mask):
            before = net.stats(0).dropped
            mallory.send(cell_frame(_flip(good, i, mask)))
            wait_until(lambda: net.stats(0).dropped == before + 1, "the flipped cell's drop")

        random_frames()
        flipped()
        assert net.stats(0).exited == 0 and not net.sink.frames
        mallory.send(cell_frame(good))  # no flipped copy was admitted, so the original still counts
        assert decode(net.sink.wait(1)[0]).msg == CloveDrop(b"the one good clove")


def test_the_rate_limiter_drops_a_burst_beyond_the_bucket():
    with mesh(1, rate_per_s=0.001, burst=5) as net:
        flood = net.dealer(0)
        for _ in range(12):
            flood.send(cell_frame(forward(net, [0], b"flood")))
        wait_until(lambda: net.stats(0).rate_limited == 7, "seven frames over the limit")
        wait_until(lambda: net.stats(0).exited == 5, "five frames within the bucket")
        net.dealer(0).send(cell_frame(forward(net, [0], b"another peer")))  # buckets are per connection
        assert decode(net.sink.wait(6)[-1]).msg == CloveDrop(b"another peer")
        assert net.stats(0).rate_limited == 7


def test_a_dead_relay_reads_and_drops_everything():
    with mesh(1, fail_after=1) as net:
        sender = net.dealer(0)
        sender.send(cell_frame(forward(net, [0], b"before")))
        sender.send(cell_frame(forward(net, [0], b"after")))
        wait_until(lambda: net.stats(0).dropped == 1, "the dead relay's drop")
        assert dict(net.stats(0).dropped_by_reason) == {"dead": 1}
        assert [decode(f).msg for f in net.sink.wait(1)] == [CloveDrop(b"before")]
    with mesh(1, drop_all=True) as net:
        sender = net.dealer(0)
        sender.send(cell_frame(forward(net, [0], b"lost")))
        sender.send(b"garbage")
        wait_until(lambda: net.stats(0).dropped == 2, "both drops")
        assert sender.recv(0.05) is None and not net.sink.frames and net.stats(0).bad_frames == 0


def test_a_second_key_cannot_take_over_an_attached_client_id():
    with mesh(1) as net:
        client_id = b"k" * 16
        net.dealer(0).send(encode(RelayAttach(client_id), ME))
        wait_until(lambda: net.stats(0).attached == 1, "the attach")
        net.dealer(0).send(encode(RelayAttach(client_id), NodeIdentity.generate()))
        wait_until(lambda: net.stats(0).dropped == 1, "the refused attach")
        assert dict(net.stats(0).dropped_by_reason) == {"attach_conflict": 1}


def test_a_relay_record_gives_the_hop_and_descriptor_and_lookups_reload_on_a_miss():
    ident = NodeIdentity.generate()
    pub = ident.public
    record = RelayRecord(ident.node_id, "tcp://127.0.0.1:7400", pub.sign_key.hex(), pub.kex_key.hex(),
                         "isp-a", "grid-a", "site-a")
    assert record.hop() == HopInfo.from_identity(pub)
    assert record.descriptor().address == record.endpoint and record.descriptor().node_id == record.hop().node_id
    with pytest.raises(OverlayError, match="sign_key"):
        RelayRecord(ident.node_id, "tcp://127.0.0.1:7400", "zz", pub.kex_key.hex(), "a", "b", "c")
    table: dict[bytes, str] = {record.node_id_bytes: record.endpoint}
    loads = []
    lookup = CachedLookup(lambda: loads.append(1) or dict(table), max_age_s=60.0, miss_interval_s=0.0)
    assert lookup() == {record.node_id_bytes: record.endpoint} and lookup() is lookup()
    assert len(loads) == 1
    table[b"f" * 16] = "tcp://127.0.0.1:7401"  # a relay that joined after the last load
    assert lookup()[b"f" * 16] == "tcp://127.0.0.1:7401" and len(loads) == 2


def test_the_relay_process_refuses_to_start_without_a_committee_or_with_an_unreachable_one(tmp_path):
    """Joining through a real committee is tested in tests/directory/test_join.py."""
    env = {k: v for k, v in os.environ.items() if k != "PERMAMESH_JOIN"}
    base = [sys.executable, "-m", "permamesh", "relay", "--data-dir", str(tmp_path), "--name", "r1"]
    alone = subprocess.run(base, capture_output=True, text=True, timeout=TIMEOUT_S * 10, env=env)
    assert alone.returncode == 2 and "needs the committee's directory" in alone.stderr and "--join" in alone.stderr
    started = time.monotonic()
    lost = subprocess.run(base + ["--join", "tcp://127.0.0.1:9"], capture_output=True, text=True,
                          timeout=TIMEOUT_S * 10, env=env)
    assert lost.returncode == 2 and "cannot read the directory from tcp://127.0.0.1:9" in lost.stderr
    assert time.monotonic() - started < 30  # a clear error, not a hang
    assert not (tmp_path / "run" / "relays").exists()
