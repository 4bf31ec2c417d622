"""Erasure codes for S-IDA: n equal-length shares of a byte string, any k of which rebuild it.

:class:`ErasureCodec` is the interface; :func:`get_codec` finds one by name or wire id.

- :class:`ZfecCodec` (``"zfec"``, wire id 1): zfec's Reed-Solomon over GF(2^8) in C. The
  default and the only one fit for the data path (microseconds for a 4 KB message).
- :class:`ReedSoloCodec` (``"reedsolo"``, wire id 2): the pure-Python ``reedsolo`` package,
  one RS codeword per byte column. Kept so the benchmark can show why zfec is the default
  (it is thousands of times slower); never chosen by the relay or the client.

Both are systematic and split the same way: the input is padded with zeros to k blocks of
``share_length(len(data), k)`` bytes; shares ``0..k-1`` are those blocks, shares ``k..n-1``
are parity. Callers: :mod:`permamesh.overlay.sida` (``encode`` in ``split``,
``decode`` in the rebuilder) and :mod:`permamesh.bench.codecs`. Every bad argument raises
:class:`~permamesh.overlay.errors.OverlayError` saying which and why.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping

import zfec

from permamesh.overlay.errors import OverlayError

logger = logging.getLogger(__name__)

MAX_SHARES = 255  # n and k are at most this (GF(2^8) has 255 non-zero evaluation points)


def share_length(length: int, k: int) -> int:
    """Bytes in each share of a ``length``-byte input cut into ``k`` blocks (ceil division)."""
    return -(-length // k)


def check_params(k: object, n: object) -> None:
    """Raise :class:`OverlayError` unless ``1 <= k <= n <= MAX_SHARES`` (plain ints)."""
    for name, value in (("k", k), ("n", n)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise OverlayError(f"erasure {name} must be an int, got {type(value).__name__}")
    if not 1 <= k <= n <= MAX_SHARES:  # type: ignore[operator]
        raise OverlayError(f"erasure parameters need 1 <= k <= n <= {MAX_SHARES}, got k={k} n={n}")


class ErasureCodec(ABC):
    """A systematic (k, n) erasure code. Subclasses implement the two block-level hooks;
    argument checks, padding and trimming live here so every codec behaves the same."""

    name: str = ""  # registry name, e.g. "zfec"
    codec_id: int = 0  # one byte on the wire (see permamesh.overlay.clove)

    def encode(self, data: bytes, k: int, n: int) -> list[bytes]:
        """The n shares of ``data``, each ``share_length(len(data), k)`` bytes long."""
        check_params(k, n)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise OverlayError(f"erasure input must be bytes, got {type(data).__name__}")
        data = bytes(data)
        size = share_length(len(data), k)
        if size == 0:
            return [b""] * n
        padded = data.ljust(size * k, b"\0")
        blocks = [padded[i * size : (i + 1) * size] for i in range(k)]
        if k == n:
            return blocks
        shares = self._encode_blocks(blocks, k, n)
        return [bytes(s) for s in shares]

    def decode(self, shares: Mapping[int, bytes], k: int, n: int, length: int) -> bytes:
        """The original ``length`` bytes from any k of the n shares (more are ignored).

        ``shares`` maps share index (0..n-1) to share bytes; all must have the length
        ``encode`` gives for ``length``.
        """
        check_params(k, n)
        if not isinstance(length, int) or length < 0:
            raise OverlayError(f"erasure length must be a non-negative int, got {length!r}")
        if not isinstance(shares, Mapping):
            raise OverlayError("erasure shares must be a mapping of index to bytes")
        size = share_length(length, k)
        for index, share in shares.items():
            if not isinstance(index, int) or not 0 <= index < n:
                raise OverlayError(f"share index {index!r} outside 0..{n - 1}")
            if not isinstance(share, (bytes, bytearray)) or len(share) != size:
                got = len(share) if isinstance(share, (bytes, bytearray)) else type(share).__name__
                raise OverlayError(f"share {index} should be {size} bytes, got {got}")
        if len(shares) < k:
            raise OverlayError(f"need {k} shares to decode, got {len(shares)}")
        if size == 0:
            return b""
        chosen = sorted(shares)[:k]  # lowest indices first: primary blocks need no work
        if chosen[-1] < k:
            blocks = [bytes(shares[i]) for i in chosen]
        else:
            blocks = self._decode_blocks({i: bytes(shares[i]) for i in chosen}, k, n)
        return b"".join(blocks)[:length]

    @abstractmethod
    def _encode_blocks(self, blocks: list[bytes], k: int, n: int) -> list[bytes]:
        """All n shares (primary blocks first) of k equal, non-empty blocks; 1 <= k < n."""

    @abstractmethod
    def _decode_blocks(self, shares: dict[int, bytes], k: int, n: int) -> list[bytes]:
        """The k primary blocks from exactly k shares, at least one of them parity."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@functools.lru_cache(maxsize=64)
def _zfec_encoder(k: int, n: int) -> zfec.Encoder:
    return zfec.Encoder(k, n)


@functools.lru_cache(maxsize=64)
def _zfec_decoder(k: int, n: int) -> zfec.Decoder:
    return zfec.Decoder(k, n)


class ZfecCodec(ErasureCodec):
    """zfec (C, Vandermonde Reed-Solomon over GF(2^8)); the default codec."""

    name = "zfec"
    codec_id = 1

    def _encode_blocks(self, blocks: list[bytes], k: int, n: int) -> list[bytes]:
        return list(_zfec_encoder(k, n).encode(blocks))

    def _decode_blocks(self, shares: dict[int, bytes], k: int, n: int) -> list[bytes]:
        nums = sorted(shares)
        return list(_zfec_decoder(k, n).decode([shares[i] for i in nums], nums))


@functools.lru_cache(maxsize=64)
def _rs_codec(nsym: int, n: int):  # -> reedsolo.RSCodec
    import reedsolo  # imported lazily: only the benchmark and tests use this codec

    return reedsolo.RSCodec(nsym, nsize=n)


class ReedSoloCodec(ErasureCodec):
    """Pure-Python ``reedsolo``: one (n, k) codeword per byte column. Measured, not used."""

    name = "reedsolo"
    codec_id = 2

    def _encode_blocks(self, blocks: list[bytes], k: int, n: int) -> list[bytes]:
        rs = _rs_codec(n - k, n)
        parity_columns = [bytes(rs.encode(bytes(column)))[k:] for column in zip(*blocks)]
        parity = [bytes(p) for p in zip(*parity_columns)]
        return blocks + parity

    def _decode_blocks(self, shares: dict[int, bytes], k: int, n: int) -> list[bytes]:
        rs = _rs_codec(n - k, n)
        present = sorted(shares)
        erased = [i for i in range(n) if i not in shares]
        size = len(shares[present[0]])
        rows = [shares.get(i, bytes(size)) for i in range(n)]
        columns = []
        for column in zip(*rows):
            try:
                message = rs.decode(bytearray(column), erase_pos=erased)[0]
            except Exception as exc:  # reedsolo.ReedSolomonError and friends
                raise OverlayError(f"reedsolo could not decode a column: {exc}") from exc
            columns.append(bytes(message))
        return [bytes(b) for b in zip(*columns)]


CODECS: dict[str, ErasureCodec] = {c.name: c for c in (ZfecCodec(), ReedSoloCodec())}
_BY_ID: dict[int, ErasureCodec] = {c.codec_id: c for c in CODECS.values()}
DEFAULT_CODEC: ErasureCodec = CODECS["zfec"]


def get_codec(name: str | int) -> ErasureCodec:
    """The codec called ``name`` (``"zfec"``, ``"reedsolo"``) or with that wire id (1, 2)."""
    codec = _BY_ID.get(name) if isinstance(name, int) else CODECS.get(name)
    if codec is None:
        known = ", ".join(f"{c.name} ({c.codec_id})" for c in CODECS.values())
        raise OverlayError(f"unknown erasure codec {name!r}; known: {known}")
    return codec
