"""The verifier on real (tiny, seeded) models: honest answers score 1, every full-time cheater
of the zoo scores an abnormal epoch, and malformed answers are zero credit with a reason, never
an exception. The registered model is a peaked tiny random Llama (zoo.peaked): the flat default
would let any two random models agree. SmolLM2 figures are in the benchmark and
test_verify_smollm2.py."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest

from permamesh.verify import zoo
from permamesh.verify.errors import VerifyError
from permamesh.verify.verifier import Verifier, epoch_credit
from permamesh.wire.messages import ChatMessage, GenerateRequest
from permamesh.workers import models
from permamesh.workers.engine import Engine

WORDS = "the cat sat on a mat while dogs ran through green fields of barley near old stone walls".split()
CLAIM = "tiny-random"


def peaked_tiny(seed: int):
    loaded = models.load(models.TINY_RANDOM, device="cpu", seed=seed)
    zoo.peaked(loaded.model)
    return loaded


@pytest.fixture(scope="module")
def ref():
    return peaked_tiny(0)


@pytest.fixture(scope="module")
def verifier(ref):
    return Verifier(ref)


def challenges(seed: int, count: int) -> list[GenerateRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
        kind = dict(prompt=text) if i % 3 else dict(messages=(ChatMessage("user", text),))
        out.append(GenerateRequest(f"c{seed}-{i}", max_tokens=rng.choice([8, 16, 24]),
                                   temperature=rng.choice([0.0, 0.0, 0.7, 1.0]), seed=rng.randrange(1000),
                                   logprobs=True, **kind))
    return out


def variant(ref, change):
    clone = copy.copy(ref)
    clone.model = change(ref.model)
    return Engine(clone)


def test_an_honest_node_scores_full_credit_on_every_challenge(ref, verifier):
    honest = zoo.ModelNode(Engine(ref), CLAIM)
    credits = [verifier.score(req, honest(req)) for req in challenges(1, 18)]
    assert all(c.credit == 1.0 for c in credits), [(c.credit, c.reason) for c in credits]


def test_an_honest_node_answering_grammar_challenges_keeps_full_credit(ref, verifier):
    """Challenges carry grammars as users' requests do (traffic.GRAMMARS); the reference applies
    the grammar's mask, so an honest constrained answer, greedy or sampled (seeded: replayed
    under the mask), gets full credit and keeps the sampling contract, while an answer that
    leaves its grammar is zero credit."""
    from permamesh.verify.contract import ContractState, judge, tally
    from permamesh.verify.traffic import GRAMMARS

    honest = zoo.ModelNode(Engine(ref), CLAIM)
    asked = [dataclasses.replace(req, messages=(ChatMessage("user", req.prompt or req.messages[-1].content),),
                                 prompt=None, max_tokens=24, grammar_kind=kind, grammar=grammar)
             for req, ((kind, grammar), _) in zip(challenges(3, 8), GRAMMARS * 2)]
    credits = [verifier.score(req, honest(req)) for req in asked]
    assert all(c.credit == 1.0 for c in credits), [(c.credit, c.reason) for c in credits]
    assert any(c.sampling is not None and c.sampling.seeded_tokens for c in credits)  # seeds replayed, masked
    assert judge(ContractState((tally(credits),))).ok
    free = honest(dataclasses.replace(asked[0], grammar_kind="", grammar=""))  # the unconstrained answer
    assert verifier.score(asked[0], dataclasses.replace(free, request_id=asked[0].request_id)).credit == 0.0


@pytest.mark.parametrize("cheater", ["other model", "layers skipped", "noisy weights", "random tokens",
                                     "truncated", "replay"])
def test_every_full_time_cheater_has_abnormal_epochs(ref, verifier, cheater):
    honest = zoo.ModelNode(Engine(ref), CLAIM)
    node = {
        "other model": lambda: zoo.ModelNode(Engine(peaked_tiny(1)), CLAIM),
        "layers skipped": lambda: zoo.ModelNode(variant(ref, zoo.skip_layers), CLAIM),
        "noisy weights": lambda: zoo.ModelNode(variant(ref, lambda m: zoo.add_noise(m, 0.3)), CLAIM),
        "random tokens": lambda: zoo.RandomTokens(256, CLAIM, avoid=ref.tokenizer.eos_ids),
        "truncated": lambda: zoo.Truncating(honest, ref.tokenizer),
        "replay": lambda: zoo.Replaying(honest),
    }[cheater]()
    epochs = [challenges(100 + e, 3) for e in range(4)]
    node(epochs[0][0])  # a replaying node's first answer is its honest one; it replays from then on
    abnormal = [epoch_credit(verifier.score(req, node(req)) for req in epoch) < 400_000 for epoch in epochs]
    assert sum(abnormal) >= 3, abnormal  # 3 challenges per epoch; a cheater may pass an epoch by luck


def test_malformed_answers_are_zero_credit_with_a_reason(ref, verifier):
    req = challenges(7, 1)[0]
    good = zoo.ModelNode(Engine(ref), CLAIM)(req)
    cases = {
        "another model": dataclasses.replace(good, model="smollm2-135m"),
        "another request": dataclasses.replace(good, request_id="x"),
        "counts": dataclasses.replace(good, completion_tokens=good.completion_tokens + 1),
        "text": dataclasses.replace(good, text="something else entirely"),
        "vocabulary": dataclasses.replace(good, token_ids=(10**6,) * len(good.token_ids)),
        "logprobs": dataclasses.replace(good, logprobs=()),
    }
    for what, answer in cases.items():
        credit = verifier.score(req, answer)
        assert credit.credit == 0.0 and credit.reason, what
    assert verifier.score(req, "not a result").credit == 0.0
    assert verifier.score(req, good).credit == 1.0  # and the real answer still passes
    with pytest.raises(VerifyError):
        verifier.score("not a request", good)  # the validator's own input is a programming error


def test_epoch_credit_is_the_minimum_and_nothing_answered_is_zero():
    assert epoch_credit([0.9, 0.2, 1.0]) == 200_000
    assert epoch_credit([]) == 0


def test_verification_is_counted_for_the_rate(ref):
    v = Verifier(ref)
    req = challenges(9, 1)[0]
    v.score(req, zoo.ModelNode(Engine(ref), CLAIM)(req))
    assert v.scored == 1 and v.busy_s > 0 and v.rate_per_minute() > 0

