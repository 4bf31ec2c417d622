"""CometBFT ABCI socket framing: a uvarint byte length, then that many protobuf bytes.

Who calls what: the socket server (``server.py``) feeds every chunk it reads from a
connection into a :class:`FrameDecoder` and parses each complete body as a ``Request``;
it writes ``Response`` messages with :func:`encode_frame`. The blocking
``SocketClient`` (``client.py``) does the mirror image.

The framing fact, checked against CometBFT v0.38 source: ``abci/types/messages.go``
``WriteMessage`` / ``ReadMessage`` use ``libs/protoio.NewDelimitedWriter`` /
``NewDelimitedReader``, and ``libs/protoio/writer.go`` writes the length with Go's
``binary.PutUvarint`` (reader: ``binary.ReadUvarint``). So the prefix is an *unsigned*
protobuf-style varint (7 bits per byte, least significant group first, high bit =
"more"), not the zigzag signed varint that Tendermint 0.34 used. ``messages.go`` caps a
message at ``math.MaxInt32``; we cap lower and check the cap as soon as the length prefix
is complete, before buffering any of the body, so a hostile peer cannot make us allocate
more than the cap. Nothing is reserved from the announced length: the buffer holds only the
bytes that have arrived, so a peer announcing a huge frame and trickling it costs what it
sent.

The cap: 64 MiB by default, raised to fit the chain's blocks once the app knows its
consensus params (:func:`frame_limit_for_block`). A FinalizeBlock request carries a whole
block, and CometBFT allows blocks of ``block.max_bytes`` bytes, or 100 MiB
(``types.MaxBlockSizeBytes``) when ``block.max_bytes`` is -1; a frame limit below that
would make the server hang up on a legitimate block, which CometBFT treats as fatal.

Bad input from a peer is an expected outcome: every malformation raises
:class:`~permamesh.committee.errors.ProtocolError` and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from permamesh.committee.errors import ProtocolError

log = logging.getLogger(__name__)

MAX_VARINT_BYTES = 10  # a uint64 needs at most ceil(64 / 7) = 10 varint bytes
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the floor: never refuse what this allowed
MAX_FRAME_BYTES = 2**31 - 1  # CometBFT's own cap (abci/types/messages.go maxMsgSize)
MAX_BLOCK_SIZE_BYTES = 104_857_600  # CometBFT types.MaxBlockSizeBytes (block.max_bytes = -1)
# Room for a block-carrying request's other fields (commit info, misbehavior, header
# fields): a FinalizeBlock holds no more than the block itself, and CometBFT caps the
# validator set at 10,000 (about 40 bytes of commit info each).
REQUEST_HEADROOM_BYTES = 8 * 1024 * 1024


def frame_limit_for_block(max_bytes: int) -> int | None:
    """The frame limit for requests on a chain whose ``block.max_bytes`` is ``max_bytes``.

    -1 means CometBFT's largest block (100 MiB); a positive value is the block size
    itself. Either way we add :data:`REQUEST_HEADROOM_BYTES` and never go below
    :data:`DEFAULT_MAX_MESSAGE_BYTES`. Anything else (0 is proto3's "not set"; CometBFT
    rejects other values) returns None: no information, keep the default.
    """
    if max_bytes == -1:
        block = MAX_BLOCK_SIZE_BYTES
    elif 0 < max_bytes <= MAX_BLOCK_SIZE_BYTES:
        block = max_bytes
    else:
        return None
    return max(DEFAULT_MAX_MESSAGE_BYTES, block + REQUEST_HEADROOM_BYTES)


@dataclass(frozen=True)
class FramingConfig:
    """Limits applied to every incoming frame."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # bytes of protobuf body per frame

    def __post_init__(self) -> None:
        if not 1 <= self.max_message_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"max_message_bytes must be in 1..{MAX_FRAME_BYTES}")


def encode_uvarint(value: int) -> bytes:
    """The unsigned varint encoding of ``value`` (0 <= value < 2**64)."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"uvarint out of range: {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def uvarint_size(value: int) -> int:
    """How many bytes :func:`encode_uvarint` writes for ``value``."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"uvarint out of range: {value}")
    return max(1, (value.bit_length() + 6) // 7)


def encode_frame(body: bytes) -> bytes:
    """One frame: ``uvarint(len(body)) + body``."""
    return encode_uvarint(len(body)) + body


def encode_message(message: object) -> bytes:
    """Frame a protobuf message (anything with ``SerializeToString``)."""
    return encode_frame(message.SerializeToString())  # type: ignore[attr-defined]


class FrameDecoder:
    """Incremental decoder: feed arbitrary chunks, get back complete frame bodies.

    State survives across :meth:`feed` calls, so a frame may arrive one byte at a time.
    After a :class:`ProtocolError` the decoder is poisoned (the stream has lost sync and
    the connection must be closed); further feeds raise again.

    ``limit``, when given, is asked for the cap each time a length prefix completes (the
    server's limit can rise after InitChain, on connections opened before it); otherwise
    the cap is ``config.max_message_bytes``.
    """

    def __init__(
        self, config: FramingConfig | None = None, limit: Callable[[], int] | None = None
    ) -> None:
        fixed = (config or FramingConfig()).max_message_bytes
        self._limit = limit or (lambda: fixed)
        self._buf = bytearray()
        self._need: int | None = None  # body length once the prefix is complete
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a complete frame."""
        return len(self._buf)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending (a clean place for the stream to end)."""
        return not self._buf and self._need is None

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every frame body it completed, in order."""
        return list(self.iter_feed(data))

    def iter_feed(self, data: bytes) -> Iterator[bytes]:
        if self._error is not None:
            raise self._error
        self._buf += data
        try:
            while True:
                if self._need is None:
                    self._need = self._parse_prefix()
                    if self._need is None:
                        return
                if len(self._buf) < self._need:
                    return
                if len(self._buf) == self._need:  # the common case: hand over the buffer whole
                    body, self._buf = bytes(self._buf), bytearray()
                else:
                    with memoryview(self._buf) as view:  # one copy, not a slice then a copy
                        body = bytes(view[: self._need])
                    del self._buf[: self._need]
                self._need = None
                yield body
        except ProtocolError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def _parse_prefix(self) -> int | None:
        """Consume a complete length prefix from the buffer, or return None if partial."""
        value = 0
        for i, byte in enumerate(self._buf):
            if i >= MAX_VARINT_BYTES:
                raise ProtocolError("frame length varint longer than 10 bytes")
            value |= (byte & 0x7F) << (7 * i)
            if byte & 0x80:
                continue
            if i == MAX_VARINT_BYTES - 1 and byte > 1:
                raise ProtocolError("frame length varint overflows 64 bits")
            cap = self._limit()
            if value > cap:
                raise ProtocolError(f"frame of {value} bytes exceeds the {cap}-byte limit")
            del self._buf[: i + 1]
            return value
        if len(self._buf) >= MAX_VARINT_BYTES:
            raise ProtocolError("frame length varint longer than 10 bytes")
        return None
