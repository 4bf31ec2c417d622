"""Erasure codecs: any k of n shares give the data back, with zfec or pure-Python reedsolo."""

from __future__ import annotations

import itertools
import random

import pytest

from permamesh.bench.codecs import measure_codecs
from permamesh.overlay import OverlayError
from permamesh.overlay.erasure import (
    CODECS,
    DEFAULT_CODEC,
    ReedSoloCodec,
    ZfecCodec,
    get_codec,
    share_length,
)

ALL_CODECS = sorted(CODECS)


@pytest.mark.parametrize("name", ALL_CODECS)
@pytest.mark.parametrize("n,k", [(4, 3), (5, 3), (6, 3), (1, 1), (3, 3), (4, 1)])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 29, 500])
def test_every_k_subset_gives_the_data_back(name: str, n: int, k: int, size: int) -> None:
    codec = get_codec(name)
    data = random.Random(f"{name}{n}{k}{size}").randbytes(size)
    shares = codec.encode(data, k, n)

    assert len(shares) == n
    assert {len(s) for s in shares} == {share_length(size, k)}
    for subset in itertools.combinations(range(n), k):
        assert codec.decode({i: shares[i] for i in subset}, k, n, size) == data


@pytest.mark.parametrize("name", ALL_CODECS)
def test_the_codes_are_systematic_and_extra_shares_are_ignored(name: str) -> None:
    codec = get_codec(name)
    data = b"0123456789ab"
    shares = codec.encode(data, 3, 5)
    assert shares[:3] == [b"0123", b"4567", b"89ab"]
    assert codec.decode(dict(enumerate(shares)), 3, 5, len(data)) == data


def test_both_codecs_agree_on_the_data_from_parity_shares() -> None:
    data = random.Random(7).randbytes(1000)
    for codec in CODECS.values():
        shares = codec.encode(data, 3, 6)
        assert codec.decode({3: shares[3], 4: shares[4], 5: shares[5]}, 3, 6, 1000) == data


def test_codecs_are_found_by_name_or_wire_id() -> None:
    assert get_codec("zfec") is DEFAULT_CODEC and isinstance(DEFAULT_CODEC, ZfecCodec)
    assert isinstance(get_codec("reedsolo"), ReedSoloCodec)
    assert get_codec(1) is get_codec("zfec") and get_codec(2) is get_codec("reedsolo")
    with pytest.raises(OverlayError, match="unknown erasure codec"):
        get_codec("lz4")
    with pytest.raises(OverlayError, match="unknown erasure codec"):
        get_codec(0)


@pytest.mark.parametrize(
    "k,n", [(0, 4), (5, 4), (3, 256), (-1, 3), (3.0, 4), (True, 4), (3, "4")]
)
def test_parameters_out_of_range_are_refused(k: object, n: object) -> None:
    with pytest.raises(OverlayError, match="erasure"):
        DEFAULT_CODEC.encode(b"data", k, n)  # type: ignore[arg-type]
    with pytest.raises(OverlayError, match="erasure"):
        DEFAULT_CODEC.decode({}, k, n, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ALL_CODECS)
def test_bad_shares_are_refused_with_a_reason(name: str) -> None:
    codec = get_codec(name)
    shares = codec.encode(b"x" * 30, 3, 4)
    with pytest.raises(OverlayError, match="need 3 shares"):
        codec.decode({0: shares[0], 1: shares[1]}, 3, 4, 30)
    with pytest.raises(OverlayError, match="outside"):
        codec.decode({0: shares[0], 1: shares[1], 4: shares[2]}, 3, 4, 30)
    with pytest.raises(OverlayError, match="should be 10 bytes"):
        codec.decode({0: shares[0], 1: shares[1], 2: shares[2][:-1]}, 3, 4, 30)
    with pytest.raises(OverlayError, match="should be 10 bytes"):
        codec.decode({0: shares[0], 1: shares[1], 2: "text"}, 3, 4, 30)  # type: ignore[dict-item]
    with pytest.raises(OverlayError, match="non-negative"):
        codec.decode(dict(enumerate(shares)), 3, 4, -1)
    with pytest.raises(OverlayError, match="must be bytes"):
        codec.encode("text", 3, 4)  # type: ignore[arg-type]


def test_the_codec_benchmark_reports_both_codecs_in_quick_mode() -> None:
    report = measure_codecs(sizes=(4096,), quick=True)

    assert (report["n"], report["k"], report["rebuild_from"]) == (4, 3, [1, 2, 3])
    for name in ("zfec", "reedsolo"):
        cell = report["results"][name]["4096"]
        assert cell["prep_ms"] > 0 and cell["rebuild_ms"] > 0 and cell["decode_ms"] > 0
        assert cell["total_ms"] == pytest.approx(cell["prep_ms"] + cell["rebuild_ms"], abs=1e-3)
        assert cell["clove_bytes"] > 4096 // 3
    # Loose guard (the target is 1 ms on a 2-core CPU; CI machines are noisy).
    assert report["results"]["zfec"]["4096"]["total_ms"] < 10
    assert report["summary"]["reedsolo_over_zfec_decode_4096"] > 10
