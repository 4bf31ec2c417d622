"""The gateway's request parsing is pure and strict: valid OpenAI bodies become jobs, anything
else is an ApiError naming the parameter, and random JSON never raises anything else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.gateway import openai_api as oa
from permamesh.gateway.errors import ApiError
from permamesh.wire import GenerateRequest, GenerateResult


def test_a_chat_body_becomes_a_request():
    parsed = oa.parse_chat({"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                                       {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                            "max_completion_tokens": 7, "temperature": 0, "stop": "\n", "stream": True,
                            "stream_options": {"include_usage": True}, "user": "u1"})
    req = GenerateRequest("r", **parsed.fields)
    assert [m.role for m in req.messages] == ["system", "user"] and req.messages[1].content == "hi"
    assert (req.max_tokens, req.temperature, req.stop) == (7, 0.0, ("\n",))
    assert parsed.stream and parsed.include_usage and parsed.model == "m"


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 1e-300}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 5e-324}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 9}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
])
def test_bad_bodies_name_the_parameter(body, param):
    with pytest.raises(ApiError) as err:
        oa.parse_chat(body)
    assert err.value.status == 400 and err.value.param == param
    assert err.value.body()["error"]["type"] == "invalid_request_error"


def test_a_prompt_over_the_jobs_limit_is_a_400():
    with pytest.raises(ApiError, match="exceeds") as err:
        oa.parse_completion({"model": "m", "prompt": "x" * (300 * 1024)})
    assert err.value.status == 400


def test_responses_have_the_openai_shape():
    result = GenerateResult("r", "Hello there", "stop", 5, 2, worker_id="abcdef0123", cached_tokens=3)
    chat = oa.chat_response(result, "m", "chatcmpl-x", 1)
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Hello there"}
    assert chat["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 3}}
    assert "".join(oa.pieces("  two  words\nand more ")) == "  two  words\nand more "


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                    max_leaves=20)
KEYS = st.sampled_from(["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "stop", "n", "seed",
                        "stream", "stream_options", "tools", "logprobs", "response_format"])


@settings(max_examples=400, deadline=None)
@given(st.one_of(JSON, st.dictionaries(KEYS, JSON, max_size=8)))
def test_random_bodies_give_a_request_or_an_api_error(body):
    for parse in (oa.parse_chat, oa.parse_completion):
        try:
            parsed = parse(body)
        except ApiError as exc:
            assert 400 <= exc.status < 500 and exc.message
        else:
            GenerateRequest("r", **parsed.fields)  # whatever parses must be a valid job
