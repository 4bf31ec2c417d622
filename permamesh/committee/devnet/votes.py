"""Proposals and votes of the devnet engine, and how they are signed and counted.

(:class:`Validator` and :class:`ValidatorSet` live in
:mod:`permamesh.committee.devnet.validators` and are re-exported here.)

Who calls what:

- :class:`~permamesh.committee.devnet.tendermint.Tendermint` signs its own messages with
  :func:`sign_proposal` / :func:`sign_vote`, checks every peer message with
  :func:`verify_proposal` / :func:`verify_vote`, and tallies votes in one :class:`VoteSet` per
  (height, round, kind).
- The node embeds :class:`Proposal`, :class:`Vote`, :class:`Evidence` and
  :class:`ValidatorSet` in its wire messages (they are :func:`~permamesh.wire.codec.struct`
  records, so the codec checks their field types and ``__post_init__`` their values) and calls
  :func:`verify_commit` on a block and commit fetched from a peer while catching up.

Every proposal and vote carries its own Ed25519 signature over canonical, domain-separated
sign bytes that include the chain id, so it stays verifiable when re-sent inside a commit.
Verification never raises for peer data: it returns ``False`` and logs at debug level.
A :class:`VoteSet` never checks signatures (its caller has) and never changes except by
:meth:`VoteSet.add`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections.abc import Sequence

from permamesh.committee.devnet.validators import MAX_POWER, MAX_VALIDATORS, Validator, ValidatorSet, is_key
from permamesh.identity import PUBLIC_KEY_BYTES, NodeIdentity, SigningKey, verify_signature
from permamesh.wire.codec import MAX_FRAME_BYTES, WireError, struct

log = logging.getLogger(__name__)

__all__ = [
    "HASH_BYTES", "MAX_BLOCK_BYTES", "MAX_CHAIN_ID", "MAX_HASHES_PER_VALIDATOR", "MAX_HEIGHT",
    "MAX_POWER", "MAX_ROUND", "MAX_VALIDATORS", "PRECOMMIT", "PREVOTE", "VOTE_KINDS",
    "AddResult", "Evidence", "Proposal", "Signer", "Validator", "ValidatorSet", "Vote", "VoteSet",
    "block_hash_of", "proposal_sign_bytes", "public_key_of", "sign_proposal", "sign_vote",
    "verify_commit", "verify_evidence", "verify_proposal", "verify_vote", "vote_sign_bytes",
]  # fmt: skip

PREVOTE = "prevote"
PRECOMMIT = "precommit"
VOTE_KINDS = (PREVOTE, PRECOMMIT)
HASH_BYTES = 32  # sha256 block hashes; b"" is the nil vote
MAX_HEIGHT = 2**63  # heights in [0, MAX_HEIGHT)
MAX_ROUND = 2**31  # rounds in [0, MAX_ROUND)
MAX_BLOCK_BYTES = MAX_FRAME_BYTES - 64 * 1024  # a proposal's block; the node's message may cap it lower
MAX_CHAIN_ID = 64  # characters
MAX_HASHES_PER_VALIDATOR = 4  # distinct block hashes counted per validator in one VoteSet
_PROPOSAL_DOMAIN = b"permamesh/devnet/proposal/v1\x00"
_VOTE_DOMAIN = b"permamesh/devnet/vote/v1\x00"

Signer = SigningKey | NodeIdentity


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise WireError(what)


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def block_hash_of(block: bytes) -> bytes:
    return hashlib.sha256(block).digest()


def public_key_of(signer: Signer) -> bytes:
    """The Ed25519 public key of a :class:`SigningKey` or :class:`NodeIdentity`."""
    return signer.signing.public_bytes if isinstance(signer, NodeIdentity) else signer.public_bytes


@struct
class Proposal:
    """The block the proposer of (height, round) offers; ``pol_round`` is the round of the
    proof-of-lock (2/3+ prevotes for this block) it re-proposes, or -1."""

    height: int
    round: int
    block: bytes
    pol_round: int
    proposer: bytes
    signature: bytes = b""

    def __post_init__(self) -> None:
        _require(_is_int(self.height, 0, MAX_HEIGHT), "proposal height out of range")
        _require(_is_int(self.round, 0, MAX_ROUND), "proposal round out of range")
        _require(_is_int(self.pol_round, -1, max(self.round, 0)), "pol_round must be in [-1, round)")
        _require(isinstance(self.block, bytes) and len(self.block) <= MAX_BLOCK_BYTES, "block too large")
        _require(is_key(self.proposer), f"proposer must be a {PUBLIC_KEY_BYTES}-byte key")
        _require(isinstance(self.signature, bytes), "signature must be bytes")

    @functools.cached_property
    def block_hash(self) -> bytes:
        return block_hash_of(self.block)


@struct
class Vote:
    """A prevote or precommit for ``block_hash`` (``b""`` = nil) at (height, round)."""

    kind: str  # PREVOTE or PRECOMMIT
    height: int
    round: int
    block_hash: bytes
    validator: bytes
    signature: bytes = b""

    def __post_init__(self) -> None:
        _require(self.kind in VOTE_KINDS, f"vote kind must be one of {VOTE_KINDS}")
        _require(_is_int(self.height, 0, MAX_HEIGHT), "vote height out of range")
        _require(_is_int(self.round, 0, MAX_ROUND), "vote round out of range")
        _require(
            isinstance(self.block_hash, bytes) and len(self.block_hash) in (0, HASH_BYTES),
            f"vote block_hash must be empty (nil) or {HASH_BYTES} bytes",
        )
        _require(is_key(self.validator), f"validator must be a {PUBLIC_KEY_BYTES}-byte key")
        _require(isinstance(self.signature, bytes), "signature must be bytes")

    @property
    def is_nil(self) -> bool:
        return not self.block_hash


@struct
class Evidence:
    """Two conflicting signed votes of one validator for the same (height, round, kind),
    ordered by block hash so every node reports the same pair the same way."""

    vote_a: Vote
    vote_b: Vote

    def __post_init__(self) -> None:
        a, b = self.vote_a, self.vote_b
        same = (a.kind, a.height, a.round, a.validator) == (b.kind, b.height, b.round, b.validator)
        _require(same and a.block_hash < b.block_hash, "evidence votes must conflict, in order")


# ------------------------------------------------------------------------ signing, checking


def _chain_bytes(chain_id: str) -> bytes:
    raw = chain_id.encode()
    return len(raw).to_bytes(2, "big") + raw


def proposal_sign_bytes(chain_id: str, p: Proposal) -> bytes:
    return b"".join((
        _PROPOSAL_DOMAIN, _chain_bytes(chain_id), p.height.to_bytes(8, "big"),
        p.round.to_bytes(4, "big"), (p.pol_round + 1).to_bytes(4, "big"), p.block_hash, p.proposer,
    ))  # fmt: skip


def vote_sign_bytes(chain_id: str, v: Vote) -> bytes:
    return b"".join((
        _VOTE_DOMAIN, _chain_bytes(chain_id), bytes([VOTE_KINDS.index(v.kind) + 1]),
        v.height.to_bytes(8, "big"), v.round.to_bytes(4, "big"),
        bytes([len(v.block_hash)]), v.block_hash, v.validator,
    ))  # fmt: skip


def sign_proposal(
    chain_id: str, signer: Signer, height: int, round: int, block: bytes, pol_round: int = -1
) -> Proposal:
    unsigned = Proposal(height, round, block, pol_round, public_key_of(signer))
    return dataclasses.replace(unsigned, signature=signer.sign(proposal_sign_bytes(chain_id, unsigned)))


def sign_vote(
    chain_id: str, signer: Signer, kind: str, height: int, round: int, block_hash: bytes
) -> Vote:
    unsigned = Vote(kind, height, round, block_hash, public_key_of(signer))
    return dataclasses.replace(unsigned, signature=signer.sign(vote_sign_bytes(chain_id, unsigned)))


def verify_proposal(chain_id: str, validators: ValidatorSet, p: object) -> bool:
    """True iff ``p`` is a Proposal signed by the proposer ``validators`` names for its round."""
    if not isinstance(p, Proposal):
        log.debug("dropped %s: not a Proposal", type(p).__name__)
        return False
    if p.proposer != validators.proposer(p.height, p.round):
        log.debug("dropped proposal h=%d r=%d: not from the round's proposer", p.height, p.round)
        return False
    return verify_signature(p.proposer, p.signature, proposal_sign_bytes(chain_id, p))


def verify_vote(chain_id: str, validators: ValidatorSet, v: object) -> bool:
    """True iff ``v`` is a Vote signed by a member of ``validators``."""
    if not isinstance(v, Vote):
        log.debug("dropped %s: not a Vote", type(v).__name__)
        return False
    if v.validator not in validators:
        log.debug("dropped %s h=%d r=%d: unknown validator", v.kind, v.height, v.round)
        return False
    return verify_signature(v.validator, v.signature, vote_sign_bytes(chain_id, v))


def verify_evidence(chain_id: str, validators: ValidatorSet, e: object) -> bool:
    return isinstance(e, Evidence) and all(verify_vote(chain_id, validators, v) for v in (e.vote_a, e.vote_b))


def verify_commit(
    chain_id: str, validators: ValidatorSet, height: int, block_hash: bytes, precommits: Sequence[Vote]
) -> bool:
    """True iff ``precommits`` are valid precommits for ``block_hash`` at ``height`` (any
    round) from distinct validators holding more than 2/3 of the power. Any bad entry (wrong
    kind, height or block, unknown or repeated signer, bad signature) rejects the commit."""
    if not isinstance(block_hash, bytes) or len(block_hash) != HASH_BYTES:
        return False
    if not isinstance(precommits, Sequence) or len(precommits) > len(validators):
        return False
    seen: set[bytes] = set()
    for v in precommits:
        if not (isinstance(v, Vote) and v.kind == PRECOMMIT and v.height == height):
            return False
        if v.block_hash != block_hash or v.validator in seen:
            return False
        if not verify_vote(chain_id, validators, v):
            return False
        seen.add(v.validator)
    return sum(validators.power_of(k) for k in seen) >= validators.quorum


# ---------------------------------------------------------------------------------- tallies


@dataclasses.dataclass(frozen=True)
class AddResult:
    counted: bool  # the vote changed the tally
    evidence: Evidence | None = None  # set when the vote revealed an equivocation


class VoteSet:
    """The votes of one kind at one (height, round), tallied per block hash.

    Each validator's power counts at most once in :attr:`total_power` (the "2f+1 of any"
    rules) and at most once in each block's tally. A repeat of a vote is ignored. A
    conflicting vote (same validator, other block hash) is recorded as :class:`Evidence`
    (the first one per validator) and also counts in its own block's tally, up to
    :data:`MAX_HASHES_PER_VALIDATOR` hashes per validator: otherwise a node that happened to
    hear an equivocator's other vote first could never count a commit that includes the
    vote its peers heard (CometBFT tracks such votes the same way, on a peer's claim). This
    stays safe: with less than 1/3 of the power byzantine, no two blocks both reach 2/3+.
    """

    def __init__(self, validators: ValidatorSet, height: int, round: int, kind: str) -> None:
        self.validators, self.height, self.round, self.kind = validators, height, round, kind
        self._first: dict[bytes, Vote] = {}  # validator -> its first vote
        self._by_block: dict[bytes, dict[bytes, Vote]] = {}  # block hash -> validator -> vote
        self._hashes: dict[bytes, int] = {}  # validator -> distinct block hashes counted
        self._power: dict[bytes, int] = {}  # block hash -> counted power
        self._evidence: dict[bytes, Evidence] = {}  # validator -> first equivocation seen
        self.total_power = 0

    def add(self, vote: Vote) -> AddResult:
        """Count ``vote`` (whose signature the caller has checked)."""
        if (vote.kind, vote.height, vote.round) != (self.kind, self.height, self.round):
            log.debug("vote for %s h=%d r=%d offered to the wrong set", vote.kind, vote.height, vote.round)
            return AddResult(False)
        power = self.validators.power_of(vote.validator)
        if power == 0 or vote.validator in self._by_block.get(vote.block_hash, {}):
            return AddResult(False)
        first = self._first.get(vote.validator)
        if first is None:
            self._first[vote.validator] = vote
            self.total_power += power
        elif self._hashes[vote.validator] >= MAX_HASHES_PER_VALIDATOR:
            return AddResult(False)
        self._hashes[vote.validator] = self._hashes.get(vote.validator, 0) + 1
        self._by_block.setdefault(vote.block_hash, {})[vote.validator] = vote
        self._power[vote.block_hash] = self._power.get(vote.block_hash, 0) + power
        if first is None or vote.validator in self._evidence:
            return AddResult(True)
        a, b = sorted((first, vote), key=lambda v: v.block_hash)
        evidence = self._evidence[vote.validator] = Evidence(a, b)
        log.warning("validator %s equivocated: two %ss at h=%d r=%d",
                    vote.validator.hex()[:16], self.kind, self.height, self.round)  # fmt: skip
        return AddResult(True, evidence)

    def has(self, vote: Vote) -> bool:
        """Whether exactly this vote (signature included) is already held."""
        return self._by_block.get(vote.block_hash, {}).get(vote.validator) == vote

    def get(self, validator: bytes) -> Vote | None:
        """The first vote counted from ``validator``."""
        return self._first.get(validator)

    def power_for(self, block_hash: bytes) -> int:
        return self._power.get(block_hash, 0)

    def has_quorum_any(self) -> bool:
        return self.total_power >= self.validators.quorum

    def quorum_hash(self) -> bytes | None:
        """The block hash (``b""`` for nil) with more than 2/3 of the power, if any."""
        for block_hash, power in self._power.items():
            if power >= self.validators.quorum:
                return block_hash
        return None

    def votes_for(self, block_hash: bytes) -> tuple[Vote, ...]:
        """The counted votes for ``block_hash``, sorted by validator key."""
        return tuple(sorted(self._by_block.get(block_hash, {}).values(), key=lambda v: v.validator))

    @property
    def evidence(self) -> tuple[Evidence, ...]:
        return tuple(self._evidence.values())
