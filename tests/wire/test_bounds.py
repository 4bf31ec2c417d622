"""Every string a peer can make long is bounded at decode (and at encode, so we never send what a
peer would refuse). The story that motivated it: a worker echoed a 100 KB request id into an
ErrorReply, which then could not be encoded, and its reply loop died."""

from __future__ import annotations

import re

import msgpack
import pytest

from permamesh.identity import NodeIdentity
from permamesh.wire import ErrorReply, GenerateResult, Progress, StatusRequest, WireError, decode, encode
from permamesh.wire import codec
from permamesh.wire.codec import MAX_REQUEST_ID_CHARS
from permamesh.wire.messages import MAX_CODE_CHARS, MAX_ERROR_CHARS

MALLORY = NodeIdentity.generate()


def signed_frame(tag: str, fields: dict, signer: NodeIdentity = MALLORY) -> bytes:
    """Framing and signature correct, so only the body's values can be refused."""
    body = msgpack.packb(fields, use_bin_type=True)
    sig = signer.sign(codec._signed_bytes(tag, body))
    return msgpack.packb([codec.PROTOCOL_VERSION, tag, body, signer.public.sign_key, sig], use_bin_type=True)


RESULT = {"text": "hi", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}
LONG_ID = "r" * 100_000  # fits only a result's body limit (2 MiB)
LONG_ENOUGH_ID = "r" * 10_000  # fits every type's body limit, so only the field bound refuses it

# (tag, the rest of a valid body) for types whose request_id a worker or client would echo
TYPES_WITH_REQUEST_IDS = [
    ("result", RESULT),
    ("error", {"code": "internal", "message": "boom"}),
    ("progress", {"queue_position": 0, "worker_id": "w"}),
    ("status?", {}),
    ("token", {"index": 0, "text": "a", "token_ids": [1]}),
    ("accepted", {"queue_position": 0, "worker_id": "w"}),
]


@pytest.mark.parametrize("tag,rest", TYPES_WITH_REQUEST_IDS, ids=[t for t, _ in TYPES_WITH_REQUEST_IDS])
def test_a_long_request_id_is_refused_at_decode_with_the_reason(tag, rest):
    reason = rf"{re.escape(tag)}\.request_id: 10000 characters exceeds limit {MAX_REQUEST_ID_CHARS}"
    with pytest.raises(WireError, match=reason):
        decode(signed_frame(tag, {"request_id": LONG_ENOUGH_ID, **rest}))


def test_the_fuzzers_100kb_result_frame_is_refused_at_decode():
    with pytest.raises(WireError, match=r"result\.request_id: 100000 characters exceeds limit"):
        decode(signed_frame("result", {"request_id": LONG_ID, **RESULT}))


@pytest.mark.parametrize("tag,rest", TYPES_WITH_REQUEST_IDS, ids=[t for t, _ in TYPES_WITH_REQUEST_IDS])
def test_a_request_id_at_the_limit_is_accepted(tag, rest):
    msg = decode(signed_frame(tag, {"request_id": "r" * MAX_REQUEST_ID_CHARS, **rest})).msg
    assert msg.request_id == "r" * MAX_REQUEST_ID_CHARS


def test_a_message_type_from_another_package_gets_the_request_id_bound_too():
    from permamesh.containers.messages import RunResult

    assert RunResult.LIMITS["request_id"] == MAX_REQUEST_ID_CHARS
    with pytest.raises(WireError, match="request_id"):
        decode(signed_frame(RunResult.TAG, {"request_id": LONG_ID, "exit_code": 0, "stdout": b"", "stderr": b""}))


def test_error_codes_are_short_words():
    with pytest.raises(WireError, match=r"error\.code: .* exceeds limit"):
        decode(signed_frame("error", {"request_id": "", "code": "c" * (MAX_CODE_CHARS + 1), "message": "m"}))


def test_an_error_text_is_cut_when_built_and_refused_when_too_long_from_a_peer():
    built = ErrorReply("r1", "internal", "x" * 100_000)
    assert len(built.message) == MAX_ERROR_CHARS and built.message.endswith("...")
    assert decode(encode(built, MALLORY)).msg == built  # what we build always goes out
    with pytest.raises(WireError, match=r"error\.message: .* exceeds limit"):
        decode(signed_frame("error", {"request_id": "", "code": "internal", "message": "x" * (MAX_ERROR_CHARS + 1)}))


def test_we_never_encode_what_a_peer_would_refuse():
    with pytest.raises(WireError, match="request_id"):
        encode(ErrorReply(LONG_ID, "bad_request", "no"), MALLORY)
    with pytest.raises(WireError, match="request_id"):
        encode(GenerateResult(LONG_ID, "t", "stop", 1, 1), MALLORY)
    assert decode(encode(Progress("p" * 128, 0, "w"), MALLORY)).msg.request_id == "p" * 128
    assert decode(encode(StatusRequest("s"), MALLORY)).msg == StatusRequest("s")
