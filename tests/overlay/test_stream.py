"""A streamed answer's pieces without a network: the envelope carries chunk blocks (or, as a
top-up, a tagged token and more chunk blocks), the entry worker's ChunkBuffer cuts chunks by
size and by time (a container's output by bytes), and the client's ChunkReassembly rebuilds
each chunk from any k cloves, releases them strictly in order, and fills in from the final
answer what no chunk carried, refusing an answer that contradicts its chunks or chunks signed
by anyone but the entry worker (mallory)."""

from __future__ import annotations

import dataclasses

import pytest

from permamesh.identity import NodeIdentity
from permamesh.containers.messages import RunOutput
from permamesh.overlay.envelope import (
    MAX_CHUNK_BLOCKS, TOPUP, ChunkClove, chunk_message_id, decode_envelope, decode_reply_item, encode_chunk_item,
    encode_envelope, encode_topup_envelope,
)
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.onion import HopInfo
from permamesh.overlay.reply import build_reply_block
from permamesh.overlay.sida import split
from permamesh.overlay.reassembly import ChunkReassembly
from permamesh.overlay.stream import ChunkBuffer, StreamConfig
from permamesh.overlay.topup import NEW_LANE, TopUpGate, TopUpLimits, make_topup, topup_key
from permamesh.wire import TokenChunk, TopLogprobs, encode

RELAYS = [HopInfo.from_identity(NodeIdentity.generate().public) for _ in range(3)]
CLIENT_ID = b"c" * 16
ENTRY = NodeIdentity.generate()
MID = b"m" * 16


def _block():
    return build_reply_block(RELAYS, CLIENT_ID)[0]


def _chunk_cloves(seq: int, text: str, signer: NodeIdentity = ENTRY, n: int = 4, k: int = 3) -> list[ChunkClove]:
    frame = encode(TokenChunk("r", seq, text, (seq,)), signer)
    return [ChunkClove(seq, c) for c in split(frame, n=n, k=k, message_id=chunk_message_id(MID, seq))]


def _reassembly() -> tuple[ChunkReassembly, list[str]]:
    seen: list[str] = []
    return ChunkReassembly(MID, bytes.fromhex(ENTRY.public.sign_key.hex()), seen.append), seen


def test_an_envelope_carries_its_chunk_blocks_in_order():
    clove = split(b"a request", n=4, k=3)[0]
    ack, answer, chunks = _block(), _block(), tuple(_block() for _ in range(5))
    env = decode_envelope(encode_envelope(clove, ack, answer, chunks))
    assert env.ack_block == ack and env.answer_block == answer and env.chunk_blocks == chunks
    assert decode_envelope(encode_envelope(clove, ack, answer)).chunk_blocks == ()
    with pytest.raises(OverlayError):
        encode_envelope(clove, ack, answer, tuple(_block() for _ in range(MAX_CHUNK_BLOCKS + 1)))
    with pytest.raises(OverlayError):
        encode_envelope(clove, None, None, chunks)


def test_a_top_up_envelope_carries_its_token_and_nothing_else_passes():
    key = topup_key(b"the signed request frame")
    ack, answer, chunks = _block(), _block(), tuple(_block() for _ in range(3))
    topup = make_topup(key, MID, 7, NEW_LANE, chunks)
    env = decode_envelope(encode_topup_envelope(topup, ack, answer, chunks))
    assert env.clove is None and env.topup == topup and env.chunk_blocks == chunks and env.ack_block == ack
    with pytest.raises(OverlayError, match="at least one chunk block"):
        encode_topup_envelope(topup, ack, answer, ())
    plain = encode_envelope(split(b"a request", n=4, k=3)[0], ack, answer, chunks)
    assert decode_envelope(plain).topup is None
    flags_at = 1  # version, then flags
    for flags in (0x01, 0x80, 0xFF):  # 0x01 was EXTEND: retired
        bad = plain[:flags_at] + bytes([flags]) + plain[flags_at + 1:]
        with pytest.raises(OverlayError, match="unknown flags"):
            decode_envelope(bad)
    bare = encode_envelope(split(b"a request", n=4, k=3)[0], ack, answer)
    with pytest.raises(OverlayError, match="without chunk blocks"):
        decode_envelope(bare[:flags_at] + bytes([TOPUP]) + bare[flags_at + 1:])
    with pytest.raises(OverlayError):  # a clove where a top-up's token belongs
        decode_envelope(plain[:flags_at] + bytes([TOPUP]) + plain[flags_at + 1:])


def test_only_the_requests_sender_tops_it_up_once_within_bounds():
    """The gate (the entry worker's check): the tag is keyed by the request frame and covers
    the lane and the blocks; each top-up counts once; chunk blocks per request and unused ones
    are bounded. Mallory, a relay that saw a top-up, can neither replay nor re-aim it."""
    key = topup_key(b"the signed request frame")
    gate = TopUpGate(key, TopUpLimits(max_blocks=6, max_unused=8))
    blocks = [_block() for _ in range(3)]
    first = make_topup(key, MID, 0, b"L" * 8, blocks)
    assert gate.check(first, blocks, unused=2) is None
    gate.take(first, blocks)
    assert "replay" in gate.check(first, blocks, unused=0)
    second = make_topup(key, MID, 1, b"L" * 8, blocks)
    assert "does not verify" in gate.check(second, [_block() for _ in range(3)], unused=0)  # mallory's blocks
    assert "does not verify" in gate.check(dataclasses.replace(second, lane=b"M" * 8), blocks, unused=0)
    assert "does not verify" in gate.check(make_topup(topup_key(b"a guess"), MID, 1, b"L" * 8, blocks), blocks, 0)
    assert "unused" in gate.check(second, blocks, unused=6)  # 6 + 3 > 8 held at once
    assert gate.check(second, blocks, unused=0) is None
    gate.take(second, blocks)
    third = make_topup(key, MID, 2, b"L" * 8, blocks[:1])
    assert "would exceed 6" in gate.check(third, blocks[:1], unused=0)  # 7 > 6 for the request


def test_a_chunk_item_round_trips_and_names_its_number():
    clove = _chunk_cloves(7, "seven")[0].clove
    item = decode_reply_item(encode_chunk_item(7, clove))
    assert item == ChunkClove(7, clove)
    with pytest.raises(OverlayError):
        decode_reply_item(b"S\x00")


def test_chunks_grow_so_a_bounded_number_of_blocks_covers_a_long_answer():
    config = StreamConfig(first_tokens=1, chunk_tokens=4, interval_s=0.05, growth=1.5, max_interval_s=1.0)
    sizes = [config.tokens(s) for s in range(12)]
    assert sizes[0] == 1 and sizes[1] == 4 and sizes == sorted(sizes) and sum(sizes) > 500
    assert config.wait_s(0) == 0 and config.wait_s(1) == 0.05 and config.wait_s(30) == 1.0
    with pytest.raises(OverlayError):
        StreamConfig(growth=0.5)


def test_the_buffer_cuts_the_first_chunk_at_once_and_later_ones_by_size_or_time():
    buf = ChunkBuffer("r", StreamConfig(first_tokens=1, chunk_tokens=3, interval_s=0.1, growth=1.0))
    assert buf.add(TokenChunk("r", 0, "a", (1,)), now=0.0)  # the first token is due at once
    assert buf.take() == (0, TokenChunk("r", 0, "a", (1,)))
    assert not buf.add(TokenChunk("r", 1, "b", (2,)), now=1.0)
    assert buf.due_in(1.05) == pytest.approx(0.05)  # due by time 0.1 s after its first token
    assert not buf.add(TokenChunk("r", 2, "", (3,)), now=1.06)  # text held back (a stop string?)
    assert buf.add(TokenChunk("r", 3, "cd", (4, 5)), now=1.07)  # 4 tokens >= 3: due by size
    assert buf.take() == (1, TokenChunk("r", 1, "bcd", (2, 3, 4, 5)))
    assert buf.take() is None and buf.due_in(2.0) is None
    # a merged chunk keeps its tokens' log-probabilities, texts and alternatives, in order
    top = TopLogprobs(("x", "y"), (-0.1, -2.0))
    buf.add(TokenChunk("r", 4, "x", (6,), (-0.1,), ("x",), (top,)), now=3.0)
    buf.add(TokenChunk("r", 5, "", (), (), (), ()), now=3.0)  # a tail: text, no tokens
    buf.add(TokenChunk("r", 6, "yz", (7,), (-0.5,), ("yz",), (top,)), now=3.0)
    assert buf.take() == (2, TokenChunk("r", 4, "xyz", (6, 7), (-0.1, -0.5), ("x", "yz"), (top, top)))


def test_chunks_are_released_in_order_from_any_k_cloves():
    stream, seen = _reassembly()
    first, second, third = _chunk_cloves(0, "Hel"), _chunk_cloves(1, "lo, "), _chunk_cloves(2, "world")
    for item in third[1:]:  # chunk 2 rebuilds first: held back
        stream.add(item)
    for item in second[:1] + second[2:]:  # any three of four
        stream.add(item)
    assert seen == [] and stream.rebuilt == 2
    for item in first[:3]:
        stream.add(item)
    assert seen == ["Hel", "lo, ", "world"] and stream.next_seq == 3
    stream.finish("Hello, world")
    assert seen == ["Hel", "lo, ", "world"]  # nothing left over


def test_a_chunk_that_never_rebuilds_is_filled_in_from_the_final_answer():
    stream, seen = _reassembly()
    for item in _chunk_cloves(0, "one "):
        stream.add(item)
    for item in _chunk_cloves(1, "two ")[:2]:  # only two cloves: a dead reply path too many
        stream.add(item)
    for item in _chunk_cloves(2, "three"):
        stream.add(item)
    assert seen == ["one "]
    stream.finish("one two three four")
    assert "".join(seen) == "one two three four"


def test_an_answer_that_contradicts_its_chunks_is_refused():
    stream, _ = _reassembly()
    for item in _chunk_cloves(0, "yes"):
        stream.add(item)
    with pytest.raises(OverlayError, match="contradicts"):
        stream.finish("no")


def test_mallory_cannot_slip_in_a_chunk():
    stream, seen = _reassembly()
    mallory = NodeIdentity.generate()
    for item in _chunk_cloves(0, "forged", signer=mallory):  # not the entry worker's key
        stream.add(item)
    wrong_id = [ChunkClove(1, item.clove) for item in _chunk_cloves(0, "moved")]  # renumbered
    for item in wrong_id:
        stream.add(item)
    assert seen == [] and stream.rebuilt == 0 and stream.dropped >= 2


def test_a_chunk_short_of_k_cloves_shows_as_a_stall_until_it_rebuilds():
    stream, seen = _reassembly()
    cloves = _chunk_cloves(0, "late")
    assert stream.stalled_since() is None
    stream.add(cloves[0])
    stream.add(cloves[1])
    assert stream.stalled_since() is not None and seen == []
    stream.add(cloves[3])  # a spare over a fresh path
    assert stream.stalled_since() is None and seen == ["late"]
    stream.add(cloves[2])  # the last one, late: nothing more
    assert seen == ["late"] and stream.stalled_since() is None


def _output_cloves(seq: int, out: bytes, err: bytes = b"", signer: NodeIdentity = ENTRY) -> list[ChunkClove]:
    frame = encode(RunOutput("r", out, err), signer)
    return [ChunkClove(seq, c) for c in split(frame, n=4, k=3, message_id=chunk_message_id(MID, seq))]


def test_a_containers_output_is_cut_by_bytes_and_merged_per_stream():
    buf = ChunkBuffer("r", StreamConfig(first_tokens=1, chunk_tokens=2, growth=1.0, output_bytes_per_token=4))
    assert buf.add(RunOutput("r", b"x"), now=0.0)  # the first piece is due at once
    assert buf.take() == (0, RunOutput("r", b"x"))
    assert not buf.add(RunOutput("r", b"abc"), now=1.0)  # 3 bytes: 1 token of 2
    assert buf.add(RunOutput("r", b"", b"E"), now=1.1)  # 2 tokens: due
    assert buf.take() == (1, RunOutput("r", b"abc", b"E"))
    buf.add(RunOutput("r", b"y"), now=2.0)
    with pytest.raises(OverlayError, match="TokenChunk in a stream of RunOutput"):
        buf.add(TokenChunk("r", 0, "t", (1,)), now=2.1)


def test_a_containers_output_is_released_in_order_and_checked_against_its_result():
    seen: list[tuple[bytes, bytes]] = []
    key = bytes.fromhex(ENTRY.public.sign_key.hex())
    stream = ChunkReassembly(MID, key, on_output=lambda out, err: seen.append((out, err)), kind=RunOutput)
    for item in _output_cloves(1, b"second\n", b"warn\n")[:3]:  # chunk 1 first: held back
        stream.add(item)
    for item in _chunk_cloves(2, "a token chunk"):  # not output: refused
        stream.add(item)
    assert seen == [] and stream.dropped == 1
    for item in _output_cloves(0, b"first\n")[1:]:
        stream.add(item)
    assert seen == [(b"first\n", b""), (b"second\n", b"warn\n")]
    stream.finish_output(b"first\nsecond\nlast\n", b"warn\n")
    assert seen[-1] == (b"last\n", b"") and bytes(stream.stdout) == b"first\nsecond\nlast\n"
    liar = ChunkReassembly(MID, key, kind=RunOutput)
    for item in _output_cloves(0, b"yes\n", b"err"):
        liar.add(item)
    with pytest.raises(OverlayError, match="stderr contradicts"):
        liar.finish_output(b"yes\n", b"other")
