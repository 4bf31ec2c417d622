"""The overlay's wire messages: what clients, relays and entry workers send each other.

All travel as frames of :mod:`permamesh.wire` on zmq; their contents are opaque bytes produced
by :mod:`~permamesh.overlay.onion` and :mod:`~permamesh.overlay.envelope`.
Cells, deliveries and clove drops are *unsigned*: every cell is authenticated hop by hop by its
header MAC and payload tag, cloves by their fingerprint vectors and AEAD, replies end to end by
the reply block's key, so an Ed25519 signature per hop would add ~1 ms of CPU per hop and no
protection. :class:`RelayAttach` is signed (a client id belongs to the first key attaching it).

Who sends what:

- client -> its first relay (a guard): :class:`RelayAttach` once per connection (deliveries for
  ``client_id`` come back on it), then :class:`RelayCell` per clove.
- relay -> next relay: :class:`RelayCell` (a peeled cell).
- proxy (last relay) -> entry worker: :class:`CloveDrop` (the exit payload: an envelope).
- entry worker -> first relay of a reply block: :class:`RelayCell` (a sealed reply).
- guard -> client: :class:`RelayDelivery` (a reply cell's payload, still layered).
- relay -> sender: :class:`ErrorReply <permamesh.wire.messages.ErrorReply>` only for frames it
  cannot decode; a cell that fails to peel is dropped and counted, never answered (answers would
  give an attacker an oracle).
"""

from __future__ import annotations

from permamesh.overlay.cells import MAX_CELL_BYTES
from permamesh.wire.codec import Message, WireError, message

CLIENT_ID_BYTES = 16
REPLY_ID_BYTES = 16


@message("overlay.cell", max_bytes=MAX_CELL_BYTES + 64, signed=False)
class RelayCell(Message):
    cell: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.cell, bytes) or not 0 < len(self.cell) <= MAX_CELL_BYTES:
            raise WireError(f"overlay.cell: cell must be 1..{MAX_CELL_BYTES} bytes")


@message("overlay.attach")
class RelayAttach(Message):
    client_id: bytes  # the id the client's reply blocks name; deliveries for it use this connection

    def __post_init__(self) -> None:
        if not isinstance(self.client_id, bytes) or len(self.client_id) != CLIENT_ID_BYTES:
            raise WireError(f"overlay.attach: client_id must be {CLIENT_ID_BYTES} bytes")


@message("overlay.delivery", max_bytes=MAX_CELL_BYTES + 64, signed=False)
class RelayDelivery(Message):
    reply_id: bytes  # names the reply block, so the client finds its keys
    payload: bytes  # still under every reply hop's layer: only the client can open it

    def __post_init__(self) -> None:
        if not isinstance(self.reply_id, bytes) or len(self.reply_id) != REPLY_ID_BYTES:
            raise WireError(f"overlay.delivery: reply_id must be {REPLY_ID_BYTES} bytes")
        if not isinstance(self.payload, bytes) or len(self.payload) > MAX_CELL_BYTES:
            raise WireError(f"overlay.delivery: payload must be at most {MAX_CELL_BYTES} bytes")


@message("overlay.clove", max_bytes=MAX_CELL_BYTES + 64, signed=False)
class CloveDrop(Message):
    envelope: bytes  # a proxy's exit payload: one clove and its reply blocks

    def __post_init__(self) -> None:
        if not isinstance(self.envelope, bytes) or not 0 < len(self.envelope) <= MAX_CELL_BYTES:
            raise WireError(f"overlay.clove: envelope must be 1..{MAX_CELL_BYTES} bytes")
