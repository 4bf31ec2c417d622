"""Validator sets, signed proposals and votes, vote tallies and commit certificates.

Every message a peer can send either verifies or is refused with False (never an
exception), and a tally or certificate never counts a validator's power twice for a block.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import pytest

from permamesh.committee.devnet.validators import Validator, ValidatorSet
from permamesh.committee.devnet.votes import (
    MAX_HASHES_PER_VALIDATOR, PRECOMMIT, PREVOTE, Evidence, Proposal, Vote, VoteSet,
    block_hash_of, public_key_of, sign_proposal, sign_vote, verify_commit, verify_evidence,
    verify_proposal, verify_vote,
)  # fmt: skip
from permamesh.identity import NodeIdentity, SigningKey
from permamesh.wire.codec import Message, WireError, decode, encode, message

CHAIN = "votes-test"
KEYS = [SigningKey.from_private_bytes(hashlib.sha256(b"votes-key-%d" % i).digest()) for i in range(7)]
PUBS = [k.public_bytes for k in KEYS]
VSET = ValidatorSet.equal(PUBS[:4])
MALLORY = SigningKey.from_private_bytes(hashlib.sha256(b"mallory").digest())
BLOCK = b"a block"
HASH = block_hash_of(BLOCK)
OTHER = block_hash_of(b"another block")


@message("test.devnet.consensus", max_bytes=1 << 20)
class Envelope(Message):
    proposal: Proposal
    votes: tuple[Vote, ...]
    validators: ValidatorSet


def proposer_key(height: int, round: int, vset: ValidatorSet = VSET) -> SigningKey:
    return KEYS[PUBS.index(vset.proposer(height, round))]


def precommits(height: int, block_hash: bytes, keys, round: int = 0) -> tuple[Vote, ...]:
    return tuple(sign_vote(CHAIN, k, PRECOMMIT, height, round, block_hash) for k in keys)


# ------------------------------------------------------------------------------ validator set


def test_the_set_is_sorted_by_key_whatever_order_it_is_given_in():
    forward, backward = ValidatorSet.equal(PUBS[:4]), ValidatorSet.equal(reversed(PUBS[:4]))
    assert forward == backward
    assert [v.public_key for v in forward.validators] == sorted(PUBS[:4])


@pytest.mark.parametrize(
    ("powers", "quorum", "one_third"),
    [((1, 1, 1, 1), 3, 2), ((1, 1, 1), 3, 2), ((1,) * 6, 5, 3), ((10, 20, 30, 40), 67, 34), ((1,), 1, 1)],
)
def test_thresholds_are_strictly_more_than_two_thirds_and_one_third(powers, quorum, one_third):
    vset = ValidatorSet.from_powers(dict(zip(PUBS, powers)))
    assert (vset.total_power, vset.quorum, vset.one_third_plus) == (sum(powers), quorum, one_third)
    assert 3 * vset.quorum > 2 * vset.total_power >= 3 * (vset.quorum - 1)
    assert 3 * vset.one_third_plus > vset.total_power >= 3 * (vset.one_third_plus - 1)


def test_equal_powers_rotate_the_proposer_round_robin_over_the_sorted_keys():
    ordered = [v.public_key for v in VSET.validators]
    for height in range(1, 9):
        for round in range(5):
            assert VSET.proposer(height, round) == ordered[(height + round) % 4]
    assert ValidatorSet.equal(PUBS[:4], power=7).proposer(5, 2) == ordered[3]


def test_weighted_proposer_slots_are_proportional_to_power():
    vset = ValidatorSet.from_powers({PUBS[0]: 2, PUBS[1]: 4, PUBS[2]: 6})  # weights 1:2:3
    counts = collections.Counter(vset.proposer(h, 0) for h in range(600))
    assert [counts[PUBS[i]] for i in range(3)] == [100, 200, 300]
    assert vset.proposer(17, 3) == vset.proposer(20, 0)  # only height + round matters


@pytest.mark.parametrize(
    "make",
    [
        lambda: ValidatorSet(()),
        lambda: ValidatorSet((Validator(PUBS[0], 1), Validator(PUBS[0], 2))),
        lambda: Validator(b"short", 1),
        lambda: Validator(PUBS[0], 0),
        lambda: Validator(PUBS[0], True),
    ],
)
def test_malformed_sets_are_refused(make):
    with pytest.raises(WireError):
        make()


# ------------------------------------------------------------------------------ signatures


def test_signed_proposals_and_votes_verify_and_survive_the_wire():
    p = sign_proposal(CHAIN, proposer_key(1, 0), 1, 0, BLOCK)
    votes = (sign_vote(CHAIN, KEYS[0], PREVOTE, 1, 0, HASH), sign_vote(CHAIN, KEYS[1], PRECOMMIT, 1, 0, b""))
    assert verify_proposal(CHAIN, VSET, p) and p.block_hash == HASH and p.pol_round == -1
    assert all(verify_vote(CHAIN, VSET, v) for v in votes)
    frame = encode(Envelope(p, votes, VSET), NodeIdentity.generate())
    got = decode(frame, Envelope).msg
    assert (got.proposal, got.votes, got.validators) == (p, votes, VSET)
    assert verify_proposal(CHAIN, VSET, got.proposal) and verify_vote(CHAIN, VSET, got.votes[1])


def test_a_node_identity_signs_like_its_signing_key():
    ident = NodeIdentity.generate()
    vset = ValidatorSet.equal([public_key_of(ident)])
    assert verify_vote(CHAIN, vset, sign_vote(CHAIN, ident, PREVOTE, 3, 1, HASH))


@pytest.mark.parametrize(
    "change",
    [{"height": 2}, {"round": 1}, {"block": b"a block!"}, {"signature": bytes(64)}, {"signature": b"x"}],
)
def test_a_tampered_proposal_is_refused(change):
    p = sign_proposal(CHAIN, proposer_key(1, 0), 1, 0, BLOCK)
    if "round" in change:  # keep the proposer right so only the signature can fail
        p = dataclasses.replace(p, proposer=VSET.proposer(1, 1))
    assert not verify_proposal(CHAIN, VSET, dataclasses.replace(p, **change))


def test_proposals_from_anyone_but_the_rounds_proposer_or_for_another_chain_are_refused():
    p = sign_proposal(CHAIN, proposer_key(1, 0), 1, 0, BLOCK)
    assert not verify_proposal("other-chain", VSET, p)
    assert not verify_proposal(CHAIN, VSET, sign_proposal(CHAIN, proposer_key(1, 1), 1, 0, BLOCK))
    pol = sign_proposal(CHAIN, proposer_key(1, 2), 1, 2, BLOCK, pol_round=0)
    assert verify_proposal(CHAIN, VSET, pol)
    assert not verify_proposal(CHAIN, VSET, dataclasses.replace(pol, pol_round=1))


@pytest.mark.parametrize(
    "change",
    [{"kind": PRECOMMIT}, {"height": 6}, {"round": 0}, {"block_hash": OTHER}, {"block_hash": b""},
     {"validator": PUBS[1]}, {"signature": b"\x00" * 64}],
)  # fmt: skip
def test_a_tampered_vote_is_refused(change):
    v = sign_vote(CHAIN, KEYS[0], PREVOTE, 5, 2, HASH)
    assert verify_vote(CHAIN, VSET, v)
    assert not verify_vote(CHAIN, VSET, dataclasses.replace(v, **change))


def test_votes_of_strangers_other_chains_or_other_types_are_refused_without_raising():
    assert not verify_vote(CHAIN, VSET, sign_vote(CHAIN, MALLORY, PREVOTE, 1, 0, HASH))
    assert not verify_vote("other-chain", VSET, sign_vote(CHAIN, KEYS[0], PREVOTE, 1, 0, HASH))
    for junk in (None, b"vote", 7, sign_proposal(CHAIN, proposer_key(1, 0), 1, 0, BLOCK)):
        assert not verify_vote(CHAIN, VSET, junk)
    assert not verify_proposal(CHAIN, VSET, sign_vote(CHAIN, KEYS[0], PREVOTE, 1, 0, HASH))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Vote("vote", 1, 0, HASH, PUBS[0]),
        lambda: Vote(PREVOTE, 1, 0, b"\x01" * 31, PUBS[0]),
        lambda: Vote(PREVOTE, -1, 0, HASH, PUBS[0]),
        lambda: Vote(PREVOTE, 1, 2**31, HASH, PUBS[0]),
        lambda: Proposal(1, 0, BLOCK, 0, PUBS[0]),  # pol_round must be below round
        lambda: Proposal(1, 3, BLOCK, -2, PUBS[0]),
        lambda: Proposal(1, 0, BLOCK, -1, b"\x00" * 31),
    ],
)
def test_out_of_range_fields_are_refused_at_construction_and_so_at_decode(make):
    with pytest.raises(WireError):
        make()


# ------------------------------------------------------------------------------ tallies


def test_a_vote_set_counts_power_per_block_and_ignores_repeats():
    vset = ValidatorSet.from_powers({PUBS[0]: 1, PUBS[1]: 2, PUBS[2]: 3, PUBS[3]: 4})  # quorum 7
    votes = VoteSet(vset, 1, 0, PREVOTE)
    assert votes.quorum_hash() is None and not votes.has_quorum_any()
    assert votes.add(sign_vote(CHAIN, KEYS[3], PREVOTE, 1, 0, HASH)).counted
    assert not votes.add(sign_vote(CHAIN, KEYS[3], PREVOTE, 1, 0, HASH)).counted
    votes.add(sign_vote(CHAIN, KEYS[0], PREVOTE, 1, 0, b""))
    votes.add(sign_vote(CHAIN, KEYS[1], PREVOTE, 1, 0, HASH))
    assert (votes.power_for(HASH), votes.power_for(b""), votes.total_power) == (6, 1, 7)
    assert votes.has_quorum_any() and votes.quorum_hash() is None
    votes.add(sign_vote(CHAIN, KEYS[2], PREVOTE, 1, 0, HASH))
    assert votes.quorum_hash() == HASH
    assert [v.validator for v in votes.votes_for(HASH)] == sorted(PUBS[1:4])


def test_votes_for_another_set_or_from_strangers_are_not_counted():
    votes = VoteSet(VSET, 1, 0, PREVOTE)
    for v in (sign_vote(CHAIN, KEYS[0], PRECOMMIT, 1, 0, HASH), sign_vote(CHAIN, KEYS[0], PREVOTE, 2, 0, HASH),
              sign_vote(CHAIN, KEYS[0], PREVOTE, 1, 1, HASH), sign_vote(CHAIN, MALLORY, PREVOTE, 1, 0, HASH)):
        assert not votes.add(v).counted
    assert votes.total_power == 0


def test_an_equivocator_is_reported_once_and_its_power_counts_once_per_block():
    votes = VoteSet(VSET, 4, 1, PRECOMMIT)
    first = sign_vote(CHAIN, KEYS[0], PRECOMMIT, 4, 1, HASH)
    second = sign_vote(CHAIN, KEYS[0], PRECOMMIT, 4, 1, OTHER)
    assert votes.add(first).evidence is None
    result = votes.add(second)
    assert result.evidence == Evidence(*sorted((first, second), key=lambda v: v.block_hash))
    assert verify_evidence(CHAIN, VSET, result.evidence)
    assert votes.add(sign_vote(CHAIN, KEYS[0], PRECOMMIT, 4, 1, b"")).evidence is None  # reported once
    assert votes.evidence == (result.evidence,)
    assert votes.total_power == 1  # "2f+1 of any" never counts the equivocator twice
    assert votes.power_for(HASH) == votes.power_for(OTHER) == 1
    assert votes.get(PUBS[0]) == first


def test_an_equivocator_cannot_fill_memory_with_endless_block_hashes():
    votes = VoteSet(VSET, 1, 0, PREVOTE)
    for i in range(20):
        votes.add(sign_vote(CHAIN, KEYS[0], PREVOTE, 1, 0, block_hash_of(b"%d" % i)))
    counted = [block_hash_of(b"%d" % i) for i in range(20) if votes.power_for(block_hash_of(b"%d" % i))]
    assert len(counted) == MAX_HASHES_PER_VALIDATOR


def test_evidence_must_pair_two_conflicting_votes_of_one_validator():
    a, b = sorted((sign_vote(CHAIN, KEYS[0], PREVOTE, 1, 0, HASH), sign_vote(CHAIN, KEYS[0], PREVOTE, 1, 0, OTHER)),
                  key=lambda v: v.block_hash)  # fmt: skip
    with pytest.raises(WireError):
        Evidence(b, a)
    with pytest.raises(WireError):
        Evidence(a, sign_vote(CHAIN, KEYS[1], PREVOTE, 1, 0, b.block_hash))
    forged = dataclasses.replace(b, signature=bytes(64))
    assert not verify_evidence(CHAIN, VSET, Evidence(a, forged))


# ------------------------------------------------------------------------------ commits


def test_a_real_commit_verifies_even_across_rounds():
    assert verify_commit(CHAIN, VSET, 9, HASH, precommits(9, HASH, KEYS[:3]))
    assert verify_commit(CHAIN, VSET, 9, HASH, precommits(9, HASH, KEYS[:4]))
    mixed = precommits(9, HASH, KEYS[:2], round=0) + precommits(9, HASH, KEYS[2:3], round=3)
    assert verify_commit(CHAIN, VSET, 9, HASH, mixed)


@pytest.mark.parametrize(
    "commit",
    [
        precommits(9, HASH, KEYS[:2]),  # too few
        precommits(9, HASH, [KEYS[0], KEYS[1], KEYS[1]]),  # a signer twice
        precommits(9, HASH, [KEYS[0], KEYS[1], MALLORY]),  # a stranger
        precommits(8, HASH, KEYS[:3]),  # another height
        precommits(9, OTHER, KEYS[:3]),  # another block
        precommits(9, HASH, KEYS[:2]) + precommits(9, OTHER, KEYS[2:3]),
        tuple(sign_vote(CHAIN, k, PREVOTE, 9, 0, HASH) for k in KEYS[:3]),  # prevotes
        precommits(9, HASH, KEYS[:2]) + (dataclasses.replace(precommits(9, HASH, KEYS[2:3])[0], signature=bytes(64)),),
        precommits(9, HASH, KEYS[:4]) + precommits(9, HASH, KEYS[:1]),  # longer than the set
        (b"not a vote",) * 3,
    ],
)
def test_bad_commits_are_refused(commit):
    assert not verify_commit(CHAIN, VSET, 9, HASH, commit)


def test_a_commit_for_nil_or_from_another_chain_is_refused():
    assert not verify_commit(CHAIN, VSET, 9, b"", precommits(9, b"", KEYS[:3]))
    assert not verify_commit("other-chain", VSET, 9, HASH, precommits(9, HASH, KEYS[:3]))
    assert not verify_commit(CHAIN, VSET, 9, HASH, None)  # type: ignore[arg-type]


def test_a_commit_is_weighed_by_power_not_by_count():
    vset = ValidatorSet.from_powers({PUBS[0]: 10, PUBS[1]: 1, PUBS[2]: 1, PUBS[3]: 1})  # quorum 9
    assert verify_commit(CHAIN, vset, 2, HASH, precommits(2, HASH, KEYS[:1]))
    assert not verify_commit(CHAIN, vset, 2, HASH, precommits(2, HASH, KEYS[1:4]))
