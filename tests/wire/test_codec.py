"""The frame codec never trusts a peer: whatever bytes arrive, decode() either returns a
checked, signature-verified message or raises WireError with a reason, never anything else."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from permamesh.identity import NodeIdentity
from permamesh.wire import (
    Accepted,
    GenerateRequest,
    GenerateResult,
    Received,
    StatusReply,
    StatusRequest,
    TokenChunk,
    WireError,
    decode,
    encode,
    known_tags,
)
from permamesh.wire import codec
from permamesh.wire.codec import DOMAIN, MAX_FRAME_BYTES, PROTOCOL_VERSION, _signed_bytes
from permamesh.wire.messages import MAX_PROMPT_CHARS

ALICE = NodeIdentity.generate()
MALLORY = NodeIdentity.generate()

CLASSES = {cls.TAG: cls for cls in (GenerateRequest, Accepted, TokenChunk, GenerateResult, StatusRequest, StatusReply)}
CLASSES.update({tag: codec._REGISTRY[tag] for tag in known_tags()})


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def raw_frame(tag, body: bytes, *, signer: NodeIdentity | None = ALICE, sign_tag: str | None = None,
              version=PROTOCOL_VERSION, sender=..., signature=...) -> bytes:
    """Build the outer array by hand; by default the signature is correct for (tag, body)."""
    if signer is not None:
        if sender is ...:
            sender = signer.public.sign_key
        if signature is ...:
            signature = signer.sign(_signed_bytes(sign_tag if sign_tag is not None else tag, body))
    sender = None if sender is ... else sender
    signature = None if signature is ... else signature
    return pack([version, tag, body, sender, signature])


def signed_frame(tag: str, fields, signer: NodeIdentity = ALICE) -> bytes:
    return raw_frame(tag, pack(fields), signer=signer)


def decode_or_wire_error(data):
    """The contract under test: a Received, or a WireError; any other exception fails the test."""
    try:
        got = decode(data)
    except WireError as exc:
        assert str(exc), "a WireError must say what was wrong"
        return None
    assert isinstance(got, Received)
    return got


SAMPLE = GenerateRequest(request_id="req-1", prompt="The quick brown fox", max_tokens=16, stop=("\n",))
SAMPLE_FRAME = encode(SAMPLE, ALICE)


# ---------------------------------------------------------------------- fuzzing the decoder


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise_anything_but_wire_error(data):
    decode_or_wire_error(data)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
FIELD_NAMES = sorted({f.name for cls in CLASSES.values() for f in dataclasses.fields(cls)} | {"role", "content"})
keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=8)
msgpack_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=6),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(msgpack_values)
def test_random_msgpack_structures_never_raise_anything_but_wire_error(value):
    decode_or_wire_error(pack(value))


@settings(max_examples=400, deadline=None)
@given(
    tag=st.sampled_from(sorted(CLASSES)),
    fields=st.dictionaries(keys, msgpack_values, max_size=12) | msgpack_values,
)
def test_properly_signed_frames_with_random_bodies_decode_or_raise_wire_error(tag, fields):
    got = decode_or_wire_error(signed_frame(tag, fields))
    if got is not None:  # whatever passed is a fully built message of the labelled type
        assert type(got.msg) is CLASSES[tag]
        # unsigned types (overlay cells, cloves) ignore any signature and name no sender
        assert got.sender == (ALICE.public.sign_key if CLASSES[tag].SIGNED else None)


@settings(max_examples=300, deadline=None)
@given(
    tag=st.sampled_from(sorted(CLASSES)),
    body=st.binary(max_size=200) | msgpack_values.map(pack),
    sender=st.none() | st.binary(min_size=32, max_size=32) | st.binary(max_size=40),
    signature=st.none() | st.binary(min_size=64, max_size=64) | st.binary(max_size=70),
)
def test_frames_with_a_real_tag_but_a_forged_signature_are_always_refused(tag, body, sender, signature):
    with pytest.raises(WireError):
        decode(pack([PROTOCOL_VERSION, tag, body, sender, signature]))


def test_every_truncation_of_a_valid_frame_is_refused():
    for n in range(len(SAMPLE_FRAME)):
        with pytest.raises(WireError):
            decode(SAMPLE_FRAME[:n])


def test_trailing_bytes_after_a_valid_frame_are_refused():
    with pytest.raises(WireError):
        decode(SAMPLE_FRAME + b"\x00")


def _regions(frame: bytes):
    outer = msgpack.unpackb(frame, raw=False)
    body, sender, sig = outer[2], outer[3], outer[4]
    spans = {}
    for name, part in (("body", body), ("sender", sender), ("signature", sig)):
        start = frame.index(part)
        spans[name] = range(start, start + len(part))
    return spans


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipping_any_single_byte_of_a_valid_frame_is_refused(mask):
    spans = _regions(SAMPLE_FRAME)
    signed_parts = set().union(*spans.values())
    for pos in range(len(SAMPLE_FRAME)):
        tampered = bytearray(SAMPLE_FRAME)
        tampered[pos] ^= mask
        with pytest.raises(WireError) as info:
            decode(bytes(tampered))
        if pos in signed_parts:
            assert "bad signature" in str(info.value), (pos, str(info.value))


def test_decode_refuses_something_that_is_not_bytes():
    with pytest.raises(WireError):
        decode(SAMPLE_FRAME.decode("latin-1"))  # type: ignore[arg-type]
    with pytest.raises(WireError):
        decode(None)  # type: ignore[arg-type]


def test_decode_accepts_bytearray_and_memoryview():
    assert decode(bytearray(SAMPLE_FRAME)).msg == SAMPLE
    assert decode(memoryview(SAMPLE_FRAME)).msg == SAMPLE


def test_a_deeply_nested_tag_is_refused_with_wire_error():
    frame = b"\x95\x01" + b"\x91" * 1000 + b"\x00" + b"\xc4\x00\xc0\xc0"  # [1, [[[...0...]]], b"", nil, nil]
    assert len(frame) < 1100
    decode_or_wire_error(frame)


def test_a_deeply_nested_version_is_refused_with_wire_error():
    frame = b"\x95" + b"\x91" * 1000 + b"\x01" + b"\xa8generate\xc4\x00\xc0\xc0"
    decode_or_wire_error(frame)


def test_a_deeply_nested_unknown_field_is_ignored_or_refused_but_never_crashes():
    deep = 0
    for _ in range(900):
        deep = [deep]
    decode_or_wire_error(signed_frame("status?", {"request_id": "s1", "extra": deep}))
    decode_or_wire_error(signed_frame("status?", {"request_id": deep}))


# ---------------------------------------------------------------------- sizes


def test_a_frame_over_the_size_limit_is_refused_before_it_is_parsed(monkeypatch):
    parsed = []
    monkeypatch.setattr(codec, "_unpack", lambda *a, **k: parsed.append(a) or (_ for _ in ()).throw(AssertionError("parsed")))
    monkeypatch.setattr(msgpack, "unpackb", lambda *a, **k: parsed.append(a) or (_ for _ in ()).throw(AssertionError("parsed")))
    big = SAMPLE_FRAME + b"\x00" * (MAX_FRAME_BYTES + 1 - len(SAMPLE_FRAME))
    assert len(big) == MAX_FRAME_BYTES + 1
    with pytest.raises(WireError, match="exceeds limit"):
        decode(big)
    assert parsed == []


def test_a_frame_exactly_at_the_size_limit_is_parsed_not_refused_for_size():
    with pytest.raises(WireError) as info:
        decode(b"\x00" * MAX_FRAME_BYTES)
    assert "exceeds" not in str(info.value)


def _accepted_body(worker_id: str) -> bytes:
    return pack({"request_id": "r1", "queue_position": 0, "worker_id": worker_id})


def test_a_body_over_its_types_limit_is_refused_even_when_properly_signed():
    body = _accepted_body("w" * (Accepted.MAX_BYTES + 10))
    assert len(body) > Accepted.MAX_BYTES
    frame = raw_frame("accepted", body)
    assert len(frame) < MAX_FRAME_BYTES
    with pytest.raises(WireError, match="exceeds limit"):
        decode(frame)


def test_a_body_exactly_at_its_types_limit_is_accepted():
    overhead = len(_accepted_body(""))
    n = Accepted.MAX_BYTES - overhead
    body = _accepted_body("w" * n)
    while len(body) > Accepted.MAX_BYTES:  # the str header grows with the length
        n -= 1
        body = _accepted_body("w" * n)
    assert len(body) == Accepted.MAX_BYTES
    got = decode(raw_frame("accepted", body)).msg
    assert got == Accepted(request_id="r1", queue_position=0, worker_id="w" * n)
    with pytest.raises(WireError, match="exceeds limit"):
        decode(raw_frame("accepted", _accepted_body("w" * (n + 1))))


def test_encoding_a_message_too_big_for_its_type_fails_loudly():
    with pytest.raises(WireError, match="exceeds limit"):
        encode(Accepted(request_id="r1", queue_position=0, worker_id="w" * Accepted.MAX_BYTES), ALICE)


def test_encoding_a_valid_but_multibyte_heavy_prompt_over_the_byte_limit_fails_loudly():
    prompt = "🌍" * MAX_PROMPT_CHARS  # allowed char count, but 4 bytes each: over 1 MiB
    req = GenerateRequest(request_id="r1", prompt=prompt)
    with pytest.raises(WireError, match="exceeds limit"):
        encode(req, ALICE)


# ---------------------------------------------------------------------- field types

BASE = {
    "generate": {"request_id": "r1", "prompt": "hi"},
    "accepted": {"request_id": "r1", "queue_position": 0, "worker_id": "w"},
    "token": {"request_id": "r1", "index": 0, "text": "t", "token_ids": [1]},
    "status": {
        "request_id": "s", "worker_id": "w", "model": "m", "device": "cpu", "queue_length": 0, "busy": False,
        "served": 0, "rejected_frames": 0, "prefill_tok_per_s": 0.0, "decode_tok_per_s": 0.0, "uptime_s": 1.0,
    },
}

WRONG_TYPES = [
    ("int_where_str", "generate", {"request_id": 5}, "request_id"),
    ("bytes_where_str", "generate", {"prompt": b"hi"}, "prompt"),
    ("str_where_int", "generate", {"max_tokens": "5"}, "max_tokens"),
    ("float_where_int", "accepted", {"queue_position": 1.0}, "queue_position"),
    ("bool_where_int", "accepted", {"queue_position": True}, "queue_position"),
    ("bool_where_int_in_generate", "generate", {"max_tokens": True}, "max_tokens"),
    ("bool_where_optional_int", "generate", {"seed": False}, "seed"),
    ("bool_inside_int_array", "token", {"token_ids": [1, True]}, "token_ids"),
    ("bool_where_float", "generate", {"temperature": False}, "temperature"),
    ("str_where_float", "generate", {"top_p": "0.5"}, "top_p"),
    ("int_where_bool", "generate", {"stream": 1}, "stream"),
    ("nan_float", "generate", {"temperature": math.nan}, "temperature"),
    ("inf_float", "generate", {"top_p": math.inf}, "top_p"),
    ("negative_inf_float", "status", {"uptime_s": -math.inf}, "uptime_s"),
    ("nan_inside_float_array", "token", {"logprobs": [-1.0, math.nan]}, "logprobs"),
    ("chat_role_not_allowed", "generate", {"prompt": None, "messages": [{"role": "robot", "content": "x"}]}, "role"),
    ("chat_role_not_a_string", "generate", {"prompt": None, "messages": [{"role": 1, "content": "x"}]}, "role"),
    ("chat_message_not_a_map", "generate", {"prompt": None, "messages": ["user: hi"]}, "messages"),
    ("chat_message_missing_content", "generate", {"prompt": None, "messages": [{"role": "user"}]}, "content"),
    ("tuple_field_given_a_map", "generate", {"stop": {"a": "b"}}, "stop"),
    ("tuple_field_given_a_string", "generate", {"stop": "END"}, "stop"),
    ("chat_tuple_given_a_map", "generate", {"prompt": None, "messages": {"role": "user", "content": "x"}}, "messages"),
    ("array_element_wrong_type", "generate", {"stop": ["ok", 3]}, "stop"),
]


@pytest.mark.parametrize(
    "tag,override,field", [w[1:] for w in WRONG_TYPES], ids=[w[0] for w in WRONG_TYPES]
)
def test_a_mistyped_field_is_refused_and_named(tag, override, field):
    fields = {**BASE[tag], **override}
    with pytest.raises(WireError, match=field):
        decode(signed_frame(tag, fields))


def test_the_base_bodies_used_above_are_themselves_valid():
    for tag, fields in BASE.items():
        assert type(decode(signed_frame(tag, fields)).msg) is CLASSES[tag]


def test_an_int_is_accepted_where_a_float_is_declared_and_becomes_a_float():
    got = decode(signed_frame("generate", {**BASE["generate"], "temperature": 1, "top_p": 1})).msg
    assert got.temperature == 1.0 and type(got.temperature) is float
    assert type(got.top_p) is float


def test_an_optional_field_accepts_nil():
    got = decode(signed_frame("generate", {**BASE["generate"], "seed": None})).msg
    assert got.seed is None


@pytest.mark.parametrize("tag,field", [("accepted", "worker_id"), ("generate", "request_id"), ("status", "busy"),
                                       ("token", "token_ids")])
def test_a_missing_required_field_is_refused_and_named(tag, field):
    fields = dict(BASE[tag])
    del fields[field]
    with pytest.raises(WireError, match=f"missing field '{field}'"):
        decode(signed_frame(tag, fields))


def test_unknown_extra_fields_from_a_newer_peer_are_ignored():
    fields = {**BASE["accepted"], "priority": 7, "hints": {"a": [1, 2.5, None]}, "nan_thing": math.nan}
    got = decode(signed_frame("accepted", fields)).msg
    assert got == Accepted(request_id="r1", queue_position=0, worker_id="w")
    assert not hasattr(got, "priority")


def test_a_body_that_is_not_a_map_is_refused():
    for fields in ([1, 2], "request_id", None, 3):
        with pytest.raises(WireError):
            decode(signed_frame("status?", fields))


def test_a_body_with_non_string_keys_is_refused():
    with pytest.raises(WireError):
        decode(signed_frame("status?", {1: "s1"}))


def test_a_body_that_is_not_msgpack_but_signed_is_refused():
    with pytest.raises(WireError, match="msgpack"):
        decode(raw_frame("status?", b"\xc1"))


# ---------------------------------------------------------------------- the outer frame


@pytest.mark.parametrize("version", [0, 2, -1, True, "1", b"\x01", None, [1]])
def test_any_protocol_version_but_1_is_refused(version):
    frame = raw_frame("status?", pack({"request_id": "s1"}), version=version)
    with pytest.raises(WireError, match="version"):
        decode(frame)


def test_a_float_version_is_refused():
    with pytest.raises(WireError, match="version"):
        decode(raw_frame("status?", pack({"request_id": "s1"}), version=1.0))


@pytest.mark.parametrize("tag", ["nope", "", "Generate", "generate ", "status??"])
def test_an_unknown_tag_is_refused(tag):
    with pytest.raises(WireError, match="unknown message type"):
        decode(raw_frame(tag, pack({"request_id": "s1"})))


@pytest.mark.parametrize("tag", [5, None, b"generate", ["generate"], True])
def test_a_tag_that_is_not_a_string_is_refused(tag):
    frame = pack([PROTOCOL_VERSION, tag, pack({"request_id": "s1"}), ALICE.public.sign_key, b"\x00" * 64])
    with pytest.raises(WireError, match="message type must be a string"):
        decode(frame)


@pytest.mark.parametrize("outer", [
    {"version": 1, "tag": "status?"},
    1,
    "status?",
    b"frame",
    None,
])
def test_an_outer_value_that_is_not_an_array_is_refused(outer):
    with pytest.raises(WireError, match="array of 5"):
        decode(pack(outer))


def test_an_outer_array_of_the_wrong_length_is_refused():
    parts = msgpack.unpackb(SAMPLE_FRAME, raw=False)
    for items in (parts[:4], parts + [None], [], parts[:1]):
        with pytest.raises(WireError, match="array of 5"):
            decode(pack(items))


def test_a_body_that_is_not_bytes_is_refused():
    with pytest.raises(WireError, match="body must be bytes"):
        decode(pack([PROTOCOL_VERSION, "status?", {"request_id": "s1"}, ALICE.public.sign_key, b"\x00" * 64]))


# ---------------------------------------------------------------------- signatures


def test_a_body_changed_after_signing_has_a_bad_signature():
    version, tag, body, sender, sig = msgpack.unpackb(SAMPLE_FRAME, raw=False)
    fields = msgpack.unpackb(body, raw=False)
    fields["max_tokens"] = 4096
    with pytest.raises(WireError, match="bad signature"):
        decode(pack([version, tag, pack(fields), sender, sig]))


def test_claiming_someone_elses_key_is_refused():
    version, tag, body, _, sig = msgpack.unpackb(SAMPLE_FRAME, raw=False)
    with pytest.raises(WireError, match="bad signature"):
        decode(pack([version, tag, body, MALLORY.public.sign_key, sig]))


def test_a_frame_signed_by_someone_else_names_them_as_sender():
    assert decode(encode(SAMPLE, MALLORY)).sender == MALLORY.public.sign_key


def test_a_signature_made_for_another_tag_is_refused():
    body = pack({"request_id": "r1", "prompt": "hi"})
    with pytest.raises(WireError, match="bad signature"):
        decode(raw_frame("generate", body, sign_tag="status?"))


def test_a_signature_without_the_domain_prefix_is_refused():
    body = pack({"request_id": "s1"})
    sig = ALICE.sign(b"status?" + body)
    with pytest.raises(WireError, match="bad signature"):
        decode(raw_frame("status?", body, signature=sig))


def test_moving_the_tag_boundary_between_status_tags_breaks_the_signature():
    # The signed bytes separate tag and body with a NUL, so "status?" + body cannot be
    # re-read as "status" + ("?" + body) with the same signature.
    version, tag, body, sender, sig = msgpack.unpackb(encode(StatusRequest(request_id="s1"), ALICE), raw=False)
    assert tag == "status?"
    with pytest.raises(WireError, match="bad signature"):
        decode(pack([version, "status", b"?" + body, sender, sig]))


@pytest.mark.parametrize("sender,signature,reason", [
    (..., None, "signature"),
    (..., b"", "signature"),
    (..., b"\x00" * 63, "signature"),
    (..., "sixty-four" * 6 + "1234", "signature"),
    (None, ..., "sender"),
    (b"\x00" * 31, ..., "sender"),
    (b"\x01" + b"\x00" * 31, ..., "bad signature"),  # the identity point: small order
])
def test_a_missing_or_malformed_sender_or_signature_is_refused(sender, signature, reason):
    frame = raw_frame("status?", pack({"request_id": "s1"}), sender=sender, signature=signature)
    with pytest.raises(WireError, match=reason):
        decode(frame)


# ---------------------------------------------------------------------- expect=


def test_a_message_of_an_unexpected_type_is_refused():
    frame = encode(StatusRequest(request_id="s1"), ALICE)
    with pytest.raises(WireError, match="unexpected"):
        decode(frame, expect=GenerateRequest)


def test_expect_accepts_the_right_type_or_any_of_a_tuple():
    frame = encode(StatusRequest(request_id="s1"), ALICE)
    assert decode(frame, expect=StatusRequest).msg == StatusRequest(request_id="s1")
    assert decode(frame, expect=(GenerateRequest, StatusRequest)).msg == StatusRequest(request_id="s1")
    with pytest.raises(WireError, match="unexpected"):
        decode(frame, expect=(GenerateRequest, StatusReply))
