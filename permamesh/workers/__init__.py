"""Workers: the partner machines' side of the mesh.

- :mod:`~permamesh.workers.models`: find, convert (GGUF -> cached safetensors) and load
  models: ``smollm2-135m`` (default), ``tiny-random`` (tests), or any ``--model-path``.
- :mod:`~permamesh.workers.tokenizer`: one tokenizer interface over transformers and a byte
  tokenizer.
- :mod:`~permamesh.workers.backends`: which engine serves a model (``torch`` or ``llamacpp``;
  ``auto``), and loading it.
- :mod:`~permamesh.workers.engine`: the torch engine: continuous batching, one forward per step
  over every active request (chunked prefill), over a :mod:`~permamesh.workers.kvpool` of slots.
- :mod:`~permamesh.workers.llamacpp`: the llama.cpp engine (GGUF on CPU), the same interface;
  its prefix store of saved sequence states is :mod:`~permamesh.workers.seqstore`; what it
  computes with (the GGUF file, or a Q8_0 / F16 copy made once) is
  :mod:`~permamesh.workers.ggufweights`; :mod:`~permamesh.workers.llamalog` routes llama.cpp's
  log; :mod:`~permamesh.workers.llamabuild` builds llama-cpp-python once (``make setup``).
- :mod:`~permamesh.workers.decoding`: one request's state between steps (sampling, stop strings,
  streaming, log-probabilities) and the step plan; :mod:`~permamesh.workers.sampling`: the
  sampling rule and the request/answer types; :mod:`~permamesh.workers.stops`: stop strings.
- :mod:`~permamesh.workers.prefix_cache`: the torch engine's prefix KV cache (block digests).
- :mod:`~permamesh.workers.executor`: the engine thread: admission, steps, rates for routing.
- :mod:`~permamesh.workers.server`: the ROUTER socket in front of the executor;
  :mod:`~permamesh.workers.group`, :mod:`~permamesh.workers.inbox`: group routing, overlay cloves.
- :mod:`~permamesh.workers.process`: the ``permamesh worker`` process.
- :mod:`~permamesh.workers.errors`: the package's exception family.

Workers never decide routing; they execute what reaches them.
"""
