"""What the Tendermint engine asks of its caller: timeout settings, timers and actions.

:class:`~permamesh.committee.devnet.tendermint.Tendermint` returns a list of :data:`Action`
from every call; the node carries each out in order (see that module). :class:`Timeout` is
handed back to :meth:`~permamesh.committee.devnet.tendermint.Tendermint.on_timeout` when the
timer of a :class:`ScheduleTimeout` fires. All are frozen dataclasses; none is sent on the
wire (the messages inside :class:`Broadcast` are).
"""

from __future__ import annotations

import dataclasses
import enum

from permamesh.committee.devnet.votes import Evidence, Proposal, Vote

TIMEOUT_KINDS = ("propose", "prevote", "precommit", "resend")


@dataclasses.dataclass(frozen=True)
class TimeoutConfig:
    """Timeouts of round ``r`` are ``base + r * delta_s`` (seconds), so that after the network
    becomes synchronous they eventually exceed the message delay and a round succeeds."""

    propose_s: float = 0.3  # wait for the proposal
    prevote_s: float = 0.1  # after 2/3+ prevotes for different values, wait for the rest
    precommit_s: float = 0.1  # after 2/3+ precommits without a decision, before the next round
    delta_s: float = 0.05  # added per round
    resend_s: float = 0.5  # period of re-broadcasting own messages of the current round

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"TimeoutConfig.{f.name} must be > 0")

    def delay(self, kind: str, round: int) -> float:
        base = {"propose": self.propose_s, "prevote": self.prevote_s, "precommit": self.precommit_s}
        return self.resend_s if kind == "resend" else base[kind] + round * self.delta_s


@dataclasses.dataclass(frozen=True)
class Timeout:
    kind: str  # "propose" | "prevote" | "precommit" | "resend"
    height: int
    round: int  # for "resend": a sequence number within the height


@dataclasses.dataclass(frozen=True)
class Broadcast:
    message: Proposal | Vote


@dataclasses.dataclass(frozen=True)
class ScheduleTimeout:
    timeout: Timeout
    delay_s: float


@dataclasses.dataclass(frozen=True)
class Decide:
    height: int
    round: int
    block: bytes
    block_hash: bytes
    commit: tuple[Vote, ...]  # the 2/3+ precommits of ``round``, sorted by validator key


@dataclasses.dataclass(frozen=True)
class Misbehaviour:
    evidence: Evidence


Action = Broadcast | ScheduleTimeout | Decide | Misbehaviour


class Step(enum.IntEnum):
    PROPOSE = 0
    PREVOTE = 1
    PRECOMMIT = 2
    COMMIT = 3  # decided; waiting for start_height(height + 1)
