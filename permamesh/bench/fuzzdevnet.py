"""Attacks with signed devnet consensus messages on one validator of a multi-validator devnet,
and the state-agreement check made after each (:func:`committee_agrees`).

The attacker connects to the validator's CurveZMQ port with the server key from its endpoint
(``tcp://H:P?key=HEX``, :class:`~permamesh.transport.DealerClient`) and sends peer messages
(:class:`~permamesh.committee.devnet.messages.ProposalMsg`, ``VoteMsg``) that are correctly
signed, inside and out:

- ``stranger``: proposals, prevotes and precommits of the current height and round, and
  equivocating pairs of them, from a key that is not a member: refused before consensus.
- ``bad_heights``: votes and proposals signed by a member key (a Byzantine member) for past,
  next, far-future and absurd heights (2**63-1; 2**64-1 and -1 bypassing the builders' checks,
  so refused on decode) and absurd rounds (2**31-1).
- ``equivocation``: a member that votes for two blocks (and nil) in the same round, and a
  proposer that offers a junk block alongside its real one: counted as misbehaviour at most,
  never a fork.
- ``nested_mutants``: a member's vote and proposal with one inner field at a time set to a
  huge, empty or wrongly typed value, the frame signed by the member: refused on decode.
- ``vote_flood``: thousands of member votes for rounds ahead: the buffers' bounds hold.

:func:`committee_agrees` is the ``serves`` check: every validator commits a new block, and all
of them hold the same app hash at every height of a common window.

Who calls it: ``tests/test_fuzz_devnet.py`` through :func:`devnet_attacks`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence

from permamesh.bench.fuzz import FuzzViolation, Port
from permamesh.bench.fuzzzmq import odd_values
from permamesh.committee.client import CommitteeClient
from permamesh.committee.devnet.messages import ProposalMsg, VoteMsg
from permamesh.committee.devnet.votes import PRECOMMIT, PREVOTE, sign_proposal, sign_vote, vote_sign_bytes
from permamesh.identity import NodeIdentity
from permamesh.transport import DealerClient
from permamesh.wire.codec import WireError, encode

log = logging.getLogger(__name__)

WINDOW = 5  # heights whose app hashes are compared across validators
FLOOD_VOTES = 3000  # member votes of rounds ahead in one flood
AGREE_WAIT_S = 15.0  # seconds the committee gets to commit past the attack


@dataclasses.dataclass(frozen=True)
class DevnetTarget:
    chain_id: str
    endpoints: tuple[str, ...]  # every validator (the attacked one is Port.endpoint)
    members: tuple[NodeIdentity, ...]  # member keys the Byzantine attacker holds


def _statuses(client: CommitteeClient, endpoints: Sequence[str], first: int = 0, last: int = 0) -> list:
    return [client.status_of(e, first, last, timeout_s=3.0) for e in endpoints]


def committee_agrees(endpoints: Sequence[str], wait_s: float = AGREE_WAIT_S) -> tuple[bool, str]:
    """Every validator passes the height it had, and all hold one app hash per height over the
    last :data:`WINDOW` heights all of them have. ``(ok, what was seen)``."""
    with CommitteeClient(list(endpoints), timeout_s=5.0) as client:
        start = [s.height if s else 0 for s in _statuses(client, endpoints)]
        deadline = time.monotonic() + wait_s
        while True:
            now = [s.height if s else -1 for s in _statuses(client, endpoints)]
            if all(n > s for n, s in zip(now, start)):
                break
            if time.monotonic() > deadline:
                return False, f"heights {start} -> {now} in {wait_s:g} s"
            time.sleep(0.2)
        common = min(now)
        first = max(1, common - WINDOW + 1)
        maps = []
        for status in _statuses(client, endpoints, first, common):
            if status is None:
                return False, "a validator did not answer its app hashes"
            maps.append(dict(zip(status.heights, status.app_hashes)))
        for height in range(first, common + 1):
            hashes = {m.get(height) for m in maps}
            if len(hashes) != 1 or None in hashes:
                return False, f"app hashes differ at height {height}: {sorted(h.hex()[:12] for h in hashes if h)}"
    return True, f"agree at heights {first}..{common}"


def _now(t: DevnetTarget) -> tuple[int, int]:
    """(the attacked committee's next height, misbehaviour seen by validator 0)."""
    with CommitteeClient(list(t.endpoints), timeout_s=5.0) as client:
        status = client.status_of(t.endpoints[0], timeout_s=3.0)
    if status is None:
        raise FuzzViolation("the validator did not answer its status before the attack")
    return status.height + 1, status.misbehaviour


def _send(endpoint: str, frames: Sequence[bytes]) -> int:
    with DealerClient(endpoint) as sock:
        for frame in frames:
            sock.send(frame)
        time.sleep(0.5)  # let them leave before the link closes
    return len(frames)


def _vote(t: DevnetTarget, who: NodeIdentity, kind: str, height: int, round_: int, block_hash: bytes) -> bytes:
    return encode(VoteMsg(sign_vote(t.chain_id, who, kind, height, round_, block_hash)), who)


def _proposal(t: DevnetTarget, who: NodeIdentity, height: int, round_: int, block: bytes) -> bytes:
    return encode(ProposalMsg(sign_proposal(t.chain_id, who, height, round_, block)), who)


def _absurd_vote(t: DevnetTarget, who: NodeIdentity, height: int, round_: int) -> bytes | None:
    """A vote whose height or round no builder allows, signed anyway (refused on decode)."""
    vote = copy.copy(sign_vote(t.chain_id, who, PREVOTE, 1, 0, b""))
    object.__setattr__(vote, "height", height)
    object.__setattr__(vote, "round", round_)
    try:
        object.__setattr__(vote, "signature", who.sign(vote_sign_bytes(t.chain_id, vote)))
        return encode(VoteMsg(vote), who)
    except (WireError, ValueError, OverflowError, TypeError):
        return None


# ------------------------------------------------------------------------ attacks


def attack_stranger(t: DevnetTarget, port: Port, rng: random.Random) -> tuple[int, str]:
    height, seen = _now(t)
    mallory = NodeIdentity.generate()
    frames = []
    for r in range(3):
        a, b = rng.randbytes(32), rng.randbytes(32)
        frames += [_proposal(t, mallory, height, r, rng.randbytes(256)), _proposal(t, mallory, height, r, b"")]
        frames += [_vote(t, mallory, kind, height, r, h) for kind in (PREVOTE, PRECOMMIT) for h in (a, b, b"")]
    sent = _send(port.endpoint, frames)
    return sent, f"misbehaviour +{_now(t)[1] - seen}"


def attack_bad_heights(t: DevnetTarget, port: Port, rng: random.Random) -> tuple[int, str]:
    height, seen = _now(t)
    member = t.members[-1]
    heights = [0, max(0, height - 5), height - 1, height + 1, height + 2, height + 10**6, 2**63 - 1]
    frames = [_vote(t, member, kind, h, r, rng.randbytes(32)) for h in heights for r in (0, 1, 2**31 - 1)
              for kind in (PREVOTE, PRECOMMIT)]
    frames += [_proposal(t, member, h, 0, rng.randbytes(64)) for h in heights]
    absurd = [_absurd_vote(t, member, h, r) for h, r in ((2**64 - 1, 0), (-1, 0), (2**63, 0), (1, 2**32), (1, -1))]
    frames += [f for f in absurd if f is not None]
    sent = _send(port.endpoint, frames)
    return sent, f"{len([f for f in absurd if f])} absurd; misbehaviour +{_now(t)[1] - seen}"


def attack_equivocation(t: DevnetTarget, port: Port, rng: random.Random) -> tuple[int, str]:
    height, seen = _now(t)
    frames = []
    for member in t.members:  # whichever is the proposer of (height, r) offers a junk block too
        for r in range(2):
            frames.append(_proposal(t, member, height, r, rng.randbytes(128)))
    member = t.members[-1]
    for r in range(3):
        frames += [_vote(t, member, kind, height, r, h) for kind in (PREVOTE, PRECOMMIT)
                   for h in (rng.randbytes(32), rng.randbytes(32), b"")]
    sent = _send(port.endpoint, frames)
    time.sleep(0.5)
    return sent, f"misbehaviour +{_now(t)[1] - seen}"


def _nested_mutants(t: DevnetTarget, member: NodeIdentity, height: int, rng: random.Random) -> list[bytes]:
    """A member's vote and proposal with one inner field at a time set to an odd value
    (:func:`~permamesh.bench.fuzzzmq.odd_values`), the frame signed by the member."""
    valid = [(VoteMsg, "vote", sign_vote(t.chain_id, member, PREVOTE, height, 0, rng.randbytes(32))),
             (ProposalMsg, "proposal", sign_proposal(t.chain_id, member, height, 0, rng.randbytes(64)))]
    out = []
    for cls, name, inner in valid:
        for field in dataclasses.fields(inner):
            for odd in odd_values(getattr(inner, field.name)):
                mutant = copy.copy(inner)
                object.__setattr__(mutant, field.name, odd)
                msg = cls(inner)
                object.__setattr__(msg, name, mutant)
                try:
                    out.append(encode(msg, member))
                except (WireError, TypeError, ValueError, OverflowError):
                    continue
    return out


def attack_nested_mutants(t: DevnetTarget, port: Port, rng: random.Random) -> tuple[int, str]:
    height, seen = _now(t)
    frames = _nested_mutants(t, t.members[-1], height, rng)
    return _send(port.endpoint, frames), f"misbehaviour +{_now(t)[1] - seen}"


def attack_vote_flood(t: DevnetTarget, port: Port, rng: random.Random) -> tuple[int, str]:
    height, seen = _now(t)
    member = t.members[-1]
    frames = [_vote(t, member, PREVOTE if i % 2 else PRECOMMIT, height + (i % 2), 1 + i, rng.randbytes(32))
              for i in range(FLOOD_VOTES)]
    sent = _send(port.endpoint, frames)
    return sent, f"misbehaviour +{_now(t)[1] - seen}"


_HEIGHT_CACHE: dict[str, tuple[float, int]] = {}  # endpoint -> (when read, next height)


def member_vote(t: DevnetTarget, rng: random.Random) -> bytes:
    """A valid frame for the generic zmq attacks: a member's prevote for a random block at the
    committee's next height (read at most once a second)."""
    when, height = _HEIGHT_CACHE.get(t.endpoints[0], (0.0, 0))
    if time.monotonic() - when > 1.0:
        height = _now(t)[0]
        _HEIGHT_CACHE[t.endpoints[0]] = (time.monotonic(), height)
    return _vote(t, t.members[-1], PREVOTE, height, rng.randrange(3), rng.randbytes(32))


def devnet_attacks(t: DevnetTarget) -> dict[str, Callable[[Port, random.Random], tuple[int, str]]]:
    """Attack name -> attack, bound to ``t``."""
    fns = {"stranger": attack_stranger, "bad_heights": attack_bad_heights, "equivocation": attack_equivocation,
           "nested_mutants": attack_nested_mutants, "vote_flood": attack_vote_flood}
    return {name: (lambda fn: lambda port, rng: fn(t, port, rng))(fn) for name, fn in fns.items()}
