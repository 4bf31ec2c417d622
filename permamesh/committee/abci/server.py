"""The ABCI socket server that CometBFT v0.38 connects to (``proxy_app = tcp://...``).

Who calls what: the validator process builds an ``ABCIServer(app, address)`` and calls
:meth:`ABCIServer.serve_forever` (tests use :class:`ABCIServerThread`); CometBFT then
opens four connections (consensus, mempool, query, snapshot) and sends length-prefixed
``Request`` frames (``framing.py``). Each connection is read and answered strictly in
order; every app call, from any connection, goes through one lock and one worker thread
(``application.dispatch``), so the app never runs two calls at once. ``flush`` is
answered by the server itself. A malformed frame or an undecodable protobuf closes that
one connection with a log line; the server and the other connections carry on.

Who may connect: the ABCI socket drives consensus (a bare ``Commit`` commits), so it is
meant for the local CometBFT only. A ``tcp://`` address must be loopback unless
``ServerConfig.allow_remote`` (``permamesh validator --abci-allow-remote``) says otherwise;
``unix://`` sockets are fine. At most ``max_connections`` (CometBFT's four) are served at
once: a fifth is closed at once and logged. A ``Commit`` is passed to the app only on the
connection where a ``FinalizeBlock`` succeeded since the last ``Commit``; any other is
answered with a ``ResponseException`` and changes nothing.

Memory: a frame is buffered only as its bytes arrive (``FrameDecoder``), so a peer that
announces a huge frame and trickles costs what it sent, at most one frame per connection.

The frame limit: ``ServerConfig.max_message_bytes`` when set (``permamesh validator
--max-frame-bytes``); otherwise whatever the app says it needs
(:meth:`Application.max_request_bytes`, which the ledger derives from the chain's block
size), asked afresh at every frame, so it rises on already-open connections once
InitChain told the app the block size; otherwise 64 MiB.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.application import Application, dispatch, exception_response
from permamesh.committee.abci.framing import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_FRAME_BYTES,
    FrameDecoder,
    encode_message,
)
from permamesh.committee.errors import ProtocolError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Address:
    """A parsed ``tcp://HOST:PORT`` or ``unix:///path`` listen address."""

    scheme: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0  # 0 = let the OS pick a free port
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_address(address: str) -> Address:
    """Parse a CometBFT-style listen address; raise ValueError saying what is wrong."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        raise ValueError(
            f"ABCI address {address!r} has no scheme; use tcp://HOST:PORT or unix:///path"
        )
    if scheme == "unix":
        if not rest.startswith("/"):
            raise ValueError(f"ABCI address {address!r}: unix socket path must be absolute")
        return Address("unix", path=rest)
    if scheme != "tcp":
        raise ValueError(f"ABCI address {address!r}: scheme {scheme!r} not supported (tcp or unix)")
    host, colon, port_text = rest.rpartition(":")
    if not colon or not port_text.isdigit() or not host:
        raise ValueError(f"ABCI address {address!r}: expected tcp://HOST:PORT")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"ABCI address {address!r}: port out of range")
    return Address("tcp", host=host.strip("[]"), port=port)


def is_loopback(address: Address) -> bool:
    """True for a unix socket or a tcp address on the loopback interface."""
    if address.scheme == "unix":
        return True
    if address.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere
        return False


@dataclass(frozen=True)
class ServerConfig:
    # bytes per incoming Request frame; None = as the app asks (max_request_bytes), else 64 MiB
    max_message_bytes: int | None = None
    read_chunk_bytes: int = 64 * 1024  # bytes per socket read
    max_connections: int = 4  # what CometBFT opens: consensus, mempool, query, snapshot
    allow_remote: bool = False  # True: a non-loopback tcp address may be served

    def __post_init__(self) -> None:
        if self.max_message_bytes is not None and not 1 <= self.max_message_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"max_message_bytes must be in 1..{MAX_FRAME_BYTES}")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")


class ABCIServer:
    """Serve one :class:`Application` on one address to any number of connections."""

    def __init__(
        self,
        app: Application,
        address: str,
        config: ServerConfig | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self.app = app
        self.address = parse_address(address)
        self.config = config or ServerConfig()
        if not self.config.allow_remote and not is_loopback(self.address):
            raise ValueError(
                f"ABCI address {address!r} is not loopback: anyone who can connect could drive "
                "consensus. Use tcp://127.0.0.1:PORT or unix:///path, or allow it explicitly "
                "(--abci-allow-remote) behind a firewall that admits only CometBFT")
        self.lock = lock or threading.Lock()  # shared with a LocalClient if one exists
        self._bound: Address | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_requested = threading.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused = 0  # connections closed because max_connections were open
        self._executor: ThreadPoolExecutor | None = None
        self.started = threading.Event()  # set once listening (or once startup failed)
        self.startup_error: BaseException | None = None  # why listening failed, if it did

    @property
    def max_message_bytes(self) -> int:
        """The frame limit now: the configured one, else the app's, else 64 MiB."""
        if self.config.max_message_bytes is not None:
            return self.config.max_message_bytes
        wanted = self.app.max_request_bytes()
        return DEFAULT_MAX_MESSAGE_BYTES if wanted is None else min(wanted, MAX_FRAME_BYTES)

    @property
    def bound_address(self) -> str:
        """The address actually listened on (the real port when 0 was asked for)."""
        if self._bound is None:
            raise RuntimeError("ABCI server is not listening yet")
        return str(self._bound)

    def serve_forever(self) -> None:
        """Block, serving until :meth:`stop` is called (from any thread)."""
        asyncio.run(self.serve())

    def stop(self) -> None:
        """Ask the server to stop; safe from any thread, before or after it started."""
        self._stop_requested.set()
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # loop closed in between: already stopped
                pass

    async def serve(self) -> None:
        """The server as a coroutine, for callers that already run an event loop."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="abci-app")
        try:
            server = await self._listen()
        except BaseException as exc:
            self._executor.shutdown(wait=True)
            self.startup_error = exc
            self.started.set()
            raise
        log.info("ABCI server listening on %s", self.bound_address)
        self.started.set()
        try:
            if not self._stop_requested.is_set():
                await self._stop.wait()
        finally:
            server.close()
            for writer in list(self._writers):
                writer.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()
            self._executor.shutdown(wait=True)
            if self.address.scheme == "unix":
                _remove_socket_file(self.address.path)
            log.info("ABCI server on %s stopped", self.bound_address)

    async def _listen(self) -> asyncio.Server:
        addr = self.address
        if addr.scheme == "unix":
            _remove_socket_file(addr.path)  # a stale socket from a crashed run
            server = await asyncio.start_unix_server(self._on_connection, path=addr.path)
            self._bound = addr
        else:
            server = await asyncio.start_server(self._on_connection, addr.host, addr.port)
            port = server.sockets[0].getsockname()[1]
            self._bound = Address("tcp", host=addr.host, port=port)
        return server

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername") or "unix peer"
        if len(self._tasks) >= self.config.max_connections:
            self.refused += 1
            log.warning("refused ABCI connection from %s: %d connections already open (CometBFT "
                        "opens %d)", peer, len(self._tasks), self.config.max_connections)
            writer.close()
            return
        self._tasks.add(task)
        self._writers.add(writer)
        log.debug("ABCI connection from %s", peer)
        try:
            await self._serve_connection(reader, writer, peer)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("ABCI connection from %s lost: %s", peer, exc)
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> None:
        decoder = FrameDecoder(limit=lambda: self.max_message_bytes)
        loop = asyncio.get_running_loop()
        finalized = False  # a FinalizeBlock succeeded on this connection, not yet committed
        while True:
            data = await reader.read(self.config.read_chunk_bytes)
            if not data:
                if not decoder.at_boundary:
                    log.warning("ABCI peer %s closed mid-frame (%d bytes)", peer, decoder.buffered)
                return
            try:
                bodies = decoder.feed(data)
                requests = [_parse_request(body) for body in bodies]
            except ProtocolError as exc:
                log.warning("closing ABCI connection from %s: %s", peer, exc)
                return
            for request in requests:
                which = request.WhichOneof("value")
                if which == "flush":
                    response = pb.Response(flush=pb.ResponseFlush())
                elif which == "commit" and not finalized:
                    log.warning("ABCI Commit from %s without a FinalizeBlock on that connection; "
                                "refused", peer)
                    response = exception_response("Commit without a preceding FinalizeBlock")
                else:
                    response = await loop.run_in_executor(self._executor, self._call, request)
                    if which in ("finalize_block", "commit"):
                        finalized = which == "finalize_block" and response.WhichOneof("value") == which
                writer.write(encode_message(response))
                if which == "flush":
                    await writer.drain()
            await writer.drain()

    def _call(self, request: pb.Request) -> pb.Response:
        with self.lock:
            return dispatch(self.app, request)


def _parse_request(body: bytes) -> pb.Request:
    try:
        return pb.Request.FromString(body)
    except DecodeError as exc:
        raise ProtocolError(f"undecodable ABCI Request ({len(body)} bytes): {exc}") from exc


def _remove_socket_file(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


class ABCIServerThread:
    """Run an :class:`ABCIServer` on a background thread (tests, the local devnet)."""

    def __init__(
        self, app: Application, address: str = "tcp://127.0.0.1:0", **kwargs: Any
    ) -> None:
        self.server = ABCIServer(app, address, **kwargs)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def bound_address(self) -> str:
        return self.server.bound_address

    def start(self, timeout_s: float = 10.0) -> str:
        """Start serving; return the address actually bound. Raises if binding failed."""
        self._thread = threading.Thread(target=self._run, name="abci-server", daemon=True)
        self._thread.start()
        if not self.server.started.wait(timeout_s):
            self.stop()
            raise TimeoutError(f"ABCI server did not start within {timeout_s} s")
        error = self.server.startup_error or self._error
        if error is not None:
            self._thread.join(timeout_s)
            self._thread = None
            raise error
        return self.server.bound_address

    def _run(self) -> None:
        try:
            self.server.serve_forever()
        except BaseException as exc:  # reported to start() (bind errors) and logged
            self._error = exc
            if self.server.startup_error is None:
                log.exception("ABCI server thread failed")
            self.server.started.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server and join its thread; raise if it does not finish in time."""
        self.server.stop()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"ABCI server thread still running after {timeout_s} s")
            self._thread = None

    def __enter__(self) -> ABCIServerThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
