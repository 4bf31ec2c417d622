"""The request-path messages: every type survives the wire, and GenerateRequest refuses bad
values both when built locally and when a peer sends them in a properly signed frame."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.identity import NodeIdentity
from permamesh.wire import (
    Accepted,
    ChatMessage,
    ErrorReply,
    GenerateRequest,
    GenerateResult,
    StatusReply,
    StatusRequest,
    TokenChunk,
    WireError,
    decode,
    encode,
    known_tags,
)
from permamesh.wire import codec
from permamesh.wire.messages import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, MAX_STOP_STRINGS, MIN_TEMPERATURE

ALICE = NodeIdentity.generate()


def signed_frame(tag: str, fields: dict, signer: NodeIdentity = ALICE) -> bytes:
    """A frame whose framing and signature are correct, so only the body's values can fail."""
    body = msgpack.packb(fields, use_bin_type=True)
    sig = signer.sign(codec._signed_bytes(tag, body))
    return msgpack.packb([codec.PROTOCOL_VERSION, tag, body, signer.public.sign_key, sig], use_bin_type=True)


EVERY_MESSAGE = {
    "generate_with_prompt": GenerateRequest(request_id="r1", prompt="Once upon a time"),
    "generate_with_chat_and_all_options": GenerateRequest(
        request_id="r2",
        messages=(
            ChatMessage(role="system", content="be brief"),
            ChatMessage(role="user", content="héllo ✓ 🌍"),
            ChatMessage(role="assistant", content=""),
        ),
        max_tokens=MAX_NEW_TOKENS,
        temperature=0.7,
        top_p=0.9,
        seed=2**63 - 1,
        stop=("\n\n", "<END>"),
        stream=True,
        logprobs=True,
        model="smollm2-135m",
    ),
    "accepted": Accepted(request_id="r1", queue_position=3, worker_id="w-1"),
    "token_chunk": TokenChunk(request_id="r1", index=7, text=" wor", token_ids=(101, 102), logprobs=(-0.5, -1.25)),
    "result_with_logprobs": GenerateResult(
        request_id="r1",
        text="Hello world",
        finish_reason="stop",
        prompt_tokens=4,
        completion_tokens=2,
        token_ids=(5, 6),
        logprobs=(-0.1, -2.5),
        worker_id="w-1",
        model="tiny-random",
        queue_wait_s=0.25,
        ttft_s=0.5,
        total_s=1.5,
    ),
    "error_for_undecodable_frame": ErrorReply(request_id="", code="bad_frame", message="not valid msgpack"),
    "status_request": StatusRequest(request_id="s1"),
    "status_reply": StatusReply(
        request_id="s1",
        worker_id="w-1",
        model="tiny-random",
        device="cpu",
        queue_length=2,
        busy=True,
        served=10,
        rejected_frames=1,
        prefill_tok_per_s=1234.5,
        decode_tok_per_s=56.0,
        uptime_s=3600.0,
    ),
}


def test_the_request_path_registers_exactly_these_tags():
    assert {"generate", "accepted", "token", "result", "error", "status?", "status"} <= set(known_tags())
    assert {type(m).TAG for m in EVERY_MESSAGE.values()} == {
        "generate", "accepted", "token", "result", "error", "status?", "status"
    }


@pytest.mark.parametrize("name", sorted(EVERY_MESSAGE))
def test_every_message_arrives_exactly_as_sent_with_its_signer(name):
    msg = EVERY_MESSAGE[name]
    received = decode(encode(msg, ALICE))
    assert type(received.msg) is type(msg)
    assert received.msg == msg
    assert received.sender == ALICE.public.sign_key


def test_chat_messages_come_back_as_chat_message_records():
    msg = EVERY_MESSAGE["generate_with_chat_and_all_options"]
    got = decode(encode(msg, ALICE)).msg
    assert isinstance(got.messages, tuple)
    assert all(type(m) is ChatMessage for m in got.messages)
    assert isinstance(got.stop, tuple)


def test_a_signed_message_cannot_be_encoded_without_a_signer():
    with pytest.raises(WireError, match="signed"):
        encode(StatusRequest(request_id="s1"))


finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(
    request_id=st.text(min_size=1, max_size=64),
    text=st.text(max_size=200),
    index=st.integers(min_value=-(2**63), max_value=2**64 - 1),
    token_ids=st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=20),
    logprobs=st.lists(finite, max_size=20),
    texts=st.booleans(),
)
def test_any_token_chunk_with_finite_numbers_round_trips_or_is_refused(request_id, text, index, token_ids, logprobs,
                                                                      texts):
    """A chunk's per-token fields come one per token or not at all; its index is >= 0."""
    tokens = tuple(str(t)[:8] for t in token_ids) if texts else ()
    fields = dict(request_id=request_id, index=index, text=text, token_ids=tuple(token_ids), logprobs=tuple(logprobs),
                  tokens=tokens)
    if index < 0 or len(logprobs) not in (0, len(token_ids)):
        with pytest.raises(WireError):
            TokenChunk(**fields)
        return
    msg = TokenChunk(**fields)
    assert decode(encode(msg, ALICE)).msg == msg


@settings(max_examples=150, deadline=None)
@given(
    prompt=st.text(max_size=300),
    max_tokens=st.integers(min_value=1, max_value=MAX_NEW_TOKENS),
    temperature=st.just(0.0) | st.floats(min_value=MIN_TEMPERATURE, max_value=10.0),  # the valid ones only
    top_p=st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    seed=st.none() | st.integers(min_value=0, max_value=2**63 - 1),
    stop=st.lists(st.text(min_size=1, max_size=256), max_size=MAX_STOP_STRINGS),
    flags=st.tuples(st.booleans(), st.booleans()),
)
def test_any_valid_generate_request_round_trips(prompt, max_tokens, temperature, top_p, seed, stop, flags):
    msg = GenerateRequest(
        request_id="r", prompt=prompt, max_tokens=max_tokens, temperature=temperature,
        top_p=top_p, seed=seed, stop=tuple(stop), stream=flags[0], logprobs=flags[1],
    )
    assert decode(encode(msg, ALICE), expect=GenerateRequest).msg == msg


# ------------------------------------------------------------------ GenerateRequest validation

VALID_CHAT = {"role": "user", "content": "hi"}

# (name, keyword arguments for local construction, body for a crafted frame, expected message)
BAD_REQUESTS = [
    ("both_prompt_and_messages", dict(prompt="hi", messages=(ChatMessage("user", "hi"),)),
     {"prompt": "hi", "messages": [VALID_CHAT]}, "exactly one of prompt or messages"),
    ("neither_prompt_nor_messages", dict(), {}, "exactly one of prompt or messages"),
    ("max_tokens_zero", dict(prompt="hi", max_tokens=0), {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("max_tokens_negative", dict(prompt="hi", max_tokens=-1), {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("max_tokens_over_limit", dict(prompt="hi", max_tokens=MAX_NEW_TOKENS + 1),
     {"prompt": "hi", "max_tokens": MAX_NEW_TOKENS + 1}, "max_tokens"),
    ("negative_temperature", dict(prompt="hi", temperature=-0.01), {"prompt": "hi", "temperature": -0.01}, "temperature"),
    ("huge_temperature", dict(prompt="hi", temperature=10.5), {"prompt": "hi", "temperature": 10.5}, "temperature"),
    # below float32's range: these passed and ended in a RuntimeError in the sampler (issue 19)
    ("temperature_1e-300", dict(prompt="hi", temperature=1e-300), {"prompt": "hi", "temperature": 1e-300},
     "below float32's range"),
    ("temperature_5e-324", dict(prompt="hi", temperature=5e-324), {"prompt": "hi", "temperature": 5e-324},
     "below float32's range"),
    ("temperature_float32_subnormal", dict(prompt="hi", temperature=1e-45), {"prompt": "hi", "temperature": 1e-45},
     "below float32's range"),
    ("top_p_zero", dict(prompt="hi", top_p=0.0), {"prompt": "hi", "top_p": 0.0}, "top_p"),
    ("top_p_over_one", dict(prompt="hi", top_p=1.01), {"prompt": "hi", "top_p": 1.01}, "top_p"),
    ("too_many_stop_strings", dict(prompt="hi", stop=tuple("abcdefghi")),
     {"prompt": "hi", "stop": list("abcdefghi")}, "stop strings"),
    ("empty_stop_string", dict(prompt="hi", stop=("",)), {"prompt": "hi", "stop": [""]}, "stop strings"),
    ("negative_seed", dict(prompt="hi", seed=-1), {"prompt": "hi", "seed": -1}, "seed"),
    ("seed_too_big", dict(prompt="hi", seed=2**63), {"prompt": "hi", "seed": 2**63}, "seed"),
    ("prompt_too_long", dict(prompt="x" * (MAX_PROMPT_CHARS + 1)), {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "exceeds"),
    ("model_name_too_long", dict(prompt="hi", model="m" * 129), {"prompt": "hi", "model": "m" * 129}, "model"),
]


@pytest.mark.parametrize("kwargs,expected", [(b[1], b[3]) for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_a_bad_request_is_refused_when_built_locally(kwargs, expected):
    with pytest.raises(WireError, match=expected):
        GenerateRequest(request_id="r1", **kwargs)


@pytest.mark.parametrize("fields,expected", [(b[2], b[3]) for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_a_bad_request_from_a_peer_is_refused_at_decode(fields, expected):
    frame = signed_frame("generate", {"request_id": "r1", **fields})
    with pytest.raises(WireError, match=expected):
        decode(frame)


@pytest.mark.parametrize("request_id", ["", "x" * 65])
def test_a_request_id_outside_1_to_64_characters_is_refused(request_id):
    with pytest.raises(WireError, match="request_id"):
        GenerateRequest(request_id=request_id, prompt="hi")
    with pytest.raises(WireError, match="request_id"):
        decode(signed_frame("generate", {"request_id": request_id, "prompt": "hi"}))


def test_the_limits_themselves_are_allowed():
    edge = dict(
        request_id="x" * 64, prompt="p" * MAX_PROMPT_CHARS, max_tokens=MAX_NEW_TOKENS, temperature=10.0,
        top_p=1.0, seed=0, stop=tuple("s" * 256 for _ in range(MAX_STOP_STRINGS)), model="m" * 128,
    )
    msg = GenerateRequest(**edge)
    assert decode(encode(msg, ALICE)).msg == msg
    assert GenerateRequest(request_id="r", prompt="hi", max_tokens=1, temperature=0.0).max_tokens == 1
    assert GenerateRequest(request_id="r", prompt="hi", temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_non_finite_sampling_values_are_refused_locally(field, value):
    with pytest.raises(WireError, match=field):
        GenerateRequest(request_id="r1", prompt="hi", **{field: value})


def test_a_chat_message_with_an_unknown_role_is_refused_locally():
    with pytest.raises(WireError, match="role"):
        ChatMessage(role="robot", content="beep")


def test_a_chat_prompt_counts_toward_the_prompt_size_limit():
    half = "x" * (MAX_PROMPT_CHARS // 2 + 1)
    with pytest.raises(WireError, match="exceeds"):
        GenerateRequest(request_id="r", messages=(ChatMessage("user", half), ChatMessage("user", half)))
