"""What a worker can observe of the requests it serves, as numbers: :class:`WorkerView`.

A cheating worker that wants to be honest only on challenges must tell them apart from user
traffic using what reaches it: the request's every field (message structure, lengths, each
sampling parameter, stop strings, seed, ids, session), when it arrived (gap since the previous
request, gap since the previous turn of the same session, whether the history it carries is
the history it served), which entry worker forwarded it, whether it has seen the text before,
and the words (hashed into buckets). :class:`WorkerView` keeps that memory, in arrival order,
and turns each request into one row of features. It is the feature extractor of the
indistinguishability test (``tests/verify/test_indistinguishable.py``) and of the adaptive
dodger of the zoo (:class:`~permamesh.verify.zoo.AdaptiveDodger`), so the test measures what
the dodger can exploit.

Who calls it: tests, the zoo, the verification benchmark. Pure (no model, no network).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib

from permamesh.wire import ChatMessage, GenerateRequest

log = logging.getLogger(__name__)

__all__ = ["BUCKETS", "ENTRY_SLOTS", "WorkerView"]

BUCKETS = 64  # hashed word buckets
ENTRY_SLOTS = 8  # entry workers told apart (by a hash of their id)
POPULAR = frozenset((0, 1, 7, 42, 1234, 2024))
HANDLED = frozenset(("request_id", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                     "logprobs", "model", "session"))


def _hexish(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


class WorkerView:
    """One worker's memory of what it served, and the features of the next request."""

    def __init__(self, me: str = "") -> None:
        self.me = me  # this worker's node id: a request it is entry for came straight from a proxy
        self.served: set[str] = set()
        self.firsts: dict[str, str] = {}  # first user message -> session it came in
        self.sessions: dict[str, tuple[float, tuple[ChatMessage, ...]]] = {}
        self.last_t: float | None = None

    @staticmethod
    def _other_fields(r: GenerateRequest) -> list[float]:
        """Every other field of the request, whatever the wire adds later: numbers as they are,
        strings and tuples by length (so a new field is observed the day it exists)."""
        out = []
        for f in dataclasses.fields(r):
            if f.name in HANDLED:
                continue
            value = getattr(r, f.name)
            if isinstance(value, (bool, int, float)):
                out.append(float(value))
            elif isinstance(value, (str, tuple, list)):
                out.append(float(len(value)))
            else:
                out.append(float(value is not None))
        return out

    def features(self, t: float, r: GenerateRequest, entry: str = "") -> list[float]:
        """The row of ``r`` arriving at ``t`` (s) through ``entry`` (a node id, "" unknown);
        remembers it, so rows must be asked in arrival order."""
        texts = [r.prompt] if r.prompt is not None else [m.content for m in r.messages]
        users = [m.content for m in r.messages if m.role == "user"] or texts
        new = users[-1]
        system = r.messages[0].content if r.messages and r.messages[0].role == "system" else ""
        past = self.sessions.get(r.session) if r.session else None
        first_seen = self.firsts.get(users[0])
        bag = [0.0] * BUCKETS
        for word in " ".join(texts).lower().split():
            bag[zlib.crc32(word.encode()) % BUCKETS] += 1
        slots = [0.0] * ENTRY_SLOTS
        if entry:
            slots[zlib.crc32(entry.encode()) % ENTRY_SLOTS] = 1.0
        assistants = [m.content for m in r.messages if m.role == "assistant"]
        seed = r.seed
        row = [
            math.log1p(sum(map(len, texts))), math.log1p(sum(len(x.split()) for x in texts)),
            math.log1p(len(new)), math.log1p(len(new.split())), len(r.messages), len(users), len(assistants),
            math.log1p(sum(len(a.split()) for a in assistants)), r.prompt is None, bool(system),
            math.log1p(len(system.split())), new.count("\n"), new.count("?"),
            math.log2(r.max_tokens), r.max_tokens > 32, r.temperature, r.temperature == 0, r.top_p, r.top_p == 1.0,
            len(r.stop), sum(map(len, r.stop)), r.logprobs, getattr(r, "top_logprobs", 0),
            getattr(r, "presence_penalty", 0.0), getattr(r, "frequency_penalty", 0.0),
            seed is not None, seed in POPULAR if seed is not None else False,
            math.log1p(seed) if seed is not None and seed >= 0 else 0.0,
            r.stream, bool(r.model), len(r.model), len(r.request_id), _hexish(r.request_id),
            bool(r.session), len(r.session), past is not None, math.log1p(max(0.0, t - past[0])) if past else 0.0,
            bool(past) and r.messages[: len(past[1])] == past[1],
            math.log1p(max(0.0, t - self.last_t)) if self.last_t is not None else 0.0,
            new in self.served, first_seen is not None and first_seen != r.session,
            bool(entry), entry == self.me if entry else False,
        ] + self._other_fields(r) + slots + [math.log1p(b) for b in bag]
        self.remember(t, r, texts, users)
        return [float(x) for x in row]

    def remember(self, t: float, r: GenerateRequest, texts: list[str], users: list[str]) -> None:
        """Keep what serving ``r`` at ``t`` taught this worker (its texts, its session's history)."""
        self.served.update(texts)
        self.firsts.setdefault(users[0], r.session)
        if r.session:
            self.sessions[r.session] = (t, r.messages)
        self.last_t = t
