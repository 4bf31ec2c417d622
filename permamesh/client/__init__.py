"""The researcher's side: submit generation and container jobs to a mesh.

- :mod:`~permamesh.client.blocking`: :class:`Client`, one blocking client per thread (direct to
  workers, or ``anonymous=True`` through the overlay), with retries and key pinning.
- :mod:`~permamesh.client.aio`: :class:`AsyncClient`, the same jobs from asyncio.
- :mod:`~permamesh.client.submit`: the ``permamesh submit`` command.

The anonymous path itself (cloves, onion paths, reply blocks) is :mod:`permamesh.overlay`;
its client end is :class:`permamesh.overlay.sender.OverlayClient`.

Who calls it: researchers' code (``from permamesh import Client``), the CLI, the gateway's
direct backend and the benchmarks.
"""

from __future__ import annotations

__all__ = ["AsyncClient", "Client", "ClientError"]


def __getattr__(name: str):
    if name in ("Client", "ClientError"):
        from permamesh.client import blocking

        return getattr(blocking, name)
    if name == "AsyncClient":
        from permamesh.client.aio import AsyncClient

        return AsyncClient
    raise AttributeError(name)
