"""The llama.cpp engine on the SmolLM2 GGUF: the same interface as the torch engine, one
llama_decode per step over every active request, prefixes reused by sequence copy and by saved
sequence states, log-probabilities close to the fp32 reference's. Skipped, saying why, where
llama-cpp-python is not installed (`make setup` builds it)."""

from __future__ import annotations

import pytest

from permamesh.client.blocking import Client
from permamesh.identity import NodeIdentity
from permamesh.routing.blocks import BlockHasher
from permamesh.wire import ChatMessage
from permamesh.workers import backends
from permamesh.workers.engine import SamplingParams
from permamesh.workers.errors import WorkerError
from permamesh.workers.prefix_cache import PrefixKVCache
from permamesh.workers.seqstore import SeqStateStore
from permamesh.workers.server import ServerConfig, ServerThread, WorkerServer

pytestmark = [pytest.mark.model,
              pytest.mark.skipif(backends.llamacpp_missing() is not None, reason=str(backends.llamacpp_missing()))]

QUESTIONS = ["What is the capital of Italy?", "Name three colours.", "Count to five.", "Write a haiku about the sea."]
GREEDY = SamplingParams(max_tokens=16, logprobs=True)
BATCH_GAP_NATS = 0.1  # mean |batched - alone| per token (llama.cpp, measured 0.04-0.07; torch fp32: ~1e-6)
NEAR_TIE_NATS = 0.5  # where a batched answer parts from the lone one, both picks are this close
REFERENCE_GAP_NATS = 0.1  # mean |llama.cpp - fp32 torch| per answer token; measured 0.02-0.08 (docs/dependencies.md)


@pytest.fixture(scope="module")
def engine():
    return backends.load_engine("llamacpp", max_active=4)


def _prompts(engine):
    return [engine.tokenizer.chat_ids([ChatMessage("user", q)]) for q in QUESTIONS]


def test_auto_picks_llamacpp_for_the_gguf_and_torch_where_it_cannot(tmp_path):
    assert backends.choose("auto", "smollm2-135m", None, "cpu") == "llamacpp"
    assert backends.choose("auto", "tiny-random", None, "cpu") == "torch"
    with pytest.raises(WorkerError, match="not a GGUF"):
        backends.choose("llamacpp", "tiny-random", None, "cpu")
    with pytest.raises(WorkerError, match="unknown backend"):
        backends.choose("vllm", "smollm2-135m", None, "cpu")


def test_a_batch_answers_as_each_request_alone_up_to_llamacpps_batch_noise(engine):
    """llama.cpp's kernels differ with the batch size, so its log-probs move a little with the
    batch (the torch engine's do not: test_batching): answers agree token for token until a
    near-tie, where both picks were the top choice within a small margin."""
    prompts = _prompts(engine)
    alone = [engine.generate(p, GREEDY) for p in prompts]
    runs = [engine.start(p, GREEDY) for p in prompts]
    while any(not run.done for run in runs):
        report = engine.step([run for run in runs if not run.done])
        assert not report.failed
    together = [engine.finish(run) for run in runs]
    for got, want in zip(together, alone):
        same = next((i for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids)) if a != b),
                    min(len(got.token_ids), len(want.token_ids)))
        gaps = [abs(a - b) for a, b in zip(got.logprobs[:same], want.logprobs[:same])]
        assert not gaps or sum(gaps) / len(gaps) < BATCH_GAP_NATS
        if same < min(len(got.token_ids), len(want.token_ids)):  # they parted at a near-tie
            assert abs(got.logprobs[same] - want.logprobs[same]) < NEAR_TIE_NATS


def test_logprobs_stay_close_to_the_fp32_reference(engine, smollm2_loaded):
    import torch

    for prompt in _prompts(engine):
        answer = engine.generate(prompt, GREEDY)
        with torch.inference_mode():
            logits = smollm2_loaded.model(input_ids=torch.tensor([prompt + list(answer.token_ids)])).logits[0]
        reference = torch.log_softmax(logits.float(), dim=-1)
        gaps = [abs(float(reference[len(prompt) - 1 + i, t]) - lp)
                for i, (t, lp) in enumerate(zip(answer.token_ids, answer.logprobs))]
        assert sum(gaps) / len(gaps) < REFERENCE_GAP_NATS


def test_prefixes_are_reused_by_sequence_copy_and_by_saved_states(engine):
    engine.prefix_cache = PrefixKVCache(BlockHasher(16, b"group salt"), 1 << 28)  # as the worker process sets it
    assert isinstance(engine.prefix_cache, SeqStateStore)
    system = [ChatMessage("system", "You answer in one short sentence, about geography only. " * 4)]
    first = engine.tokenizer.chat_ids([*system, ChatMessage("user", "Where is Peru?")])
    second = engine.tokenizer.chat_ids([*system, ChatMessage("user", "Where is Chad?")])
    cold = engine.generate(second, GREEDY)

    running = engine.start(first, GREEDY)
    engine.step([running])  # prefilled and saved; still in the context
    copied = engine.start(second, GREEDY)  # shares the system prompt with a live sequence
    assert copied.cached_tokens >= len(engine.tokenizer.chat_ids(system)) - 2
    while not (running.done and copied.done):
        engine.step([run for run in (running, copied) if not run.done])
    engine.finish(running)
    assert engine.finish(copied).token_ids == cold.token_ids

    restored = engine.generate(second, GREEDY)  # from the saved state of its own earlier run
    assert restored.cached_tokens == (len(second) - 1) // 16 * 16
    assert restored.token_ids == cold.token_ids
    inserted, _ = engine.prefix_cache.drain_events()
    assert inserted  # routing hears of the cached blocks
    engine.prefix_cache = None


def test_a_worker_serves_with_llamacpp(engine):
    thread = ServerThread(WorkerServer(engine, NodeIdentity.generate(), ServerConfig(max_active=4)))
    endpoint = thread.start()
    try:
        with Client([endpoint]) as client:
            result = client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                     max_tokens=12, logprobs=True)
            (status,) = client.status()
    finally:
        thread.stop()
    assert result.completion_tokens >= 1 and len(result.logprobs) == result.completion_tokens
    assert status.served == 1 and status.decode_tok_per_s > 0
