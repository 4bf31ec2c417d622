"""Reply blocks: how an answer travels back to a client who stays unknown to the responder.

Sphinx-style single-use reply blocks. The client calls :func:`build_reply_block` with the
reply path (first the relay the responder hands the answer to, last the client's own first
relay) and its own node id; it keeps the :class:`ReplyKeys` and sends the
:class:`ReplyBlock` (serialised with :meth:`ReplyBlock.to_bytes`) inside a forward cell.
The responder (the entry worker) calls :func:`seal_reply` and learns only the first hop.

Each relay on the reply path peels the header exactly like a forward cell (see
:func:`onion.peel`: MAC, replay guard, epoch) and *adds* a ChaCha20 layer to the payload;
the last one returns a :class:`onion.ReplyDelivery`. Integrity is end to end: the
responder seals the answer with ChaCha20-Poly1305 under a one-time key from the block,
and :func:`open_reply` strips every relay layer and authenticates the result, so tampering
anywhere on the path raises :class:`OverlayError` at the client.

Body layout inside the size class: ``nonce (12) || AEAD(len (4) || answer || zeros) || tag
(16)``. A block's header is accepted once per relay (replay guard); use one block per reply.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from permamesh.overlay import cells
from permamesh.overlay.cells import (
    CELL_HEADER_BYTES,
    KEY_BYTES,
    NODE_ID_BYTES,
    SIZE_CLASSES,
    HopInfo,
    Rng,
)
from permamesh.overlay.errors import OverlayError

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_REPLY_PAYLOAD", "REPLY_BLOCK_BYTES", "ReplyBlock", "ReplyKeys", "build_reply_block",
    "open_reply", "seal_reply",
]

_VERSION = 1
_NONCE_BYTES = 12
_SEAL_OVERHEAD = _NONCE_BYTES + cells.TAG_BYTES + cells.LENGTH_BYTES  # 32 bytes per class
MAX_REPLY_PAYLOAD = SIZE_CLASSES[-1] - _SEAL_OVERHEAD  # bytes
REPLY_BLOCK_BYTES = 1 + NODE_ID_BYTES + CELL_HEADER_BYTES + KEY_BYTES  # 577


@dataclass(frozen=True)
class ReplyBlock:
    """What the responder needs to answer: the first reply hop and a ready header."""

    first_hop: bytes  # node id of the reply path's first relay, 16 bytes
    header: bytes  # alpha || beta || gamma for the first relay, CELL_HEADER_BYTES
    seal_key: bytes = field(repr=False)  # one-time ChaCha20-Poly1305 key for the answer

    def __post_init__(self) -> None:
        for name, value, size in (
            ("first_hop", self.first_hop, NODE_ID_BYTES),
            ("header", self.header, CELL_HEADER_BYTES),
            ("seal_key", self.seal_key, KEY_BYTES),
        ):
            if not isinstance(value, bytes) or len(value) != size:
                raise OverlayError(f"ReplyBlock.{name} must be {size} bytes")

    def to_bytes(self) -> bytes:
        """Fixed-size encoding (:data:`REPLY_BLOCK_BYTES`) to carry in a forward payload."""
        return bytes([_VERSION]) + self.first_hop + self.header + self.seal_key

    @classmethod
    def from_bytes(cls, data: bytes) -> ReplyBlock:
        if not isinstance(data, (bytes, bytearray)) or len(data) != REPLY_BLOCK_BYTES:
            raise OverlayError(f"reply block must be {REPLY_BLOCK_BYTES} bytes")
        data = bytes(data)
        if data[0] != _VERSION:
            raise OverlayError(f"reply block version {data[0]} is not {_VERSION}")
        hop_end = 1 + NODE_ID_BYTES
        header_end = hop_end + CELL_HEADER_BYTES
        return cls(data[1:hop_end], data[hop_end:header_end], data[header_end:])


@dataclass(frozen=True)
class ReplyKeys:
    """What the client keeps to open the answer sent with the matching block."""

    reply_id: bytes  # 16 bytes; the last reply relay hands it over with the payload
    seal_key: bytes = field(repr=False)
    layer_keys: tuple[bytes, ...] = field(repr=False)  # one ChaCha20 key per reply relay


def build_reply_block(
    path: Sequence[HopInfo],
    client_id: bytes,
    *,
    epoch: int = 0,
    rng: Rng = cells.default_rng,
) -> tuple[ReplyBlock, ReplyKeys]:
    """A single-use reply block over ``path`` ending at ``client_id``, and its keys.

    ``path[0]`` receives the sealed answer from the responder; ``path[-1]`` delivers it to
    ``client_id``. ``epoch`` must stay within the relays' replay-guard window until used.
    """
    if not isinstance(client_id, bytes) or len(client_id) != NODE_ID_BYTES:
        raise OverlayError(f"client id must be {NODE_ID_BYTES} bytes")
    if not 1 <= len(path) <= cells.MAX_HOPS:
        raise OverlayError(f"a path has 1..{cells.MAX_HOPS} hops, got {len(path)}")
    secrets = [cells.client_secret(hop, rng) for hop in path]
    reply_id, seal_key = rng(cells.REPLY_ID_BYTES), rng(KEY_BYTES)
    last = cells.terminal_slot(cells.CMD_DELIVER, epoch, cells.delivery_body(client_id, reply_id))
    no_tags = [bytes(cells.TAG_BYTES)] * len(path)
    header = cells.build_header(path, secrets, cells.CMD_REPLY_RELAY, no_tags, last, epoch, rng)
    block = ReplyBlock(path[0].node_id, header, seal_key)
    keys = ReplyKeys(reply_id, seal_key, tuple(s.stream_key for s in secrets))
    return block, keys


def seal_reply(
    block: ReplyBlock,
    payload: bytes,
    *,
    size_class: int | None = None,
    rng: Rng = cells.default_rng,
) -> tuple[bytes, bytes]:
    """``(first hop id, cell)`` carrying ``payload`` back along ``block``'s path."""
    if not isinstance(payload, bytes):
        raise OverlayError("reply payload must be bytes")
    total = cells.size_class_for(_SEAL_OVERHEAD + len(payload), size_class)
    nonce = rng(_NONCE_BYTES)
    padded = cells.pad(payload, total - _NONCE_BYTES - cells.TAG_BYTES)
    ciphertext, tag = cells.aead_seal(block.seal_key, padded, nonce)
    return block.first_hop, block.header + nonce + ciphertext + tag


def open_reply(keys: ReplyKeys, payload: bytes) -> bytes:
    """The responder's answer from a :class:`ReplyDelivery` payload, authenticated.

    Raises :class:`OverlayError` if the payload was altered anywhere on the path, or was
    not sealed with this block.
    """
    if not isinstance(payload, (bytes, bytearray)) or len(payload) not in SIZE_CLASSES:
        raise OverlayError("reply payload rejected: not a size class")
    body = bytes(payload)
    for layer_key in keys.layer_keys:  # XOR layers commute: strip them in any order
        body = cells.chacha(layer_key, body)
    nonce, ciphertext, tag = (
        body[:_NONCE_BYTES], body[_NONCE_BYTES : -cells.TAG_BYTES], body[-cells.TAG_BYTES :]
    )
    try:
        return cells.unpad(cells.aead_open(keys.seal_key, ciphertext, tag, nonce))
    except OverlayError as exc:
        logger.debug("reply %s rejected: %s", keys.reply_id.hex(), exc)
        raise OverlayError(f"reply rejected: {exc}") from exc
