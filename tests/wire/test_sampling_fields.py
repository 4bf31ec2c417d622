"""The request fields of penalties, top log-probabilities and grammars, and the result's token
texts and alternatives: they travel (encode, decode), and a peer that sends them out of range
is refused at decode with the reason, before any worker state changes."""

from __future__ import annotations

import pytest

from permamesh.identity import NodeIdentity
from permamesh.wire import GenerateRequest, GenerateResult, TopLogprobs, WireError, decode, encode
from permamesh.wire.messages import MAX_GRAMMAR_CHARS, MAX_TOKEN_TEXT

from .test_bounds import signed_frame

ME = NodeIdentity.generate()
BASE = {"request_id": "r1", "prompt": "hi"}


def test_the_new_fields_travel():
    req = GenerateRequest("r1", prompt="hi", presence_penalty=-1.5, frequency_penalty=2.0, logprobs=True,
                          top_logprobs=5, grammar_kind="json_schema", grammar='{"type": "object"}')
    assert decode(encode(req, ME)).msg == req
    result = GenerateResult("r1", "ab", "stop", 1, 2, token_ids=(1, 2), logprobs=(-0.1, -0.2), tokens=("a", "b"),
                            top_logprobs=(TopLogprobs(("a", "c"), (-0.1, -3.0)), TopLogprobs(("b",), (-0.2,))))
    assert decode(encode(result, ME)).msg == result


@pytest.mark.parametrize("fields, reason", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"top_logprobs": 3}, "needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 20, "max_tokens": 8192}, "top_logprobs x max_tokens"),
    ({"grammar_kind": "regex", "grammar": "a+"}, "grammar_kind"),
    ({"grammar_kind": "json_schema"}, "need a grammar"),
    ({"grammar_kind": "json_object", "grammar": "{}"}, "take none"),
    ({"grammar_kind": "lark", "grammar": "x" * (MAX_GRAMMAR_CHARS + 1)}, "exceeds"),
])
def test_a_peer_out_of_range_is_refused_at_decode(fields, reason):
    with pytest.raises(WireError, match=reason):
        decode(signed_frame("generate", {**BASE, **fields}))


@pytest.mark.parametrize("fields, reason", [
    ({"token_ids": [1], "tokens": ["x" * (MAX_TOKEN_TEXT + 1)]}, "exceeds"),
    ({"token_ids": [1], "tokens": ["a", "b"]}, "more token texts"),
    ({"token_ids": [1], "top_logprobs": [{"tokens": ["a"] * 21, "logprobs": [-1.0] * 21}]}, "at most 20"),
    ({"token_ids": [1], "top_logprobs": [{"tokens": ["a"], "logprobs": [0.5]}]}, "<= 0"),
    ({"token_ids": [1], "top_logprobs": [{"tokens": ["a", "b"], "logprobs": [-1.0]}]}, "one log-probability each"),
])
def test_a_result_with_unbounded_alternatives_is_refused(fields, reason):
    body = {"request_id": "r1", "text": "a", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1,
            **fields}
    with pytest.raises(WireError, match=reason):
        decode(signed_frame("result", body))
