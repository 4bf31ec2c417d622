"""The adaptive dodger, trained on a labelled history of the duties' challenges and user
traffic, cannot cheat on users without cheating on challenges about as often (so it is
caught), while against the duties as they were before issue 21 (max_tokens capped at 16) the
same dodger cheats on most user requests and on no challenge."""

from __future__ import annotations

import random

import pytest

from permamesh.bench.verifyepochs import history, train
from permamesh.committee.duties import DutyConfig, draw_for, plan_epoch
from permamesh.verify.dodger import AdaptiveDodger
from permamesh.verify.errors import VerifyError
from permamesh.verify.schedule import ChallengeSchedule
from permamesh.verify.traffic import user_requests

pytest.importorskip("sklearn")

NAMES = ["n0", "n1", "n2", "n3"]


def honest(req, horizon=None):
    return "honest"


def cheat(req, horizon=None):
    return "cheat"


def rates(duty: DutyConfig, seed: int) -> tuple[float, float]:
    """Cheat rates on held-out user requests and on challenges after training."""
    dodger = AdaptiveDodger(honest, cheat, "n0", seed=seed)
    train(dodger, NAMES, history(NAMES, ["n0"], "m", duty, seed, epochs=30, per_epoch=6), seed)
    from permamesh.bench.verifyepochs import make_pool, target_of

    pool, rng = make_pool(seed + 100), random.Random(seed + 101)
    users = list(user_requests(40 * 60, seed + 102, 1.0))
    group = [target_of(n, "m") for n in NAMES]
    events = []
    for epoch in range(40):
        for slot in plan_epoch(group, ChallengeSchedule(), epoch, rng,
                               {t.key: 6 if t.node_id == "n0" else 0 for t in group}, duty):
            events.append((slot.at, 1, slot.entry, draw_for(slot, pool, rng, duty).request))
    pick = random.Random(seed)
    events += [(t, 0, NAMES[pick.randrange(4)], r) for t, r in users]
    events.sort(key=lambda e: (e[0], e[1]))
    for t, y, entry, req in events:
        dodger.observe(t, req, entry, challenge=bool(y))
    assert dodger(events[-1][3]) in ("honest", "cheat")
    return dodger.saved, dodger.challenges_cheated / dodger.challenges


@pytest.mark.slow
def test_against_the_duties_the_dodger_cannot_cheat_on_users_without_cheating_on_challenges() -> None:
    on_users, on_challenges = rates(DutyConfig(pace=False), seed=1)
    print(f"cheats on {on_users:.3f} of user requests and {on_challenges:.3f} of challenges")
    assert on_users < 0.05 or on_challenges > 0.5 * on_users


@pytest.mark.slow
def test_against_capped_challenges_the_same_dodger_dodges() -> None:
    on_users, on_challenges = rates(DutyConfig(pace=False, answer_cap=16), seed=2)
    print(f"capped: cheats on {on_users:.3f} of user requests and {on_challenges:.3f} of challenges")
    assert on_users > 0.5 and on_challenges < 0.05


def test_a_dodger_needs_both_kinds_of_example_and_a_sane_confidence() -> None:
    with pytest.raises(VerifyError):
        AdaptiveDodger(honest, cheat, confidence=0.2)
    with pytest.raises(VerifyError):
        AdaptiveDodger(honest, cheat).learn([[0.0], [1.0]], [0, 0])
