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
