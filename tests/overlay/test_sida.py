"""S-IDA cloves: any k of n rebuild a message; fewer reveal nothing; forged or corrupted cloves
are treated as missing; the binary framing rejects every malformed input with OverlayError."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from permamesh.overlay import OverlayError
from permamesh.overlay.clove import (
    HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    Clove,
    decode_clove,
    encode_clove,
    fingerprint,
)
from permamesh.overlay.erasure import get_codec
from permamesh.overlay.shamir import combine
from permamesh.overlay.sida import Rebuilder, RebuilderConfig, rebuild, split

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def message_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1_000_003 + size).randbytes(size)


def forge(honest: Clove, index: int, vector: tuple[bytes, ...] | None = None, **content) -> Clove:
    """Mallory's clove: honest header, chosen content, a vector that makes it self-consistent."""
    clove = dataclasses.replace(honest, index=index, **content)
    fp = clove.content_fingerprint()
    vector = list(vector or honest.fingerprints)
    vector[index] = fp
    return dataclasses.replace(clove, fingerprints=tuple(vector))


@pytest.mark.parametrize("n,k", [(4, 3), (5, 3), (6, 3)])
@pytest.mark.parametrize("size", [0, 1, 100, 4096, 65536])
def test_every_k_subset_of_framed_cloves_rebuilds_the_message(n: int, k: int, size: int) -> None:
    message = message_of(size)
    wire = [encode_clove(c) for c in split(message, n=n, k=k)]
    for subset in itertools.combinations(wire, k):
        assert rebuild(decode_clove(frame) for frame in subset) == message


def test_both_codecs_rebuild_the_same_message_from_parity() -> None:
    message = message_of(3000, seed=1)
    rebuilt = {}
    for name in ("zfec", "reedsolo"):
        cloves = split(message, n=5, k=3, codec=get_codec(name))
        assert {c.codec_id for c in cloves} == {get_codec(name).codec_id}
        rebuilt[name] = rebuild(decode_clove(encode_clove(c)) for c in cloves[2:])
    assert rebuilt["zfec"] == rebuilt["reedsolo"] == message


def test_the_rebuilder_returns_the_message_with_the_kth_clove_and_only_then() -> None:
    message = b"what is the capital of France?"
    cloves = split(message)
    rebuilder = Rebuilder()
    assert rebuilder.add(cloves[3]) is None
    assert rebuilder.add(cloves[0]) is None
    assert rebuilder.pending == 1
    assert rebuilder.add(cloves[2]) == message
    assert rebuilder.pending == 0
    # The n-th clove arrives late; a repeat of the message id is not rebuilt twice.
    assert rebuilder.add(cloves[1]) is None
    stats = rebuilder.stats()
    assert (stats.accepted, stats.completed, stats.late) == (3, 1, 1)


def test_fewer_than_k_cloves_give_nothing() -> None:
    cloves = split(b"secret prompt", n=4, k=3)
    with pytest.raises(OverlayError, match="cannot rebuild from 2 clove"):
        rebuild(cloves[:2])
    with pytest.raises(OverlayError, match="cannot rebuild from 0"):
        rebuild([])


def test_k_minus_1_cloves_and_all_ciphertext_shares_do_not_decrypt() -> None:
    message = b"The quick brown fox asks about a rare disease. " * 20
    cloves = split(message, n=4, k=3)
    assert not any(b"quick brown fox" in c.data_share for c in cloves)  # ciphertext, not text
    codec = get_codec(cloves[0].codec_id)
    ciphertext = codec.decode({c.index: c.data_share for c in cloves}, 3, 4, len(message) + 16)
    for pair in itertools.combinations(cloves, 2):
        guessed_key = combine([(c.index + 1, c.key_share) for c in pair])
        with pytest.raises(InvalidTag):
            ChaCha20Poly1305(guessed_key).decrypt(bytes(12), ciphertext, cloves[0].message_id)


@pytest.mark.parametrize("victim", range(4))
def test_a_flipped_bit_anywhere_in_a_clove_is_caught_and_the_others_rebuild(victim: int) -> None:
    message = message_of(60, seed=victim)
    wire = [encode_clove(c) for c in split(message, n=4, k=3)]
    caught = 0
    for position in range(len(wire[victim])):
        corrupted = bytearray(wire[victim])
        corrupted[position] ^= 1 << (position % 8)
        rebuilder = Rebuilder()
        try:
            assert rebuilder.add(decode_clove(bytes(corrupted))) is None
        except OverlayError:
            caught += 1  # the framing refused it: as good as lost
        honest = [decode_clove(w) for i, w in enumerate(wire) if i != victim]
        results = [rebuilder.add(c) for c in honest]
        assert results == [None, None, message], f"flip at byte {position}"
        stats = rebuilder.stats()
        assert stats.completed == 1 and stats.decrypt_failures == 0
    assert caught > 0


def test_mallory_s_self_consistent_fake_cloves_do_not_stop_the_honest_ones() -> None:
    message = b"honest request"
    honest = split(message, n=4, k=3)
    # Mallory relays clove 0 and makes her own cloves 1 and 2 under a vector of her own
    # that matches all three: her group reaches k first, and its AEAD tag fails.
    fake1 = forge(honest[0], 1, key_share=bytes(32), data_share=bytes(len(honest[0].data_share)))
    fake2 = forge(fake1, 2, vector=fake1.fingerprints, key_share=b"\x01" * 32)
    vector = list(fake2.fingerprints)
    vector[0] = honest[0].content_fingerprint()
    mallory = [
        dataclasses.replace(c, fingerprints=tuple(vector)) for c in (honest[0], fake1, fake2)
    ]
    assert all(c.is_self_consistent() for c in mallory)
    # Also a clove whose content does not match its own vector entry.
    tampered = dataclasses.replace(honest[3], data_share=bytes(len(honest[3].data_share)))

    rebuilder = Rebuilder()
    assert [rebuilder.add(c) for c in mallory + [tampered]] == [None] * 4
    assert [rebuilder.add(c) for c in honest[:3]] == [None, None, message]
    stats = rebuilder.stats()
    assert (stats.rejected, stats.decrypt_failures, stats.completed) == (1, 1, 1)


def test_other_k_subsets_are_tried_when_one_fails_to_decrypt() -> None:
    message = b"a request that a colluding group tried to spoil"
    honest = split(message, n=4, k=3)
    # A vector that names the honest cloves 0-2 and a garbage clove 3: subsets with clove 3
    # fail, {0, 1, 2} decrypts once its last member arrives.
    garbage = forge(honest[0], 3, key_share=b"\x07" * 32)
    vector = honest[0].fingerprints[:3] + (garbage.content_fingerprint(),)
    group = [dataclasses.replace(c, fingerprints=vector) for c in (garbage, *honest[:3])]
    rebuilder = Rebuilder()
    assert [rebuilder.add(c) for c in group] == [None, None, None, message]
    assert rebuilder.stats().decrypt_failures == 1  # {0, 1, 3} failed, then {0, 1, 2} worked


def test_a_group_that_keeps_failing_is_shut_after_its_attempt_budget() -> None:
    honest = split(b"m" * 10, n=6, k=2)
    bad = [forge(honest[0], i, key_share=bytes([i]) * 32) for i in range(6)]
    vector = tuple(c.content_fingerprint() for c in bad)
    group = [dataclasses.replace(c, fingerprints=vector) for c in bad]
    rebuilder = Rebuilder(RebuilderConfig(max_subset_tries=3))
    assert all(rebuilder.add(c) is None for c in group)
    stats = rebuilder.stats()
    assert stats.decrypt_failures == 3 and stats.overflow >= 1
    assert rebuilder.add(honest[0]) is None and rebuilder.add(honest[5]) == b"m" * 10


def test_duplicates_are_ignored() -> None:
    cloves = split(b"hello", n=4, k=3)
    rebuilder = Rebuilder()
    for _ in range(3):
        assert rebuilder.add(cloves[0]) is None
    assert rebuilder.add(cloves[1]) is None
    assert rebuilder.add(cloves[2]) == b"hello"
    assert rebuilder.stats().duplicates == 2


def test_memory_is_bounded_by_pending_messages_cloves_and_bytes() -> None:
    rebuilder = Rebuilder(RebuilderConfig(max_pending=2, max_cloves_per_message=2))
    first, second, third = (split(bytes([i]) * 50) for i in range(3))
    rebuilder.add(first[0])
    rebuilder.add(second[0])
    rebuilder.add(third[0])  # evicts the oldest message
    assert rebuilder.pending == 2 and rebuilder.stats().evicted == 1
    assert rebuilder.add(second[1]) is None
    assert rebuilder.add(second[2]) is None  # third clove of `second`: over the per-message cap
    assert rebuilder.stats().overflow == 1

    by_bytes = Rebuilder(RebuilderConfig(max_pending_bytes=3000))
    for i in range(5):
        by_bytes.add(split(bytes(3000), message_id=bytes([i]) * 16)[0])
    assert by_bytes.pending == 2 and by_bytes.stats().evicted == 3


def test_expire_uses_the_callers_clock() -> None:
    rebuilder = Rebuilder(RebuilderConfig(ttl_s=30.0))
    old, new = split(b"old"), split(b"new")
    rebuilder.add(old[0], now=100.0)
    rebuilder.add(new[0], now=120.0)
    assert rebuilder.expire(125.0) == 0
    assert rebuilder.expire(131.0) == 1 and rebuilder.pending == 1
    # The expired clove is gone: the message starts afresh and needs k new cloves.
    assert [rebuilder.add(c) for c in old[1:]] == [None, None, b"old"]
    assert rebuilder.stats().expired == 1


def test_completed_ids_are_remembered_but_bounded() -> None:
    rebuilder = Rebuilder(RebuilderConfig(max_completed=2))
    batches = [split(bytes([i]) * 8) for i in range(3)]
    for batch in batches:
        assert [rebuilder.add(c) for c in batch[:3]][-1] is not None
    assert rebuilder.add(batches[2][3]) is None and rebuilder.stats().late == 1
    # The first id was forgotten; its last clove alone starts a pending message.
    assert rebuilder.add(batches[0][3]) is None and rebuilder.pending == 1


def test_split_and_clove_arguments_are_checked() -> None:
    with pytest.raises(OverlayError, match="exceeds"):
        split(bytes(MAX_MESSAGE_BYTES + 1))
    with pytest.raises(OverlayError, match="message_id"):
        split(b"x", message_id=b"short")
    with pytest.raises(OverlayError, match="1 <= k <= n"):
        split(b"x", n=3, k=4)
    with pytest.raises(OverlayError, match="bytes"):
        split("text")  # type: ignore[arg-type]
    with pytest.raises(OverlayError, match="takes a Clove"):
        Rebuilder().add(b"bytes")  # type: ignore[arg-type]
    clove = split(b"x" * 10, message_id=bytes(16))[1]
    assert clove.message_id == bytes(16) and len(split(bytes(MAX_MESSAGE_BYTES))) == 4
    for change, reason in [
        ({"index": 4}, "index"),
        ({"k": 5}, "k <= n"),
        ({"codec_id": 9}, "unknown erasure codec"),
        ({"ciphertext_length": 15}, "ciphertext length"),
        ({"key_share": b"short"}, "key share"),
        ({"data_share": b"short"}, "data share"),
        ({"fingerprints": clove.fingerprints[:3]}, "4 fingerprints"),
        ({"fingerprints": (b"x",) * 4}, "16 bytes"),
        ({"message_id": b"m"}, "message_id"),
    ]:
        with pytest.raises(OverlayError, match=reason):
            dataclasses.replace(clove, **change)


def test_the_framing_is_compact_and_round_trips() -> None:
    clove = split(b"x" * 4096, n=4, k=3)[2]
    frame = encode_clove(clove)
    assert len(frame) == HEADER_BYTES + 4 * 16 + 32 + len(clove.data_share)
    assert decode_clove(frame) == clove and decode_clove(bytearray(frame)) == clove
    assert clove.content_fingerprint() == fingerprint(
        clove.message_id, 2, 4, 3, 1, 4112, clove.key_share, clove.data_share
    )
    with pytest.raises(OverlayError, match="encode a Clove"):
        encode_clove(frame)  # type: ignore[arg-type]


VALID_FRAMES = [encode_clove(c) for c in split(b"fuzz me" * 9, n=5, k=3)]


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_only_ever_raise_overlay_error(data: bytes) -> None:
    for candidate in (data, VALID_FRAMES[0][:2] + data):  # also past the magic/version check
        try:
            decode_clove(candidate)
        except OverlayError:
            pass


@FUZZ
@given(st.sampled_from(VALID_FRAMES), st.integers(0, 10_000), st.integers(0, 400))
def test_truncated_or_extended_frames_are_refused(frame: bytes, cut: int, extra: int) -> None:
    cut %= len(frame)
    with pytest.raises(OverlayError):
        decode_clove(frame[:cut])
    with pytest.raises(OverlayError):
        decode_clove(frame + bytes(extra + 1))


@FUZZ
@given(
    st.sampled_from(VALID_FRAMES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_byte_flips_are_refused_or_caught_by_the_fingerprint(frame: bytes, flips: list) -> None:
    corrupted = bytearray(frame)
    for position, mask in flips:
        corrupted[position % len(frame)] ^= mask
    try:
        clove = decode_clove(bytes(corrupted))
    except OverlayError:
        return
    assert encode_clove(clove) == bytes(corrupted)
    if bytes(corrupted) != frame:
        # It parsed, so it must not pass as the honest clove it came from.
        honest = decode_clove(frame)
        assert not clove.is_self_consistent() or clove.fingerprints != honest.fingerprints or (
            clove.message_id != honest.message_id
        )
