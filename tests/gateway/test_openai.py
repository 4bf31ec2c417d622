"""The gateway with the official ``openai`` package as the client, against real workers through
the anonymous overlay: models, chat and text completions, streamed and not, usage, errors in
the OpenAI shape, per-key credit on the committee's ledger, metrics."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

MODEL = "tiny-random"
CHAT = [{"role": "user", "content": "Tell me about community networks."}]


@pytest.fixture(scope="module")
def client(stack):
    with openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.key, max_retries=0, timeout=120) as c:
        yield c


def test_models_lists_what_the_workers_serve(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion_streamed_and_not_agree(client, stack):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    answer = whole.choices[0].message
    assert answer.role == "assistant" and isinstance(answer.content, str) and answer.content
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 5
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.id.startswith("chatcmpl-") and whole.model == MODEL
    assert whole.system_fingerprint.removeprefix("permamesh-") in {c.node_id[:8] for c in stack.mesh.children}
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.content  # greedy: the same answer, whichever worker served it
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_completions_streamed_and_not(client):
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].text


def test_errors_come_in_the_openai_shape(client, stack):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=CHAT, max_tokens=2)
    assert missing.value.code == "model_not_found" and "tiny-random" in missing.value.message
    with pytest.raises(openai.BadRequestError) as hot:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=5)
    assert hot.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as many:
        client.chat.completions.create(model=MODEL, messages=CHAT, n=9)
    assert many.value.param == "n"
    with pytest.raises(openai.BadRequestError) as role:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    assert role.value.param == "messages[0].role"
    with openai.OpenAI(base_url=stack.url + "/v1", api_key="pm-wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
    request = urllib.request.Request(stack.url + "/v1/chat/completions", data=b"{not json",
                                     headers={"Authorization": f"Bearer {stack.key}"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as junk:
        urllib.request.urlopen(request, timeout=30)
    body = json.loads(junk.value.read())
    assert junk.value.code == 400 and body["error"]["type"] == "invalid_request_error"


def test_each_key_pays_with_its_own_committee_credit(client, stack):
    alice = stack.gateway.keys.identity("alice").public.sign_key
    before = stack.committee.query("/account", alice)
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0)
    after = stack.committee.query("/account", alice)
    assert after["balance"] < before["balance"]  # a signed receipt paid the worker
    with pytest.raises(openai.RateLimitError) as broke:  # more than the credit left could cover
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 30000}],
                                       max_tokens=8192)
    assert broke.value.code == "insufficient_quota" and "out of credit" in broke.value.message
    usage = stack.gateway.credit.usage()["alice"]
    assert usage["refused"] == 1 and usage["units_paid"] > 0 and usage["requests"] >= 1


def test_gateway_metrics_are_prometheus_text(client, stack):
    text = urllib.request.urlopen(stack.url + "/metrics", timeout=30).read().decode()
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    ok = sum(s.value for s in families["permamesh_gateway_requests"]
             if s.labels.get("route") == "/v1/chat/completions" and s.labels.get("status") == "200")
    assert ok >= 1 and "permamesh_gateway_request_latency_seconds" in families


def test_made_up_paths_do_not_grow_the_metrics(stack):
    for i in range(5):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{stack.url}/api/made-up-{i}", timeout=30)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{stack.url}/v1/made-up-{i}", timeout=30)
    text = urllib.request.urlopen(stack.url + "/metrics", timeout=30).read().decode()
    routes = {s.labels["route"] for f in text_string_to_metric_families(text) if f.name == "permamesh_gateway_requests"
              for s in f.samples}
    assert not any("made-up" in r for r in routes) and "unmatched" in routes
