"""Topping up a long streamed answer's chunk blocks: the token a top-up carries, and the entry
worker's check of it (``docs/paths.md`` section 9.9).

A path's chunk blocks are single-use, ``stream_blocks`` of them per path, so a long answer
outgrows them. When the chunks the client has rebuilt come within ``stream_topup_ahead`` of
the last chunk its paths have blocks for, the client sends, over each live path of the
request, one *top-up*: an envelope flagged :data:`~permamesh.overlay.envelope.TOPUP` whose
body is a :class:`TopUp` instead of a clove, with an ack block, an answer block and fresh
chunk blocks over that path reversed. The entry worker appends the chunk blocks to the path's
*lane* (named by :func:`lane_id`, a digest of the answer block the path's first envelope
carried), so the lane goes on carrying chunks exactly where it left off; a top-up naming no
lane (:data:`NEW_LANE`) opens one, for a fresh path that replaces a dead one.

Only the client and the entry worker can make a top-up: its tag is a keyed BLAKE2b under
:func:`topup_key` of the signed request frame, which only holders of k of the request's
cloves could rebuild. The tag covers the request's message id, the top-up's number and lane,
and every chunk block, so a relay that sees a top-up can neither replay it (each number is
taken once), nor move it to another lane, nor swap its blocks for its own. It spends no clove
of the request, so the request's split stays whole for resends, repairs and probes.

Bounds (:class:`TopUpLimits`, the entry's; the client has its own ``stream_max_blocks``): at
most ``max_blocks`` chunk blocks per request in top-ups, at most ``max_unused`` chunk blocks
held unused by one stream at once. :class:`TopUpGate` says why it refuses one; the inbox logs
the reason and answers nothing (a refused top-up is never acknowledged, so the client counts
that path as failed).

Who calls it: :class:`~permamesh.overlay.inflight.InFlight` (:func:`topup_key`,
:func:`make_topup`, :func:`lane_id`), :mod:`~permamesh.overlay.envelope` (:func:`encode_topup`,
:func:`decode_topup`) and :class:`permamesh.workers.inbox.Inbox` (:class:`TopUpGate`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from permamesh.overlay.errors import OverlayError, require_bytes
from permamesh.overlay.reply import ReplyBlock

log = logging.getLogger(__name__)

__all__ = ["NEW_LANE", "TOPUP_INDEX", "TopUp", "TopUpGate", "TopUpLimits", "decode_topup", "encode_topup",
           "lane_id", "make_topup", "topup_key"]

LANE_BYTES = 8
TAG_BYTES = 16
NEW_LANE = bytes(LANE_BYTES)  # the top-up opens a lane of its own (a fresh path)
TOPUP_INDEX = 255  # the clove index a top-up's ack names: no clove has it (a split has at most 255)
_BODY = struct.Struct(">16sH8s16s")  # message id, number, lane, tag


@dataclass(frozen=True)
class TopUp:
    """More chunk blocks for the streamed answer to request ``message_id``."""

    message_id: bytes  # the request's (16 bytes)
    number: int  # 0, 1, ...: each top-up of a request is taken once
    lane: bytes  # lane_id() of the lane it extends, or NEW_LANE
    tag: bytes  # topup_tag() under the request's top-up key


def topup_key(request_frame: bytes) -> bytes:
    """The key of a request's top-ups: known to whoever holds the whole signed request."""
    return hashlib.blake2b(request_frame, digest_size=32, person=b"pm-topup-key").digest()


def lane_id(answer_key: bytes) -> bytes:
    """The name of the lane opened by the envelope whose answer block's header begins with
    ``answer_key`` (its first 32 bytes, fresh per block)."""
    return hashlib.blake2b(answer_key, digest_size=LANE_BYTES, person=b"pm-lane").digest()


def topup_tag(key: bytes, message_id: bytes, number: int, lane: bytes, blocks: Sequence[ReplyBlock]) -> bytes:
    mac = hashlib.blake2b(key=key, digest_size=TAG_BYTES, person=b"pm-topup")
    mac.update(_BODY.pack(message_id, number, lane, bytes(TAG_BYTES)))
    for block in blocks:
        mac.update(block.to_bytes())
    return mac.digest()


def make_topup(key: bytes, message_id: bytes, number: int, lane: bytes, blocks: Sequence[ReplyBlock]) -> TopUp:
    if not 0 <= number < 1 << 16 or len(lane) != LANE_BYTES:
        raise OverlayError(f"top-up number {number} out of range or lane not {LANE_BYTES} bytes")
    return TopUp(message_id, number, lane, topup_tag(key, message_id, number, lane, blocks))


def encode_topup(topup: TopUp) -> bytes:
    return _BODY.pack(topup.message_id, topup.number, topup.lane, topup.tag)


def decode_topup(data: object) -> TopUp:
    data = require_bytes(data, "top-up", _BODY.size, _BODY.size)
    return TopUp(*_BODY.unpack(data))


@dataclass(frozen=True)
class TopUpLimits:
    """What one streamed job takes in top-ups (the entry worker's bounds)."""

    max_blocks: int = 1024  # chunk blocks in all top-ups of one request
    max_unused: int = 256  # chunk blocks one stream may hold unused at once, top-up included

    def __post_init__(self) -> None:
        if self.max_blocks < 0 or self.max_unused < 1:
            raise OverlayError("top-up limits must be >= 0 blocks (>= 1 unused)")


class TopUpGate:
    """The entry worker's check of one streamed job's top-ups (event-loop thread):
    :meth:`check` says why a top-up is refused (a sentence) or None; :meth:`take` records one
    that was let in."""

    def __init__(self, key: bytes, limits: TopUpLimits = TopUpLimits()) -> None:
        self.key, self.limits = key, limits
        self.numbers: set[int] = set()  # top-ups taken (bounded: each brings >= 1 block)
        self.blocks = 0  # chunk blocks taken in top-ups

    def check(self, topup: TopUp, blocks: Sequence[ReplyBlock], unused: int) -> str | None:
        """``unused``: chunk blocks the job's stream holds unused now."""
        expected = topup_tag(self.key, topup.message_id, topup.number, topup.lane, blocks)
        if not hmac.compare_digest(expected, topup.tag):
            return "its tag does not verify (not made by the request's sender, or altered)"
        if topup.number in self.numbers:
            return f"top-up {topup.number} was already taken (a replay)"
        if self.blocks + len(blocks) > self.limits.max_blocks:
            return (f"{len(blocks)} more chunk blocks would exceed {self.limits.max_blocks} "
                    f"for one request ({self.blocks} taken)")
        if unused + len(blocks) > self.limits.max_unused:
            return f"the stream would hold {unused + len(blocks)} unused chunk blocks (at most {self.limits.max_unused})"
        return None

    def take(self, topup: TopUp, blocks: Sequence[ReplyBlock]) -> None:
        self.numbers.add(topup.number)
        self.blocks += len(blocks)
