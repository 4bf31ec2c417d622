"""The llama.cpp engine: GGUF models on CPU through llama-cpp-python's low-level API.

Same interface and same per-request state as the torch engine
(:class:`permamesh.workers.engine.Engine`; :mod:`permamesh.workers.backends`): one llama.cpp
context holds every active request as its own sequence in one unified KV cache, and each
:meth:`LlamaEngine.step` is one ``llama_decode`` over a batch with every decoding request's next
token and chunks of the prompts still prefilling (:func:`~permamesh.workers.decoding.plan_step`),
logits requested only where a next token is due. Sampling is the shared
:func:`~permamesh.workers.sampling.sample_token` over llama.cpp's raw logits, so per-token
log-probabilities are the quantized model's own (they differ from the fp32 torch reference by
0.034-0.042 nats per token on SmolLM2 Q4_1, and a little with the batch: docs/dependencies.md).

Prefix reuse, two ways:

- **sequence copy**: a new prompt that shares a prefix with a request still in the context
  takes that prefix's KV by ``llama_memory_seq_cp`` (in the unified cache the cells are shared,
  nothing is copied);
- **saved sequence states**: a finished request's sequence (and a prompt's, once prefilled) is
  saved with ``llama_state_seq_get_data`` into a :class:`~permamesh.workers.seqstore.SeqStateStore`
  (the budgeted prefix store, keyed by the same chained block digests as routing); a later prompt
  that matches loads it with ``llama_state_seq_set_data`` and drops the positions past the match.

The worker process assigns ``engine.prefix_cache`` a :class:`~permamesh.workers.prefix_cache.PrefixKVCache`
once it knows its group's salt; this engine turns it into a store with the same hasher and budget.

Who calls it: the executor on its engine thread (like the torch engine);
:func:`permamesh.workers.backends.load_engine` builds it. Nothing here is thread-safe.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from permamesh.wire.messages import GenerateRequest
from permamesh.workers import ggufweights
from permamesh.workers.llamalog import route_native_log
from permamesh.workers.decoding import Decoding, plan_step, run_alone
from permamesh.workers.errors import ContextLengthError, ModelError, RequestError, WorkerError
from permamesh.workers.models import LoadedModel
from permamesh.workers.prefix_cache import PrefixKVCache
from permamesh.workers.sampling import Completion, SamplingParams, Step, StepReport, sample_token
from permamesh.workers.seqstore import SeqStateStore

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    step_tokens: int = 256  # tokens one llama_decode takes at most (n_batch)
    ctx_per_seq: int = 4096  # tokens one request may hold (the context holds max_seqs + 1 of them)
    threads: int = 0  # CPU threads; 0 = every core


@dataclasses.dataclass
class GGUFModel:
    """A loaded GGUF model (what :attr:`LoadedModel.model` holds for this backend)."""

    path: Path  # what llama.cpp loaded: the file, or its copy (ggufweights)
    model: object  # llama_model_p
    vocab: object  # llama_vocab_p
    n_vocab: int
    n_ctx_train: int
    max_seqs: int  # requests one context holds at once


def load_gguf(name: str, path: Path, max_seqs: int = 8, weights: str = ggufweights.DEFAULT_MODE,
              cache_dir: Path | None = None) -> LoadedModel:
    """Load ``path`` with llama.cpp and its tokenizer (from the GGUF, as the torch path does);
    ``weights``: compute with the file or its copy kept in ``cache_dir``
    (:func:`permamesh.workers.ggufweights.weights_for`)."""
    import llama_cpp as L
    from transformers import AutoTokenizer

    from permamesh.workers.tokenizer import HFTokenizer

    route_native_log(L)
    started = time.monotonic()
    L.llama_backend_init()
    computed = ggufweights.weights_for(path, weights, cache_dir)
    model = L.llama_model_load_from_file(str(computed).encode(), L.llama_model_default_params())
    if not model:
        raise ModelError(f"llama.cpp cannot load {computed}")
    vocab = L.llama_model_get_vocab(model)
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = HFTokenizer(hf_tok, extra_eos=[int(L.llama_vocab_eos(vocab))])
    handle = GGUFModel(computed, model, vocab, int(L.llama_vocab_n_tokens(vocab)), int(L.llama_model_n_ctx_train(model)),
                       max_seqs)
    loaded = LoadedModel(name, handle, tokenizer, "cpu", time.monotonic() - started)
    log.info("llama.cpp loaded %s in %.1f s%s", path.name, loaded.load_s,
             f" (computing with its copy {computed.name})" if computed != path else "")
    return loaded


class LlamaEngine:
    """Continuous batching in one llama.cpp context (see the module docstring)."""

    backend = "llamacpp"

    def __init__(self, loaded: LoadedModel, prefix_cache: PrefixKVCache | SeqStateStore | None = None,
                 config: LlamaConfig = LlamaConfig()) -> None:
        import llama_cpp as L

        self.loaded, self.config, self.tokenizer = loaded, config, loaded.tokenizer
        handle: GGUFModel = loaded.model
        self._L, self._handle = L, handle
        self._seqs = handle.max_seqs + 1  # one more: a restored state may briefly exceed its match
        params = L.llama_context_default_params()
        params.n_ctx = self._seqs * config.ctx_per_seq
        params.n_batch = params.n_ubatch = config.step_tokens
        params.n_seq_max = self._seqs
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = config.threads or os.cpu_count() or 1
        self._ctx = L.llama_init_from_model(handle.model, params)
        if not self._ctx:
            raise ModelError(f"llama.cpp could not make a context of {params.n_ctx} tokens")
        self._mem = L.llama_get_memory(self._ctx)
        self._batch = L.llama_batch_init(config.step_tokens, 0, 1)
        self.max_context = min(config.ctx_per_seq, handle.n_ctx_train or config.ctx_per_seq)
        self.vocab_size = handle.n_vocab  # the logits' width
        self._free = list(range(self._seqs))
        self._live: dict[int, Decoding] = {}  # seq id -> request holding it
        self._store: SeqStateStore | None = None
        self.prefix_cache = prefix_cache

    sample = staticmethod(sample_token)

    @property
    def prefix_cache(self) -> SeqStateStore | None:
        return self._store

    @prefix_cache.setter
    def prefix_cache(self, cache) -> None:
        """Takes a store, None, or a PrefixKVCache (its hasher and budget; what the worker sets)."""
        if isinstance(cache, PrefixKVCache):
            cache = SeqStateStore(cache.hasher, cache.budget_bytes)
        self._store = cache

    def prompt_ids(self, req: GenerateRequest) -> list[int]:
        if req.messages:
            return self.tokenizer.chat_ids(req.messages)
        return self.tokenizer.encode(req.prompt or "")

    # ------------------------------------------------------------------ requests join
    def start(self, prompt_ids: Sequence[int], params: SamplingParams,
              on_step: Callable[[Step], None] | None = None) -> Decoding:
        if not prompt_ids:
            raise RequestError("empty prompt")
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise ContextLengthError(f"prompt of {len(prompt_ids)} tokens leaves no room in the {self.max_context}-token context")
        if len(self._free) < 2:  # one sequence stays spare
            raise WorkerError(f"the llama.cpp engine holds {self._handle.max_seqs} requests at once")
        run = Decoding(self, tuple(prompt_ids), dataclasses.replace(params, max_tokens=min(params.max_tokens, room)),
                       on_step)
        run.seq = self._free.pop()
        self._live[run.seq] = run
        try:
            run.cached_tokens = run.prefilled = self._reuse(run.seq, list(prompt_ids))
        except BaseException:
            self.abandon(run)
            raise
        return run

    def _reuse(self, seq: int, prompt: list[int]) -> int:
        """Put the longest reusable prefix of ``prompt`` into ``seq``; return its length."""
        L, limit = self._L, len(prompt) - 1  # at least one token is prefilled (its logits are needed)
        best, source = 0, None
        for other, run in self._live.items():
            if other == seq:
                continue
            held = [*run.prompt_ids[: run.prefilled], *run.fed]
            n = 0
            for a, b in zip(held, prompt[:limit]):
                if a != b:
                    break
                n += 1
            if n > best:
                best, source = n, other
        stored, state = self._store.lookup(prompt) if self._store is not None else (0, None)
        if stored > best and state is not None:
            buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
            if L.llama_state_seq_set_data(self._ctx, buf, len(state), seq) == 0:
                log.warning("llama.cpp could not load a saved sequence state; prefilling in full")
                L.llama_memory_seq_rm(self._mem, seq, -1, -1)
                return 0
            L.llama_memory_seq_rm(self._mem, seq, stored, -1)
            return stored
        if source is not None:
            L.llama_memory_seq_cp(self._mem, source, seq, 0, best)
        return best

    # ------------------------------------------------------------------ one step
    def step(self, runs: Sequence[Decoding]) -> StepReport:
        """One ``llama_decode`` over the next tokens of ``runs`` (as :meth:`Engine.step`)."""
        import numpy as np
        import torch

        t0 = time.monotonic()
        plan = plan_step(runs, self.config.step_tokens)
        if not plan:
            return StepReport(0, 0, 0.0)
        L, batch, n = self._L, self._batch, 0
        for run, tokens, due in plan:
            for k, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, run.length + k, 1
                batch.seq_id[n][0] = run.seq
                batch.logits[n] = 1 if due and k == len(tokens) - 1 else 0
                n += 1
        batch.n_tokens = n
        rc = L.llama_decode(self._ctx, batch)
        if rc != 0:
            raise WorkerError(f"llama_decode failed ({rc}): {'no room in the KV cache' if rc == 1 else 'see the log'}")
        seconds = time.monotonic() - t0
        decode = sum(1 for run, _, _ in plan if not run.prefilling)
        failed, index = [], 0
        for run, tokens, due in plan:
            index += len(tokens)
            run.fed_tokens(len(tokens), seconds)
            if not due:
                continue
            # a view of llama.cpp's own buffer, no copy: read only here, before the next llama_decode
            logits = torch.from_numpy(np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, index - 1),
                                                            shape=(self._handle.n_vocab,)))
            try:
                run.take(logits)
            except Exception as exc:  # noqa: BLE001 - this request is over; the others go on
                failed.append((run, exc))
            if not run.fed and self._store is not None:  # its prompt is prefilled: keep it now
                self._save(run)
        return StepReport(n - decode, decode, time.monotonic() - t0, tuple(failed))

    # ------------------------------------------------------------------ requests leave
    def finish(self, run: Decoding) -> Completion:
        try:
            done = run.complete()
            if self._store is not None:
                self._save(run)
            return done
        finally:
            self.abandon(run)

    def abandon(self, run: Decoding) -> None:
        run.done = True
        if run.seq is not None and self._live.get(run.seq) is run:
            self._L.llama_memory_seq_rm(self._mem, run.seq, -1, -1)
            del self._live[run.seq]
            self._free.append(run.seq)
        run.seq = None

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 on_step: Callable[[Step], None] | None = None) -> Completion:
        """Run one request to the end on the calling thread."""
        return run_alone(self, prompt_ids, params, on_step)

    def _save(self, run: Decoding) -> None:
        """Save ``run``'s sequence state in the store, if it would cover a new block."""
        held = [*run.prompt_ids[: run.prefilled], *run.fed]
        size = self._store.block_size
        if run.seq is None or len(held) // size <= run.cached_tokens // size:
            return
        try:
            L = self._L
            nbytes = L.llama_state_seq_get_size(self._ctx, run.seq)
            buf = (ctypes.c_uint8 * nbytes)()
            got = L.llama_state_seq_get_data(self._ctx, buf, nbytes, run.seq)
            # one memcpy; bytes(buf[:got]) built a list of ints first, holding the GIL for ~0.5 s
            # per 23 MB state and freezing the worker's event loop (its heartbeats went silent)
            self._store.store(held, ctypes.string_at(buf, got))
        except Exception:  # noqa: BLE001 - the answer does not depend on the store
            log.exception("saving a sequence state of %d tokens failed", len(held))

    def close(self) -> None:
        """Free the context (the model stays loaded)."""
        if self._ctx:
            self._L.llama_batch_free(self._batch)
            self._L.llama_free(self._ctx)
            self._ctx = None
