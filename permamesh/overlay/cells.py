"""The onion cell format and its per-hop key schedule, shared by forward cells and replies.

A cell is ``alpha || beta || gamma || payload``:

==========  ======================  ===================================================
field       bytes                   meaning
==========  ======================  ===================================================
alpha       32                      this hop's fresh ephemeral X25519 public key (clear)
beta        MAX_HOPS * SLOT_BYTES   the routing header, one encrypted slot per hop
gamma       16                      HMAC-SHA256/128 of ``alpha || beta`` under the hop's MAC key
payload     one of SIZE_CLASSES     the layered payload; its length never changes on a path
==========  ======================  ===================================================

Each hop agrees a secret with ``alpha`` (X25519 + HKDF via :class:`KeyExchangeKey`), checks
``gamma``, XORs ``beta || 0^SLOT`` with its ChaCha20 header keystream, reads the first slot
and keeps the rest as the next hop's ``beta`` (Sphinx-style shift; the client precomputes
the filler so every hop's MAC verifies). Shorter paths end in random padding, so the header
looks the same for every path length up to :data:`MAX_HOPS`.

A slot is ``command (1) || epoch (4, big-endian) || body``; a routing body is
``next node_id (16) || next alpha (32) || next gamma (16) || payload tag (16)``. Only
:mod:`onion` and :mod:`reply` call into this module; all symmetric crypto of the onion lives
here, X25519 stays behind :class:`permamesh.identity.KeyExchangeKey`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from permamesh.identity import IdentityError, KeyExchangeKey, PublicIdentity
from permamesh.overlay.errors import OverlayError, require_bytes

Rng = Callable[[int], bytes]

MAX_HOPS = 5
NODE_ID_BYTES = 16
KEY_BYTES = 32  # X25519 public keys and symmetric keys
MAC_BYTES = 16
REPLY_ID_BYTES = 16
TAG_BYTES = 16  # Poly1305 tag of one forward payload layer
SLOT_BYTES = 96
BETA_BYTES = MAX_HOPS * SLOT_BYTES
CELL_HEADER_BYTES = KEY_BYTES + BETA_BYTES + MAC_BYTES  # 528
SIZE_CLASSES = tuple(1024 << i for i in range(8))  # payload bytes: 1 KiB .. 128 KiB
MIN_CELL_BYTES = CELL_HEADER_BYTES + SIZE_CLASSES[0]
MAX_CELL_BYTES = CELL_HEADER_BYTES + SIZE_CLASSES[-1]
MAX_EPOCH = 2**32 - 1

CMD_RELAY = 1  # forward: check and strip one payload layer, pass the cell on
CMD_EXIT = 2  # forward: last hop, hand the payload to the destination in the slot
CMD_REPLY_RELAY = 3  # reply: add one payload layer, pass the cell on
CMD_DELIVER = 4  # reply: add one payload layer, deliver it to the client in the slot

_SLOT_PREFIX = struct.Struct(">BI")  # command, epoch
_ROUTE = struct.Struct(f">{NODE_ID_BYTES}s{KEY_BYTES}s{MAC_BYTES}s{TAG_BYTES}s")
_HKDF_INFO = b"permamesh/overlay/onion/v1 hop keys"
_ZERO_NONCE16 = bytes(16)  # ChaCha20 counter+nonce; every key here is used for one cell only
_ZERO_NONCE12 = bytes(12)
_LENGTH = struct.Struct(">I")
_OKM_BYTES = 4 * KEY_BYTES + 16  # four keys and a 16-byte replay tag
LENGTH_BYTES = _LENGTH.size
TERMINAL_BODY_BYTES = SLOT_BYTES - _SLOT_PREFIX.size  # what a last hop's slot can carry

assert _SLOT_PREFIX.size + _ROUTE.size <= SLOT_BYTES


@dataclass(frozen=True)
class HopInfo:
    """What a client needs to route through a relay: its id and X25519 public key."""

    node_id: bytes  # 16 bytes, as carried in cells (PublicIdentity.node_id in ASCII)
    kex_public: bytes  # X25519 public key, 32 bytes

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, bytes) or len(self.node_id) != NODE_ID_BYTES:
            raise OverlayError(f"HopInfo.node_id must be {NODE_ID_BYTES} bytes")
        if not isinstance(self.kex_public, bytes) or len(self.kex_public) != KEY_BYTES:
            raise OverlayError(f"HopInfo.kex_public must be {KEY_BYTES} bytes")

    @classmethod
    def from_identity(cls, public: PublicIdentity) -> HopInfo:
        return cls(node_id=public.node_id.encode("ascii"), kex_public=public.kex_key)


@dataclass(frozen=True)
class HopSecret:
    """The symmetric keys one hop shares with the cell's builder (never logged or shown)."""

    alpha: bytes  # the ephemeral public key the hop sees
    header_key: bytes = field(repr=False)  # ChaCha20 keystream over beta
    mac_key: bytes = field(repr=False)  # HMAC key for gamma
    aead_key: bytes = field(repr=False)  # ChaCha20-Poly1305 key of a forward payload layer
    stream_key: bytes = field(repr=False)  # ChaCha20 key of a reply payload layer
    replay_tag: bytes = field(repr=False)  # what the hop's ReplayGuard remembers


def _split_secret(alpha: bytes, okm: bytes) -> HopSecret:
    k = KEY_BYTES
    return HopSecret(alpha, okm[:k], okm[k : 2 * k], okm[2 * k : 3 * k], okm[3 * k : 4 * k],
                     okm[4 * k :])


def client_secret(hop: HopInfo, rng: Rng) -> HopSecret:
    """A fresh ephemeral key for ``hop`` and the secrets it yields (builder side)."""
    ephemeral = KeyExchangeKey.from_private_bytes(rng(KEY_BYTES))
    try:
        okm = ephemeral.derive(hop.kex_public, _HKDF_INFO, _OKM_BYTES)
    except IdentityError as exc:
        raise OverlayError(f"relay {hop.node_id!r} has an unusable X25519 key: {exc}") from exc
    return _split_secret(ephemeral.public_bytes, okm)


def relay_secret(key: KeyExchangeKey, alpha: bytes) -> HopSecret:
    """The secrets a relay holding ``key`` shares with whoever chose ``alpha``."""
    try:
        return _split_secret(alpha, key.derive(alpha, _HKDF_INFO, _OKM_BYTES))
    except IdentityError as exc:
        raise OverlayError(f"cell rejected: unusable ephemeral key ({exc})") from exc


def header_mac(secret: HopSecret, beta: bytes) -> bytes:
    return hmac.new(secret.mac_key, secret.alpha + beta, hashlib.sha256).digest()[:MAC_BYTES]


def chacha(key: bytes, data: bytes) -> bytes:
    """``data`` XOR the ChaCha20 keystream of ``key`` (zero nonce: keys are single-use)."""
    return Cipher(algorithms.ChaCha20(key, _ZERO_NONCE16), mode=None).encryptor().update(data)


def _xor(a: bytes, b: bytes) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


def route_slot(command: int, epoch: int, next_hop: bytes, alpha: bytes, gamma: bytes,
               tag: bytes) -> bytes:
    return _slot(command, epoch, _ROUTE.pack(next_hop, alpha, gamma, tag))


def _slot(command: int, epoch: int, body: bytes) -> bytes:
    if len(body) > TERMINAL_BODY_BYTES:
        raise OverlayError(f"slot body of {len(body)} bytes exceeds {TERMINAL_BODY_BYTES}")
    return _SLOT_PREFIX.pack(command, epoch) + body.ljust(TERMINAL_BODY_BYTES, b"\0")


def terminal_slot(command: int, epoch: int, body: bytes) -> bytes:
    return _slot(command, epoch, body)


def parse_slot(slot: bytes) -> tuple[int, int, bytes]:
    """``(command, epoch, body)`` of a decrypted slot."""
    command, epoch = _SLOT_PREFIX.unpack_from(slot)
    return command, epoch, slot[_SLOT_PREFIX.size :]


def parse_route(body: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """``(next_hop, next_alpha, next_gamma, tag)`` of a routing slot body."""
    return _ROUTE.unpack_from(body)


def delivery_body(client_id: bytes, reply_id: bytes) -> bytes:
    if len(client_id) != NODE_ID_BYTES or len(reply_id) != REPLY_ID_BYTES:
        raise OverlayError(f"client id and reply id must be {NODE_ID_BYTES} bytes each")
    return client_id + reply_id


def parse_delivery(body: bytes) -> tuple[bytes, bytes]:
    """``(client_id, reply_id)`` of a delivery slot body."""
    return body[:NODE_ID_BYTES], body[NODE_ID_BYTES : NODE_ID_BYTES + REPLY_ID_BYTES]


def build_header(
    path: Sequence[HopInfo],
    secrets: Sequence[HopSecret],
    route_command: int,
    tags: Sequence[bytes],
    last_slot: bytes,
    epoch: int,
    rng: Rng,
) -> bytes:
    """``alpha_0 || beta_0 || gamma_0`` for ``path``; hop i's slot routes to hop i+1 with
    ``route_command`` and ``tags[i]``, and the last hop reads ``last_slot``."""
    n = len(path)
    if not 1 <= n <= MAX_HOPS:
        raise OverlayError(f"a path has 1..{MAX_HOPS} hops, got {n}")
    if not 0 <= epoch <= MAX_EPOCH:
        raise OverlayError(f"epoch must be in 0..{MAX_EPOCH}, got {epoch}")
    streams = [chacha(s.header_key, bytes(BETA_BYTES + SLOT_BYTES)) for s in secrets]
    filler = b""  # the bytes the hops before the last shift in, as the last hop will see them
    for i in range(n - 1):
        start = BETA_BYTES - i * SLOT_BYTES
        filler = _xor(filler + bytes(SLOT_BYTES), streams[i][start:])
    plain_tail = last_slot + rng(BETA_BYTES - len(filler) - SLOT_BYTES)
    beta = _xor(plain_tail, streams[n - 1][: len(plain_tail)]) + filler
    gamma = header_mac(secrets[n - 1], beta)
    for i in range(n - 2, -1, -1):
        nxt = secrets[i + 1]
        slot = route_slot(route_command, epoch, path[i + 1].node_id, nxt.alpha, gamma, tags[i])
        beta = _xor(slot + beta[: BETA_BYTES - SLOT_BYTES], streams[i][:BETA_BYTES])
        gamma = header_mac(secrets[i], beta)
    return secrets[0].alpha + beta + gamma


def size_class_for(content_bytes: int, size_class: int | None) -> int:
    """The smallest size class holding ``content_bytes`` (or ``size_class`` if it fits)."""
    if size_class is not None:
        if size_class not in SIZE_CLASSES:
            raise OverlayError(f"size class {size_class} is not one of {SIZE_CLASSES}")
        if content_bytes > size_class:
            raise OverlayError(f"{content_bytes} bytes do not fit size class {size_class}")
        return size_class
    for cls in SIZE_CLASSES:
        if content_bytes <= cls:
            return cls
    raise OverlayError(f"payload of {content_bytes} bytes exceeds {SIZE_CLASSES[-1]}")


def pad(data: bytes, total: int) -> bytes:
    """``len(data)`` (4 bytes) || data || zeros, ``total`` bytes in all."""
    return _LENGTH.pack(len(data)) + data + bytes(total - _LENGTH.size - len(data))


def unpad(padded: bytes) -> bytes:
    (n,) = _LENGTH.unpack_from(padded)
    if n > len(padded) - _LENGTH.size:
        raise OverlayError(f"padded payload claims {n} bytes in {len(padded)}")
    return padded[_LENGTH.size : _LENGTH.size + n]


def split_cell(cell: object) -> tuple[bytes, bytes, bytes, bytes]:
    """``(alpha, beta, gamma, payload)``; a cell of the wrong type or length is rejected."""
    cell = require_bytes(cell, "cell", MIN_CELL_BYTES, MAX_CELL_BYTES)
    if len(cell) - CELL_HEADER_BYTES not in SIZE_CLASSES:
        raise OverlayError(f"cell rejected: {len(cell)} bytes is not header + a size class")
    k, m = KEY_BYTES, KEY_BYTES + BETA_BYTES
    return cell[:k], cell[k:m], cell[m : m + MAC_BYTES], cell[CELL_HEADER_BYTES:]


def aead_seal(key: bytes, plaintext: bytes, nonce: bytes = _ZERO_NONCE12) -> tuple[bytes, bytes]:
    """``(ciphertext, tag)``: ChaCha20-Poly1305, length-preserving with the tag kept apart."""
    out = ChaCha20Poly1305(key).encrypt(nonce, plaintext, None)
    return out[:-TAG_BYTES], out[-TAG_BYTES:]


def aead_open(key: bytes, ciphertext: bytes, tag: bytes, nonce: bytes = _ZERO_NONCE12) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext + tag, None)
    except InvalidTag as exc:
        raise OverlayError("payload failed authentication (forged or corrupted)") from exc


_RANDOM_LOCK = threading.Lock()
_random = {"pid": 0, "buf": b"", "at": 0}


def default_rng(n: int) -> bytes:
    """``n`` bytes from the OS CSPRNG, read 64 KiB at a time (one getrandom call per ~50
    cells instead of ~70 small ones; each costs ~60 us on small VMs). The buffer is dropped in a
    forked child, so parent and child never share bytes."""
    with _RANDOM_LOCK:
        state = _random
        if state["pid"] != os.getpid() or state["at"] + n > len(state["buf"]):
            state.update(pid=os.getpid(), buf=os.urandom(max(65536, n)), at=0)
        at = state["at"]
        state["at"] = at + n
        return state["buf"][at:at + n]
