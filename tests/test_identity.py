"""Tests for permamesh.identity: signing, verification, key agreement and key files."""

from __future__ import annotations

import os
import pathlib
import re
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.errors import PermameshError
from permamesh.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    IdentityError,
    KeyExchangeKey,
    NodeIdentity,
    PublicIdentity,
    SigningKey,
    verify_signature,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
MESSAGE = b"route 7 -> 12, epoch 3"


def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _flip_bit(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# --- signing and verification ------------------------------------------------------------


def test_a_fresh_identity_signs_and_its_public_half_verifies() -> None:
    node = NodeIdentity.generate()
    signature = node.sign(MESSAGE)
    assert len(signature) == SIGNATURE_BYTES
    assert len(node.public.sign_key) == PUBLIC_KEY_BYTES
    assert node.public.verify(MESSAGE, signature)
    assert verify_signature(node.public.sign_key, signature, MESSAGE)


def test_signing_key_survives_a_round_trip_through_raw_bytes() -> None:
    key = SigningKey.generate()
    restored = SigningKey.from_private_bytes(key.private_bytes())
    assert restored.public_bytes == key.public_bytes
    assert verify_signature(key.public_bytes, restored.sign(MESSAGE), MESSAGE)


def test_a_flipped_bit_in_the_data_is_rejected() -> None:
    node = NodeIdentity.generate()
    signature = node.sign(MESSAGE)
    assert not node.public.verify(_flip_bit(MESSAGE, 0), signature)


def test_a_flipped_bit_in_the_signature_is_rejected() -> None:
    node = NodeIdentity.generate()
    signature = node.sign(MESSAGE)
    for index in (0, 31, 32, 63):
        assert not node.public.verify(MESSAGE, _flip_bit(signature, index))


def test_another_nodes_signature_is_rejected() -> None:
    alice, mallory = NodeIdentity.generate(), NodeIdentity.generate()
    assert not alice.public.verify(MESSAGE, mallory.sign(MESSAGE))


def test_a_truncated_or_padded_signature_is_rejected() -> None:
    node = NodeIdentity.generate()
    signature = node.sign(MESSAGE)
    assert not node.public.verify(MESSAGE, signature[:-1])
    assert not node.public.verify(MESSAGE, signature + b"\x00")
    assert not node.public.verify(MESSAGE, b"")


@pytest.mark.parametrize(
    "public_key",
    [b"", b"\x00" * 31, b"\x00" * 33, "a" * 32, None, 12345, [0] * 32],
    ids=["empty", "31-bytes", "33-bytes", "str", "none", "int", "list"],
)
def test_a_malformed_public_key_returns_false_without_raising(public_key: object) -> None:
    signature = NodeIdentity.generate().sign(MESSAGE)
    assert verify_signature(public_key, signature, MESSAGE) is False  # type: ignore[arg-type]


def test_non_bytes_signature_or_data_returns_false_without_raising() -> None:
    node = NodeIdentity.generate()
    signature = node.sign(MESSAGE)
    key = node.public.sign_key
    assert verify_signature(key, signature.hex(), MESSAGE) is False  # type: ignore[arg-type]
    assert verify_signature(key, signature, None) is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "weak_key",
    [bytes(32), (1).to_bytes(32, "little"), (2**255 - 20).to_bytes(32, "little")],
    ids=["order-4-zero", "identity", "order-2"],
)
def test_small_order_public_keys_are_refused(weak_key: bytes) -> None:
    # OpenSSL alone accepts the all-zero key with the all-zero signature for about one
    # message in four, so a peer with such a key could sign many messages at once.
    for i in range(64):
        assert verify_signature(weak_key, bytes(SIGNATURE_BYTES), i.to_bytes(4, "little")) is False


@settings(max_examples=300)
@given(
    public_key=st.one_of(st.binary(max_size=40), st.binary(min_size=32, max_size=32)),
    signature=st.one_of(st.binary(max_size=80), st.binary(min_size=64, max_size=64)),
    data=st.binary(max_size=64),
)
def test_random_peer_input_never_raises(public_key: bytes, signature: bytes, data: bytes) -> None:
    assert verify_signature(public_key, signature, data) is False


def test_bad_raw_private_keys_raise_identity_error() -> None:
    for raw in (b"", b"\x01" * 31, b"\x01" * 33, "x" * 32):
        with pytest.raises(IdentityError):
            SigningKey.from_private_bytes(raw)  # type: ignore[arg-type]
        with pytest.raises(IdentityError):
            KeyExchangeKey.from_private_bytes(raw)  # type: ignore[arg-type]
    assert issubclass(IdentityError, PermameshError)


# --- node ids ----------------------------------------------------------------------------


def test_node_id_is_16_hex_chars_and_stable() -> None:
    node = NodeIdentity.generate()
    assert re.fullmatch(r"[0-9a-f]{16}", node.node_id)
    assert node.node_id == node.node_id == node.public.node_id
    copy = PublicIdentity(sign_key=node.public.sign_key, kex_key=node.public.kex_key)
    assert copy.node_id == node.node_id
    assert NodeIdentity.generate().node_id != node.node_id


def test_node_id_depends_only_on_the_signing_key() -> None:
    node = NodeIdentity.generate()
    other_kex = NodeIdentity(node.signing, KeyExchangeKey.generate())
    assert other_kex.node_id == node.node_id


def test_public_identity_rejects_wrong_length_keys() -> None:
    with pytest.raises(IdentityError):
        PublicIdentity(sign_key=b"\x00" * 31, kex_key=b"\x00" * 32)


# --- X25519 key agreement ----------------------------------------------------------------


def test_both_sides_derive_the_same_key() -> None:
    alice, bob = KeyExchangeKey.generate(), KeyExchangeKey.generate()
    a = alice.derive(bob.public_bytes, info=b"onion layer 1")
    b = bob.derive(alice.public_bytes, info=b"onion layer 1")
    assert a == b
    assert len(a) == 32


def test_length_and_salt_are_honoured() -> None:
    alice, bob = KeyExchangeKey.generate(), KeyExchangeKey.generate()
    long = alice.derive(bob.public_bytes, info=b"i", length=64, salt=b"s")
    assert len(long) == 64
    assert long == bob.derive(alice.public_bytes, info=b"i", length=64, salt=b"s")
    assert long != alice.derive(bob.public_bytes, info=b"i", length=64, salt=b"t")
    with pytest.raises(ValueError):
        alice.derive(bob.public_bytes, info=b"i", length=0)


def test_different_info_gives_different_keys() -> None:
    alice, bob = KeyExchangeKey.generate(), KeyExchangeKey.generate()
    assert alice.derive(bob.public_bytes, info=b"layer 1") != alice.derive(
        bob.public_bytes, info=b"layer 2"
    )


def test_a_different_peer_gives_a_different_key() -> None:
    alice, bob, carol = (KeyExchangeKey.generate() for _ in range(3))
    assert alice.derive(bob.public_bytes, info=b"x") != alice.derive(carol.public_bytes, info=b"x")


def test_key_exchange_key_survives_a_round_trip_through_raw_bytes() -> None:
    alice, bob = KeyExchangeKey.generate(), KeyExchangeKey.generate()
    restored = KeyExchangeKey.from_private_bytes(alice.private_bytes())
    assert restored.public_bytes == alice.public_bytes
    assert restored.derive(bob.public_bytes, info=b"x") == alice.derive(bob.public_bytes, info=b"x")


@pytest.mark.parametrize(
    "peer_public",
    [b"\x00" * 32, (1).to_bytes(32, "little"), b"", b"\x09" * 31, b"\x09" * 33, "9" * 32],
    ids=["all-zero", "low-order-one", "empty", "31-bytes", "33-bytes", "str"],
)
def test_malformed_peer_key_raises_identity_error(peer_public: object) -> None:
    with pytest.raises(IdentityError):
        KeyExchangeKey.generate().derive(peer_public, info=b"x")  # type: ignore[arg-type]


# --- key files ---------------------------------------------------------------------------


@posix_only
def test_load_or_create_writes_private_files_in_a_private_directory(tmp_path: pathlib.Path) -> None:
    keydir = tmp_path / "keys"
    first = NodeIdentity.load_or_create(keydir)
    assert _mode(keydir) == 0o700
    assert _mode(keydir / "node.ed25519") == 0o600
    assert _mode(keydir / "node.x25519") == 0o600
    assert sorted(p.name for p in keydir.iterdir()) == ["node.ed25519", "node.x25519"]
    assert (keydir / "node.ed25519").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_the_second_call_returns_the_same_identity(tmp_path: pathlib.Path) -> None:
    first = NodeIdentity.load_or_create(tmp_path, name="relay-1")
    second = NodeIdentity.load_or_create(str(tmp_path), name="relay-1")
    assert second.public == first.public
    assert second.node_id == first.node_id
    assert second.signing.private_bytes() == first.signing.private_bytes()
    assert second.kex.private_bytes() == first.kex.private_bytes()
    assert first.public.verify(MESSAGE, second.sign(MESSAGE))


def test_different_names_are_different_identities(tmp_path: pathlib.Path) -> None:
    a = NodeIdentity.load_or_create(tmp_path, name="a")
    b = NodeIdentity.load_or_create(tmp_path, name="b")
    assert a.public != b.public


def test_a_missing_half_is_created_and_the_node_id_kept(tmp_path: pathlib.Path) -> None:
    first = NodeIdentity.load_or_create(tmp_path)
    (tmp_path / "node.x25519").unlink()
    second = NodeIdentity.load_or_create(tmp_path)
    assert second.node_id == first.node_id
    assert second.public.kex_key != first.public.kex_key


@posix_only
@pytest.mark.parametrize("loose_mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_readable_by_others_is_refused(tmp_path: pathlib.Path, loose_mode: int) -> None:
    NodeIdentity.load_or_create(tmp_path)
    path = tmp_path / "node.ed25519"
    path.chmod(loose_mode)
    with pytest.raises(IdentityError, match="chmod 600") as excinfo:
        NodeIdentity.load_or_create(tmp_path)
    assert str(path) in str(excinfo.value)
    path.chmod(0o600)
    NodeIdentity.load_or_create(tmp_path)


@pytest.mark.parametrize("suffix", ["ed25519", "x25519"])
@pytest.mark.parametrize(
    "contents",
    [b"", b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
    ids=["empty", "garbage", "truncated-pem"],
)
def test_a_corrupt_key_file_is_refused_with_its_path(
    tmp_path: pathlib.Path, suffix: str, contents: bytes
) -> None:
    NodeIdentity.load_or_create(tmp_path)
    path = tmp_path / f"node.{suffix}"
    path.write_bytes(contents)
    with pytest.raises(IdentityError) as excinfo:
        NodeIdentity.load_or_create(tmp_path)
    assert str(path) in str(excinfo.value)


def test_a_key_of_the_wrong_kind_is_refused(tmp_path: pathlib.Path) -> None:
    NodeIdentity.load_or_create(tmp_path)
    ed = tmp_path / "node.ed25519"
    x = tmp_path / "node.x25519"
    ed_pem = ed.read_bytes()
    ed.write_bytes(x.read_bytes())
    x.write_bytes(ed_pem)
    with pytest.raises(IdentityError, match=re.escape(str(ed))):
        NodeIdentity.load_or_create(tmp_path)


@pytest.mark.parametrize("name", ["", "a/b", "../escape", "has space", "ñode", "a\0b", "x\n"])
def test_bad_names_are_refused_before_touching_disk(tmp_path: pathlib.Path, name: str) -> None:
    keydir = tmp_path / "keys"
    with pytest.raises(IdentityError, match="name"):
        NodeIdentity.load_or_create(keydir, name=name)
    assert not keydir.exists()


def test_unreadable_location_raises_identity_error(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(IdentityError):
        NodeIdentity.load_or_create(blocker / "keys")


def test_reprs_do_not_leak_private_keys() -> None:
    node = NodeIdentity.generate()
    text = repr(node) + repr(node.signing) + repr(node.kex)
    assert node.signing.private_bytes().hex() not in text
    assert node.kex.private_bytes().hex() not in text
    assert node.node_id in repr(node)
