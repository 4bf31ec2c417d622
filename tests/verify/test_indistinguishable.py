"""A worker cannot tell the committee's challenges from user traffic, judged on what it really
receives: the duties' own plan (``committee/duties.py``: schedule, entries, pool, later chat
turns continued with the worker's answers, max_tokens as users ask) and the traffic model's
requests both go over zmq to a real worker's network front (router socket, wire decoding,
replay window), which records every request it decodes. Three classifiers (logistic
regression, naive Bayes, gradient boosting; scikit-learn) trained on everything a worker can
observe (:class:`~permamesh.verify.observe.WorkerView`: every field, lengths, message
structure, each sampling parameter, timing, session history, entry worker, words) must stay
at chance (held-out balanced accuracy <= 0.55), while the same classifiers catch the duties
as they were before issue 21 (max_tokens capped at 16, back to back) almost perfectly."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest

from permamesh.committee.duties import DutyConfig, Target, plan_epoch, send_plan
from permamesh.identity import NodeIdentity
from permamesh.transport import DealerClient
from permamesh.verify.challenges import ChallengePool
from permamesh.verify.observe import WorkerView
from permamesh.verify.profile import TrafficProfile
from permamesh.verify.schedule import ChallengeSchedule
from permamesh.verify.textgen import simulated_answer
from permamesh.verify.traffic import user_requests
from permamesh.wire import GenerateRequest, GenerateResult, decode, encode
from permamesh.workers.engine import Engine
from permamesh.workers.server import ServerThread, WorkerServer

sklearn = pytest.importorskip("sklearn")  # a dev dependency (pyproject [dev]); never skipped in `make test`

USERS = 1500  # user requests the worker serves (and about as many challenges: the hardest case)
GROUP = ("w0", "w1", "w2", "w3")  # the worker group; w0 is the worker under test
BOUND = 0.55


class RecordingServer(WorkerServer):
    """A real worker's front whose engine is replaced by a recorder: every request it decodes
    off the wire is kept, and answered at once with text from the traffic model's answer writer
    (the same writer the user conversations' histories hold, so later turns of both carry
    answers alike; what is tested is what arrives, not what is answered)."""

    def __init__(self, engine) -> None:
        super().__init__(engine, NodeIdentity.generate())
        self.received: list[GenerateRequest] = []

    def dispatch(self, peer, req):  # noqa: D401 - the one override
        self.received.append(req)
        rng = random.Random(zlib.crc32(req.request_id.encode()))
        return GenerateResult(req.request_id, simulated_answer(rng, req.max_tokens), "stop", 0, 0, (), (), "w0",
                              self.engine.loaded.name)


@pytest.fixture(scope="module")
def recorder(tiny_loaded):
    server = RecordingServer(Engine(tiny_loaded))
    thread = ServerThread(server)
    endpoint = thread.start()
    with DealerClient(endpoint) as sock:
        yield server, sock, NodeIdentity.generate()
    thread.stop()


def over_the_wire(recorder, request: GenerateRequest) -> GenerateRequest | GenerateResult:
    server, sock, me = recorder
    before = len(server.received)
    sock.send(encode(request, me))
    frame = sock.recv(10.0)
    assert frame is not None, "the worker did not answer within 10 s"
    assert len(server.received) == before + 1
    return decode(frame).msg


@pytest.fixture(scope="module")
def pool_profile():
    other = list(user_requests(8000, seed=2, rate_per_s=1.0))  # consented samples of another group's users
    profile = TrafficProfile.observe(other)
    pool = ChallengePool(profile)
    for _, request in other:
        pool.add_consented(request, group="elsewhere")
    return pool, profile


def duty_stream(recorder, pool, users, config: DutyConfig, seed: int) -> list[tuple[float, str, GenerateRequest]]:
    """What the duties send the worker under test over the users' span, as received."""
    server = recorder[0]
    targets = [Target(bytes([i]) * 32, name, "tiny-random") for i, name in enumerate(GROUP)]
    epochs = max(1, round(users[-1][0] / config.epoch_s))
    per_epoch = -(-len(users) // epochs)
    rng = random.Random(seed)
    out = []
    for epoch in range(epochs):
        plan = plan_epoch(targets, ChallengeSchedule(epoch_s=config.epoch_s), epoch, rng,
                          counts={t.key: per_epoch if t.node_id == "w0" else 0 for t in targets}, config=config)
        for slot, _, answer in send_plan(plan, pool, rng, lambda r, entry: over_the_wire(recorder, r), config):
            assert isinstance(answer, GenerateResult)
            out.append((slot.at, slot.entry, server.received[-1]))
    return out


def user_stream(recorder, users, seed: int) -> list[tuple[float, str, GenerateRequest]]:
    server = recorder[0]
    rng = random.Random(seed)
    out = []
    for t, request in users:
        over_the_wire(recorder, request)
        out.append((t, GROUP[rng.randrange(len(GROUP))], server.received[-1]))  # a user's path picks the entry
    return out


def features(users, challenges):
    stream = sorted([(t, 0, e, r) for t, e, r in users] + [(t, 1, e, r) for t, e, r in challenges],
                    key=lambda x: (x[0], x[1]))
    view = WorkerView("w0")
    x = np.array([view.features(t, r, e) for t, _, e, r in stream])
    return x, np.array([y for _, y, _, _ in stream]), np.array([t for t, *_ in stream]), \
        np.array([r.session or r.request_id for *_, r in stream])


def classifiers():
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import QuantileTransformer, StandardScaler

    return {
        "logistic regression": make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced",
                                                                                  max_iter=2000)),
        "naive Bayes": make_pipeline(QuantileTransformer(n_quantiles=50, output_distribution="normal"),
                                     GaussianNB(priors=[0.5, 0.5])),
        "gradient boosting": HistGradientBoostingClassifier(max_iter=150, class_weight="balanced", random_state=0),
    }


def held_out(x, y, t, groups):
    """Balanced accuracy of each classifier on the later half of conversations, trained on the
    earlier half and the other way round (a worker learns from its past; a conversation's turns
    never straddle the split)."""
    from sklearn.metrics import balanced_accuracy_score

    names, codes = np.unique(groups, return_inverse=True)
    start = np.full(len(names), np.inf)
    np.minimum.at(start, codes, t)
    early = start[codes] < np.median(start[codes])
    out = {}
    for name, model in classifiers().items():
        out[name] = [balanced_accuracy_score(y[~train], model.fit(x[train], y[train]).predict(x[~train]))
                     for train in (early, ~early)]
    return out


@pytest.fixture(scope="module")
def served(recorder):
    users = list(user_requests(USERS, seed=1, rate_per_s=1.0))
    return users, user_stream(recorder, users, seed=3)


def test_the_duties_challenges_look_like_user_traffic_to_the_worker_that_receives_them(recorder, pool_profile,
                                                                                         served) -> None:
    pool, _ = pool_profile
    users, received_users = served
    challenges = duty_stream(recorder, pool, users, DutyConfig(pace=False), seed=20)
    later = sum(sum(m.role == "user" for m in r.messages) > 1 for _, _, r in challenges)
    assert later > 0.2 * len(challenges), "the duties send later chat turns"
    assert max(r.max_tokens for _, _, r in challenges) > 128, "max_tokens as users ask"
    x, y, t, groups = features(received_users, challenges)
    for name, folds in held_out(x, y, t, groups).items():
        print(f"{name}: held-out balanced accuracy {folds[0]:.3f}, {folds[1]:.3f} (bound {BOUND})")
        assert max(folds) <= BOUND, f"{name} tells the duties' challenges from traffic: {folds}"


def test_the_same_classifiers_catch_the_duties_as_they_were(recorder, pool_profile, served) -> None:
    """max_tokens capped at 16 and every challenge back to back after the previous one."""
    pool, _ = pool_profile
    users, received_users = served
    old = duty_stream(recorder, pool, users[:600], DutyConfig(pace=False, answer_cap=16), seed=30)
    old = [(i * 60.0 / 3 + 0.05 * (i % 3), entry, r) for i, (_, entry, r) in enumerate(old)]
    x, y, t, groups = features([u for u in received_users if u[0] <= users[599][0]], old)
    caught = held_out(x, y, t, groups)
    print({k: [round(a, 3) for a in v] for k, v in caught.items()})
    assert min(caught["gradient boosting"]) > 0.9
