"""The researcher's asyncio client: :class:`AsyncClient`, the same jobs as :class:`permamesh.Client`.

>>> import asyncio
>>> from permamesh import AsyncClient
>>> async def main():
...     async with AsyncClient() as client:
...         answers = await asyncio.gather(*(client.generate(f"Count to {n}", max_tokens=16) for n in (2, 3)))
...         job = await client.run("bb", ["/bin/echo", "hi"])
...         async for text in client.stream("Tell me a story", max_tokens=32):
...             print(text, end="")

Each call runs a blocking :class:`~permamesh.client.Client` on a thread of its own (a
Client is not thread-safe; they are pooled and reused one call at a time), so many jobs can
be in flight from one event loop while the loop itself never blocks on a socket.

Who calls it: researchers' asyncio programs and tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Sequence

from permamesh.client.blocking import Client
from permamesh.wire import GenerateResult

log = logging.getLogger(__name__)


class AsyncClient:
    def __init__(self, endpoints: Sequence[str] | None = None, *, max_concurrency: int = 8, **options) -> None:
        """``endpoints`` and ``options`` (data_dir, timeout_s, accept_timeout_s, anonymous) as
        for :class:`~permamesh.client.Client`; ``max_concurrency``: jobs in flight at once."""
        self._endpoints, self._options = endpoints, options
        self._pool = concurrent.futures.ThreadPoolExecutor(max_concurrency, thread_name_prefix="permamesh-client")
        self._idle: list[Client] = []
        self._all: list[Client] = []
        self._lock = threading.Lock()
        Client(endpoints, **options).close()  # fail now, not at the first job, when no worker is known

    def _call(self, method: str, *args, **kwargs):
        with self._lock:
            client = self._idle.pop() if self._idle else None
        if client is None:
            client = Client(self._endpoints, **self._options)
            with self._lock:
                self._all.append(client)
        try:
            return getattr(client, method)(*args, **kwargs)
        finally:
            with self._lock:
                self._idle.append(client)

    async def _run(self, method: str, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: self._call(method, *args, **kwargs))

    async def generate(self, prompt: str | None = None, **params) -> GenerateResult:
        """One generation job to its result (``params`` as :meth:`Client.generate`)."""
        return await self._run("generate", prompt, **params)

    async def stream(self, prompt: str | None = None, **params) -> AsyncIterator[str]:
        """The answer's text as it comes (token by token direct; whole through the overlay)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        job = loop.run_in_executor(self._pool, lambda: self._call(
            "generate", prompt, on_text=lambda t: loop.call_soon_threadsafe(queue.put_nowait, t), **params))
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, done))
        while (text := await queue.get()) is not done:
            yield text
        job.result()  # raise the job's error, if any

    async def run(self, image: str, argv: Sequence[str] = (), **options):
        """A container job (``options`` as :meth:`Client.run`); its RunResult."""
        return await self._run("run", image, argv, **options)

    async def status(self):
        return await self._run("status")

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)
        with self._lock:
            clients, self._all, self._idle = self._all, [], []
        for client in clients:
            client.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
