"""The nodes of the verification benchmark: honest workers and the cheater zoo, built around one
registered (reference) model.

Honest nodes serve the registered weights on "other hardware": ``same`` runs them as the
validator does; ``bf16`` serves weights rounded to bfloat16 (what a partner GPU would hold),
so its reported log-probs carry real numeric noise. Cheaters (see :mod:`permamesh.verify.zoo`):
another model claiming the registered name (tiny random, with its own tokenizer), the
registered model with every other layer skipped, with 5% weight noise, random tokens, truncated
answers, replays of an old answer, a 20% part-time cheater (skipped layers on a fifth of
requests), a challenge dodger (honest only on what a naive detector takes for a challenge), an
adaptive dodger (:class:`~permamesh.verify.dodger.AdaptiveDodger`: a gradient-boosted classifier
trained on a labelled history of the same duties' challenges and user traffic; layers skipped
when confident a request is not a challenge), an argmax-only and a seed-ignoring worker.
With the real model, ``llamacpp`` honest nodes serve the GGUF through llama.cpp
(``backends.load_engine("llamacpp")``), scored with that engine's tolerance.

Who calls it: :mod:`permamesh.bench.verify`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

from permamesh.verify import zoo
from permamesh.verify.dodger import AdaptiveDodger
from permamesh.workers import models
from permamesh.workers.engine import Engine

log = logging.getLogger(__name__)

HONEST_KINDS = ("same", "bf16")
CHEATERS = ("other-model", "layers-skipped", "noisy-weights", "random-tokens", "truncated", "replay",
            "argmax-only", "seed-ignoring", "part-time-20", "dodger", "adaptive-dodger")
FULL_TIME = ("other-model", "layers-skipped", "noisy-weights", "random-tokens", "truncated", "replay")
CONTRACT = ("argmax-only", "seed-ignoring")  # break the sampling contract on every sampled answer
SAVING = {"layers-skipped": 0.5}  # share of compute a cheated answer saves (every other layer skipped)


def _variant(ref, change: Callable):
    clone = copy.copy(ref)
    clone.model = change(ref.model)
    return clone


def bf16_rounded(model):
    """A copy whose weights are rounded to bfloat16 and computed in fp32 (numeric noise of
    other hardware without bf16 kernels, which this CPU lacks)."""
    import torch

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))
    return clone.eval()


class Zoo:
    """Builds nodes around ``ref`` (a LoadedModel); heavy variants are made once and shared."""

    def __init__(self, ref, seed: int = 0, part_time: float = 0.2, noise: float | None = None) -> None:
        # 5% of each tensor's spread for a real model; the tiny one shrugs that off, so 30% there
        if noise is None:
            noise = 0.3 if ref.name == models.TINY_RANDOM else 0.05
        self.ref, self.seed, self.part_time, self.noise = ref, seed, part_time, noise
        self.claim = ref.name
        self._engines: dict[str, Engine] = {}

    def engine(self, kind: str) -> Engine:
        if kind not in self._engines and kind == "llamacpp":
            import torch

            from permamesh.workers.backends import load_engine

            threads = torch.get_num_threads()
            self._engines[kind] = load_engine("llamacpp", self.ref.name, max_active=1)
            # a llama.cpp worker process keeps torch at 1 thread (it only samples there); these
            # nodes stand in for remote workers, so the member's scoring keeps every core
            torch.set_num_threads(threads)
        if kind not in self._engines:
            ref = self.ref
            made = {
                "same": lambda: ref,
                "bf16": lambda: _variant(ref, bf16_rounded),
                "skipped": lambda: _variant(ref, zoo.skip_layers),
                "noisy": lambda: _variant(ref, lambda m: zoo.add_noise(m, self.noise, self.seed)),
                "tiny": lambda: _tiny(self.seed + 1, peaked=ref.name == models.TINY_RANDOM),
            }[kind]()
            self._engines[kind] = Engine(made)
        return self._engines[kind]

    def honest(self, kind: str, name: str) -> zoo.Node:
        return zoo.ModelNode(self.engine(kind), self.claim, name)

    def cheater(self, kind: str, index: int = 0) -> zoo.Node:
        honest = self.honest("same", f"{kind}-{index}")
        skipped = zoo.ModelNode(self.engine("skipped"), self.claim, f"{kind}-{index}")
        tok = self.ref.tokenizer
        vocab = int(self.ref.model.get_output_embeddings().weight.shape[0])
        return {
            "other-model": lambda: zoo.ModelNode(self.engine("tiny"), self.claim, f"{kind}-{index}"),
            "layers-skipped": lambda: skipped,
            "noisy-weights": lambda: zoo.ModelNode(self.engine("noisy"), self.claim, f"{kind}-{index}"),
            "random-tokens": lambda: zoo.RandomTokens(vocab, self.claim, self.seed + index, tok.eos_ids),
            "truncated": lambda: zoo.Truncating(honest, tok),
            "replay": lambda: zoo.Replaying(honest),
            "part-time-20": lambda: zoo.PartTime(honest, skipped, self.part_time, f"part-time/{self.seed}/{index}"),
            "dodger": lambda: zoo.ChallengeDodger(honest, skipped),
            "argmax-only": lambda: zoo.ArgmaxOnly(honest),
            "seed-ignoring": lambda: zoo.SeedIgnoring(honest),
            "adaptive-dodger": lambda: AdaptiveDodger(honest, skipped, f"{kind}-{index}", seed=self.seed + index),
        }[kind]()


def _tiny(seed: int, peaked: bool):
    loaded = models.load(models.TINY_RANDOM, device="cpu", seed=seed)
    if peaked:
        zoo.peaked(loaded.model)
    return loaded


def load_reference(model: str, data_dir, seed: int = 0):
    """The registered model: SmolLM2 (the GGUF in the wheel), or a peaked tiny random model."""
    if model == models.TINY_RANDOM:
        return _tiny(seed, peaked=True)
    return models.load(model, data_dir=data_dir, device="cpu")
