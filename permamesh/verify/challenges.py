"""Challenge requests: what validators send a worker to check the model it serves, drawn so
that the worker cannot tell them from user traffic (a cheat that behaves only when it spots a
challenge must never spot one). This module owns :class:`ChallengePool` and
:class:`Challenge`; consented samples are kept and reworded in
:mod:`~permamesh.verify.consented`, send times come from :mod:`~permamesh.verify.schedule`.

Who calls what:

- a client whose user consents calls :func:`~permamesh.verify.consented.sample_for_verification`
  after an answer arrived; when it says yes, the client hands ``(request, result)`` to the
  validators, who score the answer and call :meth:`ChallengePool.add_consented` with the
  group that served it;
- a validator keeps one :class:`ChallengePool` (built on a
  :class:`~permamesh.verify.profile.TrafficProfile`), asks
  :class:`~permamesh.verify.schedule.ChallengeSchedule` for the epoch's send times, calls
  :meth:`ChallengePool.draw` at each and sends ``challenge.request`` (nothing else of a
  :class:`Challenge` goes on the wire) through the overlay; when the answer comes back it
  calls :meth:`ChallengePool.answered`, so that a later turn of a chat challenge carries the
  worker's own answer in its history, as a user's client would.

What a worker sees of a challenge and why it matches traffic: the parameters are a consented
user's own or are drawn from the profile (chat and raw separately, so e.g. the share at
temperature 0 matches); a chat keeps one set of parameters and one session id for all its
turns, which come a think time (learned from traffic) after the previous answer; the number
of turns follows the traffic's conversation lengths; ids are 16 random bytes in hex, like the
overlay client's; ``logprobs`` is always True, as the overlay client always asks for them.

Reusing consented prompts (the choice made here): a worker may remember every prompt it has
served. So a consented sample is (1) never sent to the group that served the original, (2)
sent at most once to any group, and (3) always perturbed: a chat gets a system prompt drawn
afresh and its first message's lead-in replaced, a raw prompt another template; each redraw
keeps the traffic's distribution of lead-ins and templates (see
:func:`~permamesh.verify.consented.shift`) and is repeated until the text differs from the
original and every earlier use. A consented
conversation is replayed as a new one of its user turns only, cut at a turn drawn from the
traffic's conversation lengths. The requests of one conversation (one session id) are kept
once, the longest, so one user conversation never yields two challenges; a prompt that many
users send stays as common among challenges as it is in traffic (and as often "seen before").

Fresh prompts are composed in the traffic's style (:func:`~permamesh.verify.textgen.compose`)
with a length drawn from the profile and a topic drawn given that length, so the pool is
never empty and never only replays.

Limits: fresh prompts are synthetic text, which a worker running a language model of its own
could learn to tell from human text: keep ``fresh_share`` low once consented samples abound.
Workers of different groups that pool what they served can still match a reused consented
prompt on its words beyond the lead-in, and a replayed conversation's later user turns
answer the original model's replies, not this worker's. With few challenges an epoch, a later
chat turn goes at a send time near its think time's end: right on average, but spread wider.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass

from permamesh.verify.consented import TRIES, Sample, digest, reword_opening, reword_raw, sample_of
from permamesh.verify.errors import VerifyError
from permamesh.verify.profile import Params, TrafficProfile
from permamesh.verify.textgen import (
    FOLLOW_LEADS, LEAD_INS, RAW_FORMATS, TOPICS, Topic, compose, compose_followup, given_words, split_lead_in,
    system_prompt, weighted,
)
from permamesh.verify.traffic import THINK_MIN_S, hex_id
from permamesh.wire import ChatMessage, GenerateRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Challenge:
    """One challenge: ``request`` goes on the wire; the rest stays with the validator."""

    request: GenerateRequest
    greedy: bool  # temperature 0: the answer must match the reference model token for token
    source: str  # "consented" (a perturbed user prompt) or "fresh" (composed)
    group: str  # the worker group it was drawn for
    conversation: int  # the pool's number for its conversation
    turn: int  # 1 opens a conversation
    last: bool  # no later turn follows (answered() is then optional)
    sample: int = -1  # the consented sample it came from (its original answer may be on file); -1 fresh


@dataclass
class _Open:  # a chat challenge with turns still to come
    number: int
    group: str
    session: str
    params: Params
    history: tuple[ChatMessage, ...]
    script: list[str]  # consented user turns still to send; fresh ones are composed
    topic: Topic
    turns_left: int
    source: str
    sample: int
    sent_at: float | None
    gap_s: float  # think time: the next turn goes this long after the last was sent
    awaiting: str = ""  # request id whose answer is missing
    earliest: float = -math.inf  # no sooner than this (s)
    due: float | None = None


class ChallengePool:
    """Consented samples plus a composer of fresh prompts; :meth:`draw` gives a challenge.

    ``fresh_share``: of new conversations, the share composed even when a consented sample is
    there; ``stale_s``: an open chat challenge whose answer or next turn is this late is
    dropped (the user left); ``max_open``: open chat challenges kept, the oldest dropped."""

    def __init__(self, profile: TrafficProfile, *, fresh_share: float = 0.25, stale_s: float = 900.0,
                 max_open: int = 1024) -> None:
        if not isinstance(profile, TrafficProfile):
            raise VerifyError("a challenge pool needs a TrafficProfile")
        if not (0.0 <= fresh_share <= 1.0 and stale_s > 0 and max_open >= 1):
            raise VerifyError(f"bad pool settings: fresh_share={fresh_share!r}, stale_s={stale_s!r}")
        if profile.logprobs_share < 0.99:
            log.warning("only %.0f%% of traffic asks for logprobs: challenges (always True) stand out",
                        100 * profile.logprobs_share)
        self.profile, self.fresh_share, self.stale_s, self.max_open = profile, fresh_share, stale_s, max_open
        self._samples: dict[tuple[bool, str], Sample] = {}  # by (chat?, session id or request id)
        self._keys: dict[bool, list[tuple[bool, str]]] = {True: [], False: []}  # in arrival order
        self._open: dict[int, _Open] = {}
        self._spacing: dict[str, tuple[float, float]] = {}  # group -> (last draw s, mean spacing s)
        self._numbers = 0
        self._seed_next = False  # draw(seeded=True): the next new conversation or raw prompt is seeded
        s, mean = profile.chat_share, profile.mean_conversation()
        # new conversations that are chats, so that requests (later turns included) match chat_share
        self._new_chat = 0.0 if profile.chat is None else 1.0 if profile.raw is None else s / (s + mean * (1 - s))

    def __len__(self) -> int:
        return len(self._samples)

    # -- consented samples
    def add_consented(self, request: GenerateRequest, *, group: str = "") -> None:
        """Keep a request its user allowed to be reused (``group``: the group that served it)."""
        if not isinstance(request, GenerateRequest) or not isinstance(group, str):
            raise VerifyError("add_consented takes a GenerateRequest and a group name")
        sample = sample_of(request, len(self._samples), group)
        key = (request.prompt is None, request.session or request.request_id)  # one per conversation
        old = self._samples.get(key)
        if old is None:
            self._keys[key[0]].append(key)
        elif len(old.turns) >= len(sample.turns):
            return
        else:
            sample.number, sample.used_by, sample.sent = old.number, old.used_by, old.sent
        self._samples[key] = sample

    def _pick(self, rng: random.Random, chat: bool, group: str) -> Sample | None:
        keys = self._keys[chat]
        for _ in range(TRIES if keys else 0):
            sample = self._samples[keys[rng.randrange(len(keys))]]
            if group not in sample.used_by and not (sample.origin and sample.origin == group):
                return sample
        return None

    # -- drawing
    def draw(self, rng: random.Random, *, now: float | None = None, group: str = "", seeded: bool = False) -> Challenge:
        """The next challenge for ``group`` at time ``now`` (s): a due later turn of an open
        chat challenge if there is one, else a new conversation or raw prompt.

        ``seeded``: a new conversation or raw prompt gets a seed (drawn as users' seeds are) and
        a temperature > 0 (drawn as users' are) if its parameters had none, so that the seed
        contract is checked (:mod:`~permamesh.verify.contract`); a due later turn keeps its
        conversation's parameters (check ``request.seed`` to see whether it took).

        A later turn is due from a mean draw spacing before its think time ends: it goes at
        the first draw after that, on average when the think time ends, not a spacing later."""
        if not isinstance(rng, random.Random):
            raise VerifyError("draw() needs a random.Random")
        if now is not None and not (isinstance(now, (int, float)) and math.isfinite(now)):
            raise VerifyError(f"now must be a finite time in seconds, not {now!r}")
        if not isinstance(group, str) or len(group) > 64:
            raise VerifyError("group must be a string of at most 64 characters")
        self._expire(now)
        lead = 0.0
        if now is not None:
            last, lead = self._spacing.get(group, (None, 0.0))
            if last is not None and now >= last:
                lead = now - last if not lead else 0.9 * lead + 0.1 * (now - last)
            self._spacing[group] = (now, lead)
        due = [o for o in self._open.values() if o.group == group and not o.awaiting
               and (now is None or o.due is None or max(o.due - lead, o.earliest) <= now)]
        if due:
            return self._next_turn(rng, min(due, key=lambda o: (o.due or 0.0, o.number)), now)
        self._seed_next = seeded
        chat = rng.random() < self._new_chat
        sample = self._pick(rng, chat, group) if rng.random() >= self.fresh_share else None
        if chat:
            return self._new_conversation(rng, sample, now, group)
        return self._raw(rng, sample, group)

    def _number(self) -> int:
        self._numbers += 1
        return self._numbers

    def _raw(self, rng: random.Random, sample: Sample | None, group: str) -> Challenge:
        kind = self.profile.raw
        if sample is not None:
            prompt = reword_raw(rng, sample)
            if prompt is not None:
                return self._send_raw(rng, prompt, sample.params, group, sample)
            sample.used_by.add(group)  # no new surface form left for it
        fmt, topic, body = given_words(rng, kind.sample_words(rng), RAW_FORMATS)
        question = compose(rng, topic, body)
        return self._send_raw(rng, fmt.replace("{q}", question), kind.sample(rng), group, None)

    def _with_seed(self, rng: random.Random, params: Params, chat: bool) -> Params:
        if not self._seed_next:
            return params
        self._seed_next = False
        kind = self.profile.chat if chat else self.profile.raw
        seeds = [(v, w) for v, w in kind.seeds if v is not None] or [(-1, 1.0)]
        temps = [(v, w) for v, w in kind.temperature if v > 0] or [(0.7, 1.0)]
        seed = params.seed if params.seed is not None else weighted(rng, seeds)
        temperature = params.temperature if params.temperature > 0 else float(weighted(rng, temps))
        return dataclasses.replace(params, seed=rng.getrandbits(32) if seed == -1 else seed, temperature=temperature)

    def _send_raw(self, rng: random.Random, prompt: str, params: Params, group: str,
                  sample: Sample | None) -> Challenge:
        params = self._with_seed(rng, params, False)
        if sample is not None:
            sample.used_by.add(group)
            sample.sent.add(digest(prompt))
        session = hex_id(rng) if rng.random() < self.profile.raw.session_share else ""
        request = GenerateRequest(hex_id(rng), prompt=prompt, session=session, logprobs=True, **vars(params))
        return Challenge(request, params.temperature == 0.0, "fresh" if sample is None else "consented", group,
                         self._number(), 1, True, -1 if sample is None else sample.number)

    def _new_conversation(self, rng: random.Random, sample: Sample | None, now: float | None,
                          group: str) -> Challenge:
        profile, kind = self.profile, self.profile.chat
        turns = int(weighted(rng, profile.conversation_turns()))
        topic = weighted(rng, ((t, t.weight) for t in TOPICS))
        opening = None
        if sample is not None:
            opening = reword_opening(rng, sample, profile.system_share)
            sample.used_by.add(group)  # reworded, or no new surface form left for it
            if opening is not None:
                params, script = sample.params, list(sample.turns[1:turns])
                sample.sent.add(digest(opening[1]))
        if opening is None:
            lead, topic, body = given_words(rng, kind.sample_words(rng), LEAD_INS)
            system = system_prompt(rng) if rng.random() < profile.system_share else None
            opening, params, script, sample = (system, compose(rng, topic, body, lead)), kind.sample(rng), [], None
        params = self._with_seed(rng, params, True)
        history = (ChatMessage("system", opening[0]),) if opening[0] is not None else ()
        history += (ChatMessage("user", opening[1]),)
        session = hex_id(rng) if rng.random() < kind.session_share else ""
        conv = _Open(self._number(), group, session, params, (), script, topic, turns,
                     "fresh" if sample is None else "consented", -1 if sample is None else sample.number, now, 0.0)
        return self._send_turn(rng, conv, history)

    def _next_turn(self, rng: random.Random, conv: _Open, now: float | None) -> Challenge:
        if conv.script:
            _, rest = split_lead_in(conv.script.pop(0), FOLLOW_LEADS)
            said = " ".join(p for p in (str(weighted(rng, FOLLOW_LEADS)), rest) if p)
        else:
            lead, _, body = given_words(rng, self.profile.sample_followup_words(rng), FOLLOW_LEADS, None)
            said = compose_followup(rng, conv.topic, body, lead)
        conv.sent_at = now
        return self._send_turn(rng, conv, conv.history + (ChatMessage("user", said),))

    def _send_turn(self, rng: random.Random, conv: _Open, history: tuple[ChatMessage, ...]) -> Challenge:
        request = GenerateRequest(hex_id(rng), messages=history, session=conv.session, logprobs=True,
                                  **vars(conv.params))
        conv.history, conv.turns_left = history, conv.turns_left - 1
        turn = sum(m.role == "user" for m in history)
        if conv.turns_left > 0:
            conv.awaiting, conv.due, conv.gap_s = request.request_id, None, self.profile.sample_think_s(rng)
            self._open[conv.number] = conv
            while len(self._open) > self.max_open:
                self._open.pop(next(iter(self._open)))
        else:
            self._open.pop(conv.number, None)
        return Challenge(request, conv.params.temperature == 0.0, conv.source, conv.group, conv.number, turn,
                         conv.turns_left <= 0, conv.sample)

    def answered(self, challenge: Challenge, text: str, *, at: float | None = None) -> None:
        """The worker's answer to ``challenge`` (received at ``at`` s): its conversation's next
        turn becomes due a think time after the challenge was sent, not before the answer."""
        if not isinstance(challenge, Challenge) or not isinstance(text, str):
            raise VerifyError("answered() takes a Challenge and the answer's text")
        conv = self._open.get(challenge.conversation)
        if conv is None or conv.awaiting != challenge.request.request_id:
            if challenge.last:
                return
            raise VerifyError(f"challenge {challenge.request.request_id} is not awaiting an answer (expired?)")
        conv.history += (ChatMessage("assistant", text),)
        conv.awaiting = ""
        if conv.sent_at is not None:  # never sooner than the quickest user, nor before the answer
            quickest = self.profile.think_s[0] if self.profile.think_s else THINK_MIN_S
            conv.due = conv.sent_at + conv.gap_s
            conv.earliest = max(conv.sent_at + min(quickest, conv.gap_s), at if at is not None else -math.inf)

    def _expire(self, now: float | None) -> None:
        if now is None:
            return
        for number, conv in list(self._open.items()):
            last = conv.due if conv.due is not None else conv.sent_at
            if last is not None and now - last > self.stale_s:
                log.debug("challenge conversation %d dropped after %.0f s", number, now - last)
                del self._open[number]
