"""What a worker can observe of user traffic: :class:`TrafficProfile`, the distribution of
request parameters, lengths, conversation lengths and think times, learned from requests.

Who calls what: validators learn a profile with :meth:`TrafficProfile.observe` from requests
they may see (consented samples, or :func:`~permamesh.verify.traffic.user_requests` in tests
and benchmarks); :class:`~permamesh.verify.challenges.ChallengePool` samples its challenges'
:class:`Params`, lengths, conversation lengths and think times from it. Nothing here holds
state; every sampler takes its ``random.Random``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from permamesh.verify.errors import VerifyError
from permamesh.verify.textgen import weighted, words_of
from permamesh.verify.traffic import THINK_MEAN_S, THINK_MIN_S
from permamesh.wire import GenerateRequest

LEVELS = 101  # quantiles kept of each length distribution (every percentile)


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
    grammar_kind: str = ""  # structured output or tool calls: the answer's grammar ("" = none)
    grammar: str = ""


NO_GRAMMAR = ((("", ""), 1.0),)


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
    grammars: tuple[tuple[tuple[str, str], float], ...] = NO_GRAMMAR  # (grammar_kind, grammar); ("", "") = none

    @classmethod
    def learn(cls, requests: list[GenerateRequest], words: list[int]) -> KindProfile:
        return cls(
            _freq(r.max_tokens for r in requests), _freq(round(r.temperature, 2) for r in requests),
            _freq(round(r.top_p, 3) for r in requests), _freq(r.stop for r in requests),
            _freq(-1 if r.seed is not None and r.seed >= 2**16 else r.seed for r in requests),
            _freq(r.model for r in requests), sum(r.stream for r in requests) / len(requests),
            sum(bool(r.session) for r in requests) / len(requests), _quantiles([max(1, w) for w in words]),
            _freq((r.grammar_kind, r.grammar) for r in requests))

    def share(self, field: str, value: object) -> float:
        return dict(getattr(self, field)).get(value, 0.0)

    def sample(self, rng: random.Random) -> Params:
        seed = weighted(rng, self.seeds)
        params = Params(int(weighted(rng, self.max_tokens)), float(weighted(rng, self.temperature)),
                        float(weighted(rng, self.top_p)), tuple(weighted(rng, self.stops)),
                        rng.getrandbits(32) if seed == -1 else seed, str(weighted(rng, self.models)),
                        rng.random() < self.stream_share)
        if self.grammars == NO_GRAMMAR:  # no draw: a profile without grammars samples as it always did
            return params
        kind, grammar = weighted(rng, self.grammars)
        return dataclasses.replace(params, grammar_kind=kind, grammar=grammar)

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
    def grammar_share(self) -> float:
        """Requests asking for structured output or tool calls (a grammar); challenges carry
        grammars drawn from the traffic's at this share, so they look alike."""
        return self._blend(lambda k: 1.0 - k.share("grammars", ("", "")))

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
