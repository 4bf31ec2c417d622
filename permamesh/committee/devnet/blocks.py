"""Devnet blocks: their bytes, and the store of committed blocks with their commit certificates.

A block is canonical msgpack ``[1, height, prev_hash, last_app_hash, proposer, time_ms, txs]``.
``last_app_hash`` is the application's hash after the previous block, so a validator whose
state diverged rejects the next proposal instead of silently forking (as in CometBFT, whose
header carries ``AppHash``). ``time_ms`` is the proposer's clock, used only as the ABCI
``time`` of the block; the application never reads it into state.

:class:`BlockStore` (SQLite, one per validator) keeps every decided block, its commit (the
> 2/3 precommits that decided it) and the app hash after applying it. The node writes a
block here *before* applying it, so a validator killed between the two replays the block
from its own store on restart (the app's Info height says which blocks it lacks).

Who calls it: :mod:`permamesh.committee.devnet.node` (propose, validate, decide, catch-up).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
import sqlite3

import msgpack

from permamesh.committee.errors import ProtocolError

log = logging.getLogger(__name__)

MAX_BLOCK_BYTES = 4 * 1024 * 1024
MAX_BLOCK_TXS = 5_000
MAX_HEIGHT = 2**63  # heights in [1, MAX_HEIGHT): SQLite's INTEGER range, as the votes'
_INT64 = range(-(2**63), 2**63)  # time_ms must fit SQLite and the ABCI Timestamp


@dataclasses.dataclass(frozen=True)
class Block:
    height: int
    prev_hash: bytes
    last_app_hash: bytes
    proposer: bytes
    time_ms: int
    txs: tuple[bytes, ...]

    def encode(self) -> bytes:
        return msgpack.packb([1, self.height, self.prev_hash, self.last_app_hash, self.proposer,
                              self.time_ms, list(self.txs)], use_bin_type=True)

    @staticmethod
    def hash_of(raw: bytes) -> bytes:
        return hashlib.sha256(raw).digest()

    @classmethod
    def decode(cls, raw: bytes) -> Block:
        """Parse block bytes from a peer; :class:`ProtocolError` on anything malformed."""
        if not isinstance(raw, bytes) or len(raw) > MAX_BLOCK_BYTES:
            raise ProtocolError("block is not bytes or is too large")
        try:
            items = msgpack.unpackb(raw, raw=False, use_list=True, max_array_len=MAX_BLOCK_TXS,
                                    max_bin_len=MAX_BLOCK_BYTES, max_str_len=0, max_map_len=0,
                                    max_ext_len=0)
        except Exception as exc:  # msgpack raises several unrelated types on bad input
            raise ProtocolError(f"block is not msgpack: {exc.__class__.__name__}") from None
        if not isinstance(items, list) or len(items) != 7 or items[0] != 1:
            raise ProtocolError("block must be [1, height, prev, app_hash, proposer, time, txs]")
        _, height, prev, app_hash, proposer, time_ms, txs = items
        if type(height) is not int or not 1 <= height < MAX_HEIGHT or type(time_ms) is not int \
                or time_ms not in _INT64:
            raise ProtocolError(f"block height must be an int in [1, {MAX_HEIGHT}) and time a 64-bit int")
        if not all(isinstance(x, bytes) for x in (prev, app_hash, proposer)):
            raise ProtocolError("block hashes and proposer must be bytes")
        if not isinstance(txs, list) or not all(isinstance(t, bytes) for t in txs):
            raise ProtocolError("block txs must be a list of bytes")
        block = cls(height, prev, app_hash, proposer, time_ms, tuple(txs))
        if block.encode() != raw:
            raise ProtocolError("block bytes are not canonical")
        return block


class BlockStore:
    """Committed blocks of one validator, by height."""

    def __init__(self, path: pathlib.Path | str | None) -> None:
        self._db = sqlite3.connect(":memory:" if path is None else str(path),
                                   isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS blocks (height INTEGER PRIMARY KEY, "
                         "block BLOB NOT NULL, hash BLOB NOT NULL, round INTEGER NOT NULL, "
                         "commit_votes BLOB NOT NULL, app_hash BLOB)")

    @property
    def height(self) -> int:
        row = self._db.execute("SELECT MAX(height) FROM blocks").fetchone()
        return row[0] or 0

    def save(self, height: int, raw: bytes, round_: int, commit: bytes) -> None:
        """Persist a decided block and its encoded commit (before it is applied)."""
        self._db.execute("INSERT OR IGNORE INTO blocks VALUES (?, ?, ?, ?, ?, NULL)",
                         (height, raw, Block.hash_of(raw), round_, commit))

    def set_app_hash(self, height: int, app_hash: bytes) -> None:
        self._db.execute("UPDATE blocks SET app_hash = ? WHERE height = ?", (app_hash, height))

    def get(self, height: int) -> tuple[bytes, int, bytes] | None:
        """(block bytes, round, encoded commit) at ``height``."""
        row = self._db.execute("SELECT block, round, commit_votes FROM blocks WHERE height = ?",
                               (height,)).fetchone()
        return None if row is None else (bytes(row[0]), row[1], bytes(row[2]))

    def block_hash(self, height: int) -> bytes:
        row = self._db.execute("SELECT hash FROM blocks WHERE height = ?", (height,)).fetchone()
        return b"" if row is None else bytes(row[0])

    def app_hashes(self, first: int, last: int) -> list[tuple[int, bytes]]:
        """App hashes for the stored heights in first..last (any ints: clamped to the store)."""
        first, last = max(first, 1), min(last, MAX_HEIGHT - 1)
        if first > last:
            return []
        rows = self._db.execute("SELECT height, app_hash FROM blocks WHERE height BETWEEN ? AND ?"
                                " AND app_hash IS NOT NULL ORDER BY height", (first, last))
        return [(h, bytes(a)) for h, a in rows]

    def close(self) -> None:
        self._db.close()
