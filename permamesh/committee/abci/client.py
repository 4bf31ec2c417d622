"""ABCI clients: the consensus side's view of an application.

Who calls what: the embedded devnet engine drives the committee app in-process through
:class:`LocalClient`; tests (and tools that want to poke a running validator's app) use
:class:`SocketClient`, which speaks to an ``ABCIServer`` exactly as CometBFT v0.38's
socket client does: write a length-prefixed ``Request``, then (for a synchronous call) a
``Request{flush}``, then read the call's ``Response`` followed by ``Response{flush}``.

Both clients have one method per ABCI call, named as in ``Application``, taking the
``Request*`` message (empty when omitted) and returning the ``Response*`` message. A
``Response{exception}`` or a response of the wrong kind raises ``ProtocolError``.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from typing import Any

from google.protobuf.message import DecodeError, Message

from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.application import Application, dispatch
from permamesh.committee.abci.framing import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FrameDecoder,
    FramingConfig,
    encode_message,
)
from permamesh.committee.abci.server import parse_address
from permamesh.committee.errors import ProtocolError

log = logging.getLogger(__name__)


class _Calls:
    """The sixteen ABCI calls, written once on top of :meth:`_roundtrip`."""

    def _roundtrip(self, request: pb.Request) -> pb.Response:
        raise NotImplementedError

    def call(self, request: pb.Request) -> pb.Response:
        """Send any Request; return its Response, raising on exception or mismatch."""
        which = request.WhichOneof("value")
        response = self._roundtrip(request)
        got = response.WhichOneof("value")
        if got == "exception":
            raise ProtocolError(f"ABCI {which} failed in the app: {response.exception.error}")
        if got != which:
            raise ProtocolError(f"ABCI {which} answered with a {got} response")
        return response

    def _one(self, name: str, req: Message | None) -> Any:
        request = pb.Request()
        field = getattr(request, name)
        if req is None:
            field.SetInParent()  # an empty Request* message, still selecting the call
        else:
            field.CopyFrom(req)
        return getattr(self.call(request), name)

    def echo(self, req: pb.RequestEcho | None = None) -> pb.ResponseEcho:
        return self._one("echo", req)

    def flush(self, req: pb.RequestFlush | None = None) -> pb.ResponseFlush:
        return self._one("flush", req)

    def info(self, req: pb.RequestInfo | None = None) -> pb.ResponseInfo:
        return self._one("info", req)

    def init_chain(self, req: pb.RequestInitChain | None = None) -> pb.ResponseInitChain:
        return self._one("init_chain", req)

    def query(self, req: pb.RequestQuery | None = None) -> pb.ResponseQuery:
        return self._one("query", req)

    def check_tx(self, req: pb.RequestCheckTx | None = None) -> pb.ResponseCheckTx:
        return self._one("check_tx", req)

    def commit(self, req: pb.RequestCommit | None = None) -> pb.ResponseCommit:
        return self._one("commit", req)

    def list_snapshots(
        self, req: pb.RequestListSnapshots | None = None
    ) -> pb.ResponseListSnapshots:
        return self._one("list_snapshots", req)

    def offer_snapshot(
        self, req: pb.RequestOfferSnapshot | None = None
    ) -> pb.ResponseOfferSnapshot:
        return self._one("offer_snapshot", req)

    def load_snapshot_chunk(
        self, req: pb.RequestLoadSnapshotChunk | None = None
    ) -> pb.ResponseLoadSnapshotChunk:
        return self._one("load_snapshot_chunk", req)

    def apply_snapshot_chunk(
        self, req: pb.RequestApplySnapshotChunk | None = None
    ) -> pb.ResponseApplySnapshotChunk:
        return self._one("apply_snapshot_chunk", req)

    def prepare_proposal(
        self, req: pb.RequestPrepareProposal | None = None
    ) -> pb.ResponsePrepareProposal:
        return self._one("prepare_proposal", req)

    def process_proposal(
        self, req: pb.RequestProcessProposal | None = None
    ) -> pb.ResponseProcessProposal:
        return self._one("process_proposal", req)

    def extend_vote(self, req: pb.RequestExtendVote | None = None) -> pb.ResponseExtendVote:
        return self._one("extend_vote", req)

    def verify_vote_extension(
        self, req: pb.RequestVerifyVoteExtension | None = None
    ) -> pb.ResponseVerifyVoteExtension:
        return self._one("verify_vote_extension", req)

    def finalize_block(
        self, req: pb.RequestFinalizeBlock | None = None
    ) -> pb.ResponseFinalizeBlock:
        return self._one("finalize_block", req)


class LocalClient(_Calls):
    """Call an in-process app through :func:`dispatch`, one call at a time under ``lock``.

    Pass the server's lock (``ABCIServer.lock``) when the same app is also served on a
    socket, so the two never interleave.
    """

    def __init__(self, app: Application, lock: threading.Lock | None = None) -> None:
        self.app = app
        self.lock = lock or threading.Lock()

    def _roundtrip(self, request: pb.Request) -> pb.Response:
        with self.lock:
            return dispatch(self.app, request)


class SocketClient(_Calls):
    """A blocking ABCI socket client; one connection, not shared between threads."""

    def __init__(
        self,
        address: str,
        timeout_s: float = 10.0,
        flush: bool = True,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        addr = parse_address(address)
        if addr.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            try:
                sock.connect(addr.path)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection((addr.host, addr.port), timeout=timeout_s)
        self._sock = sock
        self.flush_after_each = flush  # CometBFT flushes after every synchronous call
        self._decoder = FrameDecoder(FramingConfig(max_message_bytes))
        self._ready: deque[pb.Response] = deque()

    def send(self, request: pb.Request) -> None:
        """Write one Request frame without waiting (pipelining, as CometBFT's mempool does)."""
        self._sock.sendall(encode_message(request))

    def send_raw(self, data: bytes) -> None:
        """Write raw bytes (tests use it to send garbage)."""
        self._sock.sendall(data)

    def receive(self) -> pb.Response:
        """Read the next Response frame, blocking up to the socket timeout."""
        while not self._ready:
            data = self._sock.recv(64 * 1024)
            if not data:
                raise ConnectionError("ABCI server closed the connection")
            for body in self._decoder.feed(data):
                try:
                    self._ready.append(pb.Response.FromString(body))
                except DecodeError as exc:
                    raise ProtocolError(f"undecodable ABCI Response: {exc}") from exc
        return self._ready.popleft()

    def _roundtrip(self, request: pb.Request) -> pb.Response:
        which = request.WhichOneof("value")
        frame = encode_message(request)
        extra_flush = self.flush_after_each and which != "flush"
        if extra_flush:
            frame += encode_message(pb.Request(flush=pb.RequestFlush()))
        self._sock.sendall(frame)
        response = self.receive()
        if extra_flush:
            flushed = self.receive()
            if flushed.WhichOneof("value") != "flush":
                raise ProtocolError(f"expected a flush response, got {flushed.WhichOneof('value')}")
        return response

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SocketClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
