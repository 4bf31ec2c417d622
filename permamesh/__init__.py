"""permamesh: a community-owned mesh for LLM inference and container workloads.

Map of the package (docs/architecture.md follows one request through it):

- leaf modules: :mod:`~permamesh.wire` (typed signed messages), :mod:`~permamesh.identity`
  (Ed25519/X25519 keys), :mod:`~permamesh.transport` (zmq wrappers), :mod:`~permamesh.errors`.
- the mission's parts: :mod:`~permamesh.workers` (models, engine, worker process),
  :mod:`~permamesh.routing` (hash-radix tree, policies, delta sync, group view),
  :mod:`~permamesh.overlay` (S-IDA cloves, onion cells, reply blocks, paths, relays, the
  overlay client), :mod:`~permamesh.directory` (how nodes find workers and relays),
  :mod:`~permamesh.verify`, :mod:`~permamesh.committee`, :mod:`~permamesh.scheduler`,
  :mod:`~permamesh.containers`.
- the researcher's side: :mod:`~permamesh.client` (sync and async, direct or anonymous,
  generation and container jobs), :mod:`~permamesh.gateway` (the OpenAI-compatible HTTP API
  and the dashboard).
- the operator's side: :mod:`~permamesh.ops` (child processes, Prometheus metrics, health).
- :mod:`~permamesh.demo` (the embedded mesh and ``permamesh demo``), :mod:`~permamesh.bench`
  (benchmarks), :mod:`~permamesh.cli` (the command).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Client":  # lazy: importing permamesh must not pull in zmq for pure modules
        from permamesh.client.blocking import Client

        return Client
    if name == "AsyncClient":
        from permamesh.client.aio import AsyncClient

        return AsyncClient
    if name == "OverlayClient":
        from permamesh.overlay.sender import OverlayClient

        return OverlayClient
    raise AttributeError(name)
