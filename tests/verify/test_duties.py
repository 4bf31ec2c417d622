"""A committee member's duties plan challenges like traffic: every worker's sends interleaved
at scheduled times inside the epoch, through entries of its model's group, max_tokens as users
ask, later chat turns that carry the worker's own answer, a seeded challenge for a worker that
needs one, and a scoring budget that never goes on the wire."""

from __future__ import annotations

import random

import pytest

from permamesh.committee.duties import Contracts, DutyConfig, Target, engine_of, plan_epoch, run_plan, send_plan
from permamesh.directory.workers import WorkerRecord
from permamesh.verify.challenges import ChallengePool
from permamesh.verify.profile import TrafficProfile
from permamesh.verify.schedule import ChallengeSchedule
from permamesh.verify.traffic import user_requests
from permamesh.wire import GenerateResult

TARGETS = [Target(bytes([i]) * 32, f"w{i}", "smollm2-135m" if i < 3 else "tiny-random") for i in range(5)]


@pytest.fixture(scope="module")
def profile() -> TrafficProfile:
    return TrafficProfile.observe(list(user_requests(4000, seed=2, rate_per_s=1.0)))


def test_an_epochs_plan_interleaves_workers_at_scheduled_times_through_their_groups_entries() -> None:
    plan = plan_epoch(TARGETS, ChallengeSchedule(), 7, random.Random(1), counts={TARGETS[0].key: 9})
    assert [s.at for s in plan] == sorted(s.at for s in plan)
    assert all(7 * 60.0 <= s.at < 8 * 60.0 for s in plan)
    assert sum(s.target is TARGETS[0] for s in plan) == 9 and sum(s.target is TARGETS[1] for s in plan) == 3
    gaps = [b.at - a.at for a, b in zip(plan, plan[1:])]
    assert len(set(round(g, 6) for g in gaps)) > len(gaps) // 2  # not on a grid, not back to back
    for slot in plan:
        group = {t.node_id for t in TARGETS if t.model == slot.target.model}
        assert slot.entry in group and 16 <= slot.budget <= 48
    entries = {s.entry for s in plan if s.target.model == "smollm2-135m"}
    assert len(entries) > 1


def test_sends_carry_traffics_max_tokens_later_turns_hold_the_workers_answer_and_no_budget(profile) -> None:
    pool, rng, sent = ChallengePool(profile), random.Random(2), []

    def send(request, entry):
        sent.append((request, entry))
        return GenerateResult(request.request_id, f"answer-{len(sent)}", "stop", 0, 0, (), (), "w0", "smollm2-135m")

    config = DutyConfig(pace=False)
    for epoch in range(30):
        plan = plan_epoch(TARGETS[:1], ChallengeSchedule(), epoch, rng, counts={TARGETS[0].key: 8}, config=config)
        list(send_plan(plan, pool, rng, send, config))
    requests = [r for r, _ in sent]
    assert max(r.max_tokens for r in requests) > 128 and min(r.max_tokens for r in requests) <= 64
    later = [r for r in requests if r.prompt is None and sum(m.role == "user" for m in r.messages) > 1]
    assert len(later) > len(requests) // 5
    for r in later:
        assert any(m.role == "assistant" and m.content.startswith("answer-") for m in r.messages)
    assert {r.temperature for r in requests} > {0.0}


def test_pacing_waits_for_each_send_time() -> None:
    now, waits = [1000.0], []

    def wait(s):
        waits.append(s)
        now[0] += s

    plan = plan_epoch(TARGETS[:1], ChallengeSchedule(), 3, random.Random(3))
    pool = ChallengePool(TrafficProfile.observe(list(user_requests(300, seed=4, rate_per_s=1.0))))
    answer = lambda r, e: GenerateResult(r.request_id, "ok", "stop", 0, 0, (), (), "w0", "m")  # noqa: E731
    times = []
    for slot, _, _ in send_plan(plan, pool, random.Random(5), answer, DutyConfig(), clock=lambda: now[0], wait=wait):
        times.append(now[0])
    assert [round(t - 1000.0, 6) for t in times] == [round(s.at - 180.0, 6) for s in plan]


def test_a_worker_due_a_seed_gets_a_seeded_sampled_challenge_and_then_not_again(profile) -> None:
    contracts, rng, pool = Contracts(), random.Random(6), ChallengePool(profile)
    due = contracts.due_seed([TARGETS[0].key], every=10)
    assert due == {TARGETS[0].key}
    config = DutyConfig(pace=False)
    plan = plan_epoch(TARGETS[:1], ChallengeSchedule(), 0, rng, config=config, seeded=due)
    got = [c.request for _, c, _ in send_plan(plan, pool, rng, lambda r, e: RuntimeError("no answer"), config)]
    seeded = [r for r in got if r.seed is not None and r.temperature > 0]
    assert len(seeded) >= 1


def test_the_engine_comes_from_the_record_the_registry_row_or_the_model_label() -> None:
    assert engine_of(WorkerRecord("n", "tcp://x", "00", "smollm2-135m", engine="llamacpp")) == "llamacpp"
    assert engine_of({"profile": {"models": ["smollm2-135m"], "model": "smollm2-135m@llamacpp"}}) == "llamacpp"
    assert engine_of({"engine": "llamacpp", "profile": {}}) == "llamacpp"
    assert engine_of({"descriptor": {"engine": "llamacpp"}, "profile": {"models": ["smollm2-135m"]}}) == "llamacpp"
    assert engine_of({"descriptor": None, "profile": {"models": ["smollm2-135m"]}}) == "torch"  # never announced
    assert engine_of({"profile": {"models": ["smollm2-135m"]}}) == "torch"


class _Judge:
    """Stands in for the Verifier (no model here): every answer earns full credit, so what the
    test sees is only who the credit goes to."""

    def fits(self, request) -> bool:
        return True

    def score(self, request, answer, budget, engine):
        return 1.0


def test_credit_goes_to_the_worker_that_served_and_one_that_served_none_stays_unscored(profile) -> None:
    """Both workers' challenges enter through w0, whose group routes every one to w1 (as routing
    by cached prefix does): w1 is scored, w0 has no evidence and is left out, not given 0."""
    pool, rng = ChallengePool(profile), random.Random(3)

    def served_by_w1(request, entry):
        return GenerateResult(request.request_id, "ok", "stop", 0, 0, (), (), "w1", "smollm2-135m")

    config = DutyConfig(pace=False)
    plan = plan_epoch(TARGETS[:2], ChallengeSchedule(), 0, rng, config=config)
    credits, scored, failures = run_plan(plan, _Judge(), pool, rng, served_by_w1, config)
    assert credits == {TARGETS[1].key: 1_000_000} and scored == len(plan) and not failures

    def w0_fails(request, entry):
        return RuntimeError("no answer") if entry == "w0" else served_by_w1(request, entry)

    credits, _, failures = run_plan(plan, _Judge(), pool, rng, w0_fails, config)
    assert set(failures) <= {TARGETS[0].key, TARGETS[1].key} and all(credits[k] == 0 for k in failures)


def test_bad_duty_configs_are_refused() -> None:
    with pytest.raises(ValueError):
        DutyConfig(budget_min=40, budget_max=20)
