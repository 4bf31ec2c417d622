"""Chained block hashing: the keys of the hash-radix tree.

A prompt is cut into blocks of ``block_size`` tokens and every block is named by a digest that
commits to the block *and to everything before it*::

    d_0 = H(ROOT || block_0)        d_i = H(d_{i-1} || block_i)

so two prompts share the digest of block ``i`` exactly when they share their first ``i + 1``
blocks. Replicas of the routing tree therefore compare prefixes by comparing digests and never
see prompt text. ``H`` is BLAKE2b with a 16-byte output, keyed by a per-trust-domain salt (an
empty salt means unkeyed), and personalised per kind of input so a token chain can never collide
with a chain of byte strings by construction. ``ROOT`` is 16 zero bytes, so every hash input
starts with a fixed-width previous digest.

:func:`chain_digests` applies the same chaining to arbitrary byte strings, one string per block;
it names OCI images by their layer digests so a worker holding the first layers of an image
matches like a worker holding a prompt prefix.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b

from permamesh.routing.errors import RoutingError

DIGEST_SIZE = 16
"""Bytes in one block digest."""

MAX_SALT = 64
"""Longest salt BLAKE2b accepts as a key."""

_ROOT = bytes(DIGEST_SIZE)
_TOKEN_PERSON = b"permamesh/tokens"
_ITEM_PERSON = b"permamesh/items"
_TOKEN_LIMIT = 2**32


def _check_salt(salt: object) -> bytes:
    if not isinstance(salt, bytes):
        raise RoutingError(f"salt must be bytes, not {type(salt).__name__}")
    if len(salt) > MAX_SALT:
        raise RoutingError(f"salt is {len(salt)} bytes; at most {MAX_SALT} are allowed")
    return salt


def _link(previous: bytes, block: bytes, salt: bytes, person: bytes) -> bytes:
    return blake2b(previous + block, digest_size=DIGEST_SIZE, key=salt, person=person).digest()


def _encode_tokens(tokens: Sequence[int]) -> bytes:
    """All tokens as 4-byte little-endian words; RoutingError names the first bad token."""
    for index, token in enumerate(tokens):
        if (
            isinstance(token, bool)
            or not isinstance(token, int)
            or not 0 <= token < _TOKEN_LIMIT
        ):
            raise RoutingError(f"token {index} is {token!r}; tokens are integers in [0, 2**32)")
    return struct.pack(f"<{len(tokens)}I", *tokens)


@dataclass(frozen=True)
class BlockHasher:
    """Names full blocks of tokens by chained digests.

    ``block_size`` is the number of tokens per block; ``salt`` keys the hash for one trust
    domain, so chains from different domains are unrelated and cannot be correlated.
    """

    block_size: int = 16  # tokens per block
    salt: bytes = b""  # per trust domain

    def __post_init__(self) -> None:
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise RoutingError(f"block_size must be an integer >= 1, not {size!r}")
        _check_salt(self.salt)

    def chain(self, tokens: Sequence[int]) -> list[bytes]:
        """The digest of every *full* block of ``tokens``; a trailing partial block is ignored.

        Every token (the ignored tail included) must be an ``int`` in ``[0, 2**32)``.
        """
        encoded = _encode_tokens(tokens)
        width = 4 * self.block_size
        digests: list[bytes] = []
        previous = _ROOT
        for start in range(0, len(encoded) - width + 1, width):
            previous = _link(previous, encoded[start : start + width], self.salt, _TOKEN_PERSON)
            digests.append(previous)
        return digests


def chain_digests(items: Sequence[bytes], salt: bytes = b"") -> list[bytes]:
    """Chain arbitrary byte strings, one string per block (e.g. an image's OCI layer digests).

    Each item is length-prefixed (8-byte little-endian) before hashing, so the encoding is
    unambiguous; the result has one digest per item.
    """
    salt = _check_salt(salt)
    digests: list[bytes] = []
    previous = _ROOT
    for index, item in enumerate(items):
        if not isinstance(item, bytes):
            raise RoutingError(f"item {index} is {type(item).__name__}; items must be bytes")
        previous = _link(previous, len(item).to_bytes(8, "little") + item, salt, _ITEM_PERSON)
        digests.append(previous)
    return digests
