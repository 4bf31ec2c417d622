"""A seeded model of user traffic, and :class:`TrafficProfile`, what a worker can observe of it.

Who calls what: tests and benchmarks call :func:`user_requests` for a stream of requests as a
worker would see them; :class:`~permamesh.verify.challenges.ChallengePool` writes its fresh
prompts with :func:`given_words`, :func:`compose`, :func:`compose_followup` and
:func:`system_prompt`, takes consented ones apart with :func:`split_lead_in` and
:func:`unwrap_raw`, and samples parameters from a :class:`TrafficProfile`, which validators
learn with :meth:`TrafficProfile.observe` from requests they may see (consented samples).
Nothing here holds state; every function takes its ``random.Random``.

The wire form is the overlay client's: request ids are 16 random bytes in hex, ``stream`` is
False and ``model`` is "". **``logprobs`` is always True**: the overlay client always asks for
log-probabilities on the wire (and drops them when its caller did not ask), so the flag that
verification needs is never a sign of a challenge.

The model, per request: chat (a conversation of 1-8 user turns under one session id, with a
system prompt for some, one set of parameters kept for the whole conversation, the answers in
the history) or a raw prompt (a bare question or a completion template, with stop strings for
half of them); topics from coding to summarising a pasted paragraph; first messages from 3 to
600 words (a lognormal per topic: heavy-tailed); Poisson conversation starts and think times
between turns. Prose comes from :func:`permamesh.bench.traces.text` and topic word lists.
A message is a lead-in (or a raw template) and a body whose length does not depend on it:
so swapping the lead-in keeps the distribution, and :func:`given_words` can say, for a
length drawn from a profile, which lead-in, topic and body length made it.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from permamesh.bench.traces import text
from permamesh.verify.errors import VerifyError
from permamesh.wire import ChatMessage, GenerateRequest

log = logging.getLogger(__name__)

MIN_WORDS, MAX_WORDS = 3, 600  # of a first user message or a raw prompt's question
LEVELS = 101  # quantiles kept of each length distribution (every percentile)

LEAD_INS = (("", 45), ("Hi!", 6), ("Hey,", 5), ("Quick question:", 6), ("I need some help.", 5),
            ("Can you help me?", 6), ("Hello there.", 4), ("Question:", 4), ("Thanks in advance.", 3),
            ("Sorry if this is basic.", 3), ("Help please:", 3))
FOLLOW_LEADS = (("", 60), ("Thanks!", 10), ("Ok,", 8), ("Great.", 7), ("Hmm,", 5), ("Got it.", 5), ("Nice.", 5))
FOLLOW_CORES = ("Can you expand on that?", "Why?", "What about the {n}?", "Can you give an example?",
                "Make it shorter.", "Explain it more simply.", "Is there another way to {v} the {n}?",
                "What if I {v} the {n} instead?", "Are you sure?", "Summarise that in one sentence.")
RAW_FORMATS = (("{q}", 35), ("Question: {q}\nAnswer:", 25), ("Q: {q}\nA:", 15),
               ("### Instruction:\n{q}\n\n### Response:\n", 25))
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a helpful, concise assistant.",
                  "You are a friendly assistant. Answer clearly.", "Answer as briefly as possible.",
                  "You are an expert tutor. Explain step by step.", "You are a senior software engineer.",
                  "Reply in plain English without jargon.", "You are a careful assistant. Say when unsure.")
STOP_SETS = ((("\n\n",), 35), (("\nQuestion:",), 25), (("###",), 20), (("\n\n", "###"), 10), (("</s>",), 10))
MAX_TOKENS = ((16, 5), (32, 10), (64, 17), (128, 28), (256, 25), (512, 15))
TEMPERATURES = ((0.2, 8), (0.3, 6), (0.5, 10), (0.6, 6), (0.7, 30), (0.8, 12), (0.9, 6), (1.0, 22))
TOP_PS = ((1.0, 86), (0.95, 6), (0.9, 6), (0.8, 2))
POPULAR_SEEDS = (0, 1, 7, 42, 1234, 2024)  # seeds people type; others are drawn at random
THINK_MIN_S, THINK_MEAN_S = 5.0, 20.0  # a user reads for at least this, plus an exponential pause


@dataclass(frozen=True)
class Topic:
    name: str
    weight: float  # share of conversations and raw prompts
    median_words: float  # of the first message (lognormal, clipped to MIN_WORDS..MAX_WORDS)
    sigma: float  # lognormal shape: the heavy tail
    cores: tuple[str, ...]  # the question: {n} noun, {v} verb, {a} adjective, {x} topic term, {k} number
    nouns: tuple[str, ...]
    terms: tuple[str, ...]
    sentences: tuple[str, ...]  # context sentences, same slots
    context_first: bool = True  # pasted context before the question (False: instruction first)

    def chance(self, words: int) -> float:
        """The probability that a first message on this topic has ``words`` words."""
        return lognormal_chance(words, self.median_words, self.sigma)


def lognormal_chance(words: int, median: float, sigma: float, lo: int = MIN_WORDS, hi: int = MAX_WORDS) -> float:
    """P(:func:`lognormal_words` gives ``words``): a rounded lognormal, redrawn outside lo..hi."""
    if not lo <= words <= hi:
        return 0.0
    cdf = lambda w: 0.5 * (1 + math.erf((math.log(w) - math.log(median)) / (sigma * math.sqrt(2))))  # noqa: E731
    return (cdf(words + 0.5) - cdf(words - 0.5)) / (cdf(hi + 0.5) - cdf(lo - 0.5))


_GENERIC = ("{The} {a} {n} {v}s the {n}.", "I tried to {v} the {n} but the {x} {n} did not {v}.",
            "My {n} is {a} and the {n} is {a}.", "We {v} the {n} every week.")
TOPICS = tuple(Topic(*row) for row in (
    ("coding", 22, 30, 1.0,
     ("How do I {v} a {n} in {x}?", "Why does my {x} {n} fail?", "Fix this {x} code.", "What is a {n}?",
      "Write a {x} function that {v}s a {n}.", "Is it better to {v} the {n} or the {n}?"),
     ("list", "loop", "class", "function", "test", "query", "thread", "socket", "parser", "array", "string", "file"),
     ("Python", "Rust", "JavaScript", "SQL", "Go", "C++", "bash"),
     ("def {v}_{n}({n}): return {n}.{v}()", "The {x} {n} raises an error when I {v} it.",
      "for {n} in {n}s: {v}({n})", "I use {x} 3.{k} on Linux.") + _GENERIC),
    ("cooking", 12, 18, 0.8,
     ("What can I cook with {n} and {n}?", "How long should I {v} the {n}?", "Give me a {a} {x} recipe.",
      "Can I replace {n} with {n}?"),
     ("onion", "garlic", "rice", "butter", "chicken", "flour", "tomato", "egg", "pasta", "lentils"),
     ("vegan", "Italian", "Thai", "breakfast", "soup", "dessert"),
     ("I have {k} grams of {n} and some {n}.", "The {n} came out {a} last time.") + _GENERIC),
    ("history", 10, 16, 0.8,
     ("What caused the fall of the {x}?", "Who ruled the {x} after the war?", "Explain the {x} in {a} terms.",
      "Why did the {x} {v} its {n}?"),
     ("empire", "treaty", "king", "revolution", "trade", "army", "border", "church", "republic"),
     ("Roman Empire", "Ottoman Empire", "Hanseatic League", "Ming dynasty", "French Revolution", "Cold War"),
     ("In {k}00 the {n} began to {v} the {n}.", "My teacher said the {x} was {a}.") + _GENERIC),
    ("science", 12, 18, 0.9,
     ("Why is the {n} {a}?", "How does {x} work?", "Explain {x} to a child.",
      "What is the difference between {n} and {n}?"),
     ("cell", "atom", "planet", "wave", "gene", "star", "protein", "battery", "magnet"),
     ("photosynthesis", "gravity", "entropy", "evolution", "quantum tunneling", "vaccination"),
     ("A {n} has {k} {n}s.", "I read that {x} makes the {n} {a}.") + _GENERIC),
    ("travel", 10, 20, 0.8,
     ("What should I see in {x}?", "Plan a {k} day trip to {x}.", "Is {x} {a} in winter?",
      "How do I get from the {n} to the {n} in {x}?"),
     ("train", "museum", "hotel", "beach", "market", "airport", "ticket", "hostel"),
     ("Lisbon", "Kyoto", "Mexico City", "Istanbul", "Cape Town", "Vancouver", "Hanoi"),
     ("We are {k} adults on a {a} budget.", "I land at the {n} at {k} pm.") + _GENERIC),
    ("math", 12, 35, 0.5,
     ("How many {n}s are left?", "What is the total cost?", "How long does it take?", "What fraction is {a}?"),
     ("apple", "ticket", "marble", "book", "coin", "box"),
     ("Sam", "Maria", "Ahmed", "Lin", "the farmer", "the shop"),
     ("{x} has {k} {n}s and buys {k} more.", "Each {n} costs {k} dollars.", "{x} gives {k} {n}s to a friend.",
      "A train travels {k} km in {k} hours.")),
    ("summarise", 12, 180, 0.6,
     ("Summarise the following paragraph:", "TL;DR:", "Summarize this in three bullet points:",
      "Give me a one-line summary of this text:"),
     (), (), (), False),
    ("chat", 10, 8, 0.9,
     ("Tell me a joke about a {n}.", "What should I {v} today?", "Write a short poem about the {n}.",
      "Give me a name for my {a} {n}."),
     ("cat", "dog", "weekend", "garden", "robot", "birthday"), ("friend", "party"), _GENERIC),
))


def weighted(rng: random.Random, pairs: Iterable[tuple[object, float]]) -> object:
    """One value of ``(value, weight)`` pairs."""
    values, weights = zip(*pairs)
    return rng.choices(values, weights)[0]


def words_of(s: str) -> int:
    return len(s.split())


def _take(s: str, n: int) -> str:
    """The first ``n`` words of ``s``, its whitespace kept, ending in a full stop."""
    kept = "".join(re.findall(r"\S+\s*", s)[:n]).rstrip()
    return kept if not kept or kept[-1] in ".?!:" else kept.rstrip(",;") + "."


def _fill(rng: random.Random, template: str, topic: Topic) -> str:
    nouns = topic.nouns or ("thing",)
    pick = {"n": nouns, "x": topic.terms or nouns, "v": ("use", "check", "build", "change", "keep", "find"),
            "a": ("simple", "good", "cheap", "fast", "safe", "quiet", "strange", "old"),
            "The": ("The", "This", "Our")}
    out = re.sub(r"\{(\w+)\}", lambda m: str(rng.randint(2, 60)) if m[1] == "k" else rng.choice(pick[m[1]]), template)
    return out[0].upper() + out[1:] if template[0] == "{" else out  # code lines keep their case


def _context(rng: random.Random, topic: Topic, n: int) -> str:
    if n <= 0:
        return ""
    if not topic.sentences:
        return _take(text(rng, n + 12), n)
    out = []
    while sum(map(words_of, out)) < n:
        out.append(_fill(rng, rng.choice(topic.sentences), topic))
    return _take(" ".join(out), n)


def compose(rng: random.Random, topic: Topic, words: int, lead: str = "") -> str:
    """``lead`` (a lead-in), then a first message (or a raw prompt's question) on ``topic`` of
    exactly ``words`` words: its context sentences and its question."""
    core = _fill(rng, rng.choice(topic.cores), topic)
    for _ in range(8):
        if words_of(core) <= words:
            break
        core = _fill(rng, rng.choice(topic.cores), topic)
    core = _take(core, words)
    ctx = _context(rng, topic, words - words_of(core))
    body = f"{ctx} {core}".strip() if topic.context_first else f"{core}\n\n{ctx}".strip()
    return f"{lead} {body}".strip()


def compose_followup(rng: random.Random, topic: Topic, words: int, lead: str = "") -> str:
    """``lead``, then a later user turn of exactly ``words`` words: a reaction, sometimes with detail."""
    core = _take(_fill(rng, rng.choice(FOLLOW_CORES), topic), words)
    return " ".join(p for p in (lead, _context(rng, topic, words - words_of(core)), core) if p)


FOLLOW_WORDS = (8, 0.8, 1, 200)  # a later turn's words after its lead-in: median, sigma, lo, hi


def given_words(rng: random.Random, words: int, prefixes: tuple[tuple[str, float], ...],
                topics: tuple[Topic, ...] | None = TOPICS) -> tuple[str, Topic | None, int]:
    """``(prefix, topic, body words)`` of a message of ``words`` words in all, drawn with the
    probability that the user model made it so: the prefix (a lead-in, or a raw template with
    ``{q}``) and the body's length are independent there. ``topics=None``: a later turn."""
    options = []
    for prefix, share in prefixes:
        body = words - words_of(prefix.replace("{q}", ""))
        for topic in topics or (None,):
            chance = topic.chance(body) if topic else lognormal_chance(body, *FOLLOW_WORDS)
            if chance > 0:
                options.append(((prefix, topic, body), share * (topic.weight if topic else 1) * chance))
    if not options:  # a length the user model never makes: the plainest form
        return prefixes[0][0], weighted(rng, ((t, t.weight) for t in topics)) if topics else None, max(1, words)
    return weighted(rng, options)


def split_lead_in(s: str, leads: Iterable[tuple[str, float]] = LEAD_INS) -> tuple[str, str]:
    """``(lead_in, rest)`` of a message (``""`` when it opens with none we know)."""
    for lead, _ in sorted(leads, key=lambda p: -len(p[0])):
        if lead and s.startswith(lead + " "):
            return lead, s[len(lead) + 1 :]
    return "", s


def unwrap_raw(prompt: str) -> tuple[str, str]:
    """``(format, question)`` of a raw prompt; ``("{q}", prompt)`` when no template fits."""
    for fmt, _ in RAW_FORMATS:
        head, tail = fmt.split("{q}")
        if (head or tail) and prompt.startswith(head) and prompt.endswith(tail) and len(prompt) > len(head + tail):
            return fmt, prompt[len(head) : len(prompt) - len(tail)]
    return "{q}", prompt


# -- the user model -------------------------------------------------------------------------

CHAT_CONVERSATIONS = 0.6  # of conversations and raw prompts, the share that are chats
SYSTEM_SHARE = 0.45  # of chats, the share with a system prompt
MORE_TURNS, MAX_TURNS = 0.55, 8  # a chat goes on after each turn with this probability
RAW_SESSIONS = 0.1  # of raw prompts, the share whose client sets a session id


def hex_id(rng: random.Random) -> str:
    """A request or session id as the overlay client writes it (16 random bytes, hex)."""
    return f"{rng.getrandbits(128):032x}"


def lognormal_words(rng: random.Random, median: float, sigma: float, lo: int = MIN_WORDS, hi: int = MAX_WORDS) -> int:
    while True:
        words = round(rng.lognormvariate(math.log(median), sigma))
        if lo <= words <= hi:
            return words


def system_prompt(rng: random.Random) -> str:
    """A stock system prompt (most) or a custom persona with instructions (a heavy tail)."""
    if rng.random() < 0.7:
        return rng.choice(SYSTEM_PROMPTS)
    words = lognormal_words(rng, 40, 0.8, 5, 300)
    return _fill(rng, "You are a {a} assistant for {x}. ", rng.choice(TOPICS)) + _take(text(rng, words + 12), words)


def simulated_answer(rng: random.Random, max_tokens: int) -> str:
    """What a model answers: its natural length, cut at ``max_tokens`` (about 1.3 tokens a word)."""
    words = max(1, round(min(max_tokens, rng.lognormvariate(math.log(150), 0.8)) / 1.3))
    return _take(text(rng, words + 12), words)


def user_params(rng: random.Random, *, chat: bool) -> dict[str, object]:
    """The request parameters a user's client sets (once per conversation)."""
    if rng.random() < (0.3 if chat else 0.45):
        temperature = 0.0
    else:
        temperature = round(rng.uniform(0.2, 1.0), 2) if rng.random() < 0.1 else weighted(rng, TEMPERATURES)
    seed = None
    if rng.random() < 0.06:
        seed = rng.choice(POPULAR_SEEDS) if rng.random() < 0.6 else rng.getrandbits(32)
    return {"max_tokens": weighted(rng, MAX_TOKENS), "temperature": temperature, "top_p": weighted(rng, TOP_PS),
            "stop": weighted(rng, STOP_SETS) if rng.random() < (0.03 if chat else 0.5) else (),
            "seed": seed, "logprobs": True}


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


# -- what a worker observes ----------------------------------------------------------------


def _freq(values: Iterable[object]) -> tuple[tuple[object, float], ...]:
    counts = Counter(values)
    total = sum(counts.values())
    return tuple(sorted(((v, c / total) for v, c in counts.items()), key=lambda p: repr(p[0])))


def _quantiles(values: list[float]) -> tuple[float, ...]:
    xs = sorted(values)
    if not xs:
        return ()
    out = []
    for i in range(LEVELS):
        pos = i * (len(xs) - 1) / (LEVELS - 1)
        lo = int(pos)
        out.append(xs[lo] + (pos - lo) * (xs[min(lo + 1, len(xs) - 1)] - xs[lo]))
    return tuple(out)


def _from_quantiles(rng: random.Random, qs: tuple[float, ...], *, log_scale: bool) -> float:
    pos = rng.random() * (len(qs) - 1)
    lo, frac = int(pos), pos - int(pos)
    a, b = qs[lo], qs[min(lo + 1, len(qs) - 1)]
    if log_scale:
        return math.exp(math.log(a) + frac * (math.log(b) - math.log(a)))
    return a + frac * (b - a)


@dataclass(frozen=True)
class Params:
    """The parameters of one request (a conversation keeps one set for all its turns)."""

    max_tokens: int
    temperature: float
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    model: str = ""
    stream: bool = False


@dataclass(frozen=True)
class KindProfile:
    """The observed parameters of one kind of request (chat or raw); each ``(value, share)``."""

    max_tokens: tuple[tuple[int, float], ...]
    temperature: tuple[tuple[float, float], ...]  # values rounded to 0.01
    top_p: tuple[tuple[float, float], ...]
    stops: tuple[tuple[tuple[str, ...], float], ...]  # () = no stop strings
    seeds: tuple[tuple[int | None, float], ...]  # None = no seed, -1 = a large (random) seed
    models: tuple[tuple[str, float], ...]
    stream_share: float
    session_share: float  # requests carrying a session id
    words: tuple[float, ...]  # LEVELS quantiles: words of a first user message (raw: of the prompt)

    @classmethod
    def learn(cls, requests: list[GenerateRequest], words: list[int]) -> KindProfile:
        return cls(
            _freq(r.max_tokens for r in requests), _freq(round(r.temperature, 2) for r in requests),
            _freq(round(r.top_p, 3) for r in requests), _freq(r.stop for r in requests),
            _freq(-1 if r.seed is not None and r.seed >= 2**16 else r.seed for r in requests),
            _freq(r.model for r in requests), sum(r.stream for r in requests) / len(requests),
            sum(bool(r.session) for r in requests) / len(requests), _quantiles([max(1, w) for w in words]))

    def share(self, field: str, value: object) -> float:
        return dict(getattr(self, field)).get(value, 0.0)

    def sample(self, rng: random.Random) -> Params:
        seed = weighted(rng, self.seeds)
        return Params(int(weighted(rng, self.max_tokens)), float(weighted(rng, self.temperature)),
                      float(weighted(rng, self.top_p)), tuple(weighted(rng, self.stops)),
                      rng.getrandbits(32) if seed == -1 else seed, str(weighted(rng, self.models)),
                      rng.random() < self.stream_share)

    def sample_words(self, rng: random.Random) -> int:
        return max(1, round(_from_quantiles(rng, self.words, log_scale=True))) if self.words else 10


def _last_user(request: GenerateRequest) -> str:
    return next((m.content for m in reversed(request.messages) if m.role == "user"), request.messages[-1].content)


@dataclass(frozen=True)
class TrafficProfile:
    """The distribution of what a worker sees in requests, learned by :meth:`observe`: per
    kind (chat, raw) the frequencies of each parameter value and the length quantiles, the
    chat share, conversation lengths, later turns' lengths and the think times between turns.
    Summaries blend the kinds by their share of requests; ``sample_*`` draw for challenges."""

    chat: KindProfile | None  # None: no chat request observed
    raw: KindProfile | None
    chat_share: float  # of requests, later turns included
    system_share: float  # of chat first turns, the share opening with a system message
    turns: tuple[tuple[int, float], ...]  # user turns per chat request
    followup_words: tuple[float, ...]  # LEVELS quantiles: words of a later turn's user message
    think_s: tuple[float, ...]  # LEVELS quantiles of the gap between turns of a session; () = untimed
    logprobs_share: float
    observed: int  # requests observed

    @classmethod
    def observe(cls, requests: Iterable[GenerateRequest | tuple[float, GenerateRequest]]) -> TrafficProfile:
        """Learn from requests, or from ``(arrival_s, request)`` pairs (which add think times)."""
        chats, raws, words, first_words, later_words, systems = [], [], [], [], [], []
        by_session: dict[str, list[tuple[float, int]]] = {}
        for item in requests:
            t, request = item if isinstance(item, tuple) and len(item) == 2 else (None, item)
            if not isinstance(request, GenerateRequest) or not (t is None or isinstance(t, (int, float))):
                raise VerifyError(f"observe() takes requests or (s, request) pairs, not {type(item).__name__}")
            if request.prompt is not None:
                raws.append(request)
                words.append(words_of(request.prompt))
                continue
            chats.append(request)
            n_user = sum(m.role == "user" for m in request.messages)
            (first_words if n_user <= 1 else later_words).append(words_of(_last_user(request)))
            if n_user <= 1:
                systems.append(request.messages[0].role == "system")
            if t is not None and request.session:
                by_session.setdefault(request.session, []).append((float(t), n_user))
        if not chats and not raws:
            raise VerifyError("a traffic profile needs at least one request")
        gaps = [b[0] - a[0] for turns in map(sorted, by_session.values())
                for a, b in zip(turns, turns[1:]) if b[1] > a[1]]  # between turns of one session
        everything = chats + raws
        return cls(KindProfile.learn(chats, first_words or [10]) if chats else None,
                   KindProfile.learn(raws, words) if raws else None,
                   len(chats) / len(everything), sum(systems) / len(systems) if systems else 0.0,
                   _freq(sum(m.role == "user" for m in r.messages) for r in chats), _quantiles([max(1, w) for w in later_words]),
                   _quantiles(gaps), sum(r.logprobs for r in everything) / len(everything), len(everything))

    # -- summaries (both kinds blended by their share of requests)
    def _blend(self, share_of_kind) -> float:
        kinds = ((self.chat, self.chat_share), (self.raw, 1 - self.chat_share))
        return sum(w * share_of_kind(k) for k, w in kinds if k)

    def max_tokens_share(self, value: int) -> float:
        return self._blend(lambda k: k.share("max_tokens", value))

    @property
    def temperature_zero_share(self) -> float:
        return self._blend(lambda k: k.share("temperature", 0.0))

    @property
    def stop_share(self) -> float:
        return self._blend(lambda k: 1.0 - k.share("stops", ()))

    def temperature_buckets(self) -> dict[str, float]:
        edges = (("0", 0.0, 0.0), ("(0, 0.5]", 1e-9, 0.5), ("(0.5, 1]", 0.5 + 1e-9, 1.0), ("> 1", 1.0 + 1e-9, 10.0))
        return {name: self._blend(lambda k: sum(s for v, s in k.temperature if lo <= v <= hi))
                for name, lo, hi in edges}

    # -- sampling, for challenge conversations
    def conversation_turns(self) -> tuple[tuple[int, float], ...]:
        """``(turns, share)`` of whole conversations: P(C >= j) is the share of requests at turn j
        relative to turn 1."""
        at = dict(self.turns)
        first = at.get(1, 0.0)
        if not first:
            return ((1, 1.0),)
        pairs = [(j, max(0.0, at.get(j, 0.0) - at.get(j + 1, 0.0)) / first) for j in sorted(at)]
        return tuple((j, p) for j, p in pairs if p > 0) or ((1, 1.0),)

    def mean_conversation(self) -> float:
        return sum(j * p for j, p in self.conversation_turns()) / sum(p for _, p in self.conversation_turns())

    def sample_followup_words(self, rng: random.Random) -> int:
        return max(1, round(_from_quantiles(rng, self.followup_words, log_scale=True))) if self.followup_words else 8

    def sample_think_s(self, rng: random.Random) -> float:
        if self.think_s:
            return _from_quantiles(rng, self.think_s, log_scale=False)
        return THINK_MIN_S + rng.expovariate(1.0 / THINK_MEAN_S)
