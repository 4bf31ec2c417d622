"""A committee member's duties outside the state machine: challenge workers, score, report.

No model ever runs inside the ledger. Each member, once per epoch:

1. reads the registered workers from the committee (``/registry``) and the epoch (``/status``);
2. plans the epoch (:func:`plan_epoch`, challenges drawn at send time by :func:`send_plan`): each worker's ``challenges`` (or the count its
   reputation calls for) at send times from a
   :class:`~permamesh.verify.schedule.ChallengeSchedule` (Poisson within the epoch, like user
   arrivals, never back to back), every worker's sends interleaved in time order, each through
   an entry worker drawn uniformly from the workers serving the same model (as users' proxies
   pick entries), each drawn from a :class:`~permamesh.verify.challenges.ChallengePool` at its
   send time: parameters, max_tokens (16-512, as users ask), seeds and later chat turns (a
   conversation continues with the worker's own earlier answers) exactly as traffic has them;
3. sends them at their times (``pace``; the caller's ``send`` puts them on the overlay) and
   scores every answer against the reference model
   (:class:`~permamesh.verify.verifier.Verifier`), teacher-forcing only the first ``budget``
   tokens, drawn per challenge and never on the wire (so the cost per challenge is bounded
   and the worker cannot know where scoring stops), with the tolerance of the engine the
   worker's descriptor names (:func:`engine_of`);
4. takes each worker's epoch credit (the minimum of its challenges, 0 when the sampling
   contract over its recent epochs is broken: :mod:`~permamesh.verify.contract`) and signs a
   :class:`~permamesh.committee.txs.ScoreReport`.

The ledger takes the lower median of the members' reports, so one member that lies (``lie``:
reports 1 - credit, a drill) or reports nothing changes no honest node's reputation.

Who calls it: the demo (all members of the local devnet, sharing one scoring pass: on one
machine their honest results would be identical; a real member scores on its own), tests
(``tests/verify/test_indistinguishable.py`` captures what :func:`plan_epoch` sends through a
real worker's wire).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from permamesh.committee import txs
from permamesh.committee.client import CommitteeClient, TxOutcome
from permamesh.committee.trust import node_id_of
from permamesh.identity import NodeIdentity
from permamesh.verify import contract
from permamesh.verify.challenges import Challenge, ChallengePool
from permamesh.verify.schedule import ChallengeSchedule
from permamesh.verify.verifier import Verifier, epoch_credit
from permamesh.wire.messages import GenerateRequest, GenerateResult

log = logging.getLogger(__name__)

PPM = 1_000_000


@dataclass(frozen=True)
class DutyConfig:
    challenges: int = 3  # per worker per epoch (``counts`` of plan_epoch may raise it for a doubtful node)
    budget_min: int = 16  # tokens teacher-forced per answer, drawn in [budget_min, budget_max]...
    budget_max: int = 48  # ...per challenge by the member, never sent (scoring cost stays bounded)
    epoch_s: float = 60.0  # s, the schedule's epoch
    pace: bool = True  # send at the planned times; False: at once, in planned order (drills, tests)
    answer_cap: int | None = None  # max_tokens cap: None = as traffic asks; a cap makes challenges stand out
    seed_every: int = 10  # epochs: a worker with no seeded sampled challenge for this long (or never) gets one
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.challenges >= 1 and 1 <= self.budget_min <= self.budget_max and self.epoch_s > 0):
            raise ValueError(f"bad duty config: {self}")


@dataclass(frozen=True)
class Target:
    """A worker to challenge, as the directory describes it."""

    key: bytes  # its signing key (what score reports name)
    node_id: str
    model: str
    engine: str = "torch"


@dataclass(frozen=True)
class Slot:
    """One send of an epoch's plan. Its challenge is drawn only at its time (:func:`send_plan`):
    a later chat turn carries the answer to the turn before."""

    at: float  # s, the send time (epoch * epoch_s + offset)
    target: Target  # the worker it is for
    entry: str  # node id of the entry worker it is sent through (drawn like a user's path's)
    budget: int  # answer tokens to teacher-force (never sent)
    seeded: bool = False  # the worker is due a seeded sampled challenge (the first new one of its slots)


def engine_of(record) -> str:
    """The engine a worker serves with, as its signed descriptor names it: from a directory
    record, a ``/directory`` row or a ``/registry`` row (its ``descriptor``), else from a model
    label (``model@engine``); torch when none is named."""
    if isinstance(record, dict):
        named = record.get("engine") or (record.get("descriptor") or {}).get("engine")
        label = str((record.get("profile") or {}).get("model", ""))
    else:
        named, label = getattr(record, "engine", ""), str(getattr(record, "model", ""))
    if not named and "@" in label:
        named = label.rsplit("@", 1)[1]
    return str(named or "torch")


def plan_epoch(targets: list[Target], schedule: ChallengeSchedule, epoch: int, rng: random.Random,
               counts: dict[bytes, int] | None = None, config: DutyConfig = DutyConfig(),
               seeded: frozenset[bytes] | set[bytes] = frozenset()) -> list[Slot]:
    """The epoch's sends in time order, every worker's interleaved: ``counts[key]`` (default
    ``config.challenges``) at times from ``schedule``, each through an entry drawn uniformly
    from the workers serving the same model, each with a scoring budget; the slots of workers
    in ``seeded`` (:meth:`Contracts.due_seed`) are marked to carry a seed."""
    slots = []
    for target in sorted(targets, key=lambda t: t.key):
        for at in schedule.send_times(epoch, (counts or {}).get(target.key, config.challenges), rng):
            slots.append((at, target))
    slots.sort(key=lambda s: (s[0], s[1].key))
    by_model: dict[str, list[str]] = {}
    for target in targets:
        by_model.setdefault(target.model, []).append(target.node_id)
    plan = []
    for at, target in slots:
        entries = sorted(by_model[target.model])
        plan.append(Slot(at, target, entries[rng.randrange(len(entries))],
                         rng.randint(config.budget_min, config.budget_max), target.key in seeded))
    return plan


def draw_for(slot: Slot, pool: ChallengePool, rng: random.Random, config: DutyConfig = DutyConfig(),
             fits: Callable[[GenerateRequest], bool] | None = None, seeded: bool = False) -> Challenge:
    """The challenge of ``slot``, drawn at its time (a due later turn of the worker's open chat
    challenge, else a new one); ``answer_cap`` applied if set. ``fits`` (the reference's
    context, :meth:`~permamesh.verify.verifier.Verifier.fits`): a conversation grown too long
    for the model is dropped, as its user would have to, and another drawn."""
    for _ in range(8):
        challenge = pool.draw(rng, now=slot.at, group=slot.target.node_id, seeded=seeded)
        if fits is None or fits(challenge.request):
            break
        log.debug("challenge %s does not fit the model's context: drawn again", challenge.request.request_id)
    if config.answer_cap is not None and challenge.request.max_tokens > config.answer_cap:
        challenge = dataclasses.replace(challenge, request=dataclasses.replace(
            challenge.request, max_tokens=config.answer_cap))
    return challenge


def send_plan(plan: list[Slot], pool: ChallengePool, rng: random.Random,
              send: Callable[[GenerateRequest, str], object], config: DutyConfig = DutyConfig(),
              clock: Callable[[], float] = time.monotonic, wait: Callable[[float], None] = time.sleep,
              fits: Callable[[GenerateRequest], bool] | None = None) -> Iterator[tuple[Slot, Challenge, object]]:
    """Send ``plan`` through ``send(request, entry_node_id)`` in order; yield ``(slot,
    challenge, answer)`` (``answer`` is the exception when sending failed). With ``pace`` each
    send waits for its time (offsets from the start of the plan's first epoch, on ``clock``).
    Answers go back to the pool, so later turns of a chat carry them."""
    origin = clock() - (plan[0].at - plan[0].at % config.epoch_s) if plan else 0.0
    seeded: set[bytes] = set()
    for slot in plan:
        if config.pace:
            delay = origin + slot.at - clock()
            if delay > 0:
                wait(delay)
        challenge = draw_for(slot, pool, rng, config, fits, slot.seeded and slot.target.key not in seeded)
        if challenge.request.seed is not None and challenge.request.temperature > 0:
            seeded.add(slot.target.key)
        try:
            answer = send(challenge.request, slot.entry)
        except Exception as exc:  # no answer at all is an abnormal epoch, not a crash
            log.warning("challenge to %s failed: %s", slot.target.node_id, exc)
            answer = exc
        if isinstance(answer, GenerateResult) and not challenge.last:
            pool.answered(challenge, answer.text, at=slot.at)
        yield slot, challenge, answer


@dataclass
class Contracts:
    """A member's sampling-contract state per worker (kept across epochs, off the ledger)."""

    configs: dict[str, contract.ContractConfig] = field(default_factory=lambda: dict(contract.ENGINE_CONTRACTS))
    states: dict[bytes, contract.ContractState] = field(default_factory=dict)
    seeded_at: dict[bytes, int] = field(default_factory=dict)  # key -> last epoch with seeded sampled tokens
    epochs: int = 0  # epochs judged so far

    def epoch(self, key: bytes, credits: list, engine: str = "torch") -> contract.Verdict:
        """Add a worker's credits of this epoch; judge its window under its engine's config."""
        config = contract.contract_for(engine, self.configs)
        tally = contract.tally(credits)
        state = contract.update(self.states.get(key, contract.ContractState()), tally, config)
        self.states[key] = state
        if tally.seeded_tokens:
            self.seeded_at[key] = self.epochs
        return contract.judge(state, config)

    def close_epoch(self) -> None:
        self.epochs += 1

    def due_seed(self, keys, every: int, min_tokens: int = 24) -> set[bytes]:
        """Workers with fewer than ``min_tokens`` seeded sampled tokens in their window (a new
        worker, until checked), or none for ``every`` epochs."""
        def few(k: bytes) -> bool:
            return self.states.get(k, contract.ContractState()).total().seeded_tokens < min_tokens
        return {k for k in keys if few(k) or k not in self.seeded_at or self.epochs - self.seeded_at[k] >= every}


@dataclass(frozen=True)
class EpochScores:
    epoch: int
    credits: dict[bytes, int]  # node key -> epoch credit (ppm)
    challenges: int  # answers scored
    failures: dict[bytes, str]  # node key -> why it scored 0 without an answer


def run_plan(plan: list[Slot], verifier: Verifier, pool: ChallengePool, rng: random.Random,
             send: Callable[[GenerateRequest, str], object], config: DutyConfig = DutyConfig(),
             contracts: Contracts | None = None, **timing) -> tuple[dict[bytes, int], int, dict[bytes, str]]:
    """Send ``plan`` (:func:`send_plan`), score the answers with each worker's engine's
    tolerance and budget, and return (epoch credit ppm per worker, answers scored, failures).
    A worker that failed to answer one challenge gets no more this epoch and credit 0; one that
    served none (its group peers served every challenge sent through it) is left unscored."""
    answers: dict[bytes, list] = {slot.target.key: [] for slot in plan}
    failures: dict[bytes, str] = {}
    by_node = {slot.target.node_id: slot.target for slot in plan}
    engines = {slot.target.key: slot.target.engine for slot in plan}
    scored = 0
    for slot, challenge, answer in send_plan(plan, pool, rng, send, config, fits=verifier.fits, **timing):
        if isinstance(answer, Exception):
            failures[slot.target.key] = f"{type(answer).__name__}: {answer}"
            answers[slot.target.key] = []
            continue
        if slot.target.key in failures:
            continue
        target = slot.target
        if isinstance(answer, GenerateResult):
            target = by_node.get(answer.worker_id, target)  # the entry may have routed it to a group peer
        answers.setdefault(target.key, []).append(
            verifier.score(challenge.request, answer, budget=slot.budget, engine=target.engine))
        scored += 1
    credits = {}
    for key, got in answers.items():
        if not got and key not in failures:
            continue  # no evidence this epoch (its entry routed every challenge to a group peer): unscored
        credit = epoch_credit(got) if got and key not in failures else 0
        if contracts is not None and got and key not in failures:
            verdict = contracts.epoch(key, got, engines.get(key, "torch"))
            if not verdict.ok:
                log.warning("worker %s breaks the sampling contract: %s", key.hex()[:16], verdict.reason)
                credit = 0
        credits[key] = credit
    return credits, scored, failures


def targets_of(committee: CommitteeClient, model: str | None = None) -> list[Target]:
    """The registered workers (serving ``model``, if given)."""
    out = []
    for row in committee.query("/registry"):
        if row["role"] != "worker" or (model and model not in row["profile"]["models"]):
            continue
        out.append(Target(bytes.fromhex(row["node"]), node_id_of(row["node"]),
                          model or ",".join(sorted(row["profile"]["models"])), engine_of(row)))
    return out


def score_workers(committee: CommitteeClient, verifier: Verifier, pool: ChallengePool,
                  send: Callable[[GenerateRequest, str], object], config: DutyConfig,
                  model: str | None = None, schedule: ChallengeSchedule | None = None,
                  contracts: Contracts | None = None) -> EpochScores:
    """Challenge and score every registered worker (serving ``model``, if given), one epoch;
    ``send(request, entry_node_id)`` puts a challenge on the overlay through that entry."""
    status = committee.query("/status")
    rng = random.Random(config.seed * 1_000_003 + status["height"])
    schedule = schedule or ChallengeSchedule(epoch_s=config.epoch_s)
    targets = targets_of(committee, model)
    due = contracts.due_seed([t.key for t in targets], config.seed_every) if contracts is not None else set()
    plan = plan_epoch(targets, schedule, int(status.get("epoch", 0)), rng, config=config, seeded=due)
    credits, scored, failures = run_plan(plan, verifier, pool, rng, send, config, contracts)
    if contracts is not None:
        contracts.close_epoch()
    epoch = committee.query("/status")["epoch"]  # the epoch the scoring ended in: its report is open
    return EpochScores(epoch, credits, scored, failures)


class Member:
    """One committee member's signing side: turns scores into signed reports."""

    def __init__(self, identity: NodeIdentity, chain_id: str, lie: bool = False) -> None:
        self.identity, self.chain_id, self.lie = identity, chain_id, lie

    def report_tx(self, scores: EpochScores, nonce: int) -> bytes:
        entries = tuple(txs.Score(key, PPM - credit if self.lie else credit, scores.challenges)
                        for key, credit in sorted(scores.credits.items()))
        return txs.sign_tx(txs.ScoreReport(chain_id=self.chain_id, nonce=nonce, epoch=scores.epoch,
                                           scores=entries), self.identity)

    def report(self, committee: CommitteeClient, scores: EpochScores) -> TxOutcome:
        if not scores.credits:
            return TxOutcome(0, "no workers to report", 0, False)
        outcome = committee.submit_signed(lambda nonce: self.report_tx(scores, nonce), self.identity.public.sign_key)
        if not outcome.ok:
            log.warning("score report for epoch %d rejected: %s", scores.epoch, outcome.log)
        return outcome
