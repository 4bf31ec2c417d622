"""The container job messages are untrusted like every frame: a valid one round-trips, anything
out of range is refused at decode time with the reason, random field maps never raise anything
but WireError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from permamesh.containers.messages import MAX_OUTPUT_BYTES, ForwardedRun, RunRequest, RunResult
from permamesh.containers.transfer import HoldingsReply, HoldingsRequest
from permamesh.identity import NodeIdentity
from permamesh.wire import WireError, decode, encode
from permamesh.wire.codec import _signed_bytes

ALICE = NodeIdentity.generate()
REQ = RunRequest("r1", b'{"m":1}', b'{"c":1}', ("/bin/sh", "-c", "echo hi"), 5.0, 64, 0.5, ("tcp://127.0.0.1:5555",))


def frame(tag: str, fields) -> bytes:
    body = msgpack.packb(fields, use_bin_type=True)
    return msgpack.packb([1, tag, body, ALICE.public.sign_key, ALICE.sign(_signed_bytes(tag, body))],
                         use_bin_type=True)


def test_messages_round_trip():
    result = RunResult("r1", 3, b"out", b"err", timed_out=True, runtime="runc", notes=("n",), worker_id="w")
    for msg in (REQ, result, ForwardedRun(REQ, "entry", "why"), HoldingsRequest(("sha256:" + "0" * 64,)),
                HoldingsReply(1, 2)):
        assert decode(encode(msg, ALICE)).msg == msg


@pytest.mark.parametrize("change, match", [
    ({"timeout_s": 0.0}, "timeout_s"), ({"timeout_s": float("nan")}, "timeout_s"),
    ({"memory_mb": 1}, "memory_mb"), ({"manifest": b""}, "manifest"),
    ({"sources": ["http://x:1"]}, "sources"), ({"argv": ["a\x00b"]}, "NUL"),
    ({"sources": ["tcp://h:1"] * 9}, "at most 8 sources"), ({"request_id": ""}, "request_id"),
])
def test_bad_requests_are_refused_with_the_reason(change, match):
    fields = {**REQ.to_fields(), **change}
    with pytest.raises(WireError, match=match):
        decode(frame(RunRequest.TAG, fields))


def test_output_over_the_cap_is_refused():
    fields = {
        "request_id": "r1", "exit_code": 0, "stdout": b"x" * (MAX_OUTPUT_BYTES + 1), "stderr": b""}
    with pytest.raises(WireError, match="capped"):
        decode(frame(RunResult.TAG, fields))


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(), st.text(max_size=40),
                   st.binary(max_size=64), st.lists(st.text(max_size=8), max_size=4))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([RunRequest, RunResult, ForwardedRun, HoldingsRequest, HoldingsReply]),
       st.dictionaries(st.sampled_from(["request_id", "manifest", "config", "argv", "timeout_s", "memory_mb",
                                        "sources", "exit_code", "stdout", "stderr", "request", "entry", "held",
                                        "jobs", "digests", "notes"]), VALUES, max_size=8))
def test_random_fields_decode_or_raise_wire_error(cls, fields):
    try:
        decode(frame(cls.TAG, fields))
    except WireError as exc:
        assert str(exc)
