"""Per-height message bookkeeping of the Tendermint engine: rounds and bounded buffers.

Only :class:`~permamesh.committee.devnet.tendermint.Tendermint` uses this module. It keeps
one :class:`RoundState` per round it has accepted messages for (rounds up to its current
round + 1), one :class:`MessageBuffer` for verified messages of rounds further ahead, and one
for verified messages of the next height. Everything is dropped when a new height starts.

Bounds (so a byzantine peer cannot grow memory without limit): a round keeps at most
:data:`MAX_PROPOSALS_PER_ROUND` distinct proposals, one counted vote plus one piece of
evidence per validator and kind; a buffer keeps at most ``per_sender`` messages per
validator key (only keys of the validator set are accepted), evicting that sender's
lowest-round message for a higher-round one.
"""

from __future__ import annotations

import logging

from permamesh.committee.devnet.votes import PRECOMMIT, PREVOTE, Proposal, ValidatorSet, Vote, VoteSet

log = logging.getLogger(__name__)

MAX_PROPOSALS_PER_ROUND = 3  # the first proposal plus the two most recent alternatives
AHEAD_PER_VALIDATOR = 6  # messages kept per validator for rounds > current round + 1
NEXT_HEIGHT_PER_VALIDATOR = 16  # messages kept per validator for height + 1

Message = Proposal | Vote


def sender_of(msg: Message) -> bytes:
    return msg.proposer if isinstance(msg, Proposal) else msg.validator


class RoundState:
    """Proposals and votes of one (height, round), plus the once-only flags of the upon-rules."""

    def __init__(self, validators: ValidatorSet, height: int, round: int) -> None:
        self.validators = validators
        self.round = round
        self.proposals: dict[bytes, Proposal] = {}  # block hash -> proposal, first one first
        self.prevotes = VoteSet(validators, height, round, PREVOTE)
        self.precommits = VoteSet(validators, height, round, PRECOMMIT)
        self._senders: dict[bytes, None] = {}  # ordered set of validators heard from
        self.sender_power = 0
        self.prevote_timeout_set = False  # rule "2f+1 prevotes any" fired
        self.precommit_timeout_set = False  # rule "2f+1 precommits any" fired
        self.polka_seen = False  # rule "proposal and 2f+1 prevotes for it" fired

    @property
    def proposal(self) -> Proposal | None:
        """The first proposal received: the one prevotes are decided on."""
        return next(iter(self.proposals.values()), None)

    def proposal_for(self, block_hash: bytes) -> Proposal | None:
        return self.proposals.get(block_hash)

    def has(self, msg: Message) -> bool:
        """Whether exactly this message (signature included) is already held."""
        if isinstance(msg, Proposal):
            return self.proposals.get(msg.block_hash) == msg
        return self.votes(msg.kind).has(msg)

    def votes(self, kind: str) -> VoteSet:
        return self.prevotes if kind == PREVOTE else self.precommits

    def add_proposal(self, p: Proposal) -> bool:
        if p.block_hash in self.proposals:
            return False
        if self.proposals:
            log.warning("proposer %s sent a second block for round %d", p.proposer.hex()[:16], self.round)
        if len(self.proposals) >= MAX_PROPOSALS_PER_ROUND:
            oldest_alternative = list(self.proposals)[1]
            del self.proposals[oldest_alternative]
        self.proposals[p.block_hash] = p
        return True

    def note_sender(self, key: bytes) -> None:
        if key not in self._senders:
            self._senders[key] = None
            self.sender_power += self.validators.power_of(key)

    def senders(self) -> list[bytes]:
        return list(self._senders)


class MessageBuffer:
    """Verified messages held for later, in arrival order, at most ``per_sender`` per sender."""

    def __init__(self, per_sender: int) -> None:
        self.per_sender = per_sender
        self._items: list[Message] = []
        self._count: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, msg: object) -> bool:
        return msg in self._items

    def add(self, msg: Message) -> bool:
        """Keep ``msg``; when its sender is at the cap, it replaces that sender's lowest-round
        message if its own round is higher, and is dropped otherwise."""
        if msg in self._items:
            return False
        sender = sender_of(msg)
        if self._count.get(sender, 0) >= self.per_sender:
            own = [m for m in self._items if sender_of(m) == sender]
            lowest = min(own, key=lambda m: m.round)
            if msg.round <= lowest.round:
                log.debug("buffer full for %s: dropped a round-%d message", sender.hex()[:16], msg.round)
                return False
            self._items.remove(lowest)
            self._count[sender] -= 1
        self._items.append(msg)
        self._count[sender] = self._count.get(sender, 0) + 1
        return True

    def senders_at(self, round: int) -> list[bytes]:
        """The distinct senders of messages of ``round`` held here, in arrival order."""
        return list(dict.fromkeys(sender_of(m) for m in self._items if m.round == round))

    def rounds(self) -> list[int]:
        return sorted({m.round for m in self._items})

    def take(self, max_round: int | None = None) -> list[Message]:
        """Remove and return the messages of rounds <= ``max_round`` (all if None), in order."""
        taken = [m for m in self._items if max_round is None or m.round <= max_round]
        if taken:
            self._items = [m for m in self._items if not (max_round is None or m.round <= max_round)]
            self._count = {}
            for m in self._items:
                self._count[sender_of(m)] = self._count.get(sender_of(m), 0) + 1
        return taken
