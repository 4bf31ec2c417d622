"""Port fuzzing: attacks on the ports of a running mesh, and the checks made after each one.

A :class:`Port` is plain data: a name, an endpoint (``tcp://H:P?key=HEX`` for a CurveZMQ
ROUTER, ``http://H:P/path`` for HTTP), the pids of the processes behind it, factories of
valid frames, and ``serves``, a real request that must still succeed. An attack is a function
``(port, rng) -> frames sent``; it raises :class:`FuzzViolation` when the port does something
it must never do (answers a plaintext peer, a replayed job runs twice, a 5xx on bad input).
:func:`run_attack` runs one attack and then checks every process of the mesh alive, the port
still serving, and the resident memory of the port's processes grown by at most
:data:`RSS_BUDGET_MIB`, giving one :class:`Row`. Every count and wait is bounded; all traffic
goes to the endpoints given (loopback in the tests); randomness comes only from ``rng``.

Who calls it: ``tests/test_fuzz_ports.py`` (in ``make test``), which starts the mesh.
"""

from __future__ import annotations

import copy
import dataclasses
import http.client
import logging
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import psutil
import zmq

from permamesh.identity import NodeIdentity
from permamesh.transport import DealerClient, split_endpoint
from permamesh.wire.codec import MAX_FRAME_BYTES, WireError, decode, encode

log = logging.getLogger(__name__)

RSS_BUDGET_MIB = 64  # MiB of resident memory a port's processes may gain in one attack
FRAMES = 200  # frames per random or mutated attack
RESIGNED = 120  # re-signed mutants per port, at most
REPLAYS = 50  # copies of one valid frame
FLOOD = 200  # DEALER connections, each its own identity
SLOW_FRAMES = 1000  # requests a slow reader sends and never reads the answers of
HTTP_CONCURRENT = 32  # concurrent HTTP requests (a metrics port serves 4 at once)
HALF_OPEN = 16  # stalled HTTP connections (each costs a metrics port up to 1 s of admission)
DRAIN_S = 2.0  # seconds an attack waits for a port's answers, at most
MIB = 1 << 20


class FuzzViolation(Exception):
    """A port did something it must never do (the message says what)."""


@dataclasses.dataclass(frozen=True)
class Port:
    name: str  # worker, relay, validator, layers, gateway, metrics:<node>
    endpoint: str  # tcp://H:P?key=HEX (CurveZMQ ROUTER) or http://H:P/path
    pids: tuple[int, ...]  # processes behind the port (RSS is measured over these)
    serves: Callable[[], bool]  # a real request; True when it was answered correctly
    valid: Callable[[random.Random], bytes] | None = None  # a valid frame (zmq ports)
    chatty: Callable[[random.Random], bytes] | None = None  # a frame the port answers (zmq ports)
    once_tag: str = ""  # reply tag a replayed `valid` frame may get at most once ("" = no check)


@dataclasses.dataclass(frozen=True)
class Row:
    port: str
    attack: str
    frames: int
    alive: bool
    serves: bool
    rss_growth_mib: float
    note: str = ""  # the violation or the attack's own error

    @property
    def ok(self) -> bool:
        return self.alive and self.serves and self.rss_growth_mib <= RSS_BUDGET_MIB and not self.note


# ------------------------------------------------------------------------ frames


def random_frame(rng: random.Random) -> bytes:
    size = rng.choice((0, 1, 7, 64, 1024, 65536))
    return rng.randbytes(size)


# msgpack headers whose length field can be blown up: (first byte, bytes of length)
_LENGTH_HEADERS = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}


def mutate(frame: bytes, rng: random.Random) -> bytes:
    """One mutant of ``frame``: bit flips, a truncation, a blown-up length field, or junk around it."""
    kind = rng.randrange(4)
    data = bytearray(frame)
    if kind == 0 and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[rng.randrange(len(data) + 1):]
    elif kind == 2:
        heads = [i for i, b in enumerate(data) if b in _LENGTH_HEADERS]
        if heads:
            i = rng.choice(heads)
            width = _LENGTH_HEADERS[data[i]]
            data[i + 1:i + 1 + width] = b"\xff" * width
    else:
        junk = rng.randbytes(rng.randint(1, 64))
        data = bytearray(junk + data if rng.random() < 0.5 else data + junk)
    return bytes(data)


def _odd_values(value: object) -> list[object]:
    """Huge, empty, malformed or wrongly typed stand-ins for a field's ``value``."""
    wrong_type = [None, 1, "x", b"x", 1.5, (1, 2)]
    if isinstance(value, bool):
        return [not value, 2, *wrong_type]
    if isinstance(value, int):
        return [-1, 0, 2**63 - 1, -(2**63), 2**64 - 1, *wrong_type]
    if isinstance(value, float):
        return [math.nan, math.inf, -math.inf, 1e-300, 1e300, -0.0, *wrong_type]
    if isinstance(value, str):
        return ["", "\x00" * 64, "x" * 8192, "\u00e9" * 2048, *wrong_type]
    if isinstance(value, bytes):
        return [b"", b"\x00" * 60_000, bytes(range(256)) * 4, *wrong_type]
    if isinstance(value, tuple):
        return [(), tuple(value[:1]) * 1000, ("x",) * 1000, *wrong_type]
    return wrong_type


def resigned_mutants(frame: bytes, rng: random.Random, limit: int = RESIGNED) -> list[bytes]:
    """Decode a valid ``frame``, set one field at a time to an odd value (bypassing the
    message's own checks), and re-encode it, signed by a fresh identity when the type is signed.
    Mutants the encoder itself refuses are skipped."""
    msg = decode(frame).msg
    out = []
    for field in dataclasses.fields(msg):
        for odd in _odd_values(getattr(msg, field.name)):
            mutant = copy.copy(msg)
            object.__setattr__(mutant, field.name, odd)
            try:
                out.append(encode(mutant, NodeIdentity.generate() if msg.SIGNED else None))
            except (WireError, TypeError, ValueError, OverflowError):
                continue
    rng.shuffle(out)
    return out[:limit]


# ------------------------------------------------------------------------ zmq attacks


def _drain(sock: DealerClient, wait_s: float = DRAIN_S) -> list[bytes]:
    """Read answers until the port is quiet for a moment (this also lets sends flush)."""
    got, deadline = [], time.monotonic() + wait_s
    while time.monotonic() < deadline:
        frame = sock.recv(min(0.3, max(0.01, deadline - time.monotonic())))
        if frame is None:
            break
        got.append(frame)
    return got


def _send_all(port: Port, frames: Sequence[bytes]) -> int:
    with DealerClient(port.endpoint) as sock:
        for frame in frames:
            sock.send(frame)
        _drain(sock)
    return len(frames)


def attack_random_bytes(port: Port, rng: random.Random) -> int:
    sent = _send_all(port, [random_frame(rng) for _ in range(FRAMES)])
    with DealerClient(port.endpoint) as sock:  # multipart junk, and one frame over the cap (zmq drops the link)
        for _ in range(10):
            sock.send_parts([random_frame(rng) for _ in range(rng.randint(2, 4))])
        sock.send(rng.randbytes(MAX_FRAME_BYTES + 2048))
        _drain(sock, 0.5)
    return sent + 11


def attack_mutated(port: Port, rng: random.Random) -> int:
    return _send_all(port, [mutate(port.valid(rng), rng) for _ in range(FRAMES)])


def attack_resigned(port: Port, rng: random.Random) -> int:
    return _send_all(port, resigned_mutants(port.valid(rng), rng))


def attack_replay(port: Port, rng: random.Random) -> int:
    frame = port.valid(rng)
    with DealerClient(port.endpoint) as sock:
        for _ in range(REPLAYS):
            sock.send(frame)
        answers = _drain(sock, 5.0 if port.once_tag else DRAIN_S)
    if port.once_tag:
        tags = []
        for answer in answers:
            try:
                tags.append(decode(answer).msg.TAG)
            except WireError:
                tags.append("?")
        if not tags.count(port.once_tag):
            raise FuzzViolation(f"the valid frame was never answered {port.once_tag!r} (got {sorted(set(tags))})")
        if tags.count(port.once_tag) > 1:
            raise FuzzViolation(f"a replayed frame was answered {port.once_tag!r} {tags.count(port.once_tag)} times")
    return REPLAYS


def attack_flood(port: Port, rng: random.Random) -> int:
    socks = []
    try:
        for _ in range(FLOOD):
            sock = DealerClient(port.endpoint)
            socks.append(sock)
            sock.send(port.chatty(rng))
        time.sleep(1.0)  # let the handshakes and frames arrive before the links go
    finally:
        for sock in socks:
            sock.close()
    return FLOOD


def attack_slow_reader(port: Port, rng: random.Random) -> int:
    with DealerClient(port.endpoint) as sock:
        for _ in range(SLOW_FRAMES):
            sock.send(port.chatty(rng))
        time.sleep(1.5)  # never read; the port must drop, not buffer without bound
    return SLOW_FRAMES


def attack_plaintext(port: Port, rng: random.Random) -> int:
    """A peer that skips CurveZMQ: a plain DEALER must get no answer, raw TCP at most the
    64-byte ZMTP greeting."""
    address, _ = split_endpoint(port.endpoint)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        for _ in range(5):
            sock.send(port.valid(rng))
        if sock.poll(1000):
            raise FuzzViolation("a plaintext DEALER got an answer from a CurveZMQ port")
    finally:
        sock.close(0)
    host, tcp_port = address.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(tcp_port)), timeout=2.0) as raw:
        raw.sendall(b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00NULL" + b"\x00" * 48 + rng.randbytes(256))
        raw.settimeout(0.5)
        got = b""
        try:
            while len(got) <= 4096:
                chunk = raw.recv(4096)
                if not chunk:
                    break
                got += chunk
        except (TimeoutError, ConnectionError):
            pass
    if len(got) > 64:
        raise FuzzViolation(f"raw TCP got {len(got)} bytes past the ZMTP greeting")
    return 6


ZMQ_ATTACKS: dict[str, Callable[[Port, random.Random], int]] = {
    "random_bytes": attack_random_bytes, "mutated": attack_mutated, "resigned": attack_resigned,
    "replay": attack_replay, "flood_identities": attack_flood, "slow_reader": attack_slow_reader,
    "plaintext": attack_plaintext,
}


# ------------------------------------------------------------------------ HTTP attacks


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


# ------------------------------------------------------------------------ checks


def rss_mib(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total / MIB


def alive(pids: Sequence[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            return False
    return True


def run_attack(port: Port, attack: str, fn: Callable[[Port, random.Random], int], rng: random.Random,
               mesh_pids: Sequence[int]) -> Row:
    """Run one attack on ``port``, then check the mesh (``mesh_pids``) and the port."""
    before = rss_mib(port.pids)
    note, frames = "", 0
    try:
        frames = fn(port, rng)
    except FuzzViolation as exc:
        note = str(exc)[:200]
    except Exception as exc:  # the attack itself broke: say so in the row rather than hide it
        note = f"attack error: {exc.__class__.__name__}: {exc}"[:200]
    is_alive = alive(mesh_pids)
    try:
        serves = bool(port.serves())
    except Exception as exc:
        log.warning("%s no longer serves after %s: %s", port.name, attack, exc)
        serves = False
    growth = rss_mib(port.pids) - before
    return Row(port.name, attack, frames, is_alive, serves, round(growth, 1), note)


def format_table(rows: Sequence[Row]) -> str:
    lines = [f"{'port':<24} {'attack':<17} {'frames':>6} {'alive':>5} {'serves':>6} {'rss_mib':>8}  note"]
    for r in rows:
        lines.append(f"{r.port:<24} {r.attack:<17} {r.frames:>6} {str(r.alive):>5} {str(r.serves):>6} "
                     f"{r.rss_growth_mib:>8.1f}  {r.note}")
    return "\n".join(lines)
