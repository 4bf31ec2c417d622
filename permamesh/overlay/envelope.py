"""What rides inside onion cells between clients and entry workers (binary, versioned).

Forward, a proxy's exit payload is an *envelope*: one encoded clove plus the reply blocks the
entry worker answers it with (an ack block, then an answer block; both built by the client over
the reverse of the clove's path). Back, each sealed reply carries one *reply item*: an
acknowledgement of one clove, or one clove of the answer.

Layouts (big-endian):

- envelope: ``version (1) | block count (1) | clove length (4) | clove | blocks (577 each)``
- ack item: ``b"A" | message id (16) | clove index (1) | status (1)``
- answer item: ``b"C" | encoded clove``

Who calls it: the overlay client (:mod:`~permamesh.overlay.sender`) builds envelopes
and reads reply items; the entry worker's inbox (:mod:`permamesh.workers.inbox`) reads
envelopes and builds reply items. Every parse is strict and raises :class:`OverlayError`.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from permamesh.overlay.clove import MAX_CLOVE_BYTES, Clove, decode_clove, encode_clove
from permamesh.overlay.errors import OverlayError, require_bytes
from permamesh.overlay.reply import REPLY_BLOCK_BYTES, ReplyBlock

log = logging.getLogger(__name__)

VERSION = 1
MAX_BLOCKS = 2  # an ack block and an answer block
MESSAGE_ID_BYTES = 16
_HEAD = struct.Struct(">BBI")
_ACK = struct.Struct(">c16sBB")

# ack status: what the entry worker knows of the message when a clove arrives
HELD = 0  # kept; fewer than k valid cloves so far
STARTED = 1  # rebuilt: the job runs (or ran)
ANSWERED = 2  # the answer is ready; an answer clove follows on this clove's answer block
STATUSES = (HELD, STARTED, ANSWERED)


@dataclass(frozen=True)
class Envelope:
    clove: Clove
    ack_block: ReplyBlock | None
    answer_block: ReplyBlock | None


def encode_envelope(clove: Clove, ack_block: ReplyBlock | None, answer_block: ReplyBlock | None) -> bytes:
    if (ack_block is None) != (answer_block is None):
        raise OverlayError("an envelope carries both reply blocks or neither")
    body = encode_clove(clove)
    blocks = [b.to_bytes() for b in (ack_block, answer_block) if b is not None]
    return _HEAD.pack(VERSION, len(blocks), len(body)) + body + b"".join(blocks)


def decode_envelope(data: object) -> Envelope:
    data = require_bytes(data, "envelope", _HEAD.size, _HEAD.size + MAX_CLOVE_BYTES + MAX_BLOCKS * REPLY_BLOCK_BYTES)
    version, count, length = _HEAD.unpack_from(data)
    if version != VERSION:
        raise OverlayError(f"envelope rejected: version {version}, expected {VERSION}")
    if count not in (0, MAX_BLOCKS):
        raise OverlayError(f"envelope rejected: {count} reply blocks, expected 0 or {MAX_BLOCKS}")
    if len(data) != _HEAD.size + length + count * REPLY_BLOCK_BYTES:
        raise OverlayError(f"envelope rejected: {len(data)} bytes do not match its lengths")
    clove = decode_clove(data[_HEAD.size:_HEAD.size + length])
    at = _HEAD.size + length
    blocks = [ReplyBlock.from_bytes(data[at + i * REPLY_BLOCK_BYTES:at + (i + 1) * REPLY_BLOCK_BYTES]) for i in range(count)]
    return Envelope(clove, *(blocks or (None, None)))


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


def decode_reply_item(data: object) -> Ack | Clove:
    """An opened reply's content: an :class:`Ack` or an answer :class:`Clove`."""
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
    raise OverlayError(f"reply item rejected: unknown kind {data[:1]!r}")
