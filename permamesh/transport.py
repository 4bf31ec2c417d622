"""Small zmq wrappers that own their sockets: ROUTER servers and DEALER clients over TCP.

- :class:`RouterServer` (asyncio, :mod:`zmq.asyncio`): a worker (later relays, validators)
  binds one, receives ``(peer, frame)`` pairs and answers ``send(peer, frame)``. Only the
  event-loop thread that owns it may touch it.
- :class:`AsyncDealer` (asyncio): a worker's link to another member of its group.
- :class:`DealerClient` (blocking): a client connects one to a server, sends frames and waits
  for replies with a timeout. One per thread.

**Encrypted links (CurveZMQ).** A server given its transport key (``secret_key``: the 32 raw
bytes of :attr:`permamesh.identity.NodeIdentity.transport`) speaks only CurveZMQ, and
advertises an endpoint that names its public key: ``tcp://HOST:PORT?key=<64 hex>``. A client
given such an endpoint encrypts the link with a fresh ephemeral key and authenticates the server
by that key (a server holding another key never completes the handshake, so the client hears
nothing; a :class:`DealerClient` with ``watch_handshake`` hears that it failed). The endpoint
string travels wherever addresses travel today (registry records, the committee's
descriptors, READY lines), so whoever trusts the address trusts the key. Endpoints without a
key are plain TCP (tests; the committee client allows them to loopback only).

Every socket sets ``LINGER=0`` and ``MAXMSGSIZE`` (zmq drops larger frames before we see
them) and is recorded in :data:`OPEN_SOCKETS` until closed, so tests can fail on leaks.
Frames are opaque bytes here; :mod:`permamesh.wire` gives them meaning.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence

import zmq
import zmq.asyncio

from permamesh.errors import PermameshError
from permamesh.wire.codec import MAX_FRAME_BYTES

log = logging.getLogger(__name__)

OPEN_SOCKETS: "weakref.WeakSet[zmq.Socket]" = weakref.WeakSet()


class TransportError(PermameshError):
    """A socket could not be bound, connected, or used."""


_KEY_MARK = "?key="


def split_endpoint(endpoint: str) -> tuple[str, bytes | None]:
    """``tcp://HOST:PORT?key=<hex>`` -> (``tcp://HOST:PORT``, the server's 32-byte public key);
    an endpoint without a key gives None. A malformed key raises :class:`TransportError`."""
    if not isinstance(endpoint, str):
        raise TransportError(f"an endpoint is a string, not {type(endpoint).__name__}")
    address, mark, key = endpoint.partition(_KEY_MARK)
    if not mark:
        return endpoint, None
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise TransportError(f"endpoint {endpoint!r}: the key must be 64 lowercase hex characters")
    return address, bytes.fromhex(key)


def with_key(address: str, public_key: bytes | None) -> str:
    """The endpoint that names ``public_key`` as the server's transport key."""
    return address if public_key is None else f"{address}{_KEY_MARK}{public_key.hex()}"


def _public_of(secret_key: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import x25519

    if not isinstance(secret_key, bytes) or len(secret_key) != 32:
        raise TransportError("a transport secret key is 32 raw bytes")
    return x25519.X25519PrivateKey.from_private_bytes(secret_key).public_key().public_bytes_raw()


def _curve_client(sock: zmq.Socket, server_key: bytes) -> None:
    public, secret = zmq.curve_keypair()  # ephemeral: clients stay unlinkable across links
    sock.curve_serverkey = server_key
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def _connect(sock: zmq.Socket, endpoint: str) -> None:
    address, server_key = split_endpoint(endpoint)
    if server_key is not None:
        _curve_client(sock, server_key)
    sock.connect(address)


def _prepare(sock: zmq.Socket) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES + 1024)
    OPEN_SOCKETS.add(sock)
    return sock


def open_sockets() -> list[zmq.Socket]:
    """Sockets created through this module and not yet closed."""
    return [s for s in list(OPEN_SOCKETS) if not s.closed]


class RouterServer:
    """An asyncio ROUTER socket bound on TCP. ``recv`` yields ``(peer, frame)``; multipart
    messages with more than one body part yield ``frame=None`` so the caller can reject them."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, secret_key: bytes | None = None,
                 sndhwm: int | None = None) -> None:
        """``sndhwm``: frames queued per peer at most; :meth:`offer` then drops beyond it (set
        before binding: zmq copies it into each accepted connection)."""
        public = _public_of(secret_key) if secret_key is not None else None
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = _prepare(self._ctx.socket(zmq.ROUTER))
        if sndhwm is not None:
            if sndhwm < 1:
                self._sock.close(0)
                raise TransportError("sndhwm must be >= 1")
            self._sock.setsockopt(zmq.SNDHWM, sndhwm)
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full queue raises instead of dropping silently
        if secret_key is not None:
            self._sock.curve_server = True
            self._sock.curve_secretkey = secret_key
        try:
            if port:
                self._sock.bind(f"tcp://{host}:{port}")
            else:
                self._sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as exc:
            self._sock.close(0)
            raise TransportError(f"cannot bind tcp://{host}:{port}: {exc}") from None
        self.public_key = public  # None: plain TCP
        self.endpoint: str = with_key(self._sock.getsockopt_string(zmq.LAST_ENDPOINT), public)

    async def recv(self) -> tuple[bytes, bytes | None]:
        parts = await self._sock.recv_multipart(copy=True)
        peer = parts[0]
        if len(parts) != 2:
            return peer, None
        return peer, parts[1]

    async def send(self, peer: bytes, frame: bytes) -> None:
        try:
            await self._sock.send_multipart([peer, frame])
        except zmq.ZMQError as exc:  # peer gone, or socket closing: log, never crash the server
            log.debug("send to %s failed: %s", peer.hex(), exc)

    async def offer(self, peer: bytes, frame: bytes) -> bool:
        """Queue ``frame`` for ``peer`` if its queue has room; False when dropped (full, or gone)."""
        try:
            await self._sock.send_multipart([peer, frame], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("dropped a frame to %s: %s", peer.hex()[:16], exc)
            return False
        return True

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(0)


class AsyncDealer:
    """An asyncio DEALER socket connected to one endpoint (worker-to-worker links). Only the
    event-loop thread that created it may use it."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._sock = _prepare(zmq.asyncio.Context.instance().socket(zmq.DEALER))
        self._sock.setsockopt(zmq.SNDHWM, 10_000)
        try:
            _connect(self._sock, endpoint)
        except (zmq.ZMQError, TransportError) as exc:
            self._sock.close(0)
            raise TransportError(f"cannot connect to {endpoint}: {exc}") from None

    async def send(self, frame: bytes) -> None:
        try:
            await self._sock.send(frame, flags=zmq.NOBLOCK)
        except zmq.Again:  # the peer is not keeping up (or gone): drop, like a lost packet
            log.debug("dropping a frame to %s: send queue full", self.endpoint)
        except zmq.ZMQError as exc:
            log.debug("send to %s failed: %s", self.endpoint, exc)

    async def recv(self) -> bytes:
        return await self._sock.recv()

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(0)


class HandshakeFailed(TransportError):
    """The server took the TCP connection but the ZMTP handshake failed: it holds another
    transport key than the endpoint names, or speaks CurveZMQ to a plain client (or the
    reverse)."""


WATCHED_SEND_S = 5.0  # a handshake-watching client's send gives up after this long (module doc)
_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class DealerClient:
    """A blocking DEALER socket connected to one endpoint.

    ``watch_handshake``: follow the socket's handshake events, so that :meth:`recv` raises
    :class:`HandshakeFailed` as soon as the server refuses the handshake instead of waiting
    out the timeout (a server holding another key never answers, so this is the only sign)."""

    def __init__(self, endpoint: str, watch_handshake: bool = False) -> None:
        self.endpoint = endpoint
        self._ctx = zmq.Context.instance()
        self._sock = _prepare(self._ctx.socket(zmq.DEALER))
        self._monitor: zmq.Socket | None = None
        self._handshake: bool | None = None  # the last handshake's outcome; None before the first
        try:
            if watch_handshake:
                self._monitor = self._sock.get_monitor_socket(_HANDSHAKE_EVENTS)
                self._sock.setsockopt(zmq.SNDTIMEO, int(WATCHED_SEND_S * 1000))
            _connect(self._sock, endpoint)
        except (zmq.ZMQError, TransportError) as exc:
            self._close_monitor()
            self._sock.close(0)
            raise TransportError(f"cannot connect to {endpoint}: {exc}") from None
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        if self._monitor is not None:
            self._poller.register(self._monitor, zmq.POLLIN)

    def send(self, frame: bytes) -> None:
        """Queue ``frame``. With ``watch_handshake`` a send that no connection takes within
        ``WATCHED_SEND_S`` (the server refused the handshake, so zmq holds no pipe to queue on)
        raises :class:`HandshakeFailed` or :class:`TransportError` instead of blocking for good."""
        try:
            self._sock.send(frame)
        except zmq.Again:
            if self._monitor is not None:
                self._read_events()
            if self._handshake is False:
                raise HandshakeFailed(f"{self.endpoint}: the server refused the handshake") from None
            raise TransportError(f"{self.endpoint}: no connection took the frame within {WATCHED_SEND_S:g} s") from None

    def send_parts(self, parts: list[bytes]) -> None:
        """Send raw multipart frames (tests use it to play a misbehaving peer)."""
        self._sock.send_multipart(parts)

    def recv(self, timeout_s: float) -> bytes | None:
        """The next frame, or None when nothing arrived within ``timeout_s`` seconds; with
        ``watch_handshake``, :class:`HandshakeFailed` once the last handshake failed."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = dict(self._poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
            if self._sock in ready:
                return self._sock.recv()
            if self._monitor is not None and self._monitor in ready:
                self._read_events()
            if self._handshake is False:
                raise HandshakeFailed(f"{self.endpoint}: the server refused the handshake")
            if not ready or time.monotonic() >= deadline:
                return None

    def _read_events(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            self._handshake = event == zmq.EVENT_HANDSHAKE_SUCCEEDED

    def _close_monitor(self) -> None:
        if self._monitor is not None and not self._monitor.closed:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(0)

    def close(self) -> None:
        if not self._sock.closed:
            self._poller.unregister(self._sock)
            if self._monitor is not None:
                self._poller.unregister(self._monitor)
                self._close_monitor()
            self._sock.close(0)

    def __enter__(self) -> DealerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def poll_readable(clients: Sequence[DealerClient], timeout_s: float) -> list[DealerClient]:
    """The clients with a frame waiting, after waiting up to ``timeout_s`` for any of them."""
    poller = zmq.Poller()
    for client in clients:
        poller.register(client._sock, zmq.POLLIN)
    ready = dict(poller.poll(max(0, int(timeout_s * 1000))))
    return [c for c in clients if c._sock in ready]


class ServingThread:
    """Run a server's ``async serve(stop, on_ready)`` on its own event loop in a background
    thread (tests and embedding); :meth:`start` returns its ``endpoint`` once it is serving.
    Subclasses name the error they raise (``error``)."""

    error: type[Exception] = TransportError
    what = "server"

    def __init__(self, server, name: str = "serving") -> None:
        import threading

        self.server = server
        self._ready = threading.Event()
        self._loop = None
        self._stop = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self, timeout_s: float = 30.0) -> str:
        self._thread.start()
        if not self._ready.wait(timeout_s) or self.server.endpoint is None:
            raise self.error(f"{self.what} did not start: {self._error!r}")
        return self.server.endpoint

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        import asyncio

        async def run() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await self.server.serve(self._stop, on_ready=lambda _: self._ready.set())

        try:
            asyncio.run(run())
        except BaseException as exc:  # surfaced through start()
            self._error = exc
            self._ready.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise self.error(f"{self.what} did not stop in time")

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_until_signalled(server, node_id: str, register, unregister) -> None:
    """Run ``server.serve`` in this process until SIGINT or SIGTERM (process entry points).

    Once the server listens: ``register(endpoint)`` on a thread of its own (it announces the
    node to the committee and may wait on it: the server keeps answering meanwhile, members'
    probes included), then the line ``READY <endpoint> <node_id>`` on stdout, which the
    embedded mesh waits for. A ``register`` that raises stops the server, and its exception is
    raised here. On the way out, whatever happened: ``unregister()``.
    """
    import asyncio
    import signal

    failed: list[BaseException] = []

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        publishing: list[asyncio.Task] = []

        async def publish(endpoint: str) -> None:
            try:
                await asyncio.to_thread(register, endpoint)
            except Exception as exc:  # noqa: BLE001 - raised again below, once the server stopped
                failed.append(exc)
                stop.set()
                return
            print(f"READY {endpoint} {node_id}", flush=True)

        def ready(endpoint: str) -> None:
            publishing.append(loop.create_task(publish(endpoint)))

        try:
            await server.serve(stop, on_ready=ready)
        finally:
            for task in publishing:
                task.cancel()  # the thread itself finishes its call; its outcome is dropped
            unregister()

    asyncio.run(main())
    if failed:
        raise failed[0]
