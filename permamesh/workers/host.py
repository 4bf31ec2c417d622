"""The worker as its parts see it: what the group link and the overlay inbox may ask of it.

:class:`WorkerHost` is implemented by :class:`permamesh.workers.server.WorkerServer`, which owns
a :class:`~permamesh.workers.group.GroupLink` and an :class:`~permamesh.workers.inbox.Inbox` and
hands each of them itself. They call back only through this interface, so neither imports the
server's module, and the server's dependencies point one way (server -> group, inbox -> host).

Every method is called on the worker's event-loop thread.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from permamesh.containers.messages import RunRequest
from permamesh.identity import NodeIdentity
from permamesh.wire import GenerateRequest, Message
from permamesh.workers.engine import Engine
from permamesh.workers.executor import Executor

__all__ = ["WorkerHost"]


class WorkerHost(Protocol):
    """The calls a worker's group link and overlay inbox make on the worker that owns them."""

    identity: NodeIdentity  # signs every reply
    worker_id: str
    engine: Engine  # the model this worker serves (its name, its prompt rendering)
    executor: Executor  # queue and step estimates, for routing

    def send(self, peer: bytes, msg: Message) -> None:
        """Queue ``msg`` for ``peer`` (a socket peer, or a local sink)."""

    def accept(self, peer: bytes, req: GenerateRequest, prompt_ids: Sequence[int] | None = None,
               cached_tokens: int = 0) -> Message:
        """Run ``req`` here: check it, queue it, answer Accepted (or why not)."""

    def dispatch(self, peer: bytes, req: GenerateRequest | RunRequest) -> Message | None:
        """A job for ``peer``: route it inside the group, or run it here."""

    def add_sink(self, peer: bytes, sink: Callable[[Message], None]) -> None:
        """Messages for ``peer`` go to ``sink`` instead of a socket."""

    def remove_sink(self, peer: bytes) -> None:
        """Forget a sink added by :meth:`add_sink`."""
