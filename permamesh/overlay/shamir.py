"""Shamir (k, n) secret sharing of a byte string over GF(2^8), every byte independently.

Byte ``b`` of the secret is the constant term of its own random polynomial of degree k-1;
share ``x`` (1..n) holds every polynomial's value at ``x``. Any k shares give the secret by
Lagrange interpolation at 0; any k-1 are uniformly distributed whatever the secret is (for
each candidate secret exactly one polynomial passes through them), so they reveal nothing.

The field is GF(2^8) with the AES polynomial x^8 + x^4 + x^3 + x + 1 (0x11b) and generator 3,
multiplied through log/exp tables. Arithmetic runs a whole byte string at a time: multiplying
every byte by a constant ``c`` is ``data.translate(mul_table(c))`` and adding is XOR of the
strings as integers, so no Python loop runs per byte of the secret.

Callers: :mod:`permamesh.overlay.sida` splits each message's 32-byte ChaCha20 key with
:func:`split_secret` and rebuilds it with :func:`combine`. Random coefficients come from
``secrets`` unless a source with ``token_bytes(n)`` is injected (tests only). Bad arguments
raise :class:`~permamesh.overlay.errors.OverlayError`.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Iterable, Mapping
from typing import Protocol

from permamesh.overlay.errors import OverlayError

logger = logging.getLogger(__name__)

FIELD_POLY = 0x11B  # x^8 + x^4 + x^3 + x + 1
GENERATOR = 0x03
MAX_SHARES = 255  # share x-coordinates are 1..255; 0 is where the secret sits


class RandomSource(Protocol):
    """Anything with ``token_bytes(n) -> bytes`` (the ``secrets`` module, or a seeded stand-in)."""

    def token_bytes(self, nbytes: int) -> bytes: ...


def _build_tables() -> tuple[tuple[int, ...], tuple[int, ...]]:
    exp = [0] * 510
    log = [0] * 256
    value = 1
    for power in range(255):
        exp[power] = value
        log[value] = power
        doubled = value << 1  # value * 3 = value * 2 XOR value
        if doubled & 0x100:
            doubled ^= FIELD_POLY
        value = doubled ^ value
    for power in range(255, 510):  # so exp[log a + log b] needs no modulo
        exp[power] = exp[power - 255]
    return tuple(exp), tuple(log)


EXP, LOG = _build_tables()


def gf_mul(a: int, b: int) -> int:
    """a * b in GF(2^8)."""
    if a == 0 or b == 0:
        return 0
    return EXP[LOG[a] + LOG[b]]


def gf_div(a: int, b: int) -> int:
    """a / b in GF(2^8); b must be non-zero."""
    if b == 0:
        raise ZeroDivisionError("division by zero in GF(2^8)")
    if a == 0:
        return 0
    return EXP[LOG[a] + 255 - LOG[b]]


def gf_pow(a: int, e: int) -> int:
    """a ** e in GF(2^8) (with 0 ** 0 == 1)."""
    if e == 0:
        return 1
    if a == 0:
        return 0
    return EXP[(LOG[a] * e) % 255]


@functools.lru_cache(maxsize=256)
def mul_table(c: int) -> bytes:
    """The 256-byte translation table of multiplication by ``c``: ``bytes.translate`` with it
    multiplies every byte of a string by ``c``."""
    return bytes(gf_mul(c, b) for b in range(256))


def _xor_into(acc: int, data: bytes) -> int:
    return acc ^ int.from_bytes(data, "big")


def split_secret(
    secret: bytes, k: int, n: int, rng: RandomSource = secrets  # type: ignore[assignment]
) -> list[tuple[int, bytes]]:
    """n shares ``(x, share)`` of ``secret`` with x = 1..n; any k of them rebuild it.

    Each share is as long as the secret. k = 1 gives n copies of the secret.
    """
    if not isinstance(secret, (bytes, bytearray)):
        raise OverlayError(f"secret must be bytes, got {type(secret).__name__}")
    for name, value in (("k", k), ("n", n)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise OverlayError(f"shamir {name} must be an int, got {type(value).__name__}")
    if not 1 <= k <= n <= MAX_SHARES:
        raise OverlayError(f"shamir needs 1 <= k <= n <= {MAX_SHARES}, got k={k} n={n}")
    size = len(secret)
    coefficients = [rng.token_bytes(size) for _ in range(k - 1)]
    if any(len(c) != size for c in coefficients):
        raise OverlayError("random source returned the wrong number of bytes")
    base = int.from_bytes(secret, "big")
    shares = []
    for x in range(1, n + 1):
        acc = base
        for degree, coefficient in enumerate(coefficients, start=1):
            acc = _xor_into(acc, coefficient.translate(mul_table(gf_pow(x, degree))))
        shares.append((x, acc.to_bytes(size, "big")))
    return shares


def _points(shares: Mapping[int, bytes] | Iterable[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    items = list(shares.items()) if isinstance(shares, Mapping) else list(shares)
    if not items:
        raise OverlayError("no shares to combine")
    seen: set[int] = set()
    size = None
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise OverlayError("each share must be an (x, bytes) pair")
        x, data = item
        if not isinstance(x, int) or not 0 <= x <= MAX_SHARES:
            raise OverlayError(f"share x must be an int in 0..{MAX_SHARES}, got {x!r}")
        if x in seen:
            raise OverlayError(f"two shares at x={x}")
        if not isinstance(data, (bytes, bytearray)):
            raise OverlayError(f"share {x} must be bytes, got {type(data).__name__}")
        if size is not None and len(data) != size:
            raise OverlayError(f"share {x} is {len(data)} bytes, others are {size}")
        seen.add(x)
        size = len(data)
    return items


def interpolate(shares: Mapping[int, bytes] | Iterable[tuple[int, bytes]], at: int) -> bytes:
    """The value at ``at`` of the lowest-degree polynomials through ``shares`` (x -> bytes).

    With shares from :func:`split_secret`, ``at=0`` is the secret; tests also use it to show
    that k-1 shares fit every possible secret.
    """
    points = _points(shares)
    if not isinstance(at, int) or not 0 <= at <= MAX_SHARES:
        raise OverlayError(f"interpolation point must be in 0..{MAX_SHARES}, got {at!r}")
    size = len(points[0][1])
    acc = 0
    for i, (xi, yi) in enumerate(points):
        basis = 1  # Lagrange basis polynomial i evaluated at `at`
        for j, (xj, _) in enumerate(points):
            if j != i:
                basis = gf_mul(basis, gf_div(at ^ xj, xi ^ xj))
        if basis:
            acc = _xor_into(acc, bytes(yi).translate(mul_table(basis)))
    return acc.to_bytes(size, "big")


def combine(shares: Mapping[int, bytes] | Iterable[tuple[int, bytes]]) -> bytes:
    """The secret from k (or more) shares ``(x, share)`` of one :func:`split_secret` call.

    Fewer than k shares give a wrong secret, not an error: Shamir cannot tell. Callers check
    the result (S-IDA does, through the AEAD tag of the message the key opens).
    """
    points = _points(shares)
    if any(x == 0 for x, _ in points):
        raise OverlayError("share x must be 1..255 (x=0 is the secret itself)")
    return interpolate(points, 0)
