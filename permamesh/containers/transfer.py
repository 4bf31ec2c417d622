"""Layers between workers over the network: a blob server, and a fetch that trusts no peer.

A container worker serves the blobs of its :class:`LayerStore` on a ROUTER socket
(:class:`LayerServer`): ``LayerRequest(digest, offset, length)`` is answered by
``LayerData(digest, offset, data, total)`` (at most 1 MiB a chunk) or an ``error``, and
``HoldingsRequest(digests)`` (an image's layer chain) by ``HoldingsReply``: how many leading
layers it holds and how many container jobs it has (the load the router trades against).
Frames are signed wire frames (``docs/wire.md``). What the server queues for one peer is
bounded: at most ``sndhwm`` answers (so ``sndhwm`` MiB) wait in that peer's send queue; an
answer beyond it (a peer that asks and never reads) is dropped and counted (``dropped``),
never queued, and the server goes on serving the others.

:func:`fetch_layer` pulls a blob chunk by chunk from one peer and streams it into the local
store, whose ``put`` verifies sha256 and size as it writes: a peer that sends other bytes,
too many or too few, or stops answering, leaves nothing stored and raises
:class:`ContainerError`, so the caller can try another peer or the job's source.

Who calls it: :class:`~permamesh.containers.host.ContainerWorker` (fetching from peers the
router's tree names), ``ContainerWorker.serve`` (serving), tests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable


from permamesh.containers.errors import ContainerError
from permamesh.containers.images import check_digest
from permamesh.containers.store import LayerStore
from permamesh.identity import NodeIdentity
from permamesh.transport import DealerClient, RouterServer, ServingThread
from permamesh.wire.codec import Message, WireError, decode, encode, message

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per LayerData


@message("containers.layer_request", max_bytes=1024)
class LayerRequest(Message):
    digest: str
    offset: int
    length: int


@message("containers.layer_data", max_bytes=CHUNK + 4096)
class LayerData(Message):
    digest: str
    offset: int
    data: bytes
    total: int  # the blob's size
    error: str = ""


MAX_CHAIN = 256


@message("containers.holdings?", max_bytes=MAX_CHAIN * 80 + 256)
class HoldingsRequest(Message):
    digests: tuple[str, ...]  # an image's layers, bottom first

    def __post_init__(self) -> None:
        if len(self.digests) > MAX_CHAIN:
            raise WireError(f"at most {MAX_CHAIN} digests")


@message("containers.holdings")
class HoldingsReply(Message):
    held: int  # leading digests of the request held
    jobs: int  # container jobs running or queued there
    error: str = ""


DEFAULT_SNDHWM = 4  # answers (up to 1 MiB each) queued per peer at most


class LayerServer:
    """Serves ``store``'s blobs; ``async serve(stop, on_ready)`` like the other servers.
    ``jobs`` (optional) says how many container jobs the worker has, for holdings replies;
    ``sndhwm``: answers queued for one peer at most (beyond, dropped and counted)."""

    def __init__(self, store: LayerStore, identity: NodeIdentity | None = None, host: str = "127.0.0.1",
                 jobs: Callable[[], int] = lambda: 0, sndhwm: int = DEFAULT_SNDHWM) -> None:
        if sndhwm < 1:
            raise ContainerError("a layer server needs sndhwm >= 1")
        self.store, self.identity, self.host, self.jobs = store, identity or NodeIdentity.generate(), host, jobs
        self.sndhwm = sndhwm
        self.endpoint: str | None = None
        self.served = self.refused = self.dropped = 0

    def answer(self, frame: bytes) -> LayerData | HoldingsReply:
        try:
            req = decode(frame, (LayerRequest, HoldingsRequest)).msg
            if isinstance(req, HoldingsRequest):
                return self._holdings(req)
            check_digest(req.digest, "request")
        except (WireError, ContainerError) as exc:
            self.refused += 1
            return LayerData("", 0, b"", 0, f"bad request: {exc}")
        if not self.store.has(req.digest):
            return LayerData(req.digest, req.offset, b"", 0, "not held")
        total = self.store.size_of(req.digest)
        if req.offset < 0 or req.length < 1 or req.offset > total:
            return LayerData(req.digest, req.offset, b"", total, "offset or length out of range")
        with self.store.pin([req.digest]), self.store.open(req.digest) as blob:
            blob.seek(req.offset)
            data = blob.read(min(req.length, CHUNK))
        self.served += 1
        return LayerData(req.digest, req.offset, data, total)

    def _holdings(self, req: HoldingsRequest) -> HoldingsReply:
        held = self.store.holdings()
        count = 0
        for digest in req.digests:
            if digest not in held:
                break
            count += 1
        return HoldingsReply(count, self.jobs())

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[str], None] | None = None) -> None:
        router = RouterServer(self.host, 0, self.identity.transport.private_bytes(), sndhwm=self.sndhwm)
        self.endpoint = router.endpoint

        async def loop() -> None:
            while True:
                peer, frame = await router.recv()
                if frame is not None and not await router.offer(peer, encode(self.answer(frame), self.identity)):
                    self.dropped += 1

        task = asyncio.create_task(loop())
        try:
            if on_ready is not None:
                on_ready(self.endpoint)
            await stop.wait()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            router.close()


class LayerServerThread(ServingThread):
    error = ContainerError
    what = "layer server"


class _PeerStream:
    """A file-like reader pulling a blob from a peer chunk by chunk (for ``LayerStore.put``)."""

    def __init__(self, sock: DealerClient, identity: NodeIdentity, digest: str, size: int, timeout_s: float) -> None:
        self.sock, self.identity, self.digest, self.size, self.timeout_s = sock, identity, digest, size, timeout_s
        self.offset = 0

    def read(self, n: int = -1) -> bytes:
        if self.offset >= self.size:
            return b""
        want = CHUNK if n is None or n < 0 else min(n, CHUNK)
        self.sock.send(encode(LayerRequest(self.digest, self.offset, want), self.identity))
        frame = self.sock.recv(self.timeout_s)
        if frame is None:
            raise ContainerError(f"peer {self.sock.endpoint} did not answer for {self.digest} within {self.timeout_s:g} s")
        try:
            reply = decode(frame, LayerData).msg
        except WireError as exc:
            raise ContainerError(f"peer {self.sock.endpoint} sent a bad frame: {exc}") from None
        if reply.error:
            raise ContainerError(f"peer {self.sock.endpoint}: {reply.error}")
        if reply.digest != self.digest or reply.offset != self.offset or reply.total != self.size:
            raise ContainerError(f"peer {self.sock.endpoint} answered for another blob, offset or size")
        if not reply.data:
            raise ContainerError(f"peer {self.sock.endpoint} sent an empty chunk before the end")
        self.offset += len(reply.data)
        return reply.data


def fetch_layer(endpoint: str, digest: str, size: int, store: LayerStore, timeout_s: float = 10.0) -> None:
    """Fetch blob ``digest`` of ``size`` bytes from the peer at ``endpoint`` into ``store``
    (verified as written); :class:`ContainerError` if anything is wrong."""
    check_digest(digest, "fetch")
    with DealerClient(endpoint) as sock:
        store.put(digest, _PeerStream(sock, NodeIdentity.generate(), digest, size, timeout_s), size)


def ask_holdings(endpoint: str, digests: list[str], timeout_s: float = 1.0) -> HoldingsReply | None:
    """What the layer server at ``endpoint`` holds of ``digests`` (and its job count), or
    None when it does not answer in time or answers junk."""
    with DealerClient(endpoint) as sock:
        sock.send(encode(HoldingsRequest(tuple(digests)), NodeIdentity.generate()))
        frame = sock.recv(timeout_s)
    if frame is None:
        return None
    try:
        reply = decode(frame, (HoldingsReply, LayerData)).msg
    except WireError as exc:
        log.info("bad holdings reply from %s: %s", endpoint, exc)
        return None
    if not isinstance(reply, HoldingsReply) or reply.error or not 0 <= reply.held <= len(digests) or reply.jobs < 0:
        return None
    return reply
