"""Socket framing: uvarint length + body, fed in arbitrary chunks, hostile input refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.committee.abci.framing import (
    FrameDecoder,
    FramingConfig,
    encode_frame,
    encode_uvarint,
    frame_limit_for_block,
    uvarint_size,
)
from permamesh.committee.errors import ProtocolError


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),  # unsigned: zigzag would give 0x80 0x02
        (300, b"\xac\x02"),
        (2**64 - 1, b"\xff" * 9 + b"\x01"),
    ],
)
def test_uvarint_matches_protobuf_encoding(value, encoded):
    assert encode_uvarint(value) == encoded


@pytest.mark.parametrize("value", [0, 1, 127, 128, 16_383, 16_384, 2**21 - 1, 2**21, 2**63, 2**64 - 1])
def test_uvarint_size_is_the_encoded_length(value):
    assert uvarint_size(value) == len(encode_uvarint(value))


def test_round_trip_several_frames_in_one_chunk():
    bodies = [b"", b"a", b"hello", bytes(range(256)) * 3]
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder()
    assert decoder.feed(stream) == bodies
    assert decoder.at_boundary


def test_one_byte_at_a_time():
    bodies = [b"x" * 200, b"", b"yz"]  # 200 needs a two-byte prefix
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder()
    out: list[bytes] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
        if i < len(stream) - 1:
            assert len(out) < len(bodies)
    assert out == bodies
    assert decoder.at_boundary


def test_partial_frame_is_held_back():
    decoder = FrameDecoder()
    assert decoder.feed(b"\x05abc") == []
    assert not decoder.at_boundary and decoder.buffered == 3
    assert decoder.feed(b"de\x00") == [b"abcde", b""]


def test_oversized_frame_rejected_from_the_prefix_alone():
    decoder = FrameDecoder(FramingConfig(max_message_bytes=10))
    assert decoder.feed(encode_frame(b"x" * 10)) == [b"x" * 10]
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(encode_uvarint(11))  # no body sent: refused before buffering it
    assert decoder.buffered == 0


def test_default_limit_is_64_mib():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(encode_uvarint(64 * 1024 * 1024 + 1))


def test_a_limit_callable_is_asked_at_every_frame():
    """The server's limit rises once InitChain tells the app the block size, on connections
    CometBFT opened before that."""
    limit = [4]
    decoder = FrameDecoder(limit=lambda: limit[0])
    assert decoder.feed(encode_frame(b"abcd")) == [b"abcd"]
    limit[0] = 6
    assert decoder.feed(encode_frame(b"abcdef")) == [b"abcdef"]
    with pytest.raises(ProtocolError, match="7 bytes exceeds the 6-byte limit"):
        decoder.feed(encode_uvarint(7))


MIB = 1024 * 1024


@pytest.mark.parametrize(
    "max_bytes, limit",
    [
        (-1, 104_857_600 + 8 * MIB),  # CometBFT's MaxBlockSizeBytes when block.max_bytes is -1
        (104_857_600, 104_857_600 + 8 * MIB),  # the largest block.max_bytes CometBFT accepts
        (80 * MIB, 88 * MIB),
        (56 * MIB + 1, 64 * MIB + 1),
        (56 * MIB, 64 * MIB),  # never below the old 64 MiB default
        (22_020_096, 64 * MIB),  # CometBFT's default genesis (21 MiB)
        (1, 64 * MIB),
        (0, None),  # proto3's "not set": no information
        (-2, None),  # values CometBFT itself refuses
        (104_857_601, None),
    ],
)
def test_frame_limit_follows_block_max_bytes(max_bytes, limit):
    assert frame_limit_for_block(max_bytes) == limit


def test_overlong_varint_rejected():
    with pytest.raises(ProtocolError, match="longer than 10"):
        FrameDecoder().feed(b"\x80" * 11)
    decoder = FrameDecoder()
    decoder.feed(b"\x80" * 5)  # still partial, fine so far
    with pytest.raises(ProtocolError, match="longer than 10"):
        decoder.feed(b"\x80" * 5)


def test_varint_overflowing_64_bits_rejected():
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(b"\xff" * 9 + b"\x02")


def test_decoder_stays_poisoned_after_an_error():
    decoder = FrameDecoder(FramingConfig(max_message_bytes=1))
    with pytest.raises(ProtocolError):
        decoder.feed(b"\x05")
    with pytest.raises(ProtocolError):
        decoder.feed(encode_frame(b"a"))


def test_config_rejects_nonpositive_limit():
    with pytest.raises(ValueError):
        FramingConfig(max_message_bytes=0)
    with pytest.raises(ValueError):  # CometBFT never sends more than math.MaxInt32
        FramingConfig(max_message_bytes=2**31)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048), cuts=st.lists(st.integers(0, 2048), max_size=8))
def test_fuzz_random_bytes_only_protocol_error_escapes(data, cuts):
    decoder = FrameDecoder(FramingConfig(max_message_bytes=4096))
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    try:
        for start, end in zip(points, points[1:]):
            for body in decoder.feed(data[start:end]):
                assert len(body) <= 4096
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=300), max_size=10),
    cuts=st.lists(st.integers(0, 4000), max_size=10),
)
def test_fuzz_round_trip_under_any_chunking(bodies, cuts):
    stream = b"".join(encode_frame(b) for b in bodies)
    points = sorted({0, len(stream), *(c for c in cuts if c <= len(stream))})
    decoder = FrameDecoder()
    out: list[bytes] = []
    for start, end in zip(points, points[1:]):
        out += decoder.feed(stream[start:end])
    assert out == bodies
