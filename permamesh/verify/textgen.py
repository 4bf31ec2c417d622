"""English-like user text: the topics, lead-ins and raw templates of user messages, and the
composers that write them with a given number of words.

Who calls what: the user model (:func:`~permamesh.verify.traffic.user_requests`) writes its
users' messages with :func:`compose`, :func:`compose_followup`, :func:`system_prompt` and
:func:`simulated_answer`; :class:`~permamesh.verify.challenges.ChallengePool` writes its fresh
prompts with :func:`given_words`, :func:`compose`, :func:`compose_followup` and
:func:`system_prompt`, and it and :mod:`~permamesh.verify.consented` take consented ones apart
with :func:`split_lead_in` and :func:`unwrap_raw`. Nothing here holds state; every function
takes its ``random.Random``.

Topics run from coding to summarising a pasted paragraph; first messages have 3 to 600 words
(a lognormal per topic: heavy-tailed). Prose comes from :func:`permamesh.bench.traces.text`
and topic word lists. A message is a lead-in (or a raw template) and a body whose length does
not depend on it: so swapping the lead-in keeps the distribution, and :func:`given_words` can
say, for a length drawn from a profile, which lead-in, topic and body length made it.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

from permamesh.bench.traces import text

MIN_WORDS, MAX_WORDS = 3, 600  # of a first user message or a raw prompt's question

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


def lognormal_words(rng: random.Random, median: float, sigma: float, lo: int = MIN_WORDS, hi: int = MAX_WORDS) -> int:
    while True:
        words = round(rng.lognormvariate(math.log(median), sigma))
        if lo <= words <= hi:
            return words


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
