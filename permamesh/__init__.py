"""permamesh: a community-owned mesh for LLM inference and container workloads.

Map of the package (see docs/architecture.md for the request path):

- leaf modules: :mod:`~permamesh.wire` (typed signed messages), :mod:`~permamesh.identity`
  (Ed25519/X25519 keys), :mod:`~permamesh.transport` (zmq wrappers),
  :mod:`~permamesh.localmesh` (local worker registry), :mod:`~permamesh.errors`.
- packages: :mod:`~permamesh.workers` (models, engine, worker process),
  :mod:`~permamesh.routing` (hash-radix tree, policies, delta sync, and the anonymous
  overlay in :mod:`~permamesh.routing.overlay`: S-IDA cloves, onion cells, relays, paths),
  :mod:`~permamesh.verify`, :mod:`~permamesh.committee`, :mod:`~permamesh.scheduler`,
  :mod:`~permamesh.containers`; :mod:`~permamesh.metrics` and :mod:`~permamesh.health`
  (Prometheus metrics of every process, the free health checks).
- entry points: :mod:`~permamesh.client` and :mod:`~permamesh.aclient` (researchers: sync and
  async, direct or anonymous, generation and container jobs), :mod:`~permamesh.gateway`
  (the OpenAI-compatible HTTP API, dashboard),
  :class:`~permamesh.routing.overlay.sender.OverlayClient` (researchers, anonymous), :mod:`~permamesh.mesh` and
  :mod:`~permamesh.demo` (embedded mesh), :mod:`~permamesh.cli` (the command).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Client":  # lazy: importing permamesh must not pull in zmq for pure modules
        from permamesh.client import Client

        return Client
    if name == "AsyncClient":
        from permamesh.aclient import AsyncClient

        return AsyncClient
    if name == "OverlayClient":
        from permamesh.routing.overlay.sender import OverlayClient

        return OverlayClient
    raise AttributeError(name)
