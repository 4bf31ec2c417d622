"""A running container job's output on its way to whoever asked, as it is written.

The runner reads a job's stdout and stderr on a pool thread and hands each piece it keeps
(within the job's output cap) to an :class:`OutputPump`. The pump hops onto the worker's
event loop and sends :class:`~permamesh.containers.messages.RunOutput` messages to the job's
peer: the first piece at once, later ones gathered for at most ``interval_s`` (or until
``piece_bytes`` are waiting), so a job that writes a byte at a time costs a bounded number of
messages. The peer is a client's socket (a direct job), another worker's router (a forwarded
job, whose entry worker passes the pieces on), or the overlay inbox's sink, which sends them
as chunks over the request's chunk blocks (``docs/paths.md`` section 9). :meth:`flush` sends
what is left before the job's :class:`~permamesh.containers.messages.RunResult`, so the
pieces always come first and join to the result's output.

Who calls it: :class:`~permamesh.containers.service.ContainerService` makes one per job run
with ``stream`` set; the runner calls :meth:`OutputPump.feed` from the pool thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from permamesh.containers.messages import MAX_OUTPUT_BYTES, RunOutput
from permamesh.wire import Message

log = logging.getLogger(__name__)

__all__ = ["OutputPump"]


class OutputPump:
    """Output pieces of job ``request_id`` from any thread, sent as RunOutput on ``loop``
    through ``send(message)`` (which must be called on the loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request_id: str, send: Callable[[Message], None],
                 interval_s: float = 0.05, piece_bytes: int = 16 * 1024) -> None:
        self.loop, self.request_id, self.send = loop, request_id, send
        self.interval_s, self.piece_bytes = interval_s, min(piece_bytes, MAX_OUTPUT_BYTES)
        self._out, self._err = bytearray(), bytearray()
        self._sent_at = float("-inf")
        self._timer: asyncio.TimerHandle | None = None
        self.pieces = 0  # RunOutput messages sent

    def feed(self, out: bytes, err: bytes) -> None:
        """A piece of output (any thread; the runner's)."""
        self.loop.call_soon_threadsafe(self._add, out, err)

    def _add(self, out: bytes, err: bytes) -> None:
        self._out += out
        self._err += err
        wait = self._sent_at + self.interval_s - time.monotonic()
        if wait <= 0 or len(self._out) + len(self._err) >= self.piece_bytes:
            self.flush()
        elif self._timer is None:
            self._timer = self.loop.call_later(wait, self.flush)

    def flush(self) -> None:
        """Send what is waiting now (event loop)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._out or self._err:
            out, err = bytes(self._out[:self.piece_bytes]), bytes(self._err[:self.piece_bytes])
            del self._out[:len(out)], self._err[:len(err)]
            self.send(RunOutput(self.request_id, out, err))
            self.pieces += 1
        self._sent_at = time.monotonic()
