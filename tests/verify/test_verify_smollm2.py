"""Verification with the real registered model, SmolLM2-135M-Instruct: an honest worker over
real sockets scores full credit, a worker process that serves another model under the name
(``permamesh worker --model tiny-random --claim smollm2-135m``) scores zero, and so do the
registered weights with layers skipped or noise added."""

from __future__ import annotations

import copy

import pytest

from permamesh.client.blocking import Client
from permamesh.identity import NodeIdentity
from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
from permamesh.verify import zoo
from permamesh.verify.verifier import Verifier
from permamesh.wire.messages import ChatMessage, GenerateRequest
from permamesh.workers.engine import Engine
from permamesh.workers.server import ServerThread, WorkerServer

pytestmark = pytest.mark.model

QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.",
             "Why do leaves change colour in autumn?", "Give me a word that rhymes with cat."]


def ask(client: Client, question: str, temperature: float, seed: int):
    """(the request as it went out, the worker's answer): the client picks the request id."""
    result = client.generate(messages=[{"role": "user", "content": question}], max_tokens=20,
                             temperature=temperature, seed=seed, logprobs=True)
    return GenerateRequest(result.request_id, messages=(ChatMessage("user", question),), max_tokens=20,
                           temperature=temperature, seed=seed, logprobs=True), result


@pytest.fixture(scope="module")
def verifier(smollm2_loaded):
    return Verifier(smollm2_loaded)


def test_an_honest_smollm2_worker_over_sockets_scores_full_credit(smollm2_loaded, verifier):
    thread = ServerThread(WorkerServer(Engine(smollm2_loaded), NodeIdentity.generate()))
    endpoint = thread.start()
    try:
        with Client([endpoint]) as client:
            credits = [verifier.score(*ask(client, q, t, i)) for i, q in enumerate(QUESTIONS) for t in (0.0, 0.8)]
    finally:
        thread.stop()
    assert all(c.credit == 1.0 for c in credits), [(c.credit, c.reason) for c in credits]


def test_a_worker_process_posing_as_smollm2_scores_zero(home, verifier):
    mesh = EmbeddedMesh(MeshConfig(home, workers=1, model="tiny-random", device="cpu",
                                   worker_args=("--claim", "smollm2-135m")))
    with mesh:
        (record,) = mesh.workers()
        assert record.model == "smollm2-135m"  # it announces the name it claims
        with Client([record.endpoint]) as client:
            pairs = [ask(client, q, 0.0, i) for i, q in enumerate(QUESTIONS)]
    assert all(result.model == "smollm2-135m" for _, result in pairs)
    credits = [verifier.score(req, result) for req, result in pairs]
    assert all(c.credit < 0.4 for c in credits), [(c.credit, c.reason) for c in credits]


@pytest.mark.parametrize("change", ["layers skipped", "noisy weights"])
def test_cheaper_copies_of_the_registered_weights_score_low(smollm2_loaded, verifier, change):
    clone = copy.copy(smollm2_loaded)
    clone.model = zoo.skip_layers(smollm2_loaded.model) if change == "layers skipped" else \
        zoo.add_noise(smollm2_loaded.model, 0.05)
    node = zoo.ModelNode(Engine(clone), smollm2_loaded.name)
    requests = [GenerateRequest(f"c{i}", messages=(ChatMessage("user", q),), max_tokens=20, temperature=t, seed=i,
                                logprobs=True) for i, q in enumerate(QUESTIONS) for t in (0.0, 0.8)]
    credits = [verifier.score(req, node(req)) for req in requests]
    assert sum(c.credit < 0.4 for c in credits) >= 6, [(c.credit, c.reason) for c in credits]


@pytest.mark.parametrize("weights", ["fast", "exact"])
def test_an_honest_llamacpp_worker_keeps_its_credit_on_grammar_challenges(smollm2_loaded, verifier, weights):
    """Structured-output challenges (the traffic's grammars) answered by llama.cpp on the GGUF:
    where the grammar forces tokens the model gave little mass, llama.cpp's raw log-probs stray
    0.1-0.4 nats from the fp32 reference (this zeroed honest answers before those positions
    were left out of the gap). With the F16 copy (``exact``) every answer keeps full credit and
    its log-probs sit within 0.01 nats of the reference; with the default Q8_0 copy (``fast``,
    8-bit activations: 0.02-0.12 nats per token) none comes near exclusion (one of four measured
    0.83 on a 0.117-nat gap, the Q4_1 file itself 1.0); noisy weights fail either way."""
    from permamesh.verify.traffic import GRAMMARS
    from permamesh.workers import backends

    if backends.llamacpp_missing():
        pytest.skip(backends.llamacpp_missing())
    engine = backends.load_engine("llamacpp", smollm2_loaded.name, max_active=1, gguf_weights=weights)
    honest = zoo.ModelNode(engine, smollm2_loaded.name)
    clone = copy.copy(smollm2_loaded)
    clone.model = zoo.add_noise(smollm2_loaded.model, 0.05)
    noisy = zoo.ModelNode(Engine(clone), smollm2_loaded.name)
    credits, cheats = [], []
    for i, ((kind, grammar), _) in enumerate(GRAMMARS):  # each grammar, greedy and sampled in turn
        temperature = 0.7 * (i % 2)
        req = GenerateRequest(f"{i:032x}", messages=(ChatMessage("user", QUESTIONS[i]),), max_tokens=20,
                              temperature=temperature, seed=i if temperature else None, logprobs=True,
                              grammar_kind=kind, grammar=grammar)
        credits.append(verifier.score(req, honest(req), engine="llamacpp"))
        cheats.append(verifier.score(req, noisy(req), engine="llamacpp"))
    if weights == "exact":
        assert all(c.credit == 1.0 and c.mean_abs_diff < 0.01 for c in credits), [(c.credit, c.mean_abs_diff) for c in credits]
    else:
        assert min(c.credit for c in credits) >= 0.8, [(c.credit, c.reason) for c in credits]
        assert sum(c.credit for c in credits) / len(credits) >= 0.9, [(c.credit, c.reason) for c in credits]
    assert sum(c.credit for c in cheats) / len(cheats) < 0.5, [(c.credit, c.reason) for c in cheats]
