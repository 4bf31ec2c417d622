"""Presence and frequency penalties, top log-probabilities and token texts: applied in the one
sampling path both engines share (:class:`~permamesh.workers.decoding.Decoding`), checked
against a naive reference, then on the torch engine (tiny-random) and on llama.cpp (SmolLM2)."""

from __future__ import annotations

import math

import pytest
import torch

from permamesh.wire import ChatMessage
from permamesh.workers import backends
from permamesh.workers.decoding import Decoding
from permamesh.workers.engine import Engine, SamplingParams
from permamesh.workers.sampling import apply_penalties, generator, sample_token, top_alternatives


class _Tok:
    eos_ids = frozenset({99})

    @staticmethod
    def decode(ids):
        return "".join(f"<{i}>" for i in ids)


class _Sampler:
    tokenizer = _Tok()
    sample = staticmethod(sample_token)


@pytest.fixture(scope="module")
def llama():
    return backends.load_engine("llamacpp", max_active=2)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (1.3, 0.8)])
def test_the_sampler_draws_each_token_as_often_as_its_probability(temperature, top_p):
    """The exponential race picks token i with probability weight_i / total: 40,000 seeded
    draws over a 200-token vocabulary land within 5 standard errors of the softmax at the
    temperature, restricted to the top-p nucleus (tokens outside it never drawn); the
    log-probability reported is the raw model's."""
    import collections

    logits = torch.randn(200, generator=torch.Generator().manual_seed(1)) * 2
    probs = torch.softmax(logits.double() / temperature, 0)
    order = torch.argsort(probs, descending=True)
    before = torch.cumsum(probs[order], 0) - probs[order]
    nucleus = set(order[before < top_p].tolist())
    kept = torch.zeros_like(probs)
    kept[list(nucleus)] = probs[list(nucleus)]
    kept /= kept.sum()
    gen, params, n = generator(7), SamplingParams(temperature=temperature, top_p=top_p), 40_000
    draws = [sample_token(logits, params, gen) for _ in range(n)]
    counts = collections.Counter(token for token, _ in draws)
    assert set(counts) <= nucleus
    for token in range(200):
        p = float(kept[token])
        assert abs(counts[token] - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1, (token, counts[token], n * p)
    raw = torch.log_softmax(logits, 0)
    assert all(abs(lp - float(raw[token])) < 1e-5 for token, lp in draws[:50])


def test_the_same_seed_draws_the_same_tokens():
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=0.9, top_p=0.95)
    one, two = generator(11), generator(11)
    first = [sample_token(logits, params, one)[0] for _ in range(30)]
    assert first == [sample_token(logits, params, two)[0] for _ in range(30)]
    assert first != [sample_token(logits, params, generator(12))[0] for _ in range(30)]


def test_penalties_match_the_openai_formula():
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, {2: 3, 0: 1}, params)
    expected = [1.0 - 0.25 - 0.5, 2.0, 3.0 - 0.75 - 0.5, 0.5]
    assert out.tolist() == pytest.approx(expected)
    assert logits.tolist() == [1.0, 2.0, 3.0, 0.5]  # the raw logits are left alone


def test_a_penalized_greedy_decoding_moves_off_a_repeated_token_and_reports_raw_logprobs():
    logits = torch.tensor([0.0, 3.0, 2.5, -1.0])  # token 1 is the likeliest every step
    plain = Decoding(_Sampler(), (5,), SamplingParams(max_tokens=3, logprobs=True), None)
    penal = Decoding(_Sampler(), (5,), SamplingParams(max_tokens=3, logprobs=True, frequency_penalty=1.0,
                                                       top_logprobs=2), None)
    for _ in range(3):
        plain.take(logits)
        penal.take(logits)
    assert plain.ids == [1, 1, 1]
    assert penal.ids == [1, 2, 1]  # 3-1 < 2.5, then 2.5-1 < 3-1
    raw = torch.log_softmax(logits, dim=-1)
    assert penal.lps == pytest.approx([float(raw[1]), float(raw[2]), float(raw[1])])
    done = penal.complete()
    assert done.tokens == ("<1>", "<2>", "<1>")
    assert done.top_logprobs[0] == (("<1>", pytest.approx(float(raw[1]))), ("<2>", pytest.approx(float(raw[2]))))


def test_top_alternatives_are_the_likeliest_in_order():
    logits = torch.tensor([0.1, 5.0, float("nan"), 4.0, -3.0])
    top = top_alternatives(logits, 3)
    assert [i for i, _ in top] == [1, 3, 0]
    assert all(lp <= 0 for _, lp in top) and math.fsum(math.exp(lp) for _, lp in top) < 1.0


def _distinct(engine, prompt_ids, **kw) -> float:
    done = engine.generate(prompt_ids, SamplingParams(max_tokens=24, **kw))
    return len(set(done.token_ids)) / max(1, len(done.token_ids)), done


def test_the_torch_engine_applies_penalties_and_reports_alternatives(tiny_loaded):
    engine = Engine(tiny_loaded)
    prompt = engine.tokenizer.chat_ids([ChatMessage("user", "Say the same word again and again.")])
    plain, _ = _distinct(engine, prompt)
    penal, done = _distinct(engine, prompt, frequency_penalty=2.0, presence_penalty=2.0, logprobs=True, top_logprobs=3)
    assert penal > plain  # tiny-random repeats itself greedily; the penalties spread the answer
    assert len(done.tokens) == len(done.token_ids) == len(done.top_logprobs)
    assert all(len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] for top in done.top_logprobs)


@pytest.mark.model
@pytest.mark.skipif(backends.llamacpp_missing() is not None, reason=str(backends.llamacpp_missing()))
def test_the_llamacpp_engine_applies_penalties_and_reports_alternatives(llama):
    engine = llama
    prompt = engine.tokenizer.chat_ids([ChatMessage("user", "Repeat the word 'cat' twenty times.")])
    plain, _ = _distinct(engine, prompt)
    penal, done = _distinct(engine, prompt, frequency_penalty=2.0, presence_penalty=2.0, logprobs=True, top_logprobs=2)
    assert penal > plain
    assert len(done.tokens) == len(done.top_logprobs) == len(done.token_ids)
    assert "".join(done.tokens).strip()


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99},
                                           "tag": {"type": "string", "enum": ["red", "green"]}},
          "required": ["ok", "n", "tag"], "additionalProperties": False}


def _constrained(engine, **kw):
    import json

    prompt = engine.tokenizer.chat_ids([ChatMessage("user", "Give me a JSON object.")])
    done = engine.generate(prompt, SamplingParams(max_tokens=80, grammar_kind="json_schema", grammar=json.dumps(SCHEMA),
                                                  **kw))
    return json.loads(done.text), done


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 5}])
def test_the_torch_engine_answers_inside_a_json_schema(tiny_loaded, sampling):
    """tiny-random's weights are random: unconstrained it writes noise; under the schema, JSON."""
    engine = Engine(tiny_loaded)
    value, done = _constrained(engine, **sampling)
    assert set(value) == {"ok", "n", "tag"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 99
    assert value["tag"] in ("red", "green") and done.finish_reason == "stop"


def test_a_grammar_that_does_not_compile_fails_the_request_before_any_step(tiny_loaded):
    from permamesh.workers.errors import RequestError

    engine = Engine(tiny_loaded)
    with pytest.raises(RequestError, match="grammar|schema"):
        engine.start([1, 2, 3], SamplingParams(grammar_kind="lark", grammar="start: ???"))
    with pytest.raises(RequestError, match="not JSON"):
        engine.start([1, 2, 3], SamplingParams(grammar_kind="json_schema", grammar="{nope"))


@pytest.mark.model
@pytest.mark.skipif(backends.llamacpp_missing() is not None, reason=str(backends.llamacpp_missing()))
def test_the_llamacpp_engine_answers_inside_a_json_schema(llama):
    value, _ = _constrained(llama)
    assert set(value) == {"ok", "n", "tag"} and value["tag"] in ("red", "green")
