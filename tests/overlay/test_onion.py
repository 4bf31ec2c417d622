"""Onion cells: a client wraps, relays peel, and a mallory finds every tampering refused."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from permamesh.identity import KeyExchangeKey, NodeIdentity
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.onion import (
    CELL_HEADER_BYTES,
    MAX_CELL_BYTES,
    MAX_EXIT_COMMAND_BYTES,
    MAX_FORWARD_PAYLOAD,
    MAX_HOPS,
    SIZE_CLASSES,
    ExitPayload,
    HopInfo,
    NextHop,
    ReplayGuard,
    ReplyDelivery,
    build_forward,
    peel,
)
from permamesh.overlay.reply import (
    MAX_REPLY_PAYLOAD,
    REPLY_BLOCK_BYTES,
    ReplyBlock,
    build_reply_block,
    open_reply,
    seal_reply,
)

ENTRY_WORKER = b"entry-worker-007"  # what the exit hop is told, 16 bytes
CLIENT_ID = b"client-node-0042"


@dataclass
class Relay:
    hop: HopInfo
    key: KeyExchangeKey
    guard: ReplayGuard = field(default_factory=ReplayGuard)


@dataclass
class Trip:
    cells: list[bytes]  # every cell on the wire, first hop's included
    views: list[object]  # what each peel returned
    end: object  # the last peel's result


class Mesh:
    """A handful of relays in one process; ``carry`` walks a cell hop by hop."""

    def __init__(self, size: int = 6) -> None:
        self.relays = [self._relay() for _ in range(size)]
        self.by_id = {r.hop.node_id: r for r in self.relays}

    @staticmethod
    def _relay() -> Relay:
        ident = NodeIdentity.generate()
        return Relay(HopInfo.from_identity(ident.public), ident.kex)

    def path(self, n: int) -> list[HopInfo]:
        return [r.hop for r in self.relays[:n]]

    def carry(self, first_hop: bytes, cell: bytes) -> Trip:
        cells, views = [cell], []
        while True:
            view = peel(self.by_id[first_hop].key, cell, self.by_id[first_hop].guard)
            views.append(view)
            if not isinstance(view, NextHop):
                return Trip(cells, views, view)
            first_hop, cell = view.next_hop, view.cell
            cells.append(cell)


@pytest.fixture
def mesh() -> Mesh:
    return Mesh()


# --- delivery -------------------------------------------------------------------------------


@pytest.mark.parametrize("hops", [1, 2, 3, 4, 5])
def test_a_payload_crosses_paths_of_every_length(mesh: Mesh, hops: int) -> None:
    payload = os.urandom(3000)
    first, cell = build_forward(mesh.path(hops), ENTRY_WORKER, payload)
    assert first == mesh.relays[0].hop.node_id
    trip = mesh.carry(first, cell)
    assert trip.end == ExitPayload(ENTRY_WORKER, payload)
    assert [v.next_hop for v in trip.views[:-1]] == [h.node_id for h in mesh.path(hops)[1:]]


def test_cells_keep_one_length_whatever_the_path_or_position(mesh: Mesh) -> None:
    lengths = set()
    for hops in range(1, MAX_HOPS + 1):
        trip = mesh.carry(*build_forward(mesh.path(hops), ENTRY_WORKER, b"x" * 500))
        lengths |= {len(c) for c in trip.cells}
    assert lengths == {CELL_HEADER_BYTES + SIZE_CLASSES[0]}


@pytest.mark.parametrize(
    ("size", "expected"), [(0, 1024), (1020, 1024), (1021, 2048), (MAX_FORWARD_PAYLOAD, 131072)]
)
def test_payloads_are_padded_to_a_size_class(mesh: Mesh, size: int, expected: int) -> None:
    payload = os.urandom(size)
    first, cell = build_forward(mesh.path(2), b"", payload)
    assert len(cell) == CELL_HEADER_BYTES + expected
    assert mesh.carry(first, cell).end == ExitPayload(b"", payload)


def test_a_caller_can_pick_a_larger_size_class(mesh: Mesh) -> None:
    _, cell = build_forward(mesh.path(2), b"", b"tiny", size_class=8192)
    assert len(cell) == CELL_HEADER_BYTES + 8192
    with pytest.raises(OverlayError, match="do not fit"):
        build_forward(mesh.path(2), b"", bytes(2000), size_class=1024)


# --- what a relay learns --------------------------------------------------------------------


def _windows(data: bytes, width: int = 12) -> set[bytes]:
    return {data[i : i + width] for i in range(len(data) - width + 1)}


def test_a_relay_learns_only_the_next_hop(mesh: Mesh) -> None:
    payload = b"the secret prompt: " + bytes(range(256)) * 8
    trip = mesh.carry(*build_forward(mesh.path(4), ENTRY_WORKER, payload))
    secrets = _windows(payload) | {ENTRY_WORKER}
    ids = [r.hop.node_id for r in mesh.relays]
    for view in trip.views[:-1]:  # what each non-exit relay gets back from peel
        assert isinstance(view, NextHop)
        assert set(vars(view)) == {"next_hop", "cell"}
    for cell in trip.cells:  # what is on the wire, the cell the exit receives included
        assert not any(s in cell for s in secrets)
        assert not any(node_id in cell for node_id in ids)  # no id travels in clear


def test_two_cells_with_one_payload_look_unrelated(mesh: Mesh) -> None:
    payload = b"same payload " * 300
    a = mesh.carry(*build_forward(mesh.path(3), ENTRY_WORKER, payload)).cells
    b = mesh.carry(*build_forward(mesh.path(3), ENTRY_WORKER, payload)).cells
    for x in a:
        for y in b:
            same_position = sum(p == q for p, q in zip(x, y, strict=True))
            assert same_position < len(x) / 256 * 2 + 20  # ~ chance level
            assert not _windows(x, 8) & _windows(y, 8)


# --- mallory --------------------------------------------------------------------------------


def test_a_cell_for_another_relay_is_refused(mesh: Mesh) -> None:
    _, cell = build_forward(mesh.path(3), ENTRY_WORKER, b"hi")
    with pytest.raises(OverlayError, match="MAC"):
        peel(mesh.relays[1].key, cell, ReplayGuard())


def test_every_single_byte_flip_is_refused_and_the_relay_keeps_serving(mesh: Mesh) -> None:
    first, cell = build_forward(mesh.path(3), ENTRY_WORKER, os.urandom(900))
    second = peel(mesh.relays[0].key, cell, ReplayGuard())
    assert isinstance(second, NextHop)
    rnd = random.Random(7)
    for relay, target in ((mesh.relays[0], cell), (mesh.relays[1], second.cell)):
        positions = list(range(CELL_HEADER_BYTES)) + rnd.sample(range(len(target)), 64)
        for pos in positions:
            bad = bytearray(target)
            bad[pos] ^= 1 << rnd.randrange(8)
            with pytest.raises(OverlayError):
                peel(relay.key, bytes(bad), relay.guard)
        high_bit = bytearray(target)  # X25519 ignores bit 255 of a key; the MAC does not
        high_bit[31] ^= 0x80
        with pytest.raises(OverlayError, match="MAC"):
            peel(relay.key, bytes(high_bit), relay.guard)
        assert len(relay.guard) == 0
        assert isinstance(peel(relay.key, target, relay.guard), (NextHop, ExitPayload))


@pytest.mark.parametrize(
    ("cell", "reason"),
    [
        (b"", "truncated"),
        (bytes(CELL_HEADER_BYTES), "truncated"),
        (bytes(CELL_HEADER_BYTES + 1023), "truncated"),
        (bytes(CELL_HEADER_BYTES + 1025), "size class"),
        (bytes(MAX_CELL_BYTES + 1), "oversized"),
        (bytes(10 * MAX_CELL_BYTES), "oversized"),
        ("not bytes", "expected bytes"),
    ],
)
def test_malformed_cells_are_refused_with_a_reason(mesh: Mesh, cell: bytes, reason: str) -> None:
    with pytest.raises(OverlayError, match=reason):
        peel(mesh.relays[0].key, cell, ReplayGuard())


def test_truncating_or_extending_a_real_cell_is_refused(mesh: Mesh) -> None:
    _, cell = build_forward(mesh.path(2), ENTRY_WORKER, os.urandom(1500))
    for bad in (cell[:-1], cell[:-1024], cell + b"\0", cell[:CELL_HEADER_BYTES]):
        with pytest.raises(OverlayError):
            peel(mesh.relays[0].key, bad, ReplayGuard())


def test_a_low_order_ephemeral_key_is_refused(mesh: Mesh) -> None:
    _, cell = build_forward(mesh.path(2), ENTRY_WORKER, b"x")
    with pytest.raises(OverlayError, match="unusable ephemeral key"):
        peel(mesh.relays[0].key, bytes(32) + cell[32:], ReplayGuard())


def test_a_replayed_cell_is_refused_and_a_fresh_one_still_passes(mesh: Mesh) -> None:
    first, cell = build_forward(mesh.path(3), ENTRY_WORKER, b"once")
    relay = mesh.by_id[first]
    forwarded = peel(relay.key, cell, relay.guard)
    with pytest.raises(OverlayError, match="replayed"):
        peel(relay.key, cell, relay.guard)
    assert isinstance(forwarded, NextHop)
    second = mesh.by_id[forwarded.next_hop]
    peel(second.key, forwarded.cell, second.guard)
    with pytest.raises(OverlayError, match="replayed"):
        peel(second.key, forwarded.cell, second.guard)
    assert mesh.carry(*build_forward(mesh.path(3), ENTRY_WORKER, b"once")).end.payload == b"once"


def test_the_replay_window_follows_the_callers_clock(mesh: Mesh) -> None:
    guard = ReplayGuard(epoch=100, window=2)
    key = mesh.relays[0].key

    def cell(epoch: int) -> bytes:
        return build_forward(mesh.path(1), b"", b"x", epoch=epoch)[1]

    with pytest.raises(OverlayError, match="stale"):
        peel(key, cell(98), guard)
    with pytest.raises(OverlayError, match="future"):
        peel(key, cell(102), guard)
    old = cell(99)
    for epoch in (99, 100, 101):
        peel(key, cell(epoch), guard)
    peel(key, old, guard)
    assert len(guard) == 4
    guard.advance(101)  # epoch 99 leaves the window: its tags go, and so do its cells
    assert len(guard) == 2
    with pytest.raises(OverlayError, match="stale"):
        peel(key, old, guard)
    guard.advance(50)  # a clock never goes backwards
    assert guard.epoch == 101


def test_a_full_replay_guard_fails_closed(mesh: Mesh) -> None:
    guard = ReplayGuard(capacity=2)
    key = mesh.relays[0].key
    for _ in range(2):
        peel(key, build_forward(mesh.path(1), b"", b"x")[1], guard)
    with pytest.raises(OverlayError, match="full"):
        peel(key, build_forward(mesh.path(1), b"", b"x")[1], guard)
    guard.advance(5)
    peel(key, build_forward(mesh.path(1), b"", b"x", epoch=5)[1], guard)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.one_of(
        st.binary(max_size=2 * CELL_HEADER_BYTES),
        st.sampled_from([CELL_HEADER_BYTES + c for c in SIZE_CLASSES[:3]]).flatmap(
            lambda n: st.binary(min_size=n, max_size=n)
        ),
    )
)
def test_random_bytes_only_ever_raise_overlay_errors(mesh: Mesh, data: bytes) -> None:
    with pytest.raises(OverlayError):
        peel(mesh.relays[0].key, data, mesh.relays[0].guard)


# --- builders refuse what cannot work -------------------------------------------------------


def test_builders_refuse_bad_paths_and_inputs(mesh: Mesh) -> None:
    with pytest.raises(OverlayError, match="hops"):
        build_forward([], ENTRY_WORKER, b"x")
    with pytest.raises(OverlayError, match="hops"):
        build_forward(Mesh(MAX_HOPS + 1).path(MAX_HOPS + 1), ENTRY_WORKER, b"x")
    with pytest.raises(OverlayError, match="exit command"):
        build_forward(mesh.path(2), bytes(MAX_EXIT_COMMAND_BYTES + 1), b"x")
    with pytest.raises(OverlayError, match="exceeds"):
        build_forward(mesh.path(2), b"", bytes(MAX_FORWARD_PAYLOAD + 1))
    with pytest.raises(OverlayError, match="node_id"):
        HopInfo(b"short", bytes(32))
    with pytest.raises(OverlayError, match="unusable X25519"):
        build_forward([HopInfo(b"n" * 16, bytes(32))], b"", b"x")
    with pytest.raises(OverlayError, match="client id"):
        build_reply_block(mesh.path(2), b"short")


# --- replies --------------------------------------------------------------------------------


@pytest.mark.parametrize("hops", [1, 3, 4])
def test_a_reply_block_brings_the_answer_back(mesh: Mesh, hops: int) -> None:
    path = mesh.path(hops)[::-1]  # proxy first, the client's first relay last
    block, keys = build_reply_block(path, CLIENT_ID)
    wire = block.to_bytes()
    assert len(wire) == REPLY_BLOCK_BYTES
    block = ReplyBlock.from_bytes(wire)  # as the entry worker receives it
    answer = b"the answer: " + os.urandom(2000)
    first, cell = seal_reply(block, answer)
    assert first == path[0].node_id
    trip = mesh.carry(first, cell)
    assert isinstance(trip.end, ReplyDelivery)
    assert (trip.end.client_id, trip.end.reply_id) == (CLIENT_ID, keys.reply_id)
    assert {len(c) for c in trip.cells} == {len(cell)}
    assert not any(s in c for s in _windows(answer) for c in trip.cells + [trip.end.payload])
    assert open_reply(keys, trip.end.payload) == answer


def test_the_responder_sees_only_the_first_reply_hop(mesh: Mesh) -> None:
    path = mesh.path(4)
    block, _ = build_reply_block(path, CLIENT_ID)
    wire = block.to_bytes()
    assert CLIENT_ID not in wire
    assert [h.node_id in wire for h in path] == [True, False, False, False]


def test_tampering_with_a_reply_is_caught_by_the_client(mesh: Mesh) -> None:
    block, keys = build_reply_block(mesh.path(3), CLIENT_ID)
    first, cell = seal_reply(block, b"answer" * 50)
    bad = bytearray(cell)
    bad[CELL_HEADER_BYTES + 100] ^= 4  # reply relays add layers and cannot tell
    trip = mesh.carry(first, bytes(bad))
    with pytest.raises(OverlayError, match="reply rejected"):
        open_reply(keys, trip.end.payload)
    flipped = bytearray(trip.end.payload)
    flipped[-1] ^= 1
    with pytest.raises(OverlayError):
        open_reply(keys, bytes(flipped))
    with pytest.raises(OverlayError):
        open_reply(build_reply_block(mesh.path(3), CLIENT_ID)[1], trip.end.payload)
    with pytest.raises(OverlayError, match="size class"):
        open_reply(keys, trip.end.payload[:-1])


def test_a_reply_block_works_once_and_its_header_is_guarded(mesh: Mesh) -> None:
    block, keys = build_reply_block(mesh.path(3), CLIENT_ID)
    first, cell = seal_reply(block, b"one")
    assert open_reply(keys, mesh.carry(first, cell).end.payload) == b"one"
    with pytest.raises(OverlayError, match="replayed"):
        mesh.carry(*seal_reply(block, b"two"))
    forged = bytearray(seal_reply(build_reply_block(mesh.path(3), CLIENT_ID)[0], b"x")[1])
    forged[40] ^= 1
    with pytest.raises(OverlayError, match="MAC"):
        mesh.carry(first, bytes(forged))


def test_reply_sizes_and_bad_blocks(mesh: Mesh) -> None:
    block, keys = build_reply_block(mesh.path(2), CLIENT_ID)
    first, cell = seal_reply(block, bytes(MAX_REPLY_PAYLOAD))
    assert len(cell) == MAX_CELL_BYTES
    assert open_reply(keys, mesh.carry(first, cell).end.payload) == bytes(MAX_REPLY_PAYLOAD)
    with pytest.raises(OverlayError, match="exceeds"):
        seal_reply(block, bytes(MAX_REPLY_PAYLOAD + 1))
    with pytest.raises(OverlayError, match="reply block"):
        ReplyBlock.from_bytes(block.to_bytes()[:-1])
    with pytest.raises(OverlayError, match="version"):
        ReplyBlock.from_bytes(b"\x09" + block.to_bytes()[1:])
    assert "seal_key" not in repr(block) and "layer_keys" not in repr(keys)
