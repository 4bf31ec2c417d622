"""The cheater zoo: workers that claim one model and serve something cheaper, for tests and
the verification benchmark.

Each node answers a :class:`GenerateRequest` with a :class:`GenerateResult` the way a worker
would (always with per-token log-probs: the overlay client asks for them on every request, so
challenges never stand out by asking). Nodes run in-process on real engines; the network path
is exercised separately (``permamesh worker --model-path X --claim MODEL``).

- :class:`ModelNode`: runs an engine and names ``claim`` as its model. Honest when the engine
  holds the registered weights; an impostor otherwise: another model (:func:`tiny-random
  <permamesh.workers.models.tiny_random>` of another seed), the registered one with layers
  skipped (:func:`skip_layers`) or with noise on its weights (:func:`add_noise`).
- :class:`RandomTokens`: random token ids and made-up log-probs.
- :class:`Truncating`: the honest answer cut short, claiming it stopped.
- :class:`Replaying`: the answer it gave to an earlier request, whatever is asked now.
- :class:`PartTime`: honest, except on a fraction ``p`` of requests (seeded).
- :class:`ChallengeDodger`: honest only on what its detector takes for a challenge (a naive
  detector: temperature 0 and no session; anything a worker sees is allowed).
- :class:`ArgmaxOnly`: the registered model, but always the likeliest token (temperature,
  top_p and seed ignored); :class:`SeedIgnoring`: samples with fresh randomness whatever seed
  is asked. Both break the sampling contract (:mod:`~permamesh.verify.contract`).
- :class:`~permamesh.verify.dodger.AdaptiveDodger` (its own module): learns to spot challenges.

Every node takes ``horizon``: the benchmark's stand-in for the tokens the validator will score
(generation stops there so the CPU can afford hundreds of node-epochs); a worker on the network
never gets one, and a node's decisions see the request as sent, max_tokens included.

Who calls it: ``tests/verify`` and :mod:`permamesh.bench.verify`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import random
from collections.abc import Callable

from permamesh.wire.messages import GenerateRequest, GenerateResult

log = logging.getLogger(__name__)

__all__ = ["ArgmaxOnly", "ChallengeDodger", "ModelNode", "SeedIgnoring", "Node", "PartTime", "RandomTokens", "Replaying", "Truncating",
           "add_noise", "looks_like_a_challenge", "peaked", "skip_layers"]

Node = Callable[..., GenerateResult]  # node(request, horizon=None)


class ModelNode:
    """A worker's answers from ``engine``, announcing ``claim`` as the model it serves."""

    def __init__(self, engine, claim: str, worker_id: str = "node") -> None:
        self.engine, self.claim, self.worker_id = engine, claim, worker_id

    def __call__(self, req: GenerateRequest, horizon: int | None = None) -> GenerateResult:
        from permamesh.workers.engine import SamplingParams

        params = dataclasses.replace(SamplingParams.of(req), logprobs=True)
        if params.seed is None:  # its own randomness, drawn from the request id: benchmark runs repeat exactly
            params = dataclasses.replace(params, seed=int.from_bytes(
                hashlib.blake2b(req.request_id.encode(), digest_size=8).digest(), "little") >> 1)
        if horizon is not None:
            params = dataclasses.replace(params, max_tokens=min(params.max_tokens, horizon))
        done = self.engine.generate(self.engine.prompt_ids(req), params)
        return GenerateResult(req.request_id, done.text, done.finish_reason, done.prompt_tokens,
                              len(done.token_ids), done.token_ids, done.logprobs, self.worker_id, self.claim,
                              0.0, round(done.ttft_s, 6), round(done.total_s, 6), done.cached_tokens)


class RandomTokens:
    """Random token ids (never an end token) with plausible-looking log-probs."""

    def __init__(self, vocab: int, claim: str, seed: int = 0, avoid: frozenset[int] = frozenset()) -> None:
        self.vocab, self.claim, self.rng, self.avoid = vocab, claim, random.Random(seed), avoid

    def __call__(self, req: GenerateRequest, horizon: int | None = None) -> GenerateResult:
        ids = []
        while len(ids) < min(req.max_tokens, horizon or req.max_tokens):
            token = self.rng.randrange(self.vocab)
            if token not in self.avoid:
                ids.append(token)
        lps = tuple(-self.rng.uniform(0.05, 3.0) for _ in ids)
        return GenerateResult(req.request_id, "", "length", 0, len(ids), tuple(ids), lps, "random", self.claim)


class Truncating:
    """The honest answer with only its first ``keep`` share of tokens, claiming ``stop``."""

    def __init__(self, inner: Node, tokenizer, keep: float = 0.5) -> None:
        self.inner, self.tokenizer, self.keep = inner, tokenizer, keep

    def __call__(self, req: GenerateRequest, horizon: int | None = None) -> GenerateResult:
        full = self.inner(dataclasses.replace(req, max_tokens=max(1, int(req.max_tokens * self.keep))), horizon)
        ids = full.token_ids
        return dataclasses.replace(full, text=self.tokenizer.decode(list(ids)), finish_reason="stop")


class Replaying:
    """Answers every request with the first answer it ever computed (request id updated)."""

    def __init__(self, inner: Node) -> None:
        self.inner, self.old = inner, None

    def __call__(self, req: GenerateRequest, horizon: int | None = None) -> GenerateResult:
        if self.old is None:
            self.old = self.inner(req, horizon)
            return self.old
        return dataclasses.replace(self.old, request_id=req.request_id)


class PartTime:
    """``honest`` except on a share ``p`` of requests, answered by ``cheat``."""

    def __init__(self, honest: Node, cheat: Node, p: float, seed: int | str = 0) -> None:
        self.honest, self.cheat, self.p, self.rng = honest, cheat, p, random.Random(seed)
        self.cheated = self.served = 0

    def __call__(self, req: GenerateRequest, horizon: int | None = None) -> GenerateResult:
        self.served += 1
        if self.rng.random() < self.p:
            self.cheated += 1
            return self.cheat(req, horizon)
        return self.honest(req, horizon)


def looks_like_a_challenge(req: GenerateRequest) -> bool:
    """A naive detector a cheater could use: what a lazy validator would send (greedy, one-off)."""
    return req.temperature == 0.0 and not req.session


class ChallengeDodger:
    """Honest when ``detector`` says challenge, cheating otherwise."""

    def __init__(self, honest: Node, cheat: Node, detector: Callable[[GenerateRequest], bool] = looks_like_a_challenge
                 ) -> None:
        self.honest, self.cheat, self.detector = honest, cheat, detector
        self.dodged = self.cheated = 0

    def __call__(self, req: GenerateRequest, horizon: int | None = None) -> GenerateResult:
        if self.detector(req):
            self.dodged += 1
            return self.honest(req, horizon)
        self.cheated += 1
        return self.cheat(req, horizon)


class ArgmaxOnly:
    """``inner`` asked for its likeliest tokens whatever the request's temperature, top_p and
    seed (answers deterministic and cacheable: what a lazy serving stack does)."""

    def __init__(self, inner: Node) -> None:
        self.inner = inner

    def __call__(self, req: GenerateRequest, horizon: int | None = None) -> GenerateResult:
        res = self.inner(dataclasses.replace(req, temperature=0.0, top_p=1.0, seed=None), horizon)
        return dataclasses.replace(res, request_id=req.request_id)


class SeedIgnoring:
    """``inner`` with the request's seed dropped: fresh randomness every time."""

    def __init__(self, inner: Node) -> None:
        self.inner = inner

    def __call__(self, req: GenerateRequest, horizon: int | None = None) -> GenerateResult:
        return self.inner(dataclasses.replace(req, seed=None), horizon)


def skip_layers(model, keep_every: int = 2):
    """A copy of a Llama-style causal LM with only every ``keep_every``-th decoder layer (the
    compute a cheater saves); layer indices renumbered so the KV cache stays consistent."""
    clone = copy.deepcopy(model)
    layers = clone.model.layers
    kept = [layer for i, layer in enumerate(layers) if i % keep_every == 0]
    clone.model.layers = type(layers)(kept)
    for i, layer in enumerate(kept):
        if hasattr(layer, "self_attn"):
            layer.self_attn.layer_idx = i
    clone.config.num_hidden_layers = len(kept)
    if getattr(clone.config, "layer_types", None):
        clone.config.layer_types = [clone.config.layer_types[i] for i in range(len(layers)) if i % keep_every == 0]
    return clone.eval()


def add_noise(model, relative_std: float = 0.05, seed: int = 0):
    """A copy of ``model`` with Gaussian noise of ``relative_std`` times each weight tensor's
    standard deviation (what a sloppy low-bit re-quantization does)."""
    import torch

    clone = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in clone.parameters():
            if param.numel() > 1:
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                param.add_((noise * float(param.float().std()) * relative_std).to(param.dtype))
    return clone.eval()


def peaked(model, factor: float = 4.0):
    """``model`` (in place) with its final norm scaled by ``factor``: a tiny random model's
    next-token distribution is nearly flat, so two seeds would agree on almost everything;
    a peaked one has opinions a verifier can check. For tests and the quick benchmark only."""
    import torch

    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
    return model
