"""A seeded model of user traffic: the requests a worker would see, and when they arrive.

Who calls what: tests and benchmarks call :func:`user_requests` for a stream of requests as a
worker would see them, and validators learn a
:class:`~permamesh.verify.profile.TrafficProfile` from such requests;
:class:`~permamesh.verify.challenges.ChallengePool` writes its ids with :func:`hex_id`. The
text of the messages comes from :mod:`~permamesh.verify.textgen`. Nothing here holds state;
every function takes its ``random.Random``.

The wire form is the overlay client's: request ids are 16 random bytes in hex, ``stream`` is
False and ``model`` is "". **``logprobs`` is always True**: the overlay client always asks for
log-probabilities on the wire (and drops them when its caller did not ask), so the flag that
verification needs is never a sign of a challenge.

The model, per request: chat (a conversation of 1-8 user turns under one session id, with a
system prompt for some, one set of parameters kept for the whole conversation, the answers in
the history) or a raw prompt (a bare question or a completion template, with stop strings for
half of them); Poisson conversation starts and think times between turns. A share of chat
conversations (:data:`STRUCTURED_SHARE`) asks for structured output or tool calls, as the
gateway sends them: a grammar (``grammar_kind``, ``grammar``) drawn from :data:`GRAMMARS`
and kept for the whole conversation, like the other parameters.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator

from permamesh.verify.errors import VerifyError
from permamesh.verify.textgen import (
    FOLLOW_LEADS, FOLLOW_WORDS, LEAD_INS, RAW_FORMATS, TOPICS, compose, compose_followup, lognormal_words,
    simulated_answer, system_prompt, weighted,
)
from permamesh.wire import ChatMessage, GenerateRequest

log = logging.getLogger(__name__)

STOP_SETS = ((("\n\n",), 35), (("\nQuestion:",), 25), (("###",), 20), (("\n\n", "###"), 10), (("</s>",), 10))
MAX_TOKENS = ((16, 5), (32, 10), (64, 17), (128, 28), (256, 25), (512, 15))
TEMPERATURES = ((0.2, 8), (0.3, 6), (0.5, 10), (0.6, 6), (0.7, 30), (0.8, 12), (0.9, 6), (1.0, 22))
TOP_PS = ((1.0, 86), (0.95, 6), (0.9, 6), (0.8, 2))
POPULAR_SEEDS = (0, 1, 7, 42, 1234, 2024)  # seeds people type; others are drawn at random
THINK_MIN_S, THINK_MEAN_S = 5.0, 20.0  # a user reads for at least this, plus an exponential pause

CHAT_CONVERSATIONS = 0.6  # of conversations and raw prompts, the share that are chats
SYSTEM_SHARE = 0.45  # of chats, the share with a system prompt
MORE_TURNS, MAX_TURNS = 0.55, 8  # a chat goes on after each turn with this probability
RAW_SESSIONS = 0.1  # of raw prompts, the share whose client sets a session id
STRUCTURED_SHARE = 0.05  # of chat conversations, the share asking for structured output or tool calls


def _schema(properties: dict, required: tuple[str, ...]) -> str:
    return json.dumps({"type": "object", "properties": properties, "required": list(required),
                       "additionalProperties": False}, separators=(",", ":"), sort_keys=True)


_CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"],
         "additionalProperties": False}
# (grammar_kind, grammar), weight: JSON mode, schemas for extraction and answers, tool calls
GRAMMARS = (
    (("json_object", ""), 30),
    (("json_schema", _schema({"answer": {"type": "string", "maxLength": 200},
                              "confidence": {"type": "number", "minimum": 0, "maximum": 1}}, ("answer",))), 25),
    (("json_schema", _schema({"title": {"type": "string", "maxLength": 80},
                              "tags": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                       "maxItems": 5}}, ("title", "tags"))), 20),
    (("json_schema", json.dumps({"type": "array", "minItems": 1, "maxItems": 8, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"const": name}, "arguments": _CITY},
         "required": ["name", "arguments"], "additionalProperties": False} for name in ("weather", "local_time")]}},
        separators=(",", ":"), sort_keys=True)), 25),
)


def hex_id(rng: random.Random) -> str:
    """A request or session id as the overlay client writes it (16 random bytes, hex)."""
    return f"{rng.getrandbits(128):032x}"


def user_params(rng: random.Random, *, chat: bool) -> dict[str, object]:
    """The request parameters a user's client sets (once per conversation)."""
    if rng.random() < (0.3 if chat else 0.45):
        temperature = 0.0
    else:
        temperature = round(rng.uniform(0.2, 1.0), 2) if rng.random() < 0.1 else weighted(rng, TEMPERATURES)
    seed = None
    if rng.random() < 0.06:
        seed = rng.choice(POPULAR_SEEDS) if rng.random() < 0.6 else rng.getrandbits(32)
    kind, grammar = weighted(rng, GRAMMARS) if chat and rng.random() < STRUCTURED_SHARE else ("", "")
    return {"max_tokens": weighted(rng, MAX_TOKENS), "temperature": temperature, "top_p": weighted(rng, TOP_PS),
            "stop": weighted(rng, STOP_SETS) if rng.random() < (0.03 if chat else 0.5) else (),
            "seed": seed, "logprobs": True, "grammar_kind": kind, "grammar": grammar}


def _conversation(rng: random.Random, t: float) -> Iterator[tuple[float, GenerateRequest]]:
    topic = weighted(rng, ((tp, tp.weight) for tp in TOPICS))
    words = lognormal_words(rng, topic.median_words, topic.sigma)
    if rng.random() >= CHAT_CONVERSATIONS:
        prompt = str(weighted(rng, RAW_FORMATS)).replace("{q}", compose(rng, topic, words))
        session = hex_id(rng) if rng.random() < RAW_SESSIONS else ""
        yield t, GenerateRequest(hex_id(rng), prompt=prompt, session=session, **user_params(rng, chat=False))
        return
    params, session = user_params(rng, chat=True), hex_id(rng)
    history = (ChatMessage("system", system_prompt(rng)),) if rng.random() < SYSTEM_SHARE else ()
    turns = 1
    while turns < MAX_TURNS and rng.random() < MORE_TURNS:
        turns += 1
    for turn in range(turns):
        if turn == 0:
            said = compose(rng, topic, words, str(weighted(rng, LEAD_INS)))
        else:
            said = compose_followup(rng, topic, lognormal_words(rng, *FOLLOW_WORDS), str(weighted(rng, FOLLOW_LEADS)))
        history += (ChatMessage("user", said),)
        yield t, GenerateRequest(hex_id(rng), messages=history, session=session, **params)
        history += (ChatMessage("assistant", simulated_answer(rng, params["max_tokens"])),)
        t += THINK_MIN_S + rng.expovariate(1.0 / THINK_MEAN_S)


def user_requests(n: int, seed: int, rate_per_s: float) -> Iterator[tuple[float, GenerateRequest]]:
    """The first ``n`` requests, ``(arrival_s, request)`` in arrival order, of users arriving
    at about ``rate_per_s`` requests a second (conversations start as a Poisson process)."""
    if not (isinstance(n, int) and n >= 0 and isinstance(rate_per_s, (int, float)) and 0 < rate_per_s < math.inf):
        raise VerifyError(f"user_requests needs n >= 0 and a finite rate > 0, not {n!r}, {rate_per_s!r}")
    rng = random.Random(seed)
    mean_turns = (1 - MORE_TURNS**MAX_TURNS) / (1 - MORE_TURNS)
    start_rate = rate_per_s / (CHAT_CONVERSATIONS * mean_turns + 1 - CHAT_CONVERSATIONS)
    out: list[tuple[float, GenerateRequest]] = []
    t, starts = 0.0, 0
    while n:
        t += rng.expovariate(start_rate)
        out.extend(_conversation(rng, t))
        starts += 1
        # every request before the n-th arrival is out once a conversation starts after it
        if len(out) >= n and starts % 32 == 0 and t > sorted(a for a, _ in out)[n - 1]:
            break
    out.sort(key=lambda pair: pair[0])
    yield from out[:n]
