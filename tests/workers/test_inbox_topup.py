"""Topping up a streamed answer at the entry worker's inbox (docs/paths.md 9.9), with a
stand-in host. A stream whose paths run out of chunk blocks holds its next chunk; a top-up
from the client (tagged under the request's key) appends blocks to a path's lane and the
stream goes on where it stopped. Top-ups that are forged, replayed, re-aimed, oversized or for
a request that is not streamed are refused with a logged reason and answered with nothing;
a relay that saw one clove cannot forge further cloves to collect chunks over its own blocks."""

from __future__ import annotations

import asyncio
import logging

from permamesh.identity import NodeIdentity
from permamesh.overlay.envelope import (
    ANSWERED, STARTED, Ack, ChunkClove, decode_reply_item, encode_envelope, encode_topup_envelope,
)
from permamesh.overlay.onion import HopInfo
from permamesh.overlay.reassembly import ChunkReassembly
from permamesh.overlay.reply import build_reply_block
from permamesh.overlay.sida import split
from permamesh.overlay.stream import StreamConfig
from permamesh.overlay.topup import NEW_LANE, TOPUP_INDEX, TopUpLimits, lane_id, make_topup, topup_key
from permamesh.wire import GenerateRequest, GenerateResult, TokenChunk, encode
from permamesh.workers.inbox import SINK_PREFIX, Inbox, InboxConfig
from tests.workers.test_inbox_hardening import Host

RELAYS = [HopInfo.from_identity(NodeIdentity.generate().public) for _ in range(3)]
CLIENT = NodeIdentity.generate()
EVERY_TOKEN = StreamConfig(first_tokens=1, chunk_tokens=1, growth=1.0, interval_s=10.0)
MID = b"t" * 16


def _block():
    return build_reply_block(RELAYS, CLIENT.node_id.encode("ascii"))[0]


def _blocks(count: int) -> tuple:
    return tuple(_block() for _ in range(count))


class Entry:
    """An inbox that got three cloves of a request, each with ``chunk_blocks`` chunk blocks;
    ``sent`` records every (block, item) it sealed, ``lanes`` each path's lane name."""

    def __init__(self, chunk_blocks: int, limits: TopUpLimits = TopUpLimits(), tokens: int = 8) -> None:
        self.host = Host()
        self.inbox = Inbox(self.host, lambda: {}, InboxConfig(ack_delay_s=5.0, stream=EVERY_TOKEN, topup=limits))
        self.sent: list = []
        self.inbox._seal = lambda block, item: self.sent.append((block, item))
        self.frame = encode(GenerateRequest("r", prompt="hi", max_tokens=tokens), CLIENT)
        self.cloves = split(self.frame, n=16, k=3, message_id=MID)
        self.key = topup_key(self.frame)
        self.lanes = []
        for clove in self.cloves[:3]:
            answer = _block()
            self.lanes.append(lane_id(answer.header[:32]))
            self.inbox.on_clove(encode_envelope(clove, _block(), answer, _blocks(chunk_blocks)))
        self.sink = self.host.sinks[SINK_PREFIX + MID]
        self.number = 0

    def topup(self, lane: bytes, count: int, key: bytes | None = None, number: int | None = None) -> bytes:
        blocks = _blocks(count)
        number = self.number if number is None else number
        self.number += 1
        return encode_topup_envelope(make_topup(key or self.key, MID, number, lane, blocks), _block(), _block(), blocks)

    def released(self) -> list[str]:
        seen: list[str] = []
        stream = ChunkReassembly(MID, bytes.fromhex(self.host.identity.public.sign_key.hex()), seen.append)
        for _, item in self.sent:
            decoded = decode_reply_item(item)
            if isinstance(decoded, ChunkClove):
                stream.add(decoded)
        return seen

    def acks(self) -> list[Ack]:
        return [item for item in (decode_reply_item(i) for _, i in self.sent) if isinstance(item, Ack)]


def test_a_top_up_extends_each_lane_and_the_stream_goes_on_where_it_stopped():
    async def scenario():
        entry = Entry(chunk_blocks=2)
        for i in range(3):  # chunks 0 and 1 use both blocks of every lane; chunk 2 waits
            entry.sink(TokenChunk("r", i, f"t{i} ", (i,)))
            await asyncio.sleep(0)
        assert entry.inbox.counts["chunks"] == 2 and entry.inbox.counts["streams_starved"] == 1
        for lane in entry.lanes:
            entry.inbox.on_clove(entry.topup(lane, 4))
        for i in range(3, 6):
            entry.sink(TokenChunk("r", i, f"t{i} ", (i,)))
            await asyncio.sleep(0)
        entry.sink(GenerateResult("r", "".join(f"t{i} " for i in range(6)), "length", 2, 6, tuple(range(6))))
        await asyncio.sleep(0.01)
        entry.inbox.close()
        return entry

    entry = asyncio.run(scenario())
    counts = entry.inbox.counts
    assert counts["topups"] == 3 and counts["topup_refused"] == 0 and counts["chunks"] == 6
    assert entry.released() == [f"t{i} " for i in range(6)]  # the waiting chunk first, nothing lost
    assert [(a.index, a.status) for a in entry.acks()] == [(TOPUP_INDEX, STARTED)] * 3


def test_refused_top_ups_are_logged_with_the_reason_and_answered_with_nothing(caplog):
    async def scenario():
        entry = Entry(chunk_blocks=2, limits=TopUpLimits(max_blocks=10, max_unused=12))
        lane = entry.lanes[0]
        mallory = topup_key(b"mallory's guess at the request")
        good = entry.topup(lane, 4)
        cases = [  # in this order
            (entry.topup(lane, 3, key=mallory), "does not verify"),
            (entry.topup(b"x" * 8, 3), "names no lane"),
            (entry.topup(lane, 7), "would hold 13 unused chunk blocks"),  # 6 held + 7 > 12
            (good, None),  # taken: 4 of 10 (held: 10)
            (good, "already taken (a replay)"),
            (entry.topup(lane, 1), None),  # taken: 5 of 10 (held: 11 of 12)
            (entry.topup(entry.lanes[1], 6), "would exceed 10"),
        ]
        other = Entry(chunk_blocks=0)  # a request without chunk blocks: not streamed
        outcomes = []
        for envelope, reason in cases:
            before = len(entry.sent)
            caplog.clear()
            entry.inbox.on_clove(envelope)
            outcomes.append((reason, len(entry.sent) - before, caplog.text))
        other.inbox.on_clove(other.topup(NEW_LANE, 2))
        unknown = Entry(chunk_blocks=2)
        unknown.inbox.jobs.clear()  # forgotten (expired)
        unknown.inbox.on_clove(unknown.topup(unknown.lanes[0], 2))
        for inbox in (entry.inbox, other.inbox, unknown.inbox):
            inbox.close()
        return entry, other, unknown, outcomes

    with caplog.at_level(logging.INFO, logger="permamesh.workers.inbox"):
        entry, other, unknown, outcomes = asyncio.run(scenario())
    for reason, sealed, log in outcomes:
        if reason is None:
            assert sealed == 1 and "refused" not in log  # its ack
        else:
            assert sealed == 0 and reason in log, (reason, log)
    assert entry.inbox.counts["topup_refused"] == 5 and entry.inbox.counts["topups"] == 2
    assert other.inbox.counts["topup_refused"] == 1 and other.sent == []
    assert unknown.inbox.counts["topup_refused"] == 1
    assert "not streamed" in caplog.text and "not held here" in caplog.text


def test_a_top_up_after_the_answer_brings_a_clove_of_it():
    async def scenario():
        entry = Entry(chunk_blocks=2)
        entry.sink(GenerateResult("r", "done", "stop", 2, 1, (1,)))
        await asyncio.sleep(0)
        before = len(entry.sent)
        entry.inbox.on_clove(entry.topup(entry.lanes[0], 2))
        entry.inbox.close()
        return entry, [decode_reply_item(item) for _, item in entry.sent[before:]]

    entry, items = asyncio.run(scenario())
    assert isinstance(items[0], Ack) and items[0].status == ANSWERED
    assert len(items) == 2 and items[1].message_id == MID  # an answer clove over its answer block


def test_a_relay_that_saw_a_clove_cannot_forge_more_to_collect_chunks():
    """Mallory, the proxy of one path, knows the message id and k; she splits a message of her
    own under it and sends cloves with unused indexes and chunk blocks of her own. They carry
    her own fingerprint vector, not the request's: dropped, and no chunk goes over her blocks."""

    async def scenario():
        entry = Entry(chunk_blocks=4)
        forged = split(b"mallory's message", n=16, k=3, message_id=MID)
        mallory_blocks = []
        for clove in forged[10:13]:
            blocks = _blocks(4)
            mallory_blocks += blocks
            entry.inbox.on_clove(encode_envelope(clove, _block(), _block(), blocks))
        for i in range(3):
            entry.sink(TokenChunk("r", i, f"t{i}", (i,)))
            await asyncio.sleep(0)
        entry.inbox.close()
        return entry, {b.header for b in mallory_blocks}

    entry, mallory = asyncio.run(scenario())
    assert entry.inbox.counts["forged_clove"] == 3 and entry.inbox.counts["chunks"] == 3
    assert not any(block.header in mallory for block, _ in entry.sent)
