"""The OpenAI-compatible gateway: researchers' existing tools in, the anonymous mesh behind.

- :mod:`~permamesh.gateway.openai_api`: request bodies checked and turned into generation
  jobs; completions, stream chunks and usage shaped as OpenAI clients parse them (pure).
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
