"""Workers: the partner machines' side of the mesh.

- :mod:`~permamesh.workers.models`: find, convert (GGUF -> cached safetensors) and load
  models: ``smollm2-135m`` (default), ``tiny-random`` (tests), or any ``--model-path``.
- :mod:`~permamesh.workers.tokenizer`: one tokenizer interface over transformers and a byte
  tokenizer.
- :mod:`~permamesh.workers.engine`: the decode loop (sampling, stop strings, streaming,
  log-probabilities).
- :mod:`~permamesh.workers.stops`: stop strings that stay correct while streaming.
- :mod:`~permamesh.workers.server`: the ROUTER socket, the queue and the engine thread.
- :mod:`~permamesh.workers.process`: the ``permamesh worker`` process.
- :mod:`~permamesh.workers.errors`: the package's exception family.

Later: the prefix KV cache (routing issue), the container runner (containers issue).
Workers never decide routing; they execute what reaches them.
"""
