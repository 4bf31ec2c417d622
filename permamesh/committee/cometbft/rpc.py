"""CometRPC: CometBFT v0.38's JSON-RPC over HTTPS, from one thread, one kept-alive connection.

The endpoint is ``https://HOST:PORT?key=HEX``: TLS 1.3, and the node must hold the pinned
Ed25519 key (:mod:`.tls`; a mismatch is a :class:`~.tls.PinMismatch`, raised before any
request is sent). Plain ``http://HOST:PORT`` is accepted only for a loopback host (local
tooling); :mod:`permamesh.committee.endpoints` refuses the rest, saying what to write.

Requests are JSON-RPC 2.0 POSTs to the endpoint's root, encoded as CometBFT's ``libs/json``
expects them: 64-bit integers as decimal strings, ``tx`` and ``hash`` (``[]byte``) as
base64, and ``abci_query``'s ``data`` (``HexBytes``) as hex. Several calls can go in one
JSON-RPC batch (:meth:`CometRPC.batch`; a node accepts at most ``max_request_batch_size``
requests per batch, 10 by default, so we never send more).

Three outcomes besides a good answer, all in the :class:`CommitteeError` family:

- :class:`RPCUnreachable`: no answer (refused, reset, timed out); the caller may fail over;
- :class:`RPCError`: the node answered with a JSON-RPC error (``code``, ``message``, ``data``);
- :class:`~permamesh.committee.errors.ProtocolError`: the answer is malformed (not JSON, not
  JSON-RPC, fields missing or of the wrong type: :mod:`.answers`), or larger than
  :data:`MAX_ANSWER_BYTES`.

Who calls it: :class:`~permamesh.committee.cometbft.link.CometLink` (so the
:class:`~permamesh.committee.client.CommitteeClient`), :class:`.network.CometNet` (readiness).
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import logging
import ssl

from permamesh.committee.cometbft import answers as a
from permamesh.committee.cometbft.tls import PinnedHTTPSConnection
from permamesh.committee.endpoints import parse_endpoint
from permamesh.committee.errors import CommitteeError, ProtocolError

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 32 * 1024 * 1024  # a block is at most ~21 MiB in CometBFT's default params
MAX_BATCH = 10  # CometBFT's default rpc.max_request_batch_size


class RPCUnreachable(CommitteeError):
    """The node did not answer (connection refused or reset, or no answer in time)."""


class RPCError(CommitteeError):
    """The node answered with a JSON-RPC error object."""

    def __init__(self, method: str, code: int, message: str, data: str) -> None:
        super().__init__(f"{method}: {message} ({code}){': ' + data if data else ''}")
        self.code, self.message, self.data = code, message, data


def _error_of(method: str, error: object) -> RPCError:
    f = a.Fields(error, f"{method}.error")
    code = f.value.get("code")
    return RPCError(method, code if type(code) is int else 0, f.text("message", ""),
                    str(f.value.get("data") or "")[:500])


# a kept-alive connection the node closed while idle shows as one of these on the next request
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ssl.SSLEOFError,
          ssl.SSLZeroReturnError)


class CometRPC:
    """One CometBFT node's RPC at ``endpoint`` (``https://HOST:PORT?key=HEX``, or
    ``http://127.0.0.1:PORT`` on this machine)."""

    def __init__(self, endpoint: str, timeout_s: float = 10.0) -> None:
        ep = parse_endpoint(endpoint)
        if ep.scheme not in ("http", "https"):
            raise CommitteeError(f"not a CometBFT RPC endpoint (https://HOST:PORT?key=HEX): {endpoint!r}")
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self._host, self._port, self._pin, self._path = ep.host, ep.port, ep.key, "/"
        self._conn: http.client.HTTPConnection | None = None
        self._ids = itertools.count(1)

    # --------------------------------------------------------------------------- transport

    def _connection(self, timeout_s: float) -> tuple[http.client.HTTPConnection, bool]:
        reused = self._conn is not None
        if self._conn is None:
            if self._pin is not None:
                self._conn = PinnedHTTPSConnection(self._host, self._port, self._pin, timeout_s)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)
        self._conn.timeout = timeout_s
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout_s)
        return self._conn, reused

    def _post(self, body: bytes, timeout_s: float) -> tuple[int, bytes]:
        for attempt in (0, 1):
            conn, reused = self._connection(timeout_s)
            try:
                conn.request("POST", self._path, body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                length = resp.getheader("Content-Length")
                if length is not None and (not length.isdigit() or int(length) > MAX_ANSWER_BYTES):
                    raise ProtocolError(f"{self.endpoint}: answer of {length} bytes refused")
                data = resp.read(MAX_ANSWER_BYTES + 1)
                if len(data) > MAX_ANSWER_BYTES:
                    raise ProtocolError(f"{self.endpoint}: answer over {MAX_ANSWER_BYTES} bytes refused")
                if resp.will_close:
                    self.close()
                return resp.status, data
            except CommitteeError:  # a malformed answer, or the node holds another key (PinMismatch)
                self.close()
                raise
            except _STALE as exc:
                self.close()  # a kept-alive connection the node closed while idle: once more
                if reused and attempt == 0:
                    continue
                raise RPCUnreachable(f"{self.endpoint}: {exc.__class__.__name__}: {exc}") from None
            except ssl.SSLError as exc:  # mostly a failed handshake: no TLS there, or no TLS 1.3
                self.close()
                raise RPCUnreachable(f"{self.endpoint}: TLS failed ({exc.__class__.__name__}: {exc}); does "
                                     "the node's RPC serve TLS 1.3 ([rpc] tls_cert_file)?") from None
            except (OSError, http.client.HTTPException) as exc:  # refused, timeout, bad status line
                self.close()
                raise RPCUnreachable(f"{self.endpoint}: {exc.__class__.__name__}: {exc}") from None
        raise AssertionError("unreachable")

    def _decode(self, status: int, data: bytes, what: str) -> object:
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ProtocolError(f"{self.endpoint}: {what}: HTTP {status}, not JSON: "
                                f"{data[:80]!r}") from None

    @staticmethod
    def _result(method: str, answer: object, expected_id: int) -> object:
        """The result of one JSON-RPC response object, or RPCError; ProtocolError if malformed."""
        f = a.Fields(answer, method)
        if f.value.get("jsonrpc") != "2.0":
            raise ProtocolError(f"{method}: not a JSON-RPC 2.0 answer")
        if "error" in f.value and f.value["error"] is not None:
            return _error_of(method, f.value["error"])
        if f.value.get("id") != expected_id:
            raise ProtocolError(f"{method}: answer id {f.value.get('id')!r}, expected {expected_id}")
        if "result" not in f.value:
            raise ProtocolError(f"{method}: answer has neither result nor error")
        return f.value["result"]

    def call(self, method: str, params: dict | None = None, timeout_s: float | None = None) -> object:
        """The ``result`` of one call; RPCError, RPCUnreachable or ProtocolError otherwise."""
        ident = next(self._ids)
        body = json.dumps({"jsonrpc": "2.0", "id": ident, "method": method,
                           "params": params or {}}).encode()
        status, data = self._post(body, self.timeout_s if timeout_s is None else timeout_s)
        result = self._result(method, self._decode(status, data, method), ident)
        if isinstance(result, RPCError):
            raise result
        return result

    def batch(self, method: str, params: list[dict], timeout_s: float | None = None) -> list[object]:
        """Call ``method`` once per params in one JSON-RPC batch (at most :data:`MAX_BATCH`);
        each item is a result or an :class:`RPCError`, in the order of ``params``."""
        if not 0 < len(params) <= MAX_BATCH:
            raise CommitteeError(f"a batch holds 1..{MAX_BATCH} calls, not {len(params)}")
        ids = [next(self._ids) for _ in params]
        body = json.dumps([{"jsonrpc": "2.0", "id": i, "method": method, "params": p}
                           for i, p in zip(ids, params)]).encode()
        status, data = self._post(body, self.timeout_s if timeout_s is None else timeout_s)
        answer = self._decode(status, data, method)
        if isinstance(answer, dict) and len(ids) == 1:  # CometBFT answers a batch of one unwrapped
            answer = [answer]
        elif isinstance(answer, dict) and "error" in answer:  # the whole batch was refused
            raise self._result(method, answer, -1)
        if not isinstance(answer, list) or len(answer) != len(ids):
            raise ProtocolError(f"{self.endpoint}: {method} batch of {len(ids)}: answer is not a "
                                f"list of {len(ids)}")
        by_id = {item.get("id"): item for item in answer if isinstance(item, dict)}
        if sorted(by_id, key=str) != sorted(ids, key=str):
            raise ProtocolError(f"{self.endpoint}: {method} batch: answer ids do not match")
        return [self._result(method, by_id[i], i) for i in ids]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> CometRPC:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------- methods

    def status(self) -> a.NodeStatus:
        return a.parse_status(self.call("status"))

    def broadcast_tx_sync(self, tx: bytes) -> a.Broadcast:
        """CheckTx on this node; a refusal by the node (already in its cache, mempool full)
        is an :class:`RPCError`."""
        return a.parse_broadcast(self.call("broadcast_tx_sync", {"tx": _b64(tx)}))

    def broadcast_many(self, raw_txs: list[bytes]) -> list[a.Broadcast | RPCError]:
        """broadcast_tx_sync for each tx, :data:`MAX_BATCH` per HTTP request, in order."""
        out: list[a.Broadcast | RPCError] = []
        for start in range(0, len(raw_txs), MAX_BATCH):
            chunk = [{"tx": _b64(tx)} for tx in raw_txs[start:start + MAX_BATCH]]
            out += [r if isinstance(r, RPCError) else a.parse_broadcast(r)
                    for r in self.batch("broadcast_tx_sync", chunk)]
        return out

    def tx(self, tx_hash: bytes) -> a.CommittedTx | None:
        """The committed tx with this hash (from the kv indexer); None if not (yet) indexed."""
        try:
            return a.parse_tx(self.call("tx", {"hash": _b64(tx_hash), "prove": False}))
        except RPCError as exc:
            if "not found" in exc.data:
                return None
            raise

    def abci_info(self) -> a.AppInfo:
        return a.parse_app_info(self.call("abci_info"))

    def abci_query(self, path: str, data: bytes = b"", height: int = 0) -> a.QueryAnswer:
        return a.parse_query(self.call("abci_query", {"path": path, "data": data.hex().upper(),
                                                      "height": str(height), "prove": False}))

    def block(self, height: int) -> a.Block:
        return a.parse_block(self.call("block", {"height": str(height)}))

    def block_results(self, height: int) -> a.BlockResults:
        return a.parse_block_results(self.call("block_results", {"height": str(height)}))

    def headers(self, first: int, last: int) -> tuple[a.Header, ...]:
        """Headers of heights first..last (CometBFT returns at most 20 per call; we ask again)."""
        out: list[a.Header] = []
        while first <= last:
            got = a.parse_headers(self.call("blockchain", {"minHeight": str(first),
                                                           "maxHeight": str(last)}))
            got = tuple(h for h in got if first <= h.height <= last)
            if not got:
                break
            out += got
            # blockchain answers the newest 20 of the range: continue below what we got
            last = got[0].height - 1
        return tuple(sorted(out, key=lambda h: h.height))

    def num_unconfirmed_txs(self) -> int:
        return a.parse_num_unconfirmed(self.call("num_unconfirmed_txs"))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
