"""Attacks on HTTP ports (the gateway, every ``/metrics``): garbage, bad JSON, huge headers,
concurrent and half-open connections, stalled connections held during a real request.

Each attack is ``(port, rng) -> requests sent`` and raises
:class:`~permamesh.bench.fuzz.FuzzViolation` on a 5xx or a port that stops answering.
Who calls it: ``tests/test_fuzz_ports.py`` through :data:`HTTP_ATTACKS`.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit


from permamesh.bench.fuzz import HALF_OPEN, HTTP_CONCURRENT, FuzzViolation, Port

log = logging.getLogger(__name__)


def _addr(port: Port) -> tuple[str, int, str]:
    url = urlsplit(port.endpoint)
    return url.hostname, url.port, url.path or "/"


def http_get(url: str, timeout_s: float = 5.0) -> int:
    """The status of a GET of ``url`` (0 when it failed)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request("GET", parts.path or "/")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


def _raw_exchange(host: str, port: int, data: bytes, timeout_s: float = 2.0) -> bytes:
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        try:
            sock.sendall(data)
            return sock.recv(4096)
        except (TimeoutError, ConnectionError):
            return b""


def attack_http_garbage(port: Port, rng: random.Random) -> int:
    host, tcp_port, path = _addr(port)
    for _ in range(20):
        _raw_exchange(host, tcp_port, rng.randbytes(rng.choice((1, 100, 4096, 65536))), 0.3)
    for _ in range(20):  # a plausible request line, then a garbage body of a lying length
        body = rng.randbytes(rng.randint(0, 2048))
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body) + rng.choice((0, 7, -1))}\r\n\r\n"
        answer = _raw_exchange(host, tcp_port, head.encode() + body, 0.3)
        if answer.startswith(b"HTTP/1.1 5"):
            raise FuzzViolation(f"a garbage body got {answer[:12]!r}")
    return 40


def bad_json_bodies() -> list[tuple[dict[str, str], bytes]]:
    """(headers, body) pairs that are not what they claim to be."""
    json_h = {"Content-Type": "application/json"}
    return [
        (json_h, b"{"), (json_h, b"\xff\xfe\x00"), (json_h, b'{"messages": "\\ud800"}'),
        (json_h, b'{"messages": [{"role": "user", "content": "\\udfff"}], "model": "x"}'),
        (json_h, b"[" * 100_000 + b"]" * 100_000), (json_h, b'{"a": ' * 20_000),
        (json_h, b"null"), (json_h, b"1e999999"), (json_h, b'"' + b"x" * 60_000 + b'"'),
        ({**json_h, "Content-Encoding": "gzip"}, b"not gzip at all"),
        ({**json_h, "Content-Encoding": "br"}, b"\x00" * 100),
        ({**json_h, "Content-Encoding": "deflate"}, b"\x78\x9c" + b"\xff" * 40),
        ({"Content-Type": "text/plain"}, b"hello"),
    ]


def attack_http_bad_json(port: Port, rng: random.Random, paths: Sequence[str] = ()) -> int:
    host, tcp_port, path = _addr(port)
    sent = 0
    for target in paths or (path,):
        for headers, body in bad_json_bodies():
            conn = http.client.HTTPConnection(host, tcp_port, timeout=10.0)
            try:
                conn.request("POST", target, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                status = 0  # a closed connection is an acceptable answer to junk
            finally:
                conn.close()
            sent += 1
            if status == 500 or status >= 502:  # 501 is a fair answer to POST on a GET-only port
                raise FuzzViolation(f"POST {target} with {body[:40]!r} ({headers}) got {status}")
    return sent


def attack_http_huge_headers(port: Port, rng: random.Random) -> int:
    host, tcp_port, path = _addr(port)
    requests = [
        f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 65536}\r\n\r\n".encode(),
        (f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"X-{i}: {i}\r\n" for i in range(2000)) + "\r\n").encode(),
        f"GET /{'p' * 100_000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        f"GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n".encode(),
    ]
    for request in requests:
        answer = _raw_exchange(host, tcp_port, request, 3.0)
        if answer.startswith(b"HTTP/1.1 500") or answer.startswith(b"HTTP/1.0 500"):
            raise FuzzViolation(f"huge headers got {answer[:12]!r}")
    return len(requests)


def attack_http_concurrent(port: Port, rng: random.Random) -> int:
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(http_get(port.endpoint, 10.0)))
               for _ in range(HTTP_CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15.0)
    return len(threads)


def attack_http_half_open(port: Port, rng: random.Random) -> int:
    """Connections that send part of a request and stall (some also shut their sending side)."""
    host, tcp_port, path = _addr(port)
    socks = []
    try:
        for i in range(HALF_OPEN):
            try:
                sock = socket.create_connection((host, tcp_port), timeout=2.0)
            except TimeoutError:  # the port's backlog is full: that is its bound working
                continue
            socks.append(sock)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode()[: rng.randint(1, 30)])
            if i % 3 == 0:
                sock.shutdown(socket.SHUT_WR)
        time.sleep(1.0)
    finally:
        for sock in socks:
            sock.close()
    return len(socks)


def attack_http_stalled_during(port: Port, rng: random.Random, stalled: int = 4) -> int:
    """Hold ``stalled`` connections that never finish their request (a metrics port serves 4
    at once), and ask the port a real request meanwhile: it must still be answered."""
    host, tcp_port, path = _addr(port)
    socks = []
    try:
        for _ in range(stalled):
            sock = socket.create_connection((host, tcp_port), timeout=2.0)
            socks.append(sock)
            sock.sendall(f"GET {path} HTTP/1.1\r\n".encode())
        time.sleep(0.2)  # let the port take them in
        status = http_get(port.endpoint, 5.0)
    finally:
        for sock in socks:
            sock.close()
    if status != 200:
        got = status or "no answer"
        raise FuzzViolation(f"while {stalled} stalled connections were held, a real request got {got}")
    return stalled + 1


HTTP_ATTACKS: dict[str, Callable[[Port, random.Random], int]] = {
    "garbage": attack_http_garbage, "bad_json": attack_http_bad_json, "huge_headers": attack_http_huge_headers,
    "concurrent": attack_http_concurrent, "half_open": attack_http_half_open,
}
