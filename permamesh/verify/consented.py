"""Consented samples: user requests a client forwards to the validators, kept to be reused,
always perturbed, as challenges.

Who calls what: a client whose user consents calls :func:`sample_for_verification` after an
answer arrived; :meth:`~permamesh.verify.challenges.ChallengePool.add_consented` turns a
forwarded request into a :class:`Sample` with :func:`sample_of`, and the pool rewords one with
:func:`reword_raw` (another template) or :func:`reword_opening` (a system prompt drawn afresh
and another lead-in) before it sends it. The rules of reuse and their limits are in
:mod:`~permamesh.verify.challenges`' docstring. Nothing here holds state beyond a sample's
record of where it went; every function takes its ``random.Random``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from permamesh.verify.errors import VerifyError
from permamesh.verify.profile import Params
from permamesh.verify.textgen import LEAD_INS, RAW_FORMATS, split_lead_in, system_prompt, unwrap_raw, weighted
from permamesh.wire import GenerateRequest, GenerateResult
from permamesh.wire.messages import MAX_PROMPT_CHARS

TRIES = 16  # redraws of a perturbation (or picks of a consented sample) before giving up


@dataclass
class Sample:
    number: int
    system: str | None
    turns: tuple[str, ...]  # user messages (chat); the question (raw)
    fmt: str  # raw template, "" for chat
    params: Params
    origin: str  # the group that served the original
    used_by: set[str] = field(default_factory=set)
    sent: set[str] = field(default_factory=set)  # digests of every text sent from it


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def shift(rng: random.Random, pairs: tuple[tuple[str, float], ...], current: str) -> str:
    """Another value of ``pairs`` whose distribution, over originals drawn from ``pairs``, is
    ``pairs`` again: a uniform point in the original's arc of the unit circle, turned half a
    circle. It differs from ``current`` whenever no value holds more than half the mass."""
    total = sum(w for _, w in pairs)
    start = 0.0
    for value, w in pairs:
        if value == current:
            break
        start += w
    else:
        return str(weighted(rng, pairs))  # an original we do not know: any value
    point = (start + rng.random() * w + total / 2) % total
    for value, w in pairs:
        if point < w:
            return value
        point -= w
    return pairs[-1][0]


def sample_of(request: GenerateRequest, number: int, group: str) -> Sample:
    """The sample kept of a consented ``request`` that ``group`` served."""
    if sum(len(m.content) for m in request.messages) + len(request.prompt or "") > MAX_PROMPT_CHARS - 4096:
        raise VerifyError("a consented request too close to the size limit to be perturbed")
    params = Params(request.max_tokens, request.temperature, request.top_p, request.stop, request.seed,
                    request.model, request.stream, request.grammar_kind, request.grammar)
    if request.prompt is not None:
        if not request.prompt.strip():
            raise VerifyError("a consented raw prompt is empty")
        fmt, question = unwrap_raw(request.prompt)
        return Sample(number, None, (question,), fmt, params, group)
    turns = tuple(m.content for m in request.messages if m.role == "user")
    if not turns or not all(t.strip() for t in turns):
        raise VerifyError("a consented chat needs non-empty user messages")
    system = request.messages[0].content if request.messages[0].role == "system" else None
    return Sample(number, system, turns, "", params, group)


def reword_raw(rng: random.Random, sample: Sample) -> str | None:
    """A raw sample's question in another template, differing from the original and every
    text sent from it; None when :data:`TRIES` redraws found none."""
    for _ in range(TRIES):
        prompt = shift(rng, RAW_FORMATS, sample.fmt).replace("{q}", sample.turns[0])
        if digest(prompt) not in sample.sent and prompt != sample.fmt.replace("{q}", sample.turns[0]):
            return prompt
    return None


def reword_opening(rng: random.Random, sample: Sample, system_share: float) -> tuple[str | None, str] | None:
    """``(system prompt or None, first user message)`` opening a chat sample anew: a system
    prompt at ``system_share``, drawn afresh, and another lead-in, the message differing from
    the original and every text sent from it; None when :data:`TRIES` redraws found none."""
    lead, rest = split_lead_in(sample.turns[0])
    for _ in range(TRIES):
        system = system_prompt(rng) if rng.random() < system_share else None
        first = " ".join(p for p in (shift(rng, LEAD_INS, lead), rest) if p)
        if first != sample.turns[0] and digest(first) not in sample.sent:
            return system, first
    return None


def sample_for_verification(request: GenerateRequest, result: GenerateResult, consent: bool, rate: float,
                            rng: random.Random) -> bool:
    """Whether the client forwards this real answer to the validators (True at ``rate``, only
    where its user consents). The client decides after the answer arrived, so the worker
    cannot serve sampled requests differently; a forwarded request may later be reused,
    perturbed, as a challenge (:meth:`~permamesh.verify.challenges.ChallengePool.add_consented`)."""
    if not isinstance(request, GenerateRequest) or not isinstance(result, GenerateResult):
        raise VerifyError("sample_for_verification takes a GenerateRequest and its GenerateResult")
    if result.request_id != request.request_id:
        raise VerifyError(f"result {result.request_id!r} answers another request than {request.request_id!r}")
    if not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0) or not isinstance(rng, random.Random):
        raise VerifyError(f"rate must be in [0, 1] and rng a random.Random, not {rate!r}")
    draw = rng.random()  # drawn either way: consent does not change the stream of decisions
    return bool(consent) and draw < rate
