"""A committee member's duties outside the state machine: challenge workers, score, report.

No model ever runs inside the ledger. Each member, once per epoch:

1. reads the registered workers from the committee (``/registry``) and the epoch (``/status``);
2. sends each worker ``challenges`` challenges drawn from a
   :class:`~permamesh.verify.challenges.ChallengePool` (they look like user traffic; the
   caller's ``send`` puts them on the overlay, or sends them directly);
3. scores every answer against the reference model (:class:`~permamesh.verify.verifier.Verifier`)
   and takes each worker's epoch credit (the minimum of its challenges);
4. signs a :class:`~permamesh.committee.txs.ScoreReport` and submits it.

The ledger takes the lower median of the members' reports, so one member that lies (``lie``:
reports 1 - credit, a drill) or reports nothing changes no honest node's reputation.

Who calls it: the demo (all members of the local devnet, sharing one scoring pass: on one
machine their honest results would be identical; a real member scores on its own), tests.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from permamesh.committee import txs
from permamesh.committee.client import CommitteeClient, TxOutcome
from permamesh.committee.trust import node_id_of
from permamesh.identity import NodeIdentity
from permamesh.verify.challenges import ChallengePool
from permamesh.verify.verifier import Verifier, epoch_credit
from permamesh.wire.messages import GenerateRequest

log = logging.getLogger(__name__)

PPM = 1_000_000


@dataclass(frozen=True)
class DutyConfig:
    challenges: int = 2  # per worker per epoch
    answer_cap: int = 16  # tokens per challenge answer at most (CPU budget)
    seed: int = 0


@dataclass(frozen=True)
class EpochScores:
    epoch: int
    credits: dict[bytes, int]  # node key -> epoch credit (ppm)
    challenges: int  # answers scored
    failures: dict[bytes, str]  # node key -> why it scored 0 without an answer


def score_workers(committee: CommitteeClient, verifier: Verifier, pool: ChallengePool,
                  send: Callable[[GenerateRequest, str], object], config: DutyConfig,
                  model: str | None = None) -> EpochScores:
    """Challenge and score every registered worker (serving ``model``, if given)."""
    rng = random.Random(config.seed * 1_000_003 + committee.query("/status")["height"])
    credits, failures, scored = {}, {}, 0
    for row in committee.query("/registry"):
        if row["role"] != "worker" or (model and model not in row["profile"]["models"]):
            continue
        key, node_id = bytes.fromhex(row["node"]), node_id_of(row["node"])
        answers = []
        for _ in range(config.challenges):
            challenge = pool.draw(rng)
            req = dataclasses.replace(challenge.request,
                                      max_tokens=min(challenge.request.max_tokens, config.answer_cap))
            try:
                answer = send(req, node_id)
            except Exception as exc:  # no answer at all is an abnormal epoch, not a crash
                failures[key] = f"{type(exc).__name__}: {exc}"
                log.warning("challenge to %s failed: %s", node_id, exc)
                answers = []
                break
            answers.append(verifier.score(req, answer))
            scored += 1
        credits[key] = epoch_credit(answers) if answers else 0
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
        nonce = committee.next_nonce(self.identity.public.sign_key)
        outcome = committee.submit(self.report_tx(scores, nonce))
        if not outcome.ok:
            log.warning("score report for epoch %d rejected: %s", scores.epoch, outcome.log)
        return outcome
