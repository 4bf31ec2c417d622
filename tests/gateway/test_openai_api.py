"""The gateway's request parsing is pure and strict: valid OpenAI bodies become jobs, anything
else is an ApiError naming the parameter, and random JSON never raises anything else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.gateway import openai_api as oa
from permamesh.gateway import responses as rs
from permamesh.gateway.errors import ApiError
from permamesh.wire import GenerateRequest, GenerateResult, WireError


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
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0]"),
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
    chat = rs.chat_response(result, "m", "chatcmpl-x", 1)
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Hello there"}
    assert chat["choices"][0]["logprobs"] is None  # none asked for
    assert chat["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 3}}
    assert "".join(rs.pieces("  two  words\nand more ")) == "  two  words\nand more "


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                    max_leaves=20)
KEYS = st.sampled_from(["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "stop", "n", "seed",
                        "stream", "stream_options", "tools", "logprobs", "response_format", "tool_choice", "echo",
                        "top_logprobs", "presence_penalty", "best_of"])


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


CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize("extra, param", [
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"audio": {"voice": "x"}}, "audio"),
    ({"made_up": 1}, "made_up"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema"),
    ({"tool_choice": "required"}, "tool_choice"),  # without tools
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 9}, "n"),
])
def test_every_other_chat_parameter_is_refused_by_name(extra, param):
    with pytest.raises(ApiError) as err:
        oa.parse_chat({**CHAT, **extra})
    assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize("extra, param", [
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"echo": True, "logprobs": 2}, "echo"),
    ({"logprobs": 6}, "logprobs"),
    ({"messages": []}, "messages"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_every_other_completion_parameter_is_refused_by_name(extra, param):
    with pytest.raises(ApiError) as err:
        oa.parse_completion({"model": "m", "prompt": "p", **extra})
    assert err.value.status == 400 and err.value.param == param
    assert err.value.body()["error"]["code"] in ("unsupported_parameter", None)


def test_accepted_parameters_reach_the_job():
    parsed = oa.parse_chat({**CHAT, "presence_penalty": -0.5, "frequency_penalty": 1.5, "logprobs": True,
                            "top_logprobs": 4, "n": 3, "seed": 7})
    req = GenerateRequest("r", **parsed.fields)
    assert (req.presence_penalty, req.frequency_penalty, req.logprobs, req.top_logprobs) == (-0.5, 1.5, True, 4)
    assert parsed.n == 3 and [oa.choice_fields(parsed, i)["seed"] for i in range(3)] == [7, 8, 9]
    done = oa.parse_completion({"model": "m", "prompt": "p", "logprobs": 2, "echo": False, "best_of": 2, "n": 2})
    assert done.fields["top_logprobs"] == 2 and done.fields["logprobs"] and done.n == 2
    assert oa.parse_completion({"model": "m", "prompt": "p", "echo": True}).echo == "p"


def test_logprobs_have_the_openai_shapes():
    from permamesh.wire import TopLogprobs

    result = GenerateResult("r", "Hi there", "stop", 5, 2, token_ids=(1, 2), logprobs=(-0.5, -1.0),
                            tokens=("Hi", " there"), top_logprobs=(TopLogprobs(("Hi", "Ho"), (-0.5, -2.0)),
                                                                 TopLogprobs((" there",), (-1.0,))))
    chat = rs.chat_response([result, result], "m", "chatcmpl-x", 1)
    assert [c["index"] for c in chat["choices"]] == [0, 1] and chat["usage"]["completion_tokens"] == 4
    first = chat["choices"][0]["logprobs"]["content"][0]
    assert first == {"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                     "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                                      {"token": "Ho", "logprob": -2.0, "bytes": [72, 111]}]}
    text = rs.completion_response(result, "m", "cmpl-x", 1, echo="Say: ")["choices"][0]
    assert text["text"] == "Say: Hi there"
    assert text["logprobs"] == {"tokens": ["Hi", " there"], "token_logprobs": [-0.5, -1.0],
                                "top_logprobs": [{"Hi": -0.5, "Ho": -2.0}, {" there": -1.0}], "text_offset": [5, 7]}


def test_a_streamed_choice_sends_each_chunks_log_probs_with_it_and_the_rest_from_the_result():
    """What the workers put in their token chunks reaches the stream chunk by chunk; what no
    chunk carried (the overlay's last piece, or alternatives an older worker does not stream)
    comes from the result, so the deltas always join to the whole answer."""
    from permamesh.gateway.deltas import ChoiceDeltas
    from permamesh.wire import TokenChunk, TopLogprobs

    tops = (TopLogprobs(("Hi", "Ho"), (-0.5, -2.0)), TopLogprobs((" there",), (-1.0,)))
    result = GenerateResult("r", "Hi there", "stop", 5, 2, token_ids=(1, 2), logprobs=(-0.5, -1.0),
                            tokens=("Hi", " there"), top_logprobs=tops)
    choice = ChoiceDeltas(logprobs=True, top=2)
    first = choice.chunk(TokenChunk("r", 0, "Hi", (1,), (-0.5,), ("Hi",), tops[:1]))
    assert first.text == "Hi" and [(e.token, e.logprob, e.top, e.offset) for e in first.entries] == \
        [("Hi", -0.5, (("Hi", -0.5), ("Ho", -2.0)), 0)]
    rest = choice.rest(result)  # the second token came only in the result
    assert [(d.text, [(e.token, e.offset) for e in d.entries]) for d in rest] == [(" there", [(" there", 2)])]
    assert rs.completion_entries(rest[0].entries, top=True) == {
        "tokens": [" there"], "token_logprobs": [-1.0], "top_logprobs": [{" there": -1.0}], "text_offset": [2]}
    older = ChoiceDeltas(logprobs=True, top=2)  # a chunk without alternatives: held, the result has them
    assert older.chunk(TokenChunk("r", 0, "Hi", (1,), (-0.5,), ("Hi",))) is None
    assert [d.text for d in older.rest(result)] == ["Hi", " there"]
    plain = ChoiceDeltas(logprobs=False)
    assert plain.chunk(TokenChunk("r", 0, "Hi", (1,), (-0.5,))).entries is None
    assert [d.text for d in plain.rest(result)] == [" there"]
    with pytest.raises(WireError):  # from a peer: one entry per token or none
        TokenChunk("r", 0, "Hi", (1, 2), (-0.5,))


def test_credit_counts_tokens_and_charges_cached_ones_less():
    from permamesh.gateway.accounts import estimate_tokens, job_units

    assert estimate_tokens("x" * 3000) == 1000 + 64  # not one token per byte any more
    assert job_units(100, 10) == 110
    assert job_units(100, 10, cached_tokens=80) == 20 + 20 + 10
    assert job_units(0, 0) == 1


WEATHER = {"type": "function", "function": {"name": "weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def test_structured_outputs_and_tools_become_the_jobs_grammar():
    import json

    from permamesh.gateway import tools

    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    parsed = oa.parse_chat({**CHAT, "response_format": {"type": "json_schema",
                                                        "json_schema": {"name": "thing", "schema": schema}}})
    assert parsed.fields["grammar_kind"] == "json_schema" and json.loads(parsed.fields["grammar"]) == schema
    assert oa.parse_chat({**CHAT, "response_format": {"type": "json_object"}}).fields["grammar_kind"] == "json_object"
    forced = oa.parse_chat({**CHAT, "tools": [WEATHER], "tool_choice": "required"})
    assert forced.fields["grammar_kind"] == "json_schema" and forced.functions == ("weather",)
    assert forced.fields["messages"][0].role == "system" and "weather" in forced.fields["messages"][0].content
    auto = oa.parse_chat({**CHAT, "tools": [WEATHER]})
    assert auto.fields["grammar_kind"] == "lark" and "%json" in auto.fields["grammar"]
    assert oa.parse_chat({**CHAT, "tools": [WEATHER], "tool_choice": "none"}).fields["grammar_kind"] == ""
    turns = oa.parse_chat({"model": "m", "messages": [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"}], "tools": [WEATHER]})
    assert [m.role for m in turns.fields["messages"]][1:] == ["user", "assistant", "user"]
    assert json.loads(turns.fields["messages"][2].content) == [{"name": "weather", "arguments": {"city": "Oslo"}}]
    calls = tools.tool_calls('{"name":"weather","arguments":{"city":"Oslo"}}', ("weather",))
    assert calls[0]["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    # parallel_tool_calls true or absent: the grammar takes a list of calls, each read back with its own id
    assert json.loads(forced.fields["grammar"])["type"] == "array" and "JSON list" in forced.fields["messages"][0].content
    single = oa.parse_chat({**CHAT, "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False})
    assert json.loads(single.fields["grammar"])["properties"]["name"] == {"const": "weather"}
    two = tools.tool_calls('[{"name":"weather","arguments":{"city":"Oslo"}},{"name":"weather","arguments":{}}]',
                           ("weather",))
    assert [c["function"]["arguments"] for c in two] == ['{"city": "Oslo"}', "{}"] and two[0]["id"] != two[1]["id"]
    assert tools.tool_calls('[{"name":"weather","arguments":{}},{"name":"other","arguments":{}}]', ("weather",)) is None
    assert tools.tool_calls("[]", ("weather",)) is None
    assert tools.tool_calls("plain text", ("weather",)) is None
    assert tools.tool_calls('{"name":"other","arguments":{}}', ("weather",)) is None


TOOLISH = st.fixed_dictionaries({"type": st.sampled_from(["function", "other"]),
                                 "function": st.one_of(JSON, st.fixed_dictionaries(
                                     {"name": st.one_of(st.text(max_size=8), JSON), "parameters": JSON}))})


@settings(max_examples=150, deadline=None)
@given(st.lists(TOOLISH, max_size=3), JSON, st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["assistant", "tool", "user"]), "content": JSON, "tool_calls": JSON,
     "tool_call_id": JSON}), min_size=1, max_size=3))
def test_random_tool_bodies_give_a_request_or_an_api_error(tools, choice, messages):
    try:
        parsed = oa.parse_chat({"model": "m", "messages": messages, "tools": tools, "tool_choice": choice})
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.message
    else:
        GenerateRequest("r", **parsed.fields)


def test_message_fields_have_their_effect_or_are_refused():
    named = oa.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi", "name": "ada"}]})
    assert named.fields["messages"][0].content == "ada: hi"
    for extra, param in (({"audio": {"id": "x"}}, "messages[0].audio"), ({"refusal": "no"}, "messages[0].refusal"),
                         ({"name": 5}, "messages[0].name")):
        with pytest.raises(ApiError) as err:
            oa.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi", **extra}]})
        assert err.value.param == param
