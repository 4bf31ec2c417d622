"""Traces: the JSONL format survives a round trip, bad lines are named, and the generators
are reproducible and share prefixes the way real workloads do."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from permamesh.bench.sim import chat_text, tokenize_text, word_tokenizer
from permamesh.bench.traces import (
    GENERATORS,
    TraceError,
    TraceRequest,
    few_shot,
    load_trace,
    multi_turn,
    save_trace,
    shared_system_prompts,
    zipf_prefixes,
)

CHAT = TraceRequest(
    "chat-1", 0.5, 64, (("system", "Be brief."), ("user", "Why is the sky blue?\n\nThanks!"))
)
RAW = TraceRequest("raw-1", 1.25, 8, prompt="Question: 2+2?\nAnswer: é")


def test_a_trace_survives_a_round_trip_and_loads_in_arrival_order(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    save_trace(path, [RAW, CHAT])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {
        "session": "raw-1", "t": 1.25, "prompt": "Question: 2+2?\nAnswer: é", "max_tokens": 8
    }
    assert json.loads(lines[1])["messages"][1] == {
        "role": "user", "content": "Why is the sky blue?\n\nThanks!"
    }
    assert load_trace(path) == [CHAT, RAW]  # sorted by t

    generated = GENERATORS["multi-turn"](40, 2.0, seed=5)
    save_trace(path, generated)
    assert load_trace(path) == generated


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "Expecting"),
        ('["a list"]', "JSON object"),
        ('{"t": 1, "prompt": "x", "max_tokens": 1}', "session"),
        ('{"session": "s", "t": -1, "prompt": "x", "max_tokens": 1}', "'t'"),
        ('{"session": "s", "t": true, "prompt": "x", "max_tokens": 1}', "'t'"),
        ('{"session": "s", "t": 1, "prompt": "x", "max_tokens": 0}', "max_tokens"),
        ('{"session": "s", "t": 1, "prompt": "x", "max_tokens": 2.5}', "max_tokens"),
        ('{"session": "s", "t": 1, "max_tokens": 1}', "exactly one"),
        ('{"session": "s", "t": 1, "prompt": "x", "messages": [], "max_tokens": 1}', "exactly one"),
        ('{"session": "s", "t": 1, "messages": [], "max_tokens": 1}', "non-empty"),
        ('{"session": "s", "t": 1, "messages": [{"role": "user"}], "max_tokens": 1}', "message 0"),
        ('{"session": "s", "t": 1, "prompt": 5, "max_tokens": 1}', "'prompt'"),
        ('{"session": "s", "t": 1, "prompt": "x", "max_tokens": 1, "model": "m"}', "unknown key"),
    ],
)
def test_a_bad_line_is_rejected_with_its_line_number(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = '{"session": "s", "t": 0, "prompt": "hello", "max_tokens": 4}'
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(TraceError, match=rf"bad\.jsonl:3: .*{reason}"):
        load_trace(path)


def test_saving_refuses_a_request_no_loader_would_accept(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="max_tokens"):
        save_trace(tmp_path / "t.jsonl", [TraceRequest("s", 0.0, 0, prompt="x")])
    with pytest.raises(TraceError, match="messages and a prompt"):
        save_trace(tmp_path / "t.jsonl", [TraceRequest("s", 0.0, 1, CHAT.messages, "x")])


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_every_generator_is_reproducible_per_seed_and_arrives_at_about_its_rate(name: str) -> None:
    trace = GENERATORS[name](400, 4.0, 11)
    assert trace == GENERATORS[name](400, 4.0, 11)
    assert trace != GENERATORS[name](400, 4.0, 12)
    assert len(trace) == 400
    assert [r.t for r in trace] == sorted(r.t for r in trace)
    assert all(r.max_tokens >= 1 and (r.messages or r.prompt) for r in trace)
    if name != "multi-turn":  # chats ramp up over their first turns
        assert 400 / 4.0 * 0.8 < trace[-1].t < 400 / 4.0 * 1.2


def test_a_chats_next_turn_starts_with_everything_of_its_previous_turn() -> None:
    trace = multi_turn(sessions=6, turns=4, rate_per_s=1.0, seed=3)
    by_session: dict[str, list[TraceRequest]] = {}
    for request in trace:
        by_session.setdefault(request.session, []).append(request)
    assert len(by_session) == 6 and all(len(turns) == 4 for turns in by_session.values())
    systems = {turns[0].messages[0] for turns in by_session.values()}
    assert len(systems) < 6  # sessions share system prompts
    for turns in by_session.values():
        for before, after in zip(turns, turns[1:]):
            assert after.t - before.t >= 5.0  # the user thinks first
            assert after.messages[: len(before.messages)] == before.messages
            assert [r for r, _ in after.messages[len(before.messages) :]] == ["assistant", "user"]
            assert chat_text(after).startswith(chat_text(before))
            tokens_before, tokens_after = word_tokenizer(before), word_tokenizer(after)
            assert tokens_after[: len(tokens_before)] == tokens_before
            answer = after.messages[len(before.messages)][1]
            assert 0.6 < len(tokenize_text(answer)) / before.max_tokens < 1.6


def _shared_prefix_words(trace: list[TraceRequest]) -> Counter[str]:
    """How often each shared prefix (system prompt, or examples before the last question)."""
    return Counter(
        r.messages[0][1] if r.messages else (r.prompt or "").rsplit("\n\nQuestion:", 1)[0]
        for r in trace
    )


def test_single_turn_generators_put_long_shared_prefixes_in_front() -> None:
    system = _shared_prefix_words(shared_system_prompts(300, 5, 2.0, seed=1))
    assert len(system) == 5
    assert all(250 <= len(text.split()) <= 1600 for text in system)

    shots = _shared_prefix_words(few_shot(200, 2.0, seed=1, n_tasks=3))
    assert len(shots) == 3
    assert all(500 <= len(text.split()) <= 2000 for text in shots)

    tools = zipf_prefixes(2000, 30, 1.2, 2.0, seed=1)
    popularity = _shared_prefix_words(tools).most_common()
    assert all(250 <= len(text.split()) <= 1600 for text, _ in popularity)
    assert popularity[0][1] > 4 * popularity[9][1]  # Zipf: the head dominates
    assert all(text.startswith("You can call the following tools.") for text, _ in popularity)


def test_the_stand_in_tokenizer_is_deterministic_and_about_1_3_tokens_per_word() -> None:
    trace = GENERATORS["system-prompt"](20, 1.0, 4)
    for request in trace:
        tokens = word_tokenizer(request)
        assert tokens == tokenize_text(chat_text(request))  # per-message caching changes nothing
        assert all(isinstance(t, int) and 0 <= t < 2**32 for t in tokens)
    words = sum(len(content.split()) for r in trace for _, content in r.messages)
    tokens = sum(len(word_tokenizer(r)) for r in trace)
    assert 1.1 < tokens / words < 1.7
    assert tokenize_text("The cat.") == tokenize_text("The cat.")
    assert tokenize_text("The cat.") != tokenize_text("The dog.")
    raw = few_shot(3, 1.0, seed=2)[0]
    assert word_tokenizer(raw) == tokenize_text(raw.prompt or "")
