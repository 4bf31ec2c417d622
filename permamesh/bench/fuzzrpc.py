"""Attacks on CometBFT's RPC port (``https://H:P?key=HEX``, TLS pinned to the member key):
garbage and broken TLS handshakes, plain HTTP (a 400 and no ledger data), junk JSON-RPC over a
real TLS session (unknown and ``unsafe_*`` methods, absurd heights, deep nesting, oversized
batches, junk transactions that CheckTx must refuse), and floods of held connections and
concurrent clients. Each attack is ``(port, rng) -> (requests sent, what it found)``.

Who calls it: ``tests/test_fuzz_comet.py`` through :data:`permamesh.bench.fuzzcomet.COMET_ATTACKS`
(its ``rpc`` entry).
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from permamesh.bench.fuzz import FLOOD, FuzzViolation, Port
from permamesh.committee.cometbft.rpc import CometRPC
from permamesh.committee.errors import CommitteeError

log = logging.getLogger(__name__)

RPC_THREADS = 16  # concurrent clients of an RPC flood


def hostport(endpoint: str) -> tuple[str, int]:
    url = urlsplit(endpoint)
    return url.hostname, url.port


def raw_exchange(host: str, port: int, data: bytes, wait_s: float = 0.5) -> bytes:
    """Send ``data`` on a fresh TCP connection; the first answer bytes (b"" if none)."""
    with socket.create_connection((host, port), timeout=wait_s) as sock:
        try:
            sock.sendall(data)
            return sock.recv(4096)
        except (TimeoutError, ConnectionError):
            return b""


def _unpinned() -> ssl.SSLContext:
    """An attacker's TLS: no verification at all (it only wants to reach the parser)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def attack_rpc_garbage_tls(port: Port, rng: random.Random) -> tuple[int, str]:
    host, tcp_port = hostport(port.endpoint)
    payloads = [rng.randbytes(rng.choice((1, 5, 300, 16384))) for _ in range(20)]
    payloads += [b"\x16\x03\x01" + rng.randbytes(2) + rng.randbytes(64) for _ in range(10)]  # lying record lengths
    payloads += [b"\x16\x03\x01\x00\x40\x01\xff\xff\xff" + rng.randbytes(60) for _ in range(5)]  # a huge ClientHello
    answers = collections.Counter("alert" if got[:1] == b"\x15" else "data" if got else "closed"
                                  for got in (raw_exchange(host, tcp_port, p) for p in payloads))
    return len(payloads), " ".join(f"{k}={v}" for k, v in sorted(answers.items()))


def attack_rpc_plain_http(port: Port, rng: random.Random) -> tuple[int, str]:
    host, tcp_port = hostport(port.endpoint)
    statuses = collections.Counter()
    for path in ("/status", "/abci_info", "/block?height=1", "/"):
        got = raw_exchange(host, tcp_port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 2.0)
        if b"app_hash" in got or b"latest_block" in got or b"last_block" in got:
            raise FuzzViolation(f"plain HTTP {path} got ledger data over a TLS port: {got[:80]!r}")
        statuses[got.split(b" ", 2)[1].decode(errors="replace") if got.startswith(b"HTTP/") else "none"] += 1
    return 4, "plain HTTP: " + " ".join(f"{k}={v}" for k, v in sorted(statuses.items()))


def _junk_bodies(rng: random.Random) -> list[bytes]:
    def call(method: str, params: object) -> bytes:
        return json.dumps({"jsonrpc": "2.0", "id": rng.randrange(1 << 30), "method": method,
                           "params": params}).encode()

    return [
        b"{", b"\xff\xfe", b"null", b"[]", b"[" * 50_000 + b"]" * 50_000, b'{"a":' * 10_000,
        call("no_such_method", {}), call("unsafe_flush_mempool", {}),
        call("dial_seeds", {"seeds": ["x@1.2.3.4:1"]}), call("dial_peers", {"peers": ["x@1.2.3.4:1"]}),
        call("block", {"height": str(2**63 - 1)}), call("block", {"height": "-1"}),
        call("block", {"height": "18446744073709551615"}), call("block", {"height": {"x": 1}}),
        call("blockchain", {"minHeight": "0", "maxHeight": str(2**63 - 1)}),
        call("validators", {"height": "1", "page": "-5", "per_page": "100000"}),
        call("abci_query", {"path": "x" * 20_000, "data": "zz", "height": "-3"}),
        call("tx_search", {"query": "tx.height >" * 2000}),
        call("broadcast_tx_sync", {"tx": "not base64!"}),
        b"[" + b",".join([call("status", {})] * 200) + b"]",  # a batch far over max_request_batch_size
    ]


def _post(conn: http.client.HTTPSConnection, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def attack_rpc_junk_jsonrpc(port: Port, rng: random.Random) -> tuple[int, str]:
    host, tcp_port = hostport(port.endpoint)
    statuses, accepted = collections.Counter(), 0
    bodies = _junk_bodies(rng)
    junk_txs = [rng.randbytes(rng.choice((1, 32, 512, 4096))) for _ in range(20)]
    conn = http.client.HTTPSConnection(host, tcp_port, timeout=10.0, context=_unpinned())
    try:
        for body in bodies:
            try:
                status, data = _post(conn, body)
            except (OSError, http.client.HTTPException):
                conn.close()
                statuses["closed"] += 1
                continue
            statuses[status] += 1
            if b"unsafe" in body[:200] or b"dial_" in body[:200]:
                if b'"result"' in data:
                    raise FuzzViolation(f"an unsafe RPC route answered: {data[:120]!r}")
    finally:
        conn.close()
    with CometRPC(port.endpoint, timeout_s=5.0) as rpc:
        for tx in junk_txs:  # CheckTx must refuse every junk transaction
            try:
                accepted += rpc.broadcast_tx_sync(tx).code == 0
            except CommitteeError:
                pass
    if accepted:
        raise FuzzViolation(f"CheckTx accepted {accepted} of {len(junk_txs)} junk transactions")
    found = " ".join(f"{k}={v}" for k, v in sorted(statuses.items(), key=str))
    return len(bodies) + len(junk_txs), f"HTTP {found}; junk txs refused {len(junk_txs)}/{len(junk_txs)}"


def attack_rpc_flood(port: Port, rng: random.Random) -> tuple[int, str]:
    """FLOOD held TLS connections, and RPC_THREADS clients asking /status as fast as they can."""
    host, tcp_port = hostport(port.endpoint)
    held, answered = [], collections.Counter()
    stop, lock = threading.Event(), threading.Lock()

    def ask() -> None:
        with CometRPC(port.endpoint, timeout_s=5.0) as rpc:
            while not stop.is_set():
                try:
                    rpc.status()
                    outcome = "ok"
                except CommitteeError:
                    outcome = "failed"
                with lock:
                    answered[outcome] += 1

    threads = [threading.Thread(target=ask, daemon=True) for _ in range(RPC_THREADS)]
    try:
        for _ in range(FLOOD):
            try:
                held.append(socket.create_connection((host, tcp_port), timeout=2.0))
            except OSError:
                break
        for t in threads:
            t.start()
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(10.0)
        for sock in held:
            sock.close()
    return len(held) + sum(answered.values()), (f"{len(held)} held, /status ok={answered['ok']} "
                                                f"failed={answered['failed']} in 2 s")


RPC_ATTACKS: dict[str, Callable[[Port, random.Random], tuple[int, str]]] = {
    "garbage_tls": attack_rpc_garbage_tls, "plain_http": attack_rpc_plain_http,
    "junk_jsonrpc": attack_rpc_junk_jsonrpc, "flood": attack_rpc_flood,
}
