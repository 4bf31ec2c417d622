"""The epochs of ``permamesh bench verify``, driven by the committee's own duties.

Every epoch the benchmark does what a committee member does (:mod:`permamesh.committee.duties`):
:func:`~permamesh.committee.duties.plan_epoch` plans each node's challenges (the count its
reputation calls for) at scheduled times through random entry workers with a scoring budget
each; :func:`~permamesh.committee.duties.draw_for` draws each challenge at its time from the
pool (max_tokens 16-512 and seeds as users send them, later chat turns); the node answers;
the verifier teacher-forces the budget's tokens with the tolerance of the node's engine; the
epoch credit is the minimum, zeroed when the node breaks the sampling contract over its
window (:class:`~permamesh.committee.duties.Contracts`).

Two things differ from a member on the network, both for CPU time only: a node's generation
stops at the scoring budget (``horizon``; the node still sees the request as sent), and the
history of a later chat turn holds the traffic model's answer text (what user conversations
hold) rather than the cut answer.

Adaptive dodgers also see user traffic (60 requests an epoch, entries drawn like a user's
path's), in arrival order with their challenges; before epoch 1 they train on a labelled
history of ``TRAIN_EPOCHS`` epochs of the same duties against another pool (:func:`train`).

Who calls it: :mod:`permamesh.bench.verify`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import zlib
from collections.abc import Callable

from permamesh.committee.duties import Contracts, DutyConfig, Target, draw_for, plan_epoch
from permamesh.verify.challenges import ChallengePool
from permamesh.verify.dodger import AdaptiveDodger
from permamesh.verify.observe import WorkerView
from permamesh.verify.profile import TrafficProfile
from permamesh.verify.schedule import ChallengeSchedule
from permamesh.verify.textgen import simulated_answer
from permamesh.verify.traffic import user_requests
from permamesh.wire import GenerateRequest

log = logging.getLogger(__name__)

USER_RATE = 1.0  # user requests per second a dodger serves
TRAIN_EPOCHS = 60  # epochs of labelled history a dodger trains on


def make_pool(seed: int, requests: int = 3000) -> ChallengePool:
    """A member's pool: a profile and consented samples from one traffic sample."""
    traffic = list(user_requests(requests, seed, USER_RATE))
    pool = ChallengePool(TrafficProfile.observe(traffic))
    for _, req in traffic[::3]:
        pool.add_consented(req, group="elsewhere")
    return pool


def target_of(name: str, model: str, engine: str = "torch") -> Target:
    return Target(zlib.crc32(name.encode()).to_bytes(4, "big") * 8, name, model, engine)


class Epochs:
    """The benchmark's member: its pool, schedule, rng and contract state across epochs."""

    def __init__(self, verifier, model: str, duty: DutyConfig, seed: int, epochs: int) -> None:
        self.verifier, self.model, self.duty = verifier, model, duty
        self.pool = make_pool(seed)
        self.schedule = ChallengeSchedule(epoch_s=duty.epoch_s)
        self.rng = random.Random(seed)
        self.contracts = Contracts()
        self.users = list(user_requests(int((epochs + 2) * duty.epoch_s * USER_RATE), seed + 1, USER_RATE))
        self._seen: dict[str, int] = {}  # dodger -> users fed so far
        self.verdicts: dict[str, str] = {}  # node -> last contract breach

    def _feed_users(self, name: str, dodger: AdaptiveDodger, until: float, entries: list[str]) -> None:
        i = j = self._seen.get(name, 0)
        rng = random.Random(zlib.crc32(name.encode()) + i)
        while j < len(self.users) and self.users[j][0] < until:
            j += 1
        dodger.observe_users([(t, req, entries[rng.randrange(len(entries))]) for t, req in self.users[i:j]])
        self._seen[name] = j

    def run(self, epoch: int, nodes: dict[str, Callable], engines: dict[str, str], counts: dict[str, int],
            on_answer: Callable[[str, GenerateRequest, object], None] | None = None) -> dict[str, list]:
        """One epoch: every node in ``counts`` answers its challenges; returns their credits."""
        targets = {name: target_of(name, self.model, engines.get(name, "torch")) for name in counts}
        due = self.contracts.due_seed([t.key for t in targets.values()], self.duty.seed_every)
        plan = plan_epoch(list(targets.values()), self.schedule, epoch, self.rng,
                          {targets[n].key: c for n, c in counts.items()}, self.duty, due)
        entries = sorted(targets)
        credits: dict[str, list] = {name: [] for name in counts}
        seeded: set[str] = set()
        for slot in plan:
            name = slot.target.node_id
            node = nodes[name]
            challenge = draw_for(slot, self.pool, self.rng, self.duty, self.verifier.fits,
                                 slot.seeded and name not in seeded)
            req = challenge.request
            if req.seed is not None and req.temperature > 0:
                seeded.add(name)
            if isinstance(node, AdaptiveDodger):
                self._feed_users(name, node, slot.at, entries)
                node.observe(slot.at, req, slot.entry, challenge=True)
            answer = node(req, horizon=slot.budget)
            if not challenge.last:
                said = simulated_answer(random.Random(zlib.crc32(req.request_id.encode())), req.max_tokens)
                self.pool.answered(challenge, said, at=slot.at)
            scored = dataclasses.replace(req, max_tokens=min(req.max_tokens, slot.budget))
            credit = self.verifier.score(scored, answer, budget=slot.budget, engine=slot.target.engine)
            credits[name].append(credit)
            if on_answer is not None:
                on_answer(name, scored, credit)
        end = (epoch + 1) * self.duty.epoch_s
        for name, node in nodes.items():
            if name in counts and isinstance(node, AdaptiveDodger):
                self._feed_users(name, node, end, entries)
        return credits

    def close_epoch(self) -> None:
        self.contracts.close_epoch()

    def contract_ok(self, name: str, credits: list, engine: str = "torch") -> bool:
        verdict = self.contracts.epoch(target_of(name, self.model).key, credits, engine)
        if not verdict.ok:
            self.verdicts[name] = verdict.reason
        return verdict.ok


def history(names: list[str], dodgers: list[str], model: str, duty: DutyConfig, seed: int,
            epochs: int = TRAIN_EPOCHS, per_epoch: int = 4, fits: Callable | None = None):
    """A labelled history for ``dodgers``: ``epochs`` epochs of user traffic and of the duties'
    challenges (another pool, the same code; entries drawn among all ``names``, as the
    benchmark's are), ``(t, is_challenge, entry, request, target)`` in arrival order, and the
    user requests; each dodger gets ``per_epoch`` challenges an epoch."""
    pool, rng = make_pool(seed + 7), random.Random(seed + 8)
    users = list(user_requests(int(epochs * duty.epoch_s * USER_RATE), seed + 9, USER_RATE))
    targets = [target_of(n, model) for n in names]
    stream = []
    last: dict[bytes, int] = {}
    for epoch in range(epochs):
        due = {t.key for t in targets if t.key not in last or epoch - last[t.key] >= duty.seed_every}
        plan = plan_epoch(targets, ChallengeSchedule(epoch_s=duty.epoch_s), epoch, rng,
                          {t.key: per_epoch if t.node_id in dodgers else 0 for t in targets}, duty, due)
        for slot in plan:
            challenge = draw_for(slot, pool, rng, duty, fits, slot.seeded and slot.target.key in due)
            if challenge.request.seed is not None and challenge.request.temperature > 0:
                due.discard(slot.target.key)
                last[slot.target.key] = epoch
            if not challenge.last:
                said = simulated_answer(random.Random(zlib.crc32(challenge.request.request_id.encode())),
                                        challenge.request.max_tokens)
                pool.answered(challenge, said, at=slot.at)
            stream.append((slot.at, 1, slot.entry, challenge.request, slot.target.node_id))
    return stream, users


def train(dodger: AdaptiveDodger, names: list[str], labelled, seed: int) -> dict:
    """Fit ``dodger`` on the challenges its own name got in ``labelled`` (from :func:`history`)
    and all of its user traffic, seen in arrival order."""
    challenges, users = labelled
    pick = random.Random(seed + 10)
    stream = [(t, y, entry, req) for t, y, entry, req, target in challenges if target == dodger.me]
    stream += [(t, 0, names[pick.randrange(len(names))], req) for t, req in users]
    stream.sort(key=lambda s: (s[0], s[1]))
    view = WorkerView(dodger.me)
    rows = [view.features(t, req, entry) for t, _, entry, req in stream]
    dodger.learn(rows, [y for _, y, _, _ in stream])
    return {"rows": len(rows), "challenges": int(sum(y for _, y, _, _ in stream))}
