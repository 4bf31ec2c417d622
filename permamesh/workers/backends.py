"""Which engine serves a model: the torch engine or llama.cpp, behind one interface.

Both engines take the same calls from the executor (``start``, ``step``, ``finish``,
``abandon``, ``generate``, ``prompt_ids``; attributes ``loaded``, ``tokenizer``,
``prefix_cache``, ``max_context``, ``backend``):

- ``torch``: :class:`permamesh.workers.engine.Engine`, transformers on torch (CPU or GPU), fp32
  on CPU: the verifier's reference numbers.
- ``llamacpp``: :class:`permamesh.workers.llamacpp.LlamaEngine`, llama.cpp through
  llama-cpp-python's low-level API, for GGUF models on CPU. llama-cpp-python has no Linux wheel;
  ``make setup`` builds one once (see docs/dependencies.md).

``auto`` picks llama.cpp where it is installed, the model is a GGUF file and the device is the
CPU, else torch (saying why). Asking for ``llamacpp`` where it cannot serve is refused with the
reason. The engine is part of what a worker announces (its descriptor's ``engine``, from the
engine's ``backend``): verification compares its log-probabilities with a tolerance calibrated
for that engine (:data:`permamesh.verify.credit.ENGINE_CONFIGS`, docs/dependencies.md).

Who calls it: the worker process (``permamesh worker --backend``) and ``permamesh bench engine``.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

from permamesh.workers import ggufweights, models
from permamesh.workers.errors import ModelError, WorkerError
from permamesh.workers.prefix_cache import PrefixKVCache

log = logging.getLogger(__name__)

BACKENDS = ("torch", "llamacpp")
CHOICES = ("auto", *BACKENDS)


def llamacpp_missing() -> str | None:
    """Why llama.cpp cannot be used here (None when llama-cpp-python imports)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (`make setup` builds it; see docs/dependencies.md)"
    try:
        import llama_cpp  # noqa: F401 - a broken build fails here, not mid-request
    except Exception as exc:  # noqa: BLE001 - any import failure means: not usable
        return f"llama-cpp-python does not import: {exc.__class__.__name__}: {exc}"
    return None


def gguf_of(model: str, model_path: str | None) -> Path | None:
    """The GGUF file a model name or path serves from (None for other models)."""
    if model_path:
        path = Path(model_path).expanduser()
        return path if path.is_file() and path.suffix == ".gguf" else None
    if model == models.DEFAULT_MODEL:
        return models.smollm2_gguf()
    return None


def choose(requested: str, model: str, model_path: str | None, device: str = "auto") -> str:
    """The backend to serve with: ``requested`` checked, or ``auto`` resolved (logged)."""
    if requested not in CHOICES:
        raise WorkerError(f"unknown backend {requested!r}: use {', '.join(CHOICES)}")
    if requested == "torch":
        return "torch"
    why_not = llamacpp_missing()
    if why_not is None and gguf_of(model, model_path) is None:
        why_not = f"model {model_path or model!r} is not a GGUF file"
    if why_not is None and device not in ("auto", "cpu"):
        why_not = f"llama.cpp serves on the CPU here, not {device!r}"
    if why_not is None and device == "auto" and models.pick_device("auto") != "cpu":
        why_not = "a GPU is present: torch serves it"
    if requested == "llamacpp":
        if why_not is not None:
            raise WorkerError(f"--backend llamacpp is unavailable: {why_not}")
        return "llamacpp"
    if why_not is not None:
        log.info("backend auto: torch (%s)", why_not)
        return "torch"
    log.info("backend auto: llama.cpp")
    return "llamacpp"


def load_engine(backend: str, model: str = models.DEFAULT_MODEL, model_path: str | None = None,
                data_dir: Path | None = None, device: str = "auto", seed: int = 0, max_active: int = 8,
                prefix_cache: PrefixKVCache | None = None, threads: int = 0, gguf_weights: str = "fast"):
    """Load the model for ``backend`` (``auto`` resolved by :func:`choose`) and return its engine
    (``max_active``: requests it must hold at once; ``threads``: CPU threads of the engine that
    computes, 0 = its default: torch's for torch, every core for llama.cpp; ``gguf_weights``:
    what llama.cpp computes with, :mod:`permamesh.workers.ggufweights`; ``file`` is refused when
    torch serves, which never reads the quantized file as it is).

    Logs one ``model NAME ready on DEVICE in S s`` line: S counts the model framework's imports
    (torch, transformers, llama.cpp) with the weights, as a worker pays both only to load a model;
    ``permamesh bench hosts`` excludes that line's figure from a worker's join time."""
    started = time.monotonic()
    backend = choose(backend, model, model_path, device)
    if gguf_weights not in ggufweights.MODES:
        raise WorkerError(f"unknown --gguf-weights {gguf_weights!r}: use {', '.join(ggufweights.MODES)}")
    if backend == "torch" and gguf_weights != ggufweights.DEFAULT_MODE:
        raise WorkerError(f"--gguf-weights {gguf_weights} applies to the llama.cpp backend only; torch serves "
                          "the GGUF dequantized to fp32")
    import torch  # both engines: the torch engine computes with it, llama.cpp's samples with it

    if backend == "torch":
        from permamesh.workers.engine import Engine

        if threads:
            torch.set_num_threads(threads)
        engine = Engine(models.load(model, model_path, data_dir, device, seed), prefix_cache)
    else:
        from permamesh.workers.llamacpp import LlamaConfig, LlamaEngine, load_gguf

        gguf = gguf_of(model, model_path)
        if gguf is None:  # choose() checked it; a file removed meanwhile
            raise ModelError(f"no GGUF file for model {model!r}")
        name = Path(model_path).stem if model_path else model
        # torch only samples here: its threads would spin against llama.cpp's (measured +5%)
        torch.set_num_threads(1)
        cache_dir = Path(data_dir).expanduser() / "models" if data_dir else None
        engine = LlamaEngine(load_gguf(name, gguf, max_active, gguf_weights, cache_dir), prefix_cache,
                             LlamaConfig(threads=threads))
    loaded = engine.loaded
    total = time.monotonic() - started
    log.info("model %s ready on %s in %.1f s (%s: framework imports %.1f s, weights and tokenizer %.1f s)",
             loaded.name, loaded.device, total, backend, total - loaded.load_s, loaded.load_s)
    return engine
