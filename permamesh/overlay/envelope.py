"""What rides inside onion cells between clients and entry workers (binary, versioned).

Forward, a proxy's exit payload is an *envelope*: one encoded clove plus the reply blocks the
entry worker answers it with (an ack block, an answer block, then up to
:data:`MAX_CHUNK_BLOCKS` *chunk blocks* for a streamed answer; all built by the client over the
reverse of the clove's path). Back, each sealed reply carries one *reply item*: an
acknowledgement of one clove, one clove of the answer, or one clove of a streamed chunk
(``docs/paths.md`` section 9).

Layouts (big-endian):

- envelope: ``version (1) | flags (1) | block count (1) | body length (4) | body | blocks
  (577 each)``; block count 0 (no reply), or 2 + the chunk blocks (ack, answer, chunk 0, chunk
  1, ...); the body is one clove, or with the flag :data:`TOPUP` a
  :class:`~permamesh.overlay.topup.TopUp` (more chunk blocks for a streamed answer, at least
  one); every other flag bit is 0 (bit 0, once ``EXTEND``, is retired: extending paths spent
  the request's cloves)
- ack item: ``b"A" | message id (16) | clove index (1) | status (1)``
- answer item: ``b"C" | encoded clove``
- chunk item: ``b"S" | chunk sequence number (2) | encoded clove``; the clove's message id is
  :func:`chunk_message_id` of the request's id and the sequence number

Who calls it: the overlay client (:mod:`~permamesh.overlay.sender`) builds envelopes
and reads reply items; the entry worker's inbox (:mod:`permamesh.workers.inbox`) reads
envelopes and builds reply items. Every parse is strict and raises :class:`OverlayError`.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import dataclass

from permamesh.overlay.clove import MAX_CLOVE_BYTES, Clove, decode_clove, encode_clove
from permamesh.overlay.errors import OverlayError, require_bytes
from permamesh.overlay.reply import REPLY_BLOCK_BYTES, ReplyBlock
from permamesh.overlay.topup import TopUp, decode_topup, encode_topup

log = logging.getLogger(__name__)

VERSION = 2
TOPUP = 0x02  # flag: the body is a TopUp, not a clove (docs/paths.md 9.9)
MAX_CHUNK_BLOCKS = 16  # chunk blocks per envelope, at most (a streamed answer's chunks per path)
MAX_BLOCKS = 2 + MAX_CHUNK_BLOCKS  # an ack block, an answer block, the chunk blocks
MESSAGE_ID_BYTES = 16
_HEAD = struct.Struct(">BBBI")
_ACK = struct.Struct(">c16sBB")
_SEQ = struct.Struct(">H")

# ack status: what the entry worker knows of the message when a clove arrives
HELD = 0  # kept; fewer than k valid cloves so far
STARTED = 1  # rebuilt: the job runs (or ran)
ANSWERED = 2  # the answer is ready; an answer clove follows on this clove's answer block
STATUSES = (HELD, STARTED, ANSWERED)


@dataclass(frozen=True)
class Envelope:
    clove: Clove | None  # None in a top-up
    ack_block: ReplyBlock | None
    answer_block: ReplyBlock | None
    chunk_blocks: tuple[ReplyBlock, ...] = ()  # for a streamed answer's chunks, used in order
    topup: TopUp | None = None  # a top-up's token (then there is no clove)


def encode_envelope(clove: Clove, ack_block: ReplyBlock | None, answer_block: ReplyBlock | None,
                    chunk_blocks: tuple[ReplyBlock, ...] = ()) -> bytes:
    if (ack_block is None) != (answer_block is None):
        raise OverlayError("an envelope carries both reply blocks or neither")
    if chunk_blocks and ack_block is None:
        raise OverlayError("chunk blocks ride only with an ack and an answer block")
    return _encode(0, encode_clove(clove), (ack_block, answer_block, *chunk_blocks) if ack_block else ())


def encode_topup_envelope(topup: TopUp, ack_block: ReplyBlock, answer_block: ReplyBlock,
                          chunk_blocks: tuple[ReplyBlock, ...]) -> bytes:
    """A top-up (:mod:`~permamesh.overlay.topup`): its token and its blocks, at least one chunk block."""
    if not chunk_blocks:
        raise OverlayError("a top-up carries at least one chunk block")
    return _encode(TOPUP, encode_topup(topup), (ack_block, answer_block, *chunk_blocks))


def _encode(flags: int, body: bytes, blocks: tuple[ReplyBlock, ...]) -> bytes:
    if len(blocks) > MAX_BLOCKS:
        raise OverlayError(f"an envelope carries at most {MAX_CHUNK_BLOCKS} chunk blocks")
    return _HEAD.pack(VERSION, flags, len(blocks), len(body)) + body + b"".join(b.to_bytes() for b in blocks)


def decode_envelope(data: object) -> Envelope:
    data = require_bytes(data, "envelope", _HEAD.size, _HEAD.size + MAX_CLOVE_BYTES + MAX_BLOCKS * REPLY_BLOCK_BYTES)
    version, flags, count, length = _HEAD.unpack_from(data)
    if version != VERSION:
        raise OverlayError(f"envelope rejected: version {version}, expected {VERSION}")
    if flags & ~TOPUP:
        raise OverlayError(f"envelope rejected: unknown flags {flags:#04x}")
    if count != 0 and not 2 <= count <= MAX_BLOCKS:
        raise OverlayError(f"envelope rejected: {count} reply blocks, expected 0 or 2..{MAX_BLOCKS}")
    if len(data) != _HEAD.size + length + count * REPLY_BLOCK_BYTES:
        raise OverlayError(f"envelope rejected: {len(data)} bytes do not match its lengths")
    if flags & TOPUP and count <= 2:
        raise OverlayError("envelope rejected: a top-up without chunk blocks")
    body = data[_HEAD.size:_HEAD.size + length]
    at = _HEAD.size + length
    blocks = [ReplyBlock.from_bytes(data[at + i * REPLY_BLOCK_BYTES:at + (i + 1) * REPLY_BLOCK_BYTES]) for i in range(count)]
    if flags & TOPUP:
        return Envelope(None, blocks[0], blocks[1], tuple(blocks[2:]), decode_topup(body))
    clove = decode_clove(body)
    if not blocks:
        return Envelope(clove, None, None)
    return Envelope(clove, blocks[0], blocks[1], tuple(blocks[2:]))


@dataclass(frozen=True)
class Ack:
    message_id: bytes
    index: int  # the clove acknowledged
    status: int  # HELD, STARTED or ANSWERED


def encode_ack(ack: Ack) -> bytes:
    if len(ack.message_id) != MESSAGE_ID_BYTES or not 0 <= ack.index < 256 or ack.status not in STATUSES:
        raise OverlayError("malformed ack")
    return _ACK.pack(b"A", ack.message_id, ack.index, ack.status)


def encode_answer_item(clove: Clove) -> bytes:
    return b"C" + encode_clove(clove)


@dataclass(frozen=True)
class ChunkClove:
    """One clove of chunk ``seq`` of a streamed answer."""

    seq: int  # the chunk's place in the answer, from 0
    clove: Clove


def chunk_message_id(message_id: bytes, seq: int) -> bytes:
    """The message id of chunk ``seq`` of the answer to ``message_id`` (both ends derive it)."""
    return hashlib.blake2b(message_id + _SEQ.pack(seq), digest_size=MESSAGE_ID_BYTES,
                           person=b"pm-chunk").digest()


def encode_chunk_item(seq: int, clove: Clove) -> bytes:
    if not 0 <= seq < 1 << 16:
        raise OverlayError(f"chunk sequence number {seq} out of range")
    return b"S" + _SEQ.pack(seq) + encode_clove(clove)


def decode_reply_item(data: object) -> Ack | Clove | ChunkClove:
    """An opened reply's content: an :class:`Ack`, an answer :class:`Clove` or a
    :class:`ChunkClove`."""
    data = require_bytes(data, "reply item", 1, 1 + MAX_CLOVE_BYTES)
    if data[:1] == b"A":
        if len(data) != _ACK.size:
            raise OverlayError(f"ack rejected: {len(data)} bytes, expected {_ACK.size}")
        _, mid, index, status = _ACK.unpack(data)
        if status not in STATUSES:
            raise OverlayError(f"ack rejected: unknown status {status}")
        return Ack(mid, index, status)
    if data[:1] == b"C":
        return decode_clove(data[1:])
    if data[:1] == b"S":
        if len(data) < 1 + _SEQ.size:
            raise OverlayError("chunk item rejected: truncated")
        (seq,) = _SEQ.unpack_from(data, 1)
        return ChunkClove(seq, decode_clove(data[1 + _SEQ.size:]))
    raise OverlayError(f"reply item rejected: unknown kind {data[:1]!r}")
