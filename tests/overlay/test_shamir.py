"""Shamir secret sharing over GF(2^8): k shares rebuild a key, k-1 say nothing about it."""

from __future__ import annotations

import collections
import itertools
import os
import random

import pytest

from permamesh.overlay import OverlayError
from permamesh.overlay.shamir import (
    EXP,
    LOG,
    combine,
    gf_div,
    gf_mul,
    gf_pow,
    interpolate,
    mul_table,
    split_secret,
)


class SeededRandom:
    """A deterministic stand-in for ``secrets`` (tests only)."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def token_bytes(self, nbytes: int) -> bytes:
        return self._random.randbytes(nbytes)


def test_the_field_tables_are_a_field() -> None:
    assert sorted(EXP[:255]) == list(range(1, 256))  # 3 generates every non-zero element
    assert all(EXP[LOG[a]] == a for a in range(1, 256))
    for a in range(1, 256):
        for b in range(1, 256):
            product = gf_mul(a, b)
            assert gf_div(product, b) == a
    assert gf_mul(0x57, 0x83) == 0xC1  # FIPS-197 worked example
    assert gf_pow(3, 255) == 1 and gf_pow(0, 0) == 1 and gf_pow(0, 5) == 0
    assert bytes(range(256)).translate(mul_table(0x83))[0x57] == 0xC1
    with pytest.raises(ZeroDivisionError):
        gf_div(1, 0)


@pytest.mark.parametrize("n,k", [(4, 3), (5, 3), (6, 3), (3, 1), (2, 2), (7, 7)])
@pytest.mark.parametrize("size", [0, 1, 32, 100])
def test_any_k_shares_rebuild_the_secret(n: int, k: int, size: int) -> None:
    secret = os.urandom(size)
    shares = split_secret(secret, k, n)

    assert [x for x, _ in shares] == list(range(1, n + 1))
    assert all(len(s) == size for _, s in shares)
    for subset in itertools.combinations(shares, k):
        assert combine(subset) == secret
    assert combine(dict(shares)) == secret  # more than k shares also work


def test_an_injected_random_source_makes_shares_reproducible() -> None:
    secret = b"k" * 32
    first = split_secret(secret, 3, 4, rng=SeededRandom(1))
    assert first == split_secret(secret, 3, 4, rng=SeededRandom(1))
    assert first != split_secret(secret, 3, 4, rng=SeededRandom(2))
    assert split_secret(secret, 3, 4) != split_secret(secret, 3, 4)  # `secrets` by default


@pytest.mark.parametrize("n,k", [(4, 3), (5, 3), (6, 4), (4, 2)])
def test_k_minus_1_shares_fit_every_possible_secret(n: int, k: int) -> None:
    # Perfect secrecy: whatever the k-1 shares are, every secret byte value is explained by
    # exactly one polynomial, which also says what the k-th share would have to be.
    known = split_secret(b"\x42", k, n)[: k - 1]
    missing_x = k
    for candidate in range(256):
        points = known + [(0, bytes([candidate]))]
        kth_share = interpolate(points, missing_x)
        assert combine(known + [(missing_x, kth_share)]) == bytes([candidate])


def test_k_minus_1_shares_are_uniform_whatever_the_secret() -> None:
    # 65,536 independent byte positions per secret; each share byte should be uniform.
    size = 1 << 16
    for secret_byte in (0x00, 0xFF):
        shares = split_secret(bytes([secret_byte]) * size, 3, 4, rng=SeededRandom(secret_byte))
        for _, share in shares[:2]:
            counts = collections.Counter(share)
            expected = size / 256
            chi2 = sum((counts.get(v, 0) - expected) ** 2 / expected for v in range(256))
            assert chi2 < 400, f"share bytes not uniform: chi2={chi2:.0f} (255 dof)"
        pairs = collections.Counter(zip(shares[0][1][:size], shares[1][1][:size]))
        assert len(pairs) > 0.6 * size  # pairs spread over the 65,536 possibilities


def test_fewer_than_k_shares_give_a_wrong_secret() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, 3, 5)
    assert combine(shares[:2]) != secret


def test_bad_shares_are_refused() -> None:
    with pytest.raises(OverlayError, match="no shares"):
        combine([])
    with pytest.raises(OverlayError, match="two shares at x=1"):
        combine([(1, b"a"), (1, b"a")])
    with pytest.raises(OverlayError, match="bytes, others"):
        combine([(1, b"a"), (2, b"ab")])
    with pytest.raises(OverlayError, match="x=0"):
        combine([(0, b"a"), (2, b"b")])
    with pytest.raises(OverlayError, match="0..255"):
        combine([(256, b"a")])
    with pytest.raises(OverlayError, match="pair"):
        combine([b"ab"])  # type: ignore[list-item]
    with pytest.raises(OverlayError, match="1 <= k <= n"):
        split_secret(b"s", 4, 3)
    with pytest.raises(OverlayError, match="1 <= k <= n"):
        split_secret(b"s", 1, 256)
    with pytest.raises(OverlayError, match="bytes"):
        split_secret("s", 2, 3)  # type: ignore[arg-type]
