"""Every parameter of the OpenAI API the gateway accepts has its effect, and every other one is
refused by name: the official ``openai`` client (and LangChain's ``ChatOpenAI``) against real
workers through the anonymous overlay (the stack of ``conftest.py``: tiny-random, greedy
answers agree across workers)."""

from __future__ import annotations

import openai
import pytest

MODEL = "tiny-random"
CHAT = [{"role": "user", "content": "Say something about meshes."}]


@pytest.fixture(scope="module")
def client(stack):
    with openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.key, max_retries=0, timeout=120) as c:
        yield c


def test_chat_logprobs_and_top_logprobs_come_back_whole_and_streamed(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                           top_logprobs=3)
    choice = whole.choices[0]
    content = choice.logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy: the likeliest
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None  # not asked for


def test_completion_logprobs_and_echo(client):
    whole = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, temperature=0, logprobs=2)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == whole.usage.completion_tokens
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    echoed = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon" + whole.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=5, temperature=0, echo=True, stream=True) if c.choices)
    assert streamed == echoed.choices[0].text
    with pytest.raises(openai.BadRequestError) as both:
        client.completions.create(model=MODEL, prompt="x", echo=True, logprobs=1)
    assert both.value.param == "echo"


def test_penalties_change_a_repetitive_greedy_answer(client):
    def answer(**kw):
        return client.completions.create(model=MODEL, prompt="aaaa", max_tokens=24, temperature=0, **kw).choices[0].text

    plain = answer()
    penalized = answer(frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized != plain and len(set(penalized)) > len(set(plain))  # tiny-random repeats itself greedily
    assert answer(frequency_penalty=2.0, presence_penalty=2.0) == penalized  # applied deterministically
    with pytest.raises(openai.BadRequestError) as hot:
        answer(presence_penalty=3)
    assert hot.value.param == "presence_penalty"


def test_n_choices_are_served_whole_and_streamed(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=1.0, seed=3, n=3)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert len({c.message.content for c in whole.choices}) > 1  # each choice samples with its own seed
    one = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, temperature=0)
    assert whole.usage.prompt_tokens == 3 * one.usage.prompt_tokens  # each choice is a job of its own
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=1.0, seed=3,
                                                 n=3, stream=True))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(3)}
    assert texts == {c.index: c.message.content for c in whole.choices}  # seeded: the same choices
    finals = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finals == [0, 1, 2]


def test_other_parameters_are_refused_by_name(client):
    for kwargs, param in (({"logit_bias": {"5": 1}}, "logit_bias"), ({"extra_body": {"made_up": 1}}, "made_up"),
                          ({"functions": [{"name": "f"}]}, "functions")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, **kwargs)
        assert refused.value.param == param and refused.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as suffix:
        client.completions.create(model=MODEL, prompt="x", suffix="y", max_tokens=2)
    assert suffix.value.param == "suffix"


def test_models_by_id_and_unsupported_endpoints(client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-9")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as embeddings:
        client.embeddings.create(model=MODEL, input="x")
    assert "Invalid URL (POST /v1/embeddings)" in embeddings.value.message
    assert embeddings.value.body["type"] == "invalid_request_error"


def test_a_prompt_beyond_the_context_is_context_length_exceeded(client):
    """12,000 bytes is 12,000 tokens of tiny-random's byte vocabulary (context 4,096): admitted
    by credit (estimated from tokens, not one per byte), refused by the worker for its length."""
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL, prompt="word " * 2400, max_tokens=1)
    assert long.value.code == "context_length_exceeded"


def test_a_quota_refusal_tells_clients_not_to_retry(stack):
    with openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.key, max_retries=3, timeout=120) as patient:
        with pytest.raises(openai.RateLimitError) as broke:
            patient.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8192, n=8)
    assert broke.value.code == "insufficient_quota"
    assert broke.value.response.headers["x-should-retry"] == "false"
    refused = stack.gateway.credit.usage()["alice"]["refused"]
    assert refused >= 1


def test_langchain_chat_openai_invokes_and_streams(stack):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=stack.url + "/v1", api_key=stack.key, temperature=0,
                                      max_tokens=6, max_retries=0)
    answer = llm.invoke("Hello")
    assert isinstance(answer.content, str) and answer.content
    assert "".join(chunk.content for chunk in llm.stream("Hello")) == answer.content
    scored = llm.bind(logprobs=True).invoke("Hello")
    assert len(scored.response_metadata["logprobs"]["content"]) >= 1


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                            "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Lima"]}},
                   "required": ["city"], "additionalProperties": False}}}


def test_structured_outputs_parse_whole_and_streamed(client):
    """tiny-random writes noise unconstrained; under the worker's grammar its answers are JSON."""
    import json

    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=60, temperature=0, response_format=fmt)
    value = json.loads(whole.choices[0].message.content)
    assert set(value) == {"ok", "n"} and 0 <= value["n"] <= 9
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=60, temperature=0, response_format=fmt, stream=True) if c.choices)
    assert json.loads(streamed) == value
    anything = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=200, temperature=0,
                                              response_format={"type": "json_object"})
    if anything.choices[0].finish_reason == "stop":  # a random model may run out of tokens inside a string
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    else:
        assert anything.choices[0].message.content.startswith("{")


def test_tool_calls_parse_whole_and_streamed(client):
    import json

    forced = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                            max_tokens=60, temperature=0, tools=[WEATHER], tool_choice="required")
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "weather" and json.loads(call.function.arguments)["city"] in ("Oslo", "Lima")
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}], max_tokens=60, temperature=0,
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "weather"}}, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "weather" and json.loads(deltas[0].function.arguments) == \
        json.loads(call.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # the call's answer goes back as a tool message; the next turn is served
    follow = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "rain"}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


CLOCK = {"type": "function", "function": {
    "name": "clock", "description": "The time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Lima"]}},
                   "required": ["city"], "additionalProperties": False}}}


def _own_key(stack, name: str) -> str:
    """A key of its own, so its own credit on the ledger: each request of a search over seeds
    below (8 choices of up to 120 tokens, ~3,000 units) takes a fresh key, and the search
    never leaves alice, or itself, out of credit."""
    return stack.gateway.keys.new_key(name)


def _client(stack, name: str):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=_own_key(stack, name), max_retries=0, timeout=120)


def test_several_tool_calls_in_one_answer_whole_and_streamed(stack):
    """parallel_tool_calls absent (true): the grammar takes a list of calls, and tiny-random's
    seeded draws write two now and then (searched with 8 choices a request);
    each call comes back with its own id and index, the same streamed. False: exactly one call."""
    import json

    def ask(seed: int, n: int = 1) -> dict:
        return dict(model=MODEL, messages=[{"role": "user", "content": "What is the weather in Oslo, and what time is "
                                                                       "it there?"}], max_tokens=120, temperature=1,
                    seed=seed, tools=[WEATHER, CLOCK], tool_choice="required", n=n)

    found = None
    for seed in range(8):  # n choices of one request are seeds seed, seed + 1, ... (docs/gateway.md)
        with _client(stack, f"tools-openai-{seed}") as client:
            choices = client.chat.completions.create(**ask(seed * 8, n=8)).choices
        found = next((c for c in choices if len(c.message.tool_calls or []) >= 2), None)
        if found is not None:
            break
    assert found is not None, "no choice of 64 drew several calls"
    with _client(stack, "tools-openai") as client:
        calls = found.message.tool_calls
        assert found.finish_reason == "tool_calls"
        assert len({c.id for c in calls}) == len(calls) and all(
            c.function.name in ("weather", "clock") and json.loads(c.function.arguments)["city"] in ("Oslo", "Lima")
            for c in calls)
        one = ask(seed * 8 + found.index)
        again = client.chat.completions.create(**one).choices[0]  # that choice's seed alone: the same calls
        assert [(c.function.name, c.function.arguments) for c in again.message.tool_calls] == \
            [(c.function.name, c.function.arguments) for c in calls]
        deltas = [d for c in client.chat.completions.create(**one, stream=True) if c.choices
                  for d in (c.choices[0].delta.tool_calls or [])]
        assert [d.index for d in deltas] == list(range(len(calls))) and len({d.id for d in deltas}) == len(calls)
        assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
            [(c.function.name, json.loads(c.function.arguments)) for c in calls]
        single = client.chat.completions.create(**one | {"parallel_tool_calls": False}).choices[0]
        assert single.finish_reason == "tool_calls" and len(single.message.tool_calls) == 1


def test_langchain_bind_tools_with_two_tools_gets_every_call(stack):
    """LangChain's ``bind_tools`` with two tools parses every call of an answer. A seed that
    makes tiny-random write several calls (about one choice in thirty: most run out of tokens
    inside the JSON) is searched with the official client on the very request LangChain sends
    (its tools as LangChain writes them, 8 choices a request), then LangChain asks with it alone."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """The weather in a city."""

        city: str = Field(max_length=8)

    class LocalTime(BaseModel):
        """The local time in a city."""

        city: str = Field(max_length=8)

    question = "What is the weather and the local time in Oslo?"
    tools = [convert_to_openai_tool(Weather), convert_to_openai_tool(LocalTime)]
    seed, seen = None, []
    for base in range(0, 64, 8):
        with _client(stack, f"tools-langchain-{base}") as client:
            choices = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=120, temperature=1,
                seed=base, n=8, tools=tools, tool_choice="required").choices
        both = [c.index for c in choices if len(c.message.tool_calls or []) >= 2]
        seen.extend([t.function.name for t in c.message.tool_calls or []] for c in choices)
        if both:
            seed = base + both[0]
            break
    assert seed is not None, f"no choice of 64 drew several calls: {seen}"
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=stack.url + "/v1", api_key=_own_key(stack, "tools-langchain"),
                                      temperature=1, seed=seed, max_tokens=120, max_retries=0)
    called = llm.bind_tools([Weather, LocalTime], tool_choice="required").invoke(question)
    assert len(called.tool_calls) >= 2 and {call["name"] for call in called.tool_calls} <= {"LocalTime", "Weather"}
    assert len({call["id"] for call in called.tool_calls}) == len(called.tool_calls)
    assert all(isinstance(call["args"]["city"], str) for call in called.tool_calls)


def test_langchain_bind_tools_and_with_structured_output(stack):
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=stack.url + "/v1", api_key=stack.key, temperature=0,
                                      max_tokens=60, max_retries=0)

    class Weather(BaseModel):
        """The weather in a city."""

        city: str = Field(max_length=8)

    called = llm.bind_tools([Weather], tool_choice="Weather", parallel_tool_calls=False).invoke(
        "What is the weather in Oslo?")  # one call: the object alone, no list around it
    assert called.tool_calls and called.tool_calls[0]["name"] == "Weather"
    assert isinstance(called.tool_calls[0]["args"]["city"], str)

    class Verdict(BaseModel):
        ok: bool
        score: int = Field(ge=0, le=9)

    verdict = llm.with_structured_output(Verdict).invoke("Is the mesh up?")
    assert isinstance(verdict, Verdict) and 0 <= verdict.score <= 9
    called = llm.bind_tools([Weather]).invoke("What is the weather in Oslo?")  # tool_choice auto: a call or text
    assert called.tool_calls or isinstance(called.content, str)


def test_a_killed_relay_is_down_on_the_dashboard_and_in_permamesh_health(stack):
    """Last in this module: it kills a relay. SIGKILL leaves its metrics record and its directory
    entry behind; the health checks find it not answering, within the dashboard's 15 s."""
    import json
    import subprocess
    import sys
    import time
    import urllib.request

    def mesh():
        return json.loads(urllib.request.urlopen(stack.url + "/api/mesh", timeout=60).read())

    before = {n["id"]: n for n in mesh()["nodes"]}
    victim = stack.mesh.relay_children[0]
    assert before[victim.node_id]["health"] in ("up", "degraded")
    victim.kill()
    victim.proc.wait(10)
    deadline, node = time.monotonic() + 15, None
    while time.monotonic() < deadline:
        node = {n["id"]: n for n in mesh()["nodes"]}[victim.node_id]
        if node["health"] == "down":
            break
        time.sleep(0.5)  # the dashboard polls every 5 s; this polls its JSON until the verdict changes
    assert node["health"] == "down" and node["availability"] < 1.0
    view = mesh()
    assert view["traffic"]["requests"] > 0 and "alice" in view["usage"] and "available" in view["usage"]["alice"]
    cli = subprocess.run([sys.executable, "-m", "permamesh", "health", "--data-dir", str(stack.home)],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1 and victim.node_id[:16] in cli.stdout, cli.stdout[-2000:]
