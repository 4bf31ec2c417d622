"""Challenges: the pool draws valid, fresh requests whose parameters follow the traffic
profile; consented prompts are never replayed as they were; send times look like arrivals;
and, the point of it all, a worker that sees everything a worker sees cannot tell challenges
from user traffic better than chance, while the same classifier catches a naive generator."""

from __future__ import annotations

import math
import random
import statistics
import zlib
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.verify import observe
from permamesh.verify.challenges import Challenge, ChallengePool
from permamesh.verify.consented import sample_for_verification
from permamesh.verify.errors import VerifyError
from permamesh.verify.profile import TrafficProfile
from permamesh.verify.schedule import ChallengeSchedule
from permamesh.verify.textgen import simulated_answer, split_lead_in, unwrap_raw
from permamesh.verify.traffic import user_requests
from permamesh.wire import ChatMessage, GenerateRequest, GenerateResult

USERS = 2000  # requests of the traffic the worker serves (and as many challenges)


@pytest.fixture(scope="module")
def other_traffic() -> list[tuple[float, GenerateRequest]]:
    """Traffic the validators learned from: consented samples served by ANOTHER group."""
    return list(user_requests(12000, seed=2, rate_per_s=1.0))


@pytest.fixture(scope="module")
def profile(other_traffic) -> TrafficProfile:
    return TrafficProfile.observe(other_traffic)


def consented_pool(profile: TrafficProfile, traffic, group: str = "elsewhere") -> ChallengePool:
    pool = ChallengePool(profile)
    for _, request in traffic:
        pool.add_consented(request, group=group)
    return pool


def run_challenges(pool: ChallengePool, times: list[float], seed: int,
                   group: str = "g1") -> list[tuple[float, Challenge]]:
    """Draw a challenge at each send time; the worker answers a second later."""
    rng, answers = random.Random(seed), random.Random(seed + 1)
    out = []
    for t in times:
        challenge = pool.draw(rng, now=t, group=group)
        out.append((t, challenge))
        if not challenge.last:
            pool.answered(challenge, simulated_answer(answers, challenge.request.max_tokens), at=t + 1.0)
    return out


def last_text(request: GenerateRequest) -> str:
    return request.prompt if request.prompt is not None else request.messages[-1].content


# -- the pool -------------------------------------------------------------------------------


def test_the_pool_draws_valid_requests_with_fresh_ids(profile, other_traffic) -> None:
    pool = consented_pool(profile, other_traffic)
    drawn = run_challenges(pool, [i * 0.5 for i in range(600)], seed=1)
    ids = [c.request.request_id for _, c in drawn]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & {r.request_id for _, r in other_traffic}
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)  # the overlay client's form
    for _, c in drawn:
        assert isinstance(c.request, GenerateRequest) and c.request.logprobs
        assert c.greedy == (c.request.temperature == 0.0)
    assert {c.source for _, c in drawn} == {"consented", "fresh"}
    later = [c for _, c in drawn if c.turn > 1]
    assert later, "chat challenges continue as conversations"
    assert all(c.request.session and c.request.messages[-2].role == "assistant" for c in later)


def test_a_later_turn_carries_the_workers_own_answer_and_keeps_session_and_parameters(profile) -> None:
    pool, rng = ChallengePool(profile, fresh_share=1.0), random.Random(3)
    first = next(c for c in (pool.draw(rng) for _ in range(200)) if not c.last)
    pool.answered(first, "An answer only this worker wrote.")
    second = next(c for c in (pool.draw(rng) for _ in range(50)) if c.conversation == first.conversation)
    assert second.turn == 2 and second.request.session == first.request.session
    assert second.request.messages[: len(first.request.messages)] == first.request.messages
    answer = second.request.messages[len(first.request.messages)]
    assert answer == ChatMessage("assistant", "An answer only this worker wrote.")
    assert second.request.max_tokens == first.request.max_tokens
    assert second.request.temperature == first.request.temperature


def test_the_same_seed_draws_the_same_challenges(profile, other_traffic) -> None:
    def draws(seed: int) -> list[GenerateRequest]:
        pool = consented_pool(profile, other_traffic)
        return [c.request for _, c in run_challenges(pool, [float(i) for i in range(200)], seed)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_a_pool_without_consented_samples_still_draws_fresh_challenges(profile) -> None:
    drawn = run_challenges(ChallengePool(profile), [float(i) for i in range(300)], seed=4)
    assert {c.source for _, c in drawn} == {"fresh"}
    assert len({last_text(c.request) for _, c in drawn}) > 250


def test_a_consented_prompt_is_never_replayed_as_it_was_nor_to_its_own_group(profile, other_traffic) -> None:
    def first(r: GenerateRequest) -> str:
        return r.prompt if r.prompt is not None else next(m.content for m in r.messages if m.role == "user")

    def core(text: str) -> str:  # without its lead-in or raw template
        return split_lead_in(unwrap_raw(text)[1])[1]

    # consented conversations whose opening is theirs alone (popular prompts may well recur)
    cores = Counter(core(first(r)) for _, r in other_traffic if r.prompt is not None or len(r.messages) <= 2)
    distinct = [(t, r) for t, r in other_traffic if cores[core(first(r))] == 1 and len(first(r).split()) >= 8]
    originals = {first(r) for _, r in distinct}
    pool = consented_pool(profile, distinct, group="g1")
    own = run_challenges(pool, [float(i) for i in range(300)], seed=5, group="g1")
    assert {c.source for _, c in own} == {"fresh"}, "never back to the group that served it"
    sent = []
    for group in ("g2", "g3"):
        sent += [c for _, c in run_challenges(pool, [float(i) for i in range(1500)], seed=6, group=group)
                 if c.source == "consented" and c.turn == 1]
    assert len(sent) > 500
    assert not [c for c in sent if last_text(c.request) in originals], "perturbed, always"
    uses = Counter((c.group, c.sample) for c in sent)
    assert max(uses.values()) == 1, "a consented sample goes to each group at most once"
    by_sample: dict[int, set[str]] = {}
    for c in sent:
        by_sample.setdefault(c.sample, set()).add(last_text(c.request))
    assert sum(len(v) for v in by_sample.values()) == len(sent), "and in another form to each"
    assert len(by_sample) < len(sent)


@settings(max_examples=50, deadline=None)
@given(said=st.lists(st.text(min_size=1, max_size=60).filter(str.strip), min_size=1, max_size=3),
       raw=st.booleans(), system=st.booleans())
def test_any_consented_request_comes_back_changed_but_recognisable(profile, said, raw, system) -> None:
    if raw:
        request = GenerateRequest("r1", prompt=said[0])
    else:
        turns = [m for text in said for m in (ChatMessage("user", text), ChatMessage("assistant", "Sure."))][:-1]
        opening = (ChatMessage("system", "Be brief."),) if system else ()
        request = GenerateRequest("r1", messages=opening + tuple(turns))
    pool, rng = ChallengePool(profile, fresh_share=0.0), random.Random(0)
    pool.add_consented(request, group="a")
    challenge = next(c for c in (pool.draw(rng, group="b") for _ in range(500)) if c.source == "consented")
    sent = challenge.request.prompt if raw else challenge.request.messages[-1].content
    assert sent != said[0]
    assert (unwrap_raw(said[0])[1] if raw else split_lead_in(said[0])[1]) in sent


@pytest.mark.parametrize("bad", [
    lambda pool, rng: pool.draw("not an rng"),
    lambda pool, rng: pool.draw(rng, now=math.nan),
    lambda pool, rng: pool.draw(rng, group="g" * 65),
    lambda pool, rng: pool.add_consented("What is 2+2?"),
    lambda pool, rng: pool.add_consented(GenerateRequest("r1", prompt="  ")),
    lambda pool, rng: pool.add_consented(GenerateRequest("r1", messages=(ChatMessage("system", "Be nice."),))),
    lambda pool, rng: pool.answered(pool.draw(rng), 42),
    lambda pool, rng: ChallengePool("a profile"),
    lambda pool, rng: ChallengePool(pool.profile, fresh_share=1.5),
    lambda pool, rng: TrafficProfile.observe([]),
    lambda pool, rng: TrafficProfile.observe(["prompt"]),
    lambda pool, rng: list(user_requests(10, seed=1, rate_per_s=0.0)),
])
def test_bad_input_raises_verify_error(profile, bad) -> None:
    with pytest.raises(VerifyError):
        bad(ChallengePool(profile), random.Random(0))


def test_an_answer_to_a_challenge_that_is_not_waiting_is_refused(profile) -> None:
    pool, rng = ChallengePool(profile, fresh_share=1.0), random.Random(9)
    open_one = next(c for c in (pool.draw(rng) for _ in range(200)) if not c.last)
    pool.answered(open_one, "first")
    with pytest.raises(VerifyError):
        pool.answered(open_one, "again")


def test_drawn_parameters_follow_the_traffic_profile(profile, other_traffic) -> None:
    drawn = run_challenges(consented_pool(profile, other_traffic), [i * 0.7 for i in range(2000)], seed=10)
    seen = TrafficProfile.observe([(t, c.request) for t, c in drawn])
    conversations = len({c.conversation for _, c in drawn})  # a conversation keeps its parameters

    def close(got: float, want: float) -> bool:  # within 4 standard errors: 2-4 points here
        return abs(got - want) <= 4 * math.sqrt(want * (1 - want) / conversations) + 0.005

    assert close(seen.temperature_zero_share, profile.temperature_zero_share)
    assert abs(seen.temperature_zero_share - profile.temperature_zero_share) < 0.04
    assert close(seen.chat_share, profile.chat_share) and close(seen.stop_share, profile.stop_share)
    for value in (16, 32, 64, 128, 256, 512):
        assert close(seen.max_tokens_share(value), profile.max_tokens_share(value)), value
    for bucket, share in profile.temperature_buckets().items():
        assert close(seen.temperature_buckets()[bucket], share), bucket
    assert abs(seen.mean_conversation() - profile.mean_conversation()) < 0.25
    assert abs(statistics.median(seen.chat.words) - statistics.median(profile.chat.words)) <= 4


def test_user_traffic_has_the_variety_of_real_traffic(other_traffic, profile) -> None:
    times = [t for t, _ in other_traffic]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert 0.85 < statistics.mean(gaps) * 1.0 < 1.15  # about rate_per_s
    assert 0.6 < profile.chat_share < 0.9 and 0.2 < profile.temperature_zero_share < 0.45
    assert profile.chat.words[5] <= 8 and profile.chat.words[99] >= 250  # a few words to hundreds
    assert max(dict(profile.turns)) >= 5 and profile.think_s  # conversations that go on
    assert all(r.logprobs for _, r in other_traffic)
    assert {r.max_tokens for _, r in other_traffic} == {16, 32, 64, 128, 256, 512}


# -- the schedule ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(epoch=st.integers(0, 10**6), count=st.integers(0, 200), seed=st.integers(0, 2**32))
def test_each_epoch_gets_exactly_its_count_inside_it(epoch: int, count: int, seed: int) -> None:
    times = ChallengeSchedule(epoch_s=60.0).send_times(epoch, count, random.Random(seed))
    assert len(times) == count and list(times) == sorted(times)
    assert all(epoch * 60.0 <= t < (epoch + 1) * 60.0 for t in times)


def test_send_times_are_spread_like_poisson_arrivals_not_on_a_grid() -> None:
    times = ChallengeSchedule().plan([50] * 40, random.Random(11))
    gaps = [b - a for a, b in zip(times, times[1:])]
    cv = statistics.pstdev(gaps) / statistics.mean(gaps)
    assert 0.9 < cv < 1.1
    offsets = sorted(t % 60.0 / 60.0 for t in times)  # uniform within the epoch: no favourite offset
    assert max(abs(u - (i + 0.5) / len(offsets)) for i, u in enumerate(offsets)) < 1.63 / math.sqrt(len(offsets))
    assert len({round(t % 60.0, 3) for t in times}) > 0.95 * len(times)  # no offset used again


def test_send_times_follow_the_rate_of_user_arrivals() -> None:
    users = [3600 * 14 + i for i in range(900)] + [3600 * 3 + i * 30 for i in range(100)]  # busy 14:00, some 03:00
    schedule = ChallengeSchedule.from_arrivals(users, epoch_s=7200.0)
    night = schedule.send_times(1, 1000, random.Random(12))  # the epoch 02:00-04:00
    late = sum(3 * 3600 <= t < 4 * 3600 for t in night)
    assert late > 900, "challenges go when users do"
    assert 1000 - late > 5, "an hour without users still gets a few (the floor), so none is safe"
    with pytest.raises(VerifyError):
        ChallengeSchedule(epoch_s=0.0)
    with pytest.raises(VerifyError):
        ChallengeSchedule().send_times(0, -1, random.Random(0))


def test_only_consented_answers_are_forwarded_at_the_sampling_rate() -> None:
    request = GenerateRequest("r1", prompt="Hi")
    result = GenerateResult("r1", "Hello", "stop", 1, 1)
    rng = random.Random(13)
    assert not any(sample_for_verification(request, result, False, 1.0, rng) for _ in range(100))
    forwarded = sum(sample_for_verification(request, result, True, 0.1, rng) for _ in range(5000))
    assert 400 < forwarded < 600
    for bad in ((request, GenerateResult("r2", "", "stop", 1, 1), True, 0.1, rng), (request, result, True, 1.5, rng)):
        with pytest.raises(VerifyError):
            sample_for_verification(*bad)


# -- can a worker tell? ---------------------------------------------------------------------

BUCKETS = 64  # hashed bag of words


class WorkerView(observe.WorkerView):
    """What a worker knows when a request arrives: its fields, the arrival time, and everything
    it served before (texts, sessions and their histories; kept by the verifier's own view).
    Proxies are random: left out. The row is this test's own, smaller feature set."""

    def features(self, t: float, r: GenerateRequest) -> list[float]:
        texts = [r.prompt] if r.prompt is not None else [m.content for m in r.messages]
        users = [m.content for m in r.messages if m.role == "user"] or texts
        new, system = users[-1], (r.messages[0].content if r.messages and r.messages[0].role == "system" else "")
        past = self.sessions.get(r.session) if r.session else None
        first_seen = self.firsts.get(users[0])
        bag = [0.0] * BUCKETS
        for word in " ".join(texts).lower().split():
            bag[zlib.crc32(word.encode()) % BUCKETS] += 1
        row = [
            math.log1p(sum(map(len, texts))), math.log1p(sum(len(x.split()) for x in texts)),
            math.log1p(len(new)), math.log1p(len(new.split())), len(r.messages), len(users),
            r.prompt is None, bool(system), math.log1p(len(system.split())),
            math.log2(r.max_tokens), r.temperature, r.temperature == 0, r.top_p, r.top_p == 1.0,
            len(r.stop), r.logprobs, r.seed is not None, r.stream, bool(r.model), len(r.request_id),
            bool(r.session), past is not None, math.log1p(t - past[0]) if past else 0.0,
            bool(past) and r.messages[: len(past[1])] == past[1],
            math.log1p(t - self.last_t) if self.last_t is not None else 0.0,
            new in self.served, first_seen is not None and first_seen != r.session,
        ] + [math.log1p(b) for b in bag]
        self.remember(t, r, texts, users)
        return [float(x) for x in row]


def worker_sees(users, challenges) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The merged stream in arrival order: features, labels (1 = challenge), arrival times and
    conversations (session, else request id)."""
    stream = sorted([(t, 0, r) for t, r in users] + [(t, 1, r) for t, r in challenges], key=lambda x: x[:2])
    view = WorkerView()
    x = np.array([view.features(t, r) for t, _, r in stream])
    return (x, np.array([y for _, y, _ in stream]), np.array([t for t, _, _ in stream]),
            np.array([r.session or r.request_id for _, _, r in stream]))


def logistic(x, y, x_test, l2=1e-3, steps=400):
    """L2-regularised logistic regression, classes weighted equally, by gradient descent with
    step 1/L (L bounds the loss's curvature, so it converges)."""
    mean, std = x.mean(0), x.std(0) + 1e-9
    x, x_test = (x - mean) / std, (x_test - mean) / std
    weight = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    step = 1.0 / (0.25 * np.linalg.norm(x, 2) ** 2 / len(x) + l2)
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        g = weight * (1 / (1 + np.exp(-(x @ w + b))) - y)
        w -= step * (x.T @ g / len(y) + l2 * w)
        b -= step * float(g.mean())
    return (x_test @ w + b) > 0


def naive_bayes(x, y, x_test, bins=10):
    """Categorical naive Bayes (equal priors) over each feature cut at its training deciles."""
    score = np.zeros(len(x_test))
    for j in range(x.shape[1]):
        edges = np.unique(np.quantile(x[:, j], np.linspace(0, 1, bins + 1)[1:-1]))
        a, a_test = np.searchsorted(edges, x[:, j], "right"), np.searchsorted(edges, x_test[:, j], "right")
        k = len(edges) + 1
        p1 = (np.bincount(a[y == 1], minlength=k) + 1) / ((y == 1).sum() + k)
        p0 = (np.bincount(a[y == 0], minlength=k) + 1) / ((y == 0).sum() + k)
        score += np.log(p1[a_test]) - np.log(p0[a_test])
    return score > 0


def held_out_accuracy(classifier, x, y, t, groups) -> list[tuple[float, float]]:
    """Two-fold cross-validation in time, as a worker would learn: conversations that start
    before the median train a model that is tested on the rest, and the other way round.
    Each fold gives its balanced accuracy (chance is 0.5 whatever the fold's mix) and that
    accuracy's standard error, counting conversations, not rows, as the independent draws
    (the turns of one conversation share history and parameters). A fold never trains on a
    sibling of a row it tests, and the model is fixed while tested, so the error is honest."""
    names, codes = np.unique(groups, return_inverse=True)
    start = np.full(len(names), np.inf)
    np.minimum.at(start, codes, t)
    early = start[codes] < np.median(start[codes])
    out = []
    for train in (early, ~early):
        test = ~train
        right, label = classifier(x[train], y[train], x[test]) == y[test], y[test]
        share = np.where(label == 1, 1 / (2 * label.sum()), 1 / (2 * (1 - label).sum()))  # each class half
        accuracy = float((right * share).sum())
        per_conversation = np.bincount(codes[test], weights=(right - accuracy) * share, minlength=len(names))
        out.append((accuracy, max(float(np.sqrt((per_conversation**2).sum())), 0.5 / math.sqrt(test.sum()))))
    return out


@pytest.fixture(scope="module")
def served() -> list[tuple[float, GenerateRequest]]:
    """The traffic this worker serves: other users than the consented ones."""
    return list(user_requests(USERS, seed=1, rate_per_s=1.0))


def schedule_like(users, total: int, seed: int) -> list[float]:
    """``total`` send times over the users' span, epochs of 60 s with equal counts."""
    epochs = max(1, round(users[-1][0] / 60.0))
    counts = [total // epochs + (i < total % epochs) for i in range(epochs)]
    return ChallengeSchedule().plan(counts, random.Random(seed))


def test_a_worker_cannot_tell_challenges_from_user_traffic(profile, other_traffic, served) -> None:
    """As many challenges as user requests (the hardest case for hiding them), from a pool
    whose consented samples and profile came from other users' traffic."""
    pool = consented_pool(profile, other_traffic)
    challenges = [(t, c.request) for t, c in run_challenges(pool, schedule_like(served, USERS, seed=20), seed=21)]
    x, y, t, groups = worker_sees(served, challenges)
    assert len(y) == 2 * USERS and y.mean() == 0.5
    for classifier in (logistic, naive_bayes):
        for fold, (accuracy, se) in enumerate(held_out_accuracy(classifier, x, y, t, groups)):
            print(f"{classifier.__name__} fold {fold}: held-out accuracy {accuracy:.3f}, "
                  f"bound 0.5 + 3 x {se:.4f} = {0.5 + 3 * se:.3f}")
            assert accuracy <= 0.5 + 3 * se, f"{classifier.__name__} tells challenges from traffic: {accuracy:.3f}"


NAIVE_PROMPTS = tuple(f"Question: What is {a} plus {b}?\nAnswer:" for a, b in zip(range(2, 12), range(5, 15)))


def test_the_same_worker_catches_a_naive_challenge_generator(served) -> None:
    """Fixed temperature 0, fixed max_tokens, ten prompts: the classifiers do have the power."""
    rng = random.Random(30)
    naive = [(t, GenerateRequest(f"{rng.getrandbits(128):032x}", prompt=rng.choice(NAIVE_PROMPTS), max_tokens=32,
                                 temperature=0.0, logprobs=True)) for t in schedule_like(served, USERS, seed=31)]
    x, y, t, groups = worker_sees(served, naive)
    for classifier in (logistic, naive_bayes):
        for fold, (accuracy, _) in enumerate(held_out_accuracy(classifier, x, y, t, groups)):
            print(f"{classifier.__name__} fold {fold}: the naive generator is caught with accuracy {accuracy:.3f}")
            assert accuracy > 0.9
