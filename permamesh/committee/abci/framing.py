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
message at ``math.MaxInt32``; we cap far lower (64 MiB by default) and check the cap as
soon as the length prefix is complete, before buffering any of the body, so a hostile
peer cannot make us allocate more than the cap.

Bad input from a peer is an expected outcome: every malformation raises
:class:`~permamesh.committee.errors.ProtocolError` and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from permamesh.committee.errors import ProtocolError

log = logging.getLogger(__name__)

MAX_VARINT_BYTES = 10  # a uint64 needs at most ceil(64 / 7) = 10 varint bytes
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class FramingConfig:
    """Limits applied to every incoming frame."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # bytes of protobuf body per frame

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")


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
    """

    def __init__(self, config: FramingConfig | None = None) -> None:
        self._max = (config or FramingConfig()).max_message_bytes
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
                body = bytes(self._buf[: self._need])
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
            if value > self._max:
                raise ProtocolError(
                    f"frame of {value} bytes exceeds the {self._max}-byte limit"
                )
            del self._buf[: i + 1]
            return value
        if len(self._buf) >= MAX_VARINT_BYTES:
            raise ProtocolError("frame length varint longer than 10 bytes")
        return None
