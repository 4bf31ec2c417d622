"""Attacks on zmq ports (workers, relays, validators, layer servers): random, mutated and
re-signed frames, replays, identity floods, slow readers, plaintext to CurveZMQ ports.

Each attack is ``(port, rng) -> frames sent`` and raises
:class:`~permamesh.bench.fuzz.FuzzViolation` on what a port must never do.
Who calls it: ``tests/test_fuzz_ports.py`` through :data:`ZMQ_ATTACKS`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import socket
import time
from collections.abc import Callable, Sequence

import zmq

from permamesh.bench.fuzz import DRAIN_S, FLOOD, FRAMES, REPLAYS, RESIGNED, SLOW_FRAMES, FuzzViolation, Port
from permamesh.identity import NodeIdentity
from permamesh.transport import DealerClient, split_endpoint
from permamesh.wire.codec import MAX_FRAME_BYTES, WireError, decode, encode

log = logging.getLogger(__name__)


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


def odd_values(value: object) -> list[object]:
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
        for odd in odd_values(getattr(msg, field.name)):
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
