"""The Tendermint engine, first one instance fed hand-signed messages (each upon-rule of the
paper in turn), then N instances on the simulated network of :mod:`consensus_sim`: honest
runs, a crash, an equivocating validator, a partition, reordering and duplication, an invalid
proposer, the lock / valid-value path, and random adversarial schedules. Safety (no two
honest nodes decide different blocks at a height) is checked on every decision."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from permamesh.committee.devnet.rounds import AHEAD_PER_VALIDATOR, NEXT_HEIGHT_PER_VALIDATOR
from permamesh.committee.devnet.tendermint import (
    Broadcast, Decide, Misbehaviour, ScheduleTimeout, Step, Tendermint, Timeout, TimeoutConfig,
)  # fmt: skip
from permamesh.committee.devnet.votes import (
    PRECOMMIT, PREVOTE, Proposal, ValidatorSet, Vote, block_hash_of, sign_proposal, sign_vote,
    verify_commit, verify_evidence,
)  # fmt: skip
from permamesh.identity import SigningKey
from tests.committee.consensus_sim import CHAIN, KEYS, Network

VSET = ValidatorSet.equal(k.public_bytes for k in KEYS[:4])
ORDER = [next(k for k in KEYS if k.public_bytes == v.public_key) for v in VSET.validators]
# proposer(h, r) is ORDER[(h + r) % 4]; at height 1: round 0 -> ORDER[1], 1 -> ORDER[2], ...
ME, P0, P1, P2 = ORDER[0], ORDER[1], ORDER[2], ORDER[3]
MALLORY = SigningKey.generate()
B, C = b"block B", b"block C"
HB, HC = block_hash_of(B), block_hash_of(C)


class Harness:
    """One engine (validator ``ORDER[0]`` unless told) and a log of its validate() calls."""

    def __init__(self, signer: SigningKey | None = ME, valid: bool = True) -> None:
        self.validated: list[bytes] = []
        self.proposed = 0

        def propose(height: int) -> bytes:
            self.proposed += 1
            return b"own block %d" % height

        def validate(height: int, block: bytes) -> bool:
            self.validated.append(block)
            return valid

        self.tm = Tendermint(CHAIN, VSET, signer, propose, validate, TimeoutConfig())

    def feed(self, *msgs: Proposal | Vote) -> list:
        actions = []
        for m in msgs:
            actions += self.tm.on_proposal(m) if isinstance(m, Proposal) else self.tm.on_vote(m)
        return actions


def proposal(height: int, round: int, block: bytes, pol_round: int = -1) -> Proposal:
    signer = ORDER[(height + round) % 4]
    return sign_proposal(CHAIN, signer, height, round, block, pol_round)


def votes(kind: str, height: int, round: int, block_hash: bytes, *keys: SigningKey) -> list[Vote]:
    return [sign_vote(CHAIN, k, kind, height, round, block_hash) for k in keys]


def sent(actions: list) -> list:
    return [a.message for a in actions if isinstance(a, Broadcast)]


def own_votes(actions: list, kind: str) -> list[bytes]:
    return [m.block_hash for m in sent(actions) if isinstance(m, Vote) and m.kind == kind]


def timeouts(actions: list) -> list[tuple[str, int, float]]:
    return [(a.timeout.kind, a.timeout.round, a.delay_s) for a in actions if isinstance(a, ScheduleTimeout)]


# ----------------------------------------------------------------------------- one engine


def test_a_proposer_proposes_and_prevotes_at_once_and_its_own_messages_come_back_as_no_ops():
    h = Harness(signer=P0)
    actions = h.tm.start_height(1)
    p, prevote = sent(actions)
    assert isinstance(p, Proposal) and (p.height, p.round, p.pol_round, p.block) == (1, 0, -1, b"own block 1")
    assert prevote.kind == PREVOTE and prevote.block_hash == p.block_hash
    assert timeouts(actions) == [("resend", 0, 0.5)]  # no propose timeout for the proposer
    assert h.feed(p, prevote) == []  # already counted internally
    assert h.validated == [b"own block 1"]


def test_a_non_proposer_waits_for_the_proposal_then_prevotes_nil_on_timeout():
    h = Harness()
    assert timeouts(h.tm.start_height(1)) == [("resend", 0, 0.5), ("propose", 0, 0.3)]
    assert own_votes(h.tm.on_timeout(Timeout("propose", 1, 0)), PREVOTE) == [b""]
    assert h.tm.on_timeout(Timeout("propose", 1, 0)) == []  # stale: the step moved on
    assert h.tm.on_timeout(Timeout("propose", 7, 0)) == []  # another height


def test_timeouts_grow_by_delta_per_round():
    config = TimeoutConfig(propose_s=0.3, prevote_s=0.1, precommit_s=0.2, delta_s=0.05)
    assert config.delay("propose", 4) == pytest.approx(0.5)
    assert config.delay("precommit", 2) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        TimeoutConfig(prevote_s=0)


def test_the_happy_path_prevote_polka_lock_precommit_decide():
    h = Harness()
    h.tm.start_height(1)
    assert own_votes(h.feed(proposal(1, 0, B)), PREVOTE) == [HB]
    actions = h.feed(*votes(PREVOTE, 1, 0, HB, P0, P1))
    assert own_votes(actions, PRECOMMIT) == [HB]
    assert (h.tm.locked_value, h.tm.locked_round, h.tm.valid_round) == (B, 0, 0)
    actions = h.feed(*votes(PRECOMMIT, 1, 0, HB, P0, P1))
    [decide] = [a for a in actions if isinstance(a, Decide)]
    assert (decide.height, decide.round, decide.block, decide.block_hash) == (1, 0, B, HB)
    assert [v.validator for v in decide.commit] == sorted(k.public_bytes for k in (ME, P0, P1))
    assert verify_commit(CHAIN, VSET, 1, HB, decide.commit)
    assert h.tm.step == Step.COMMIT and h.validated == [B]
    assert h.feed(*votes(PRECOMMIT, 1, 0, HB, P2)) == []  # decided: the rest is ignored


def test_two_thirds_of_any_prevotes_start_the_prevote_timeout_and_nil_polka_precommits_nil():
    h = Harness()
    h.tm.start_height(1)
    h.feed(proposal(1, 0, B))
    actions = h.feed(*votes(PREVOTE, 1, 0, HC, P0), *votes(PREVOTE, 1, 0, b"", P1))
    assert ("prevote", 0, 0.1) in timeouts(actions) and own_votes(actions, PRECOMMIT) == []
    assert own_votes(h.tm.on_timeout(Timeout("prevote", 1, 0)), PRECOMMIT) == [b""]
    h2 = Harness()
    h2.tm.start_height(1)
    h2.tm.on_timeout(Timeout("propose", 1, 0))
    assert own_votes(h2.feed(*votes(PREVOTE, 1, 0, b"", P0, P1)), PRECOMMIT) == [b""]


def test_two_thirds_of_any_precommits_start_the_precommit_timeout_then_the_next_round():
    h = Harness()
    h.tm.start_height(1)
    h.tm.on_timeout(Timeout("propose", 1, 0))
    h.feed(*votes(PREVOTE, 1, 0, b"", P0, P1))
    actions = h.feed(*votes(PRECOMMIT, 1, 0, HB, P0), *votes(PRECOMMIT, 1, 0, b"", P1))
    assert ("precommit", 0, 0.1) in timeouts(actions)
    actions = h.tm.on_timeout(Timeout("precommit", 1, 0))
    assert h.tm.round == 1 and ("propose", 1, pytest.approx(0.35)) in timeouts(actions)


def lock_on_b_in_round_0(h: Harness) -> None:
    """ME sees B's polka in round 0 and locks, but round 0 ends without a decision."""
    h.tm.start_height(1)
    h.feed(proposal(1, 0, B), *votes(PREVOTE, 1, 0, HB, P0, P1))
    h.feed(*votes(PRECOMMIT, 1, 0, b"", P0, P1, P2))
    h.tm.on_timeout(Timeout("precommit", 1, 0))
    assert (h.tm.round, h.tm.locked_value, h.tm.locked_round) == (1, B, 0)


def test_a_locked_validator_prevotes_nil_for_a_fresh_proposal_of_another_block():
    h = Harness()
    lock_on_b_in_round_0(h)
    assert own_votes(h.feed(proposal(1, 1, C)), PREVOTE) == [b""]
    assert C not in h.validated  # its vote does not depend on C's validity


def test_a_locked_validator_prevotes_its_locked_block_when_re_proposed():
    h = Harness()
    lock_on_b_in_round_0(h)
    assert own_votes(h.feed(proposal(1, 1, B, pol_round=0)), PREVOTE) == [HB]


def test_a_proof_of_lock_from_a_later_round_unlocks():
    h = Harness()
    lock_on_b_in_round_0(h)
    h.tm.on_timeout(Timeout("propose", 1, 1))  # round 1: C's proposal never reached ME ...
    h.feed(*votes(PREVOTE, 1, 1, HC, P0, P1, P2))  # ... but the others formed a polka for C
    h.feed(*votes(PRECOMMIT, 1, 1, b"", P0, P1, P2))
    h.tm.on_timeout(Timeout("precommit", 1, 1))
    assert h.tm.round == 2 and h.tm.locked_round == 0
    assert own_votes(h.feed(proposal(1, 2, C, pol_round=1)), PREVOTE) == [HC]


def test_a_proposal_citing_a_proof_of_lock_this_node_lacks_waits_for_the_timeout():
    h = Harness()
    h.tm.start_height(1)
    h.tm.on_timeout(Timeout("propose", 1, 0))
    h.feed(*votes(PRECOMMIT, 1, 0, b"", P0, P1, P2))
    h.tm.on_timeout(Timeout("precommit", 1, 0))
    assert own_votes(h.feed(proposal(1, 1, C, pol_round=0)), PREVOTE) == []
    assert own_votes(h.tm.on_timeout(Timeout("propose", 1, 1)), PREVOTE) == [b""]


def test_the_proposer_re_proposes_its_valid_value_with_its_round():
    h = Harness(signer=P1)  # proposer of height 1 round 1
    h.tm.start_height(1)
    h.feed(proposal(1, 0, B), *votes(PREVOTE, 1, 0, HB, ME, P0))
    h.feed(*votes(PRECOMMIT, 1, 0, b"", ME, P0, P2))
    p = [m for m in sent(h.tm.on_timeout(Timeout("precommit", 1, 0))) if isinstance(m, Proposal)]
    assert [(x.round, x.block, x.pol_round) for x in p] == [(1, B, 0)] and h.proposed == 0


def test_an_invalid_block_gets_a_nil_prevote_and_validate_runs_once_per_block():
    h = Harness(valid=False)
    h.tm.start_height(1)
    p = proposal(1, 0, B)
    assert own_votes(h.feed(p, p, p), PREVOTE) == [b""]
    assert not any(isinstance(a, Decide) for a in h.feed(*votes(PRECOMMIT, 1, 0, HB, P0, P1, P2)))
    assert h.validated == [B]


def test_a_decision_can_come_from_an_earlier_round_and_from_a_late_proposal():
    h = Harness()
    h.tm.start_height(1)
    h.tm.on_timeout(Timeout("propose", 1, 0))
    h.feed(*votes(PRECOMMIT, 1, 0, HB, P0, P1, P2))  # ME missed B and its polka
    h.tm.on_timeout(Timeout("precommit", 1, 0))
    [decide] = [a for a in h.feed(proposal(1, 0, B)) if isinstance(a, Decide)]
    assert (decide.round, decide.block) == (0, B) and h.tm.round == 1


def test_an_observer_decides_without_ever_sending():
    h = Harness(signer=None)
    actions = h.tm.start_height(1)
    actions += h.feed(proposal(1, 0, B), *votes(PREVOTE, 1, 0, HB, P0, P1, P2))
    actions += h.feed(*votes(PRECOMMIT, 1, 0, HB, P0, P1, P2))
    assert sent(actions) == [] and any(isinstance(a, Decide) and a.block == B for a in actions)


def test_f_plus_one_messages_of_a_higher_round_skip_ahead_but_one_does_not():
    h = Harness()
    h.tm.start_height(1)
    h.feed(*votes(PREVOTE, 1, 5, b"", P0))
    assert h.tm.round == 0 and h.tm.buffered == 1
    h.feed(*votes(PRECOMMIT, 1, 5, b"", P1))
    assert h.tm.round == 5 and h.tm.buffered == 0 and h.tm.step == Step.PROPOSE


def test_forged_foreign_or_misplaced_messages_change_nothing():
    h = Harness()
    h.tm.start_height(1)
    good = proposal(1, 0, B)
    junk = [
        dataclasses.replace(good, signature=bytes(64)),
        dataclasses.replace(good, block=C),  # signature no longer matches
        sign_proposal(CHAIN, P1, 1, 0, B),  # not the round's proposer
        sign_proposal("other-chain", P0, 1, 0, B),
        *votes(PREVOTE, 1, 0, HB, MALLORY),
        dataclasses.replace(votes(PREVOTE, 1, 0, HB, P0)[0], block_hash=HC),
        *votes(PREVOTE, 0, 0, HB, P0),  # an old height
        *votes(PREVOTE, 3, 0, HB, P0),  # too far ahead
        "not a message",  # type: ignore[list-item]
    ]
    for m in junk:
        assert (h.tm.on_proposal(m) if isinstance(m, Proposal) else h.tm.on_vote(m)) == []
    assert h.tm.buffered == 0 and h.validated == [] and h.tm.step == Step.PROPOSE


def test_a_byzantine_flood_of_future_messages_is_bounded_per_validator():
    h = Harness()
    h.tm.start_height(1)
    for r in range(200):
        h.feed(*votes(PREVOTE, 2, r, HB, P0))  # next height, any round
        h.feed(*votes(PRECOMMIT, 1, r + 2, HB, P0))  # this height, far-ahead rounds
    assert h.tm.buffered == NEXT_HEIGHT_PER_VALIDATOR + AHEAD_PER_VALIDATOR
    assert h.tm.round == 0  # one validator alone never moves the round
    h.feed(*votes(PREVOTE, 2, 0, HB, P1))  # an honest peer's message still finds room
    assert h.tm.buffered == NEXT_HEIGHT_PER_VALIDATOR + AHEAD_PER_VALIDATOR + 1


def test_messages_of_the_next_height_are_replayed_when_it_starts():
    h = Harness()
    h.tm.start_height(1)
    h.feed(proposal(2, 0, C), *votes(PREVOTE, 2, 0, HC, P1))
    h.feed(proposal(1, 0, B), *votes(PREVOTE, 1, 0, HB, P0, P1))
    assert any(isinstance(a, Decide) for a in h.feed(*votes(PRECOMMIT, 1, 0, HB, P0, P1)))
    actions = h.tm.start_height(2)
    assert own_votes(actions, PREVOTE) == [HC] and h.tm.buffered == 0


def test_a_lagging_peer_is_sent_the_last_commit_at_the_next_resend():
    h = Harness()
    h.tm.start_height(1)
    h.feed(proposal(1, 0, B), *votes(PREVOTE, 1, 0, HB, P0, P1))
    h.feed(*votes(PRECOMMIT, 1, 0, HB, P0, P1))
    h.tm.start_height(2)
    assert sent(h.tm.on_timeout(Timeout("resend", 2, 0))) == []  # nothing to say yet
    h.feed(*votes(PREVOTE, 1, 1, b"", P2))  # P2 is still at height 1
    resent = sent(h.tm.on_timeout(Timeout("resend", 2, 1)))
    assert resent[0] == proposal(1, 0, B)
    assert verify_commit(CHAIN, VSET, 1, HB, resent[1:])


def test_resend_repeats_own_messages_of_the_current_round():
    h = Harness()
    h.tm.start_height(1)
    first = h.feed(proposal(1, 0, B))
    assert sent(h.tm.on_timeout(Timeout("resend", 1, 0))) == sent(first)
    assert h.tm.on_timeout(Timeout("resend", 1, 0)) == []  # an old link of the chain


def test_a_failing_round_relays_its_polka_so_every_correct_node_learns_the_valid_value():
    h = Harness()
    h.tm.start_height(1)
    h.feed(proposal(1, 0, B), *votes(PREVOTE, 1, 0, HB, P0, P1))  # ME locks on B
    actions = h.feed(*votes(PRECOMMIT, 1, 0, b"", P0, P1))  # ... but the round fails
    assert ("precommit", 0, 0.1) in timeouts(actions)
    relayed = sent(actions)
    assert relayed[0] == proposal(1, 0, B)
    assert sorted(v.validator for v in relayed[1:]) == sorted(k.public_bytes for k in (P0, P1))
    # A node that already precommitted nil learns B as its valid value from such a relay.
    other = Harness()
    other.tm.start_height(1)
    other.tm.on_timeout(Timeout("propose", 1, 0))
    other.feed(*votes(PREVOTE, 1, 0, HB, P0, P1))
    assert own_votes(other.tm.on_timeout(Timeout("prevote", 1, 0)), PRECOMMIT) == [b""]
    other.feed(*relayed, *votes(PREVOTE, 1, 0, HB, P2))
    assert (other.tm.valid_value, other.tm.valid_round, other.tm.locked_round) == (B, 0, -1)


def test_equivocation_seen_by_the_engine_is_reported():
    h = Harness()
    h.tm.start_height(1)
    actions = h.feed(*votes(PREVOTE, 1, 0, HB, P0), *votes(PREVOTE, 1, 0, HC, P0))
    [m] = [a for a in actions if isinstance(a, Misbehaviour)]
    assert m.evidence.vote_a.validator == P0.public_bytes and verify_evidence(CHAIN, VSET, m.evidence)


# ----------------------------------------------------------------------------- networks


def assert_agreement(net: Network, height: int) -> None:
    assert not net.forks
    honest = [n for n in net.nodes if n.honest]
    for h in range(1, height + 1):
        assert len({n.decisions[h].block_hash for n in honest}) == 1, f"height {h}"


def test_four_honest_validators_decide_the_same_block_at_each_of_50_heights():
    net = Network(4, seed=1)
    net.start()
    assert net.run_to_height(50, max_time=60)
    assert_agreement(net, 50)
    assert all(d.round == 0 for n in net.nodes for d in n.decisions.values())
    assert net.now / 50 < 0.1  # ~20 ms of virtual time per height at 1-10 ms delays
    for node in net.nodes:
        assert len(node.validated) == len(set(node.validated))  # validate once per block
        assert not node.synced and not node.evidence


def test_a_crashed_validator_does_not_stop_the_others():
    net = Network(4, seed=2, crashed=(1,))
    net.start()
    assert net.run_to_height(20, max_time=60)
    assert_agreement(net, 20)
    crashed_key = net.nodes[1].public_key
    for h, d in net.nodes[0].decisions.items():
        if net.validators.proposer(h, 0) == crashed_key:
            assert d.round >= 1  # its rounds time out
        assert crashed_key not in {v.validator for v in d.commit}


def test_power_not_head_count_decides_who_can_halt_the_chain():
    light = Network(4, seed=9, powers=(3, 1, 1, 1), crashed=(3,))  # 5 of 6 alive: quorum is 5
    light.start()
    assert light.run_to_height(10, max_time=60)
    assert_agreement(light, 10)
    heavy = Network(4, seed=9, powers=(3, 1, 1, 1), crashed=(0,))  # 3 of 6 alive
    heavy.start()
    assert not heavy.run(lambda: any(n.decisions for n in heavy.nodes), max_time=20)


@pytest.mark.parametrize("byzantine", [0, 1, 2, 3])
def test_an_equivocating_validator_cannot_fork_or_stall_the_honest_ones(byzantine):
    net = Network(4, seed=10 + byzantine, byzantine=(byzantine,))
    net.start()
    assert net.run_to_height(15, max_time=120)
    assert_agreement(net, 15)
    bad = net.nodes[byzantine].public_key
    reported = [e for n in net.nodes if n.honest for e in n.evidence]
    assert reported and all(e.vote_a.validator == bad and verify_evidence(CHAIN, net.validators, e) for e in reported)


def test_a_two_two_partition_halts_decisions_and_healing_resumes_them_without_a_fork():
    start, end = 0.5, 3.0
    net = Network(4, seed=3, link=lambda now, src, dst, m: not (start <= now < end and (src < 2) != (dst < 2)))
    net.start()
    net.run(lambda: False, start + 0.1)  # messages in flight at the cut still land
    before = [len(n.decisions) for n in net.nodes]
    net.run(lambda: False, end)
    assert [len(n.decisions) for n in net.nodes] == before
    target = max(before) + 10
    assert net.run_to_height(target, max_time=end + 30)
    assert_agreement(net, target)


def test_reordered_and_duplicated_messages_change_nothing_but_timing():
    net = Network(4, seed=4, delay=(0.001, 0.15), duplicate=0.3)
    net.start()
    assert net.run_to_height(20, max_time=120)
    assert_agreement(net, 20)


def test_an_invalid_proposal_costs_a_round_and_is_never_decided():
    bad = 2
    net = Network(4, seed=5, validate=lambda node, height, block: b"by=%d " % bad not in block)
    net.start()
    assert net.run_to_height(12, max_time=60)
    assert_agreement(net, 12)
    bad_key = net.nodes[bad].public_key
    for h, d in net.nodes[0].decisions.items():
        assert b"by=%d " % bad not in d.block
        if net.validators.proposer(h, 0) == bad_key:
            assert d.round >= 1


def test_a_value_locked_in_one_round_is_decided_in_the_next():
    # Height 1, round 0: X misses the proposal (prevotes, then precommits nil), the other three
    # see B's polka and lock on it, but the proposer's precommit is lost: no decision, and
    # round 1's proposer must re-propose B with pol_round 0 instead of building a new block.
    v = ValidatorSet.equal(k.public_bytes for k in KEYS[:4])
    proposer0, proposer1, x = v.proposer(1, 0), v.proposer(1, 1), v.proposer(1, 2)
    seen: list[Proposal] = []

    def link(now, src, dst, m):
        if isinstance(m, Proposal) and m.height == 1:
            seen.append(m)
            return not (m.round == 0 and net.nodes[dst].public_key == x)
        return not (isinstance(m, Vote) and (m.kind, m.height, m.round, m.validator) == (PRECOMMIT, 1, 0, proposer0))

    net = Network(4, seed=6, link=link, timeouts=TimeoutConfig(resend_s=10.0))
    net.start()
    assert net.run_to_height(3, max_time=60)
    assert_agreement(net, 3)
    d = net.nodes[0].decisions[1]
    round0 = next(p for p in seen if p.round == 0)
    assert (d.round, d.block) == (1, round0.block)
    assert any(p.round == 1 and p.pol_round == 0 and p.proposer == proposer1 for p in seen)
    assert b"by=%d " % net.node_of(proposer0).index in d.block


def test_the_same_seed_gives_the_same_run():
    def run() -> tuple:
        net = Network(4, seed=8, byzantine=(3,), delay=(0.001, 0.05), duplicate=0.1)
        net.start()
        net.run_to_height(8, max_time=60)
        return net.messages_sent, [(h, d.round, d.block_hash) for h, d in sorted(net.nodes[0].decisions.items())]

    assert run() == run()


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    faulty=st.integers(0, 3),
    fault=st.sampled_from(["equivocate", "crash", "none"]),
    gst=st.floats(0.0, 3.0),
    loss=st.floats(0.0, 0.6),
    max_delay=st.floats(0.002, 0.4),
    duplicate=st.floats(0.0, 0.3),
)
def test_random_schedules_never_fork_and_decide_after_gst(seed, faulty, fault, gst, loss, max_delay, duplicate):
    drops = random.Random(seed ^ 0x5EED)
    net = Network(
        4, seed=seed, delay=(0.001, max_delay), duplicate=duplicate,
        byzantine=(faulty,) if fault == "equivocate" else (), crashed=(faulty,) if fault == "crash" else (),
        link=lambda now, src, dst, m: now >= gst or drops.random() >= loss,
    )  # fmt: skip
    net.start()
    net.run(lambda: bool(net.forks), gst)
    assert not net.forks
    target = max((len(n.decisions) for n in net.nodes if n.honest), default=0) + 4
    assert net.run_to_height(target, max_time=gst + 120), "no progress after GST"
    assert_agreement(net, target)
