"""Tendermint consensus (Algorithm 1 of Buchman, Kwon, Milosevic 2018) as a pure state machine.

Who calls what: the devnet node owns one :class:`Tendermint` per validator process. It calls
:meth:`~Tendermint.start_height` once at start-up and again after applying each decided block,
:meth:`~Tendermint.on_proposal` / :meth:`~Tendermint.on_vote` for every message a peer sends,
and :meth:`~Tendermint.on_timeout` when a timer it was asked to set fires. Each call returns
the actions the node must carry out, in order: :class:`Broadcast` a message to every *other*
validator, :class:`ScheduleTimeout`, :class:`Decide` (apply the block, then start the next
height), :class:`Misbehaviour` (evidence of an equivocating validator).

Own messages are handled internally: what the engine signs is counted at once, and the node
sends it to the others only (an own message delivered back is a harmless duplicate).
The engine never reads a clock, opens a socket or starts a thread; given the same calls in
the same order it returns the same actions. Messages are checked (signature, validator
membership, proposer of the round) before they change state; bad ones are dropped and logged
at debug level. Messages of the next height and of rounds ahead are buffered with bounds
(see :mod:`permamesh.committee.devnet.rounds`); older heights are ignored. The action
types live in :mod:`permamesh.committee.devnet.actions` and are re-exported here.

The paper assumes gossip: every message a correct process receives eventually reaches all
correct processes. The engine provides the part of that its liveness needs, with bounded
traffic: (1) when a round is failing (2/3+ precommits, no decision) and it saw 2/3+
prevotes for a block in it, it relays that proposal and those prevotes, so an equivocator
cannot show a polka to one correct node only (the others, still in the round, update their
valid value); nothing is relayed on the normal path; (2) a re-proposal
(pol_round >= 0) goes out with the prevotes of its proof of lock; (3) every ``resend_s`` it
re-broadcasts its own messages of the previous and current round, so a lost message cannot
stall a round; (4) after hearing from a validator still at the previous height it sends,
at the next resend, that height's deciding proposal and commit, so the laggard decides too.
Laggards further behind catch up through the node's block sync (``verify_commit``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from permamesh.committee.devnet.actions import (
    Action, Broadcast, Decide, Misbehaviour, ScheduleTimeout, Step, Timeout, TimeoutConfig,
)  # fmt: skip
from permamesh.committee.devnet.rounds import (
    AHEAD_PER_VALIDATOR, NEXT_HEIGHT_PER_VALIDATOR, Message, MessageBuffer, RoundState, sender_of,
)  # fmt: skip
from permamesh.committee.devnet.votes import (
    MAX_CHAIN_ID, PRECOMMIT, PREVOTE, Proposal, Signer, ValidatorSet, Vote,
    public_key_of, sign_proposal, sign_vote, verify_proposal, verify_vote,
)  # fmt: skip
from permamesh.committee.errors import CommitteeError

log = logging.getLogger(__name__)

__all__ = [
    "Action", "Broadcast", "Decide", "Misbehaviour", "ScheduleTimeout", "Step", "Tendermint",
    "Timeout", "TimeoutConfig",
]  # fmt: skip


class Tendermint:
    """One validator's (or a non-voting observer's, ``signer=None``) consensus state.

    ``propose(height)`` is called when this validator proposes a new block (not when it
    re-proposes its valid value); ``validate(height, block)`` at most once per block hash
    per height, and only for blocks the rules need judged. Both run inside the call that
    triggered them; an exception from either propagates to the caller.
    """

    def __init__(
        self,
        chain_id: str,
        validators: ValidatorSet,
        signer: Signer | None,
        propose: Callable[[int], bytes],
        validate: Callable[[int, bytes], bool],
        timeouts: TimeoutConfig = TimeoutConfig(),
    ) -> None:
        if not isinstance(chain_id, str) or not 0 < len(chain_id) <= MAX_CHAIN_ID:
            raise CommitteeError(f"chain_id must be 1-{MAX_CHAIN_ID} characters")
        self.chain_id, self.validators, self.timeouts = chain_id, validators, timeouts
        self._propose, self._validate = propose, validate
        self._signer = signer
        self.me = public_key_of(signer) if signer is not None else None
        if self.me is not None and self.me not in validators:
            log.info("signing key is not a validator: running as an observer until it is")
        self.height, self.round, self.step = -1, 0, Step.COMMIT
        self._actions: list[Action] = []
        self._next = MessageBuffer(NEXT_HEIGHT_PER_VALIDATOR)
        self._last_commit: tuple[Proposal, tuple[Vote, ...]] | None = None
        self._reset(validators)

    def _reset(self, validators: ValidatorSet) -> None:
        self.validators = validators
        self.locked_value: bytes | None = None
        self.locked_round = -1
        self._locked_hash: bytes | None = None
        self.valid_value: bytes | None = None
        self.valid_round = -1
        self._rounds: dict[int, RoundState] = {}
        self._ahead = MessageBuffer(AHEAD_PER_VALIDATOR)
        self._valid: dict[bytes, bool] = {}  # block hash -> validate() result, this height
        self._resend_seq = 0
        self._peer_lagging = False

    @property
    def buffered(self) -> int:
        """Messages held for later: of the next height, and of rounds beyond round + 1."""
        return len(self._next) + len(self._ahead)

    # ------------------------------------------------------------------------ entry points

    def start_height(self, height: int, validators: ValidatorSet | None = None) -> list[Action]:
        """Begin ``height`` (after applying the block of ``height - 1``) at round 0, with
        ``validators`` if the set changed, and replay messages buffered for it."""
        if self.step != Step.COMMIT or height <= self.height:
            log.debug("start_height(%d) while at height %d step %s", height, self.height, self.step.name)
        if self._last_commit is not None and self._last_commit[0].height != height - 1:
            self._last_commit = None  # caught up by block sync: that commit is no help now
        buffered = self._next.take() if height == self.height + 1 else []
        self._next = MessageBuffer(NEXT_HEIGHT_PER_VALIDATOR)
        self.height = height
        self._reset(validators or self.validators)
        self._schedule("resend", 0)
        self._start_round(0)
        for msg in buffered:
            self._receive(msg)
        self._progress()
        return self._flush()

    def on_proposal(self, p: Proposal) -> list[Action]:
        self._receive(p)
        self._progress()
        return self._flush()

    def on_vote(self, v: Vote) -> list[Action]:
        self._receive(v)
        self._progress()
        return self._flush()

    def on_timeout(self, t: Timeout) -> list[Action]:
        if t.height == self.height and self.step != Step.COMMIT:
            if t.kind == "resend" and t.round == self._resend_seq:
                self._resend()
            elif t.round == self.round:
                if t.kind == "propose" and self.step == Step.PROPOSE:
                    self._cast(PREVOTE, b"")
                elif t.kind == "prevote" and self.step == Step.PREVOTE:
                    self._cast(PRECOMMIT, b"")
                elif t.kind == "precommit":
                    self._start_round(self.round + 1)
            self._progress()
        return self._flush()

    # ------------------------------------------------------------------------ receiving

    def _flush(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    def _verify(self, msg: object) -> bool:
        if isinstance(msg, Proposal):
            return verify_proposal(self.chain_id, self.validators, msg)
        return verify_vote(self.chain_id, self.validators, msg)

    def _receive(self, msg: Message) -> None:
        if not isinstance(msg, (Proposal, Vote)):
            log.debug("dropped %s: not a consensus message", type(msg).__name__)
            return
        if msg.height == self.height - 1 and sender_of(msg) in self.validators:
            self._peer_lagging = True  # answered at the next resend with the last commit
        if msg.height == self.height + 1:
            if msg not in self._next and self._verify(msg):
                self._next.add(msg)
            return
        if msg.height != self.height or self.step == Step.COMMIT:
            return
        if msg.round > self.round + 1:
            if msg not in self._ahead and self._verify(msg):
                self._ahead.add(msg)
            return
        rs = self._round(msg.round)
        if rs.has(msg) or not self._verify(msg):
            return
        self._store(rs, msg)

    def _round(self, r: int) -> RoundState:
        if r not in self._rounds:
            self._rounds[r] = RoundState(self.validators, self.height, r)
        return self._rounds[r]

    def _store(self, rs: RoundState, msg: Message) -> None:
        if isinstance(msg, Proposal):
            rs.add_proposal(msg)
        else:
            result = rs.votes(msg.kind).add(msg)
            if result.evidence is not None:
                self._actions.append(Misbehaviour(result.evidence))
        rs.note_sender(sender_of(msg))

    # ------------------------------------------------------------------------ own messages

    def _schedule(self, kind: str, round: int) -> None:
        t = Timeout(kind, self.height, round)
        self._actions.append(ScheduleTimeout(t, self.timeouts.delay(kind, round)))

    def _voting(self) -> bool:
        return self._signer is not None and self.me in self.validators

    def _cast(self, kind: str, block_hash: bytes) -> None:
        """Move to the step after ``kind`` and, if a validator, sign, count and send the vote."""
        self.step = Step.PREVOTE if kind == PREVOTE else Step.PRECOMMIT
        if self._voting():
            assert self._signer is not None
            vote = sign_vote(self.chain_id, self._signer, kind, self.height, self.round, block_hash)
            self._store(self._round(self.round), vote)
            self._actions.append(Broadcast(vote))

    def _start_round(self, r: int) -> None:
        self.round, self.step = r, Step.PROPOSE
        for msg in self._ahead.take(r + 1):
            rs = self._round(msg.round)
            if not rs.has(msg):
                self._store(rs, msg)
        if self._voting() and self.validators.proposer(self.height, r) == self.me:
            assert self._signer is not None
            block = self.valid_value if self.valid_value is not None else self._propose(self.height)
            p = sign_proposal(self.chain_id, self._signer, self.height, r, block, self.valid_round)
            self._store(self._round(r), p)
            self._actions.append(Broadcast(p))
            self._relay_pol(p)
        else:
            self._schedule("propose", r)

    def _resend(self) -> None:
        """Re-send own messages of the previous and current round (lost ones would otherwise
        stall a round forever), and the last commit if a validator seemed to lag behind."""
        for r in (self.round - 1, self.round):
            rs = self._rounds.get(r)
            if rs is None or self.me is None:
                continue
            for p in [p for p in rs.proposals.values() if p.proposer == self.me]:
                self._actions.append(Broadcast(p))
                self._relay_pol(p)
            own = [v for v in (rs.prevotes.get(self.me), rs.precommits.get(self.me)) if v]
            self._actions.extend(Broadcast(v) for v in own)
        if self._peer_lagging and self._last_commit is not None:
            proposal, commit = self._last_commit
            self._actions.append(Broadcast(proposal))
            self._actions.extend(Broadcast(v) for v in commit)
        self._peer_lagging = False
        self._resend_seq += 1
        self._schedule("resend", self._resend_seq)

    def _relay(self, votes: tuple[Vote, ...]) -> None:
        self._actions.extend(Broadcast(v) for v in votes if v.validator != self.me)

    def _relay_pol(self, p: Proposal) -> None:
        """Send the proof of lock a re-proposal cites: peers may never have seen it."""
        if p.pol_round >= 0:
            self._relay(self._round(p.pol_round).prevotes.votes_for(p.block_hash))

    # ------------------------------------------------------------------------ upon-rules

    def _is_valid(self, p: Proposal) -> bool:
        if p.block_hash not in self._valid:
            self._valid[p.block_hash] = bool(self._validate(self.height, p.block))
        return self._valid[p.block_hash]

    def _progress(self) -> None:
        """Apply the upon-rules until none fires (each firing changes state, so this ends)."""
        while self.height >= 0 and self.step != Step.COMMIT:
            if self._try_decide():
                return
            if not (self._try_skip() or self._try_current()):
                return

    def _try_decide(self) -> bool:
        """Proposal v and 2f+1 precommits for id(v) in any round r, v valid: decide v."""
        for r, rs in sorted(self._rounds.items()):
            block_hash = rs.precommits.quorum_hash()
            p = rs.proposal_for(block_hash) if block_hash else None
            if p is not None and self._is_valid(p):
                self.step = Step.COMMIT
                commit = rs.precommits.votes_for(block_hash)
                self._last_commit = (p, commit)
                self._actions.append(Decide(self.height, r, p.block, block_hash, commit))
                log.debug("decided height %d in round %d", self.height, r)
                return True
        return False

    def _try_skip(self) -> bool:
        """f+1 messages of a round above ours: start that round (the highest such)."""
        candidates = {r for r in self._rounds if r > self.round} | set(self._ahead.rounds())
        for r in sorted(candidates, reverse=True):
            senders = set(self._ahead.senders_at(r))
            if r in self._rounds:
                senders.update(self._rounds[r].senders())
            if sum(self.validators.power_of(k) for k in senders) >= self.validators.one_third_plus:
                self._start_round(r)
                return True
        return False

    def _try_current(self) -> bool:
        """The rules about the current round; True if one fired."""
        rs, step = self._round(self.round), self.step
        p = rs.proposal
        if step == Step.PROPOSE and p is not None:
            pol = self._rounds.get(p.pol_round) if p.pol_round >= 0 else None
            if p.pol_round == -1:  # a fresh proposal
                ok: bool | None = self.locked_round == -1 or self._locked_hash == p.block_hash
            elif pol is not None and pol.prevotes.quorum_hash() == p.block_hash:  # proof of lock
                ok = self.locked_round <= p.pol_round or self._locked_hash == p.block_hash
            else:
                ok = None  # wait for the proof of lock, or the propose timeout
            if ok is not None:
                self._cast(PREVOTE, p.block_hash if ok and self._is_valid(p) else b"")
                return True
        if step == Step.PREVOTE and not rs.prevote_timeout_set and rs.prevotes.has_quorum_any():
            rs.prevote_timeout_set = True
            self._schedule("prevote", self.round)
            return True
        polka = rs.prevotes.quorum_hash()
        if step >= Step.PREVOTE and not rs.polka_seen and polka:
            locked = rs.proposal_for(polka)
            if locked is not None and self._is_valid(locked):
                rs.polka_seen = True
                if step == Step.PREVOTE:
                    self.locked_value, self.locked_round = locked.block, self.round
                    self._locked_hash = polka
                    self._cast(PRECOMMIT, polka)
                self.valid_value, self.valid_round = locked.block, self.round
                return True
        if step == Step.PREVOTE and polka == b"":
            self._cast(PRECOMMIT, b"")
            return True
        if not rs.precommit_timeout_set and rs.precommits.has_quorum_any():
            rs.precommit_timeout_set = True
            self._schedule("precommit", self.round)
            if polka and self._voting():  # the round is failing: make sure all saw its polka
                shown = rs.proposal_for(polka)
                self._actions.extend(Broadcast(m) for m in (shown,) if m is not None and m.proposer != self.me)
                self._relay(rs.prevotes.votes_for(polka))
            return True
        return False
