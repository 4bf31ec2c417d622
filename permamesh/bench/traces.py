"""Request traces: the JSONL format, loading and saving, and seeded synthetic generators.

A trace is a JSON Lines file, one request per line, in arrival order or not (readers sort)::

    {"session": "chat-00042", "t": 12.5, "messages": [{"role": "system", "content": "..."},
     {"role": "user", "content": "..."}], "max_tokens": 128}
    {"session": "fs-000007", "t": 13.1, "prompt": "Question: ...\\nAnswer:", "max_tokens": 32}

- ``session`` (string, non-empty): requests of one conversation share it.
- ``t`` (number >= 0): arrival time in seconds from the start of the trace.
- exactly one of ``messages`` (a non-empty list of ``{"role", "content"}`` strings, rendered
  with the model's chat template) or ``prompt`` (a raw completion prompt);
- ``max_tokens`` (integer >= 1): tokens to generate; replays treat it as the answer length.

No other keys are allowed. Blank lines are skipped. :func:`load_trace` names the line of the
first bad record. :mod:`permamesh.bench.sim` and the live benchmark harness replay traces.

Generators build English-like text from a fixed word list with ``random.Random(seed)``, so a
seed always yields the same trace. Each has its own knobs; :data:`GENERATORS` wraps them with
one signature ``(n_requests, rate_per_s, seed)``. Shared prefixes are hundreds to ~1,500 words:

- ``multi-turn``: chats; turn k+1 repeats turn k's messages, its answer and a new question.
- ``system-prompt``: single questions behind a few long shared system prompts.
- ``few-shot``: a long shared block of worked examples, then a new question (raw prompts).
- ``zipf``: tool-description prefixes whose popularity follows a Zipf law (like PlanetServe's
  ToolBench trace).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from permamesh.errors import PermameshError

log = logging.getLogger(__name__)

_KEYS = {"session", "t", "messages", "prompt", "max_tokens"}


class BenchError(PermameshError):
    """The benchmark package's exception family."""


class TraceError(BenchError):
    """A trace file or record is malformed."""


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace (see the module docstring for the meaning of each field)."""

    session: str
    t: float  # arrival, seconds from the start
    max_tokens: int
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    prompt: str | None = None


def _parse(record: object) -> TraceRequest:
    if not isinstance(record, dict):
        raise TraceError("a record must be a JSON object")
    extra = sorted(set(record) - _KEYS)
    if extra:
        raise TraceError(f"unknown key(s) {', '.join(extra)}")
    session, t, max_tokens = record.get("session"), record.get("t"), record.get("max_tokens")
    if not isinstance(session, str) or not session:
        raise TraceError("'session' must be a non-empty string")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf:
        raise TraceError(f"'t' must be a finite number >= 0, not {t!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise TraceError(f"'max_tokens' must be an integer >= 1, not {max_tokens!r}")
    if ("messages" in record) == ("prompt" in record):
        raise TraceError("give exactly one of 'messages' and 'prompt'")
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise TraceError("'prompt' must be a string")
        return TraceRequest(session, float(t), max_tokens, prompt=record["prompt"])
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise TraceError("'messages' must be a non-empty list")
    parsed = []
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or set(message) != {"role", "content"}
            or not isinstance(message["role"], str)
            or not message["role"]
            or not isinstance(message["content"], str)
        ):
            raise TraceError(f"message {i} must be {{'role': str, 'content': str}}")
        parsed.append((message["role"], message["content"]))
    return TraceRequest(session, float(t), max_tokens, messages=tuple(parsed))


def to_record(request: TraceRequest) -> dict[str, object]:
    """The JSON object of one request (checked as :func:`load_trace` would)."""
    record: dict[str, object] = {"session": request.session, "t": request.t}
    if request.prompt is not None and request.messages:
        raise TraceError(f"request of session {request.session!r} has messages and a prompt")
    if request.prompt is not None:
        record["prompt"] = request.prompt
    else:
        record["messages"] = [{"role": r, "content": c} for r, c in request.messages]
    record["max_tokens"] = request.max_tokens
    _parse(record)
    return record


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Every request of a JSONL trace, sorted by arrival time (stable)."""
    requests = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                requests.append(_parse(json.loads(line)))
            except (json.JSONDecodeError, TraceError) as exc:
                raise TraceError(f"{path}:{number}: {exc}") from None
    return sorted(requests, key=lambda r: r.t)


def save_trace(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    """Write ``requests`` as JSONL, one per line, in the given order."""
    with open(path, "w", encoding="utf-8") as handle:
        for request in requests:
            handle.write(json.dumps(to_record(request), ensure_ascii=False) + "\n")


# -- text -----------------------------------------------------------------------------------

_NOUNS = """system model request server network cache garden river teacher student window
market village engine library question answer process kernel battery signal planet
mountain forest harbor bridge ticket recipe kitchen doctor patient museum painting
letter journey contract budget report council farmer harvest weather storm island
factory worker manager customer product service database record table column memory
thread socket packet router message summary chapter story writer reader language
sentence token pattern method result error warning module function variable feature
machine schedule meeting office project deadline invoice account profile camera
lens bicycle train station airport passenger festival concert audience melody rhythm
canvas sculpture theory experiment sample measure policy committee ledger
reputation partner volunteer neighbor community school lesson exam diagram graph
""".split()
_VERBS = """build check explain measure compare describe improve follow change protect
carry watch open close repair design collect deliver support answer test review count
plan share store send receive prepare observe predict produce reduce record train
translate visit write read finish start choose solve""".split()
_ADJECTIVES = """quick careful large small bright quiet heavy gentle simple complex early
late modern ancient local remote useful strange honest patient busy empty warm cold
green golden narrow wide fresh private public shared secure stable rapid steady
""".split()
_ADVERBS = "carefully quickly slowly often rarely quietly clearly together again".split()
_PREPS = "in on near under over with without before after behind across".split()
_DETS = "the a this every each another our their".split()
_SUBJECTS = "we|they|you|people|engineers|researchers|partners|the team".split("|")
_WH = "How Why When Where Which What".split()


_SHAPES = (  # P phrase, V verb, Vs verb + s, S subject, A adjective, D adverb, R preposition
    "P Vs P R P.", "S should V P D.", "when P Vs, S V P.", "P is A and A, so S V it.",
)


def _fill(rng: random.Random, shape: str) -> str:
    slots = {"V": _VERBS, "S": _SUBJECTS, "A": _ADJECTIVES, "D": _ADVERBS, "R": _PREPS}
    words = []
    for slot in shape.split():
        head = slot.rstrip(".,?")
        tail = slot[len(head) :]
        if head == "P":
            head = f"{rng.choice(_DETS)} {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
        elif head == "Vs":
            head = rng.choice(_VERBS) + "s"
        elif head in slots:
            head = rng.choice(slots[head])
        words.append(head + tail)
    sentence = " ".join(words)
    return sentence[0].upper() + sentence[1:]


def text(rng: random.Random, words: int) -> str:
    """About ``words`` words of English-like prose in paragraphs."""
    paragraphs, sentences, count = [], [], 0
    while count < words:
        sentence = _fill(rng, rng.choice(_SHAPES))
        sentences.append(sentence)
        count += sentence.count(" ") + 1
        if len(sentences) >= 5 or count >= words:
            paragraphs.append(" ".join(sentences))
            sentences = []
    return "\n\n".join(paragraphs)


def question(rng: random.Random, words: int) -> str:
    """A question of about ``words`` words: context sentences, then a wh-question."""
    head = text(rng, max(words - 10, 0)) + " " if words > 12 else ""
    return head + _fill(rng, rng.choice(_WH) + " should S V P R P?")


# -- generators -----------------------------------------------------------------------------

TOKENS_PER_WORD = 1.3  # answers are written about max_tokens / TOKENS_PER_WORD words long


def _arrivals(rng: random.Random, n: int, rate_per_s: float) -> list[float]:
    """``n`` Poisson arrival times at ``rate_per_s``."""
    if not rate_per_s > 0:
        raise TraceError(f"rate_per_s must be > 0, not {rate_per_s!r}")
    t, times = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        times.append(round(t, 6))
    return times


def _answer(rng: random.Random, max_tokens: int) -> str:
    return text(rng, max(1, round(max_tokens / TOKENS_PER_WORD)))


def multi_turn(
    sessions: int, turns: int, rate_per_s: float, seed: int, *,
    system_prompts: int = 8,  # distinct system prompts; 0 = every chat has its own
    system_words: tuple[int, int] = (150, 600),
    user_words: tuple[int, int] = (10, 60),
    answer_tokens: tuple[int, int] = (64, 256),
    think_min_s: float = 5.0,  # a user reads for at least this long ...
    think_mean_s: float = 20.0,  # ... plus an exponential pause of this mean
) -> list[TraceRequest]:
    """Interleaved chats of ``turns`` turns; sessions start as a Poisson process so requests
    arrive at about ``rate_per_s``. Turn k+1's messages are turn k's, the assistant's answer
    (``max_tokens`` long, fixed here), and a new user message, sent a think time after turn k."""
    rng = random.Random(seed)
    systems = [text(rng, rng.randint(*system_words)) for _ in range(system_prompts or sessions)]
    starts = _arrivals(rng, sessions, rate_per_s / turns)
    out = []
    for index, start in enumerate(starts):
        system = rng.choice(systems) if system_prompts else systems[index]
        history: tuple[tuple[str, str], ...] = (("system", system),)
        t = start
        for _ in range(turns):
            history += (("user", question(rng, rng.randint(*user_words))),)
            max_tokens = rng.randint(*answer_tokens)
            out.append(TraceRequest(f"chat-{index:05d}", round(t, 6), max_tokens, history))
            history += (("assistant", _answer(rng, max_tokens)),)
            t += think_min_s + rng.expovariate(1.0 / think_mean_s)
    return sorted(out, key=lambda r: r.t)


def shared_system_prompts(
    n_requests: int, n_prompts: int, rate_per_s: float, seed: int, *,
    system_words: tuple[int, int] = (300, 1500),
    user_words: tuple[int, int] = (10, 60),
    answer_tokens: tuple[int, int] = (32, 192),
) -> list[TraceRequest]:
    """Single questions, each behind one of ``n_prompts`` long system prompts (uniform)."""
    rng = random.Random(seed)
    systems = [text(rng, rng.randint(*system_words)) for _ in range(n_prompts)]
    return [
        TraceRequest(
            f"sys-{i:06d}", t, rng.randint(*answer_tokens),
            (("system", rng.choice(systems)), ("user", question(rng, rng.randint(*user_words)))),
        )
        for i, t in enumerate(_arrivals(rng, n_requests, rate_per_s))
    ]


def few_shot(
    n_requests: int, rate_per_s: float, seed: int, *,
    n_tasks: int = 4,
    examples: int = 10,
    example_words: tuple[int, int] = (60, 140),
    answer_tokens: tuple[int, int] = (16, 96),
) -> list[TraceRequest]:
    """Raw prompts: one of ``n_tasks`` shared blocks of worked examples, then a new question."""
    rng = random.Random(seed)
    blocks = []
    for _ in range(n_tasks):
        shots = [
            f"Question: {question(rng, 20)}\nAnswer: {text(rng, rng.randint(*example_words))}"
            for _ in range(examples)
        ]
        blocks.append(f"{text(rng, 40)}\n\n" + "\n\n".join(shots))
    return [
        TraceRequest(
            f"fs-{i:06d}", t, rng.randint(*answer_tokens),
            prompt=f"{rng.choice(blocks)}\n\nQuestion: {question(rng, rng.randint(10, 40))}"
            "\nAnswer:",
        )
        for i, t in enumerate(_arrivals(rng, n_requests, rate_per_s))
    ]


def _tools(rng: random.Random, words: int) -> str:
    tools, count = [], 0
    while count < words:
        body = text(rng, rng.randint(40, 120))
        args = ", ".join(f"{rng.choice(_NOUNS)} (string)" for _ in range(rng.randint(1, 4)))
        tools.append(f"Tool {rng.choice(_VERBS)}_{rng.choice(_NOUNS)}: {body}\nParameters: {args}")
        count += body.count(" ") + 10
    return "You can call the following tools.\n\n" + "\n\n".join(tools)


def zipf_prefixes(
    n_requests: int, n_prefixes: int, alpha: float, rate_per_s: float, seed: int, *,
    prefix_words: tuple[int, int] = (300, 1200),
    user_words: tuple[int, int] = (10, 60),
    answer_tokens: tuple[int, int] = (32, 160),
) -> list[TraceRequest]:
    """Requests behind one of ``n_prefixes`` tool-description system prompts, the k-th most
    popular chosen with probability proportional to ``1 / k**alpha``."""
    rng = random.Random(seed)
    prefixes = [_tools(rng, rng.randint(*prefix_words)) for _ in range(n_prefixes)]
    weights = [1.0 / (k + 1) ** alpha for k in range(n_prefixes)]
    return [
        TraceRequest(
            f"tool-{i:06d}", t, rng.randint(*answer_tokens),
            (
                ("system", rng.choices(prefixes, weights)[0]),
                ("user", question(rng, rng.randint(*user_words))),
            ),
        )
        for i, t in enumerate(_arrivals(rng, n_requests, rate_per_s))
    ]


def _multi_turn_n(n_requests: int, rate_per_s: float, seed: int) -> list[TraceRequest]:
    turns = 8
    return multi_turn(-(-n_requests // turns), turns, rate_per_s, seed)[:n_requests]


Generator = Callable[[int, float, int], list[TraceRequest]]

GENERATORS: dict[str, Generator] = {
    "multi-turn": _multi_turn_n,
    "system-prompt": lambda n, rate, seed: shared_system_prompts(n, 16, rate, seed),
    "few-shot": lambda n, rate, seed: few_shot(n, rate, seed),
    "zipf": lambda n, rate, seed: zipf_prefixes(n, 64, 1.1, rate, seed),
}
"""Every generator with one signature ``(n_requests, rate_per_s, seed)``."""
