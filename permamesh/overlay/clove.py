"""One S-IDA clove, its content fingerprint, and its compact binary framing.

A :class:`Clove` is what one onion path carries for one message: share ``index`` of ``n``
(any ``k`` rebuild), a Shamir share of the message key and an erasure-coded share of the
ciphertext, plus the fingerprint vector of all n cloves of the message. The vector lets a
rebuilder tell an honest clove from a forged or corrupted one before combining anything.

Wire format, version 1 (big-endian; 31-byte header, then the variable parts)::

    magic 0xC7 | version 0x01 | message_id 16s | index B | n B | k B | codec B
    | ciphertext_length I | key_share_length B | data_share_length I
    | n fingerprints of 16 bytes | key_share | data_share

Every field is checked: lengths must add up exactly, ``index < n``, ``k <= n``, the codec must
be known, the key share is 32 bytes, the data share is ``ceil(ciphertext_length / k)`` bytes
and messages are at most :data:`MAX_MESSAGE_BYTES`. Anything else raises
:class:`~permamesh.overlay.errors.OverlayError` with the reason, so a relay or worker
can treat a bad clove from a peer as an expected outcome.

A clove's fingerprint is the first 16 bytes of SHA-256 over a domain tag, the header fields
(all but magic and version) and both shares, so it commits to everything in the clove but
the vector itself.

Callers: :mod:`permamesh.overlay.sida` builds and checks cloves; the relay and client
call :func:`encode_clove` before onion-wrapping and :func:`decode_clove` after the last layer.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import dataclass

from permamesh.overlay.erasure import check_params, get_codec, share_length
from permamesh.overlay.errors import OverlayError, require_bytes

logger = logging.getLogger(__name__)

MAGIC = 0xC7
VERSION = 1
MESSAGE_ID_BYTES = 16
KEY_BYTES = 32  # ChaCha20-Poly1305 key, so also each Shamir key share
TAG_BYTES = 16  # Poly1305 tag: ciphertext length = message length + 16
FINGERPRINT_BYTES = 16  # truncated SHA-256
MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB of plaintext per message
MAX_CIPHERTEXT_BYTES = MAX_MESSAGE_BYTES + TAG_BYTES
_DOMAIN = b"permamesh/sida-clove/v1\0"

_FIELDS = struct.Struct(">16sBBBBIBI")  # message_id .. data_share_length
_PREFIX = struct.Struct(">BB")  # magic, version
HEADER_BYTES = _PREFIX.size + _FIELDS.size
MAX_CLOVE_BYTES = HEADER_BYTES + 255 * FINGERPRINT_BYTES + KEY_BYTES + MAX_CIPHERTEXT_BYTES


@dataclass(frozen=True, slots=True)
class Clove:
    """Share ``index`` of an S-IDA-split message. Construction validates every field."""

    message_id: bytes  # 16 random bytes naming the message; also the AEAD associated data
    index: int  # 0..n-1; the Shamir x-coordinate is index + 1
    n: int  # cloves made
    k: int  # cloves needed to rebuild
    codec_id: int  # erasure codec wire id (1 zfec, 2 reedsolo)
    ciphertext_length: int  # bytes of ciphertext incl. the 16-byte tag
    key_share: bytes  # Shamir share of the 32-byte key
    data_share: bytes  # erasure-coded share of the ciphertext
    fingerprints: tuple[bytes, ...]  # fingerprint of each of the n cloves, by index

    def __post_init__(self) -> None:
        if not isinstance(self.message_id, bytes) or len(self.message_id) != MESSAGE_ID_BYTES:
            raise OverlayError(f"clove message_id must be {MESSAGE_ID_BYTES} bytes")
        check_params(self.k, self.n)
        if not isinstance(self.index, int) or not 0 <= self.index < self.n:
            raise OverlayError(f"clove index {self.index!r} outside 0..{self.n - 1}")
        if not isinstance(self.codec_id, int):
            raise OverlayError("clove codec_id must be an int")
        get_codec(self.codec_id)
        length = self.ciphertext_length
        if not isinstance(length, int) or not TAG_BYTES <= length <= MAX_CIPHERTEXT_BYTES:
            raise OverlayError(
                f"clove ciphertext length {length!r} outside {TAG_BYTES}..{MAX_CIPHERTEXT_BYTES}"
            )
        if not isinstance(self.key_share, bytes) or len(self.key_share) != KEY_BYTES:
            raise OverlayError(f"clove key share must be {KEY_BYTES} bytes")
        size = share_length(length, self.k)
        if not isinstance(self.data_share, bytes) or len(self.data_share) != size:
            raise OverlayError(f"clove data share must be {size} bytes for this length and k")
        fps = self.fingerprints
        if not isinstance(fps, tuple) or len(fps) != self.n:
            raise OverlayError(f"clove must carry a tuple of {self.n} fingerprints")
        if not all(isinstance(f, bytes) and len(f) == FINGERPRINT_BYTES for f in fps):
            raise OverlayError(f"clove fingerprints must each be {FINGERPRINT_BYTES} bytes")

    def content_fingerprint(self) -> bytes:
        """The fingerprint of this clove's own content (everything but the vector)."""
        return fingerprint(
            self.message_id,
            self.index,
            self.n,
            self.k,
            self.codec_id,
            self.ciphertext_length,
            self.key_share,
            self.data_share,
        )

    def is_self_consistent(self) -> bool:
        """True if the vector's entry for this clove's index matches its content."""
        return self.fingerprints[self.index] == self.content_fingerprint()


def fingerprint(
    message_id: bytes,
    index: int,
    n: int,
    k: int,
    codec_id: int,
    ciphertext_length: int,
    key_share: bytes,
    data_share: bytes,
) -> bytes:
    """Truncated SHA-256 over the domain tag, the header fields and both shares."""
    fields = _FIELDS.pack(
        message_id, index, n, k, codec_id, ciphertext_length, len(key_share), len(data_share)
    )
    digest = hashlib.sha256(_DOMAIN)
    digest.update(fields)
    digest.update(key_share)
    digest.update(data_share)
    return digest.digest()[:FINGERPRINT_BYTES]


def encode_clove(clove: Clove) -> bytes:
    """The version-1 binary form of ``clove`` (see the module docstring)."""
    if not isinstance(clove, Clove):
        raise OverlayError(f"can only encode a Clove, got {type(clove).__name__}")
    return b"".join(
        (
            _PREFIX.pack(MAGIC, VERSION),
            _FIELDS.pack(
                clove.message_id,
                clove.index,
                clove.n,
                clove.k,
                clove.codec_id,
                clove.ciphertext_length,
                len(clove.key_share),
                len(clove.data_share),
            ),
            *clove.fingerprints,
            clove.key_share,
            clove.data_share,
        )
    )


def decode_clove(data: bytes) -> Clove:
    """Parse and validate one clove; any defect raises :class:`OverlayError` with a reason."""
    data = require_bytes(data, "clove", HEADER_BYTES, MAX_CLOVE_BYTES)
    magic, version = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise OverlayError(f"not a clove: magic byte 0x{magic:02x}")
    if version != VERSION:
        raise OverlayError(f"unsupported clove version {version}")
    message_id, index, n, k, codec_id, length, key_len, data_len = _FIELDS.unpack_from(
        data, _PREFIX.size
    )
    if key_len != KEY_BYTES:
        raise OverlayError(f"clove key share length {key_len}, expected {KEY_BYTES}")
    if n < 1 or not TAG_BYTES <= length <= MAX_CIPHERTEXT_BYTES or not 1 <= k <= n:
        raise OverlayError(f"clove header out of range: n={n} k={k} length={length}")
    if data_len != share_length(length, k):
        raise OverlayError(f"clove data share length {data_len} does not fit length and k")
    expected = HEADER_BYTES + n * FINGERPRINT_BYTES + key_len + data_len
    if len(data) != expected:
        raise OverlayError(f"clove is {len(data)} bytes, its header says {expected}")
    offset = HEADER_BYTES
    fps = tuple(
        data[offset + i * FINGERPRINT_BYTES : offset + (i + 1) * FINGERPRINT_BYTES]
        for i in range(n)
    )
    offset += n * FINGERPRINT_BYTES
    key_share = data[offset : offset + key_len]
    data_share = data[offset + key_len :]
    return Clove(message_id, index, n, k, codec_id, length, key_share, data_share, fps)
