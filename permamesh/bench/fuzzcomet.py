"""Attacks on a CometBFT validator's three ports: the app's ABCI socket, CometBFT's RPC (TLS,
pinned) and its p2p port; and the check made after each one (:func:`chain_healthy`).

- ABCI socket (``tcp://127.0.0.1:P``): CometBFT holds the app's four connections, so a stranger
  must get nothing back, whatever it sends: garbage, frames announcing huge lengths, a bare
  ``Commit``, a ``FinalizeBlock`` of junk txs then ``Commit``, ``InitChain``; a connection flood.
  Any byte answered to a stranger is a :class:`~permamesh.bench.fuzz.FuzzViolation`.
- RPC (``https://H:P?key=HEX``): :mod:`~permamesh.bench.fuzzrpc`.
- p2p (``tcp://H:P``): random bytes and broken SecretConnection handshakes, held connections.

:func:`chain_healthy` is a port's ``serves`` on one validator: the chain commits a new block, and
the app's own last app hash (``abci_info``) equals the one CometBFT put in the next header, so no
stranger moved the app's state past CometBFT's. :func:`network_agrees` is the same check on
every validator of a network, with the attacked one first: all commit, and every app's state is
the one the shared chain's headers record.

Who calls it: ``tests/test_fuzz_comet.py`` through :data:`COMET_ATTACKS`.
"""

from __future__ import annotations

import collections
import logging
import random
import socket
import time
from collections.abc import Callable

from permamesh.bench.fuzz import FLOOD, FRAMES, FuzzViolation, Port
from permamesh.bench.fuzzrpc import RPC_ATTACKS, hostport as _hostport, raw_exchange as _raw
from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.framing import encode_frame, encode_message, encode_uvarint
from permamesh.committee.cometbft.rpc import CometRPC

log = logging.getLogger(__name__)

HEALTH_WAIT_S = 10.0  # seconds a healthy chain gets to commit one more block


# ------------------------------------------------------------------------ the check


def chain_healthy(rpc_endpoint: str, wait_s: float = HEALTH_WAIT_S) -> bool:
    """True when the node commits a new block and its app agrees with CometBFT's headers."""
    with CometRPC(rpc_endpoint, timeout_s=3.0) as rpc:
        start = rpc.status().height
        info = rpc.abci_info()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            status = rpc.status()
            if status.height > max(start, info.last_block_height):
                break
            time.sleep(0.1)
        else:
            log.warning("%s: no new block in %.0f s (height %d)", rpc_endpoint, wait_s, start)
            return False
        (header,) = rpc.headers(info.last_block_height + 1, info.last_block_height + 1)
        if header.app_hash != info.last_block_app_hash:
            log.warning("%s: app hash after %d is %s, CometBFT's header says %s", rpc_endpoint,
                        info.last_block_height, info.last_block_app_hash.hex(), header.app_hash.hex())
            return False
    return True


def network_agrees(rpc_endpoints: list[str], wait_s: float = HEALTH_WAIT_S) -> bool:
    """True when every validator commits a new block and each app's last app hash equals the
    one in its chain's next header. The headers are the network's consensus (a block commits only
    with more than two thirds of the votes), so an app that an attack moved off the others' state
    fails here whatever its node then does."""
    return all(chain_healthy(endpoint, wait_s) for endpoint in rpc_endpoints)


# ------------------------------------------------------------------------ ABCI socket


def _stranger(endpoint: str, payload: bytes, wait_s: float = 1.0) -> bytes:
    """Connect to the ABCI socket as a stranger, send ``payload``, return what came back."""
    host, port = _hostport(endpoint)
    got = b""
    with socket.create_connection((host, port), timeout=wait_s) as sock:
        try:
            sock.sendall(payload)
            while len(got) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += chunk
        except (TimeoutError, ConnectionError):
            pass
    return got


def _refused_all(endpoint: str, payloads: list[bytes], what: str) -> tuple[int, str]:
    answered = [len(got) for got in (_stranger(endpoint, p) for p in payloads) if got]
    if answered:
        raise FuzzViolation(f"{len(answered)} of {len(payloads)} stranger(s) sending {what} got answers "
                            f"({answered[:3]} bytes)")
    return len(payloads), f"{len(payloads)} strangers, 0 answered"


def _request(**call: object) -> bytes:
    return encode_message(pb.Request(**call)) + encode_message(pb.Request(flush=pb.RequestFlush()))


def attack_abci_garbage(port: Port, rng: random.Random) -> tuple[int, str]:
    payloads = [rng.randbytes(rng.choice((1, 64, 4096, 65536))) for _ in range(FRAMES // 10)]
    payloads += [encode_frame(rng.randbytes(rng.randint(1, 512))) for _ in range(FRAMES // 10)]
    return _refused_all(port.endpoint, payloads, "garbage")


def attack_abci_huge_length(port: Port, rng: random.Random) -> tuple[int, str]:
    lengths = (2**31 - 1, 2**31, 2**63, 2**64 - 1, 64 << 20)
    payloads = [encode_uvarint(n) + rng.randbytes(4096) for n in lengths]
    payloads.append(b"\xff" * 11)  # a varint that never ends
    return _refused_all(port.endpoint, payloads, "huge announced lengths")


def attack_abci_consensus_calls(port: Port, rng: random.Random) -> tuple[int, str]:
    """A stranger's bare Commit, a FinalizeBlock of a far height with junk txs, an InitChain."""
    payloads = [
        _request(commit=pb.RequestCommit()),
        _request(finalize_block=pb.RequestFinalizeBlock(height=rng.randint(1, 1 << 40), txs=[rng.randbytes(64)]))
        + _request(commit=pb.RequestCommit()),
        _request(init_chain=pb.RequestInitChain(chain_id="mallory", initial_height=1)),
        _request(info=pb.RequestInfo()), _request(check_tx=pb.RequestCheckTx(tx=rng.randbytes(100))),
    ]
    return _refused_all(port.endpoint, payloads * 4, "consensus calls")


def attack_abci_flood(port: Port, rng: random.Random) -> tuple[int, str]:
    host, tcp_port = _hostport(port.endpoint)
    socks, answered = [], 0
    try:
        for _ in range(FLOOD):
            sock = socket.create_connection((host, tcp_port), timeout=2.0)
            socks.append(sock)
            sock.sendall(_request(commit=pb.RequestCommit()))
        time.sleep(0.5)
        for sock in socks:
            sock.settimeout(0.01)
            try:
                answered += len(sock.recv(4096)) > 0
            except (TimeoutError, ConnectionError):
                pass
    finally:
        for sock in socks:
            sock.close()
    if answered:
        raise FuzzViolation(f"{answered} of {FLOOD} flooding connections got answers")
    return FLOOD, f"{FLOOD} held connections, 0 answered"


# ------------------------------------------------------------------------ p2p


def attack_p2p_random(port: Port, rng: random.Random) -> tuple[int, str]:
    host, tcp_port = _hostport(port.endpoint)
    payloads = [rng.randbytes(rng.choice((1, 32, 34, 1024, 65536))) for _ in range(30)]
    payloads += [b"\x22\x20" + rng.randbytes(32) + rng.randbytes(rng.randint(0, 2048)) for _ in range(20)]
    answers = collections.Counter("data" if _raw(host, tcp_port, p) else "none" for p in payloads)
    return len(payloads), "answers: " + " ".join(f"{k}={v}" for k, v in sorted(answers.items()))


def attack_p2p_held(port: Port, rng: random.Random) -> tuple[int, str]:
    host, tcp_port = _hostport(port.endpoint)
    socks = []
    try:
        for _ in range(FLOOD // 2):
            try:
                sock = socket.create_connection((host, tcp_port), timeout=2.0)
            except OSError:
                break
            socks.append(sock)
            sock.sendall(rng.randbytes(rng.randint(1, 33)))  # part of a handshake, then silence
        time.sleep(1.0)
    finally:
        for sock in socks:
            sock.close()
    return len(socks), f"{len(socks)} half-handshakes held 1 s"


COMET_ATTACKS: dict[str, dict[str, Callable[[Port, random.Random], tuple[int, str]]]] = {
    "abci": {"garbage": attack_abci_garbage, "huge_length": attack_abci_huge_length,
             "consensus_calls": attack_abci_consensus_calls, "flood": attack_abci_flood},
    "rpc": RPC_ATTACKS,
    "p2p": {"random_bytes": attack_p2p_random, "held": attack_p2p_held},
}
