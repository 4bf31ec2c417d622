"""The OpenAI-compatible gateway: researchers' existing tools in, the anonymous mesh behind.

- :mod:`~permamesh.gateway.openai_api`: request bodies checked and turned into generation
  jobs; every accepted parameter has its effect, any other is refused by name (pure).
- :mod:`~permamesh.gateway.responses`: completions, stream chunks, log-probabilities and
  usage shaped as OpenAI clients parse them (pure).
- :mod:`~permamesh.gateway.tools`: ``response_format`` and ``tools`` as the job's grammar,
  and answers read back as tool calls (pure).
- :mod:`~permamesh.gateway.streaming`: streamed answers (server-sent events) of every
  choice, settled even when the client leaves; :mod:`~permamesh.gateway.deltas`: one
  choice's deltas, each chunk's log-probabilities with its text (pure).
- :mod:`~permamesh.gateway.traffic`: the dashboard's request, error, latency, TTFT and token
  rates, from the gateway's own metrics.
- :mod:`~permamesh.gateway.backend`: :class:`MeshBackend`, jobs into the mesh through the
  overlay (or direct to workers, streamed), entry workers chosen by model.
- :mod:`~permamesh.gateway.accounts`: API keys (:class:`KeyRing`) and each key's committee
  credit (:class:`Credit`: admission before a job, a signed receipt after).
- :mod:`~permamesh.gateway.dashboard`: :class:`MeshView`, the dashboard's JSON (nodes on the
  map, roles, health, reputation over epochs, replication, payouts with their why);
  ``static/dashboard.html`` draws it.
- :mod:`~permamesh.gateway.server`: the aiohttp application and its routes, metrics.
- :mod:`~permamesh.gateway.process`: ``permamesh gateway``.
- :mod:`~permamesh.gateway.errors`: :class:`GatewayError` and :class:`ApiError` (the OpenAI
  error shape).
"""

from permamesh.gateway.errors import ApiError, GatewayError

__all__ = ["ApiError", "GatewayError"]
