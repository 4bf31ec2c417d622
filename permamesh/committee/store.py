"""The ledger's state store: namespaced key/value rows in SQLite with a canonical state hash.

State is a set of rows ``(namespace, key) -> value`` (all bytes; values are canonical msgpack
written by :mod:`permamesh.committee.ledger`). Its hash must depend only on the rows, never on
the order in which blocks wrote them, so two validators that applied the same transactions
agree byte for byte, and a validator restored from disk agrees with one that never stopped.

We use a lattice hash (LtHash, Bellare and Micciancio's additive multiset hash as deployed
by Lewi et al., 2019): every row expands with SHAKE-256 to 1,024 16-bit lanes, and the state
hash is the lane-wise sum mod 2^16 of all rows. Writing a row subtracts its old expansion and
adds the new one, so a block costs O(rows it touched), not O(state). The app hash reported to
consensus is SHA-256 over the lanes and the height.

Writes are staged in memory for the block being finalized (:meth:`Store.put`,
:meth:`Store.delete`) and reach SQLite in one transaction at :meth:`Store.commit`, together
with the height and the lanes; a crash before that leaves the previous committed state
intact, which is what CometBFT's replay expects. :meth:`Store.discard` drops staged writes.
Height 0 is the genesis state: InitChain's rows, committed before the first block.

Settings (:meth:`Store.setting`) are integers from CometBFT's genesis and consensus params
that the app must remember across restarts (the chain's initial height, the block size).
They are staged and committed with the rows but are not rows: they stay out of the app
hash (CometBFT hashes its consensus params into every header itself).

Who calls it: :class:`permamesh.committee.app.LedgerApp` (one store per validator process).
Nothing here reads the clock.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
import sqlite3
from collections.abc import Iterator

import numpy as np

from permamesh.committee.errors import CommitteeError

log = logging.getLogger(__name__)

LANES = 1024  # 16-bit lanes per LtHash (2 KiB)
_META = b"\x00meta"  # reserved namespace for height / lanes / app hash
_SETTING = "setting/"  # meta table names of settings: "setting/<name>"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (ns BLOB NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,
                                 PRIMARY KEY (ns, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


def row_lanes(ns: bytes, key: bytes, value: bytes) -> np.ndarray:
    """The LtHash expansion of one row (length-prefixed fields, so no two rows collide)."""
    h = hashlib.shake_256()
    for part in (ns, key, value):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return np.frombuffer(h.digest(2 * LANES), dtype="<u2").copy()


class Store:
    """One validator's ledger state; ``path=None`` keeps it in memory (tests, benchmarks)."""

    def __init__(self, path: pathlib.Path | str | None = None) -> None:
        self.path = None if path is None else pathlib.Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(":memory:" if self.path is None else str(self.path),
                                   isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._staged: dict[tuple[bytes, bytes], bytes | None] = {}
        self.height = int.from_bytes(self._meta("height") or b"", "big")
        lanes = self._meta("lanes")
        self._lanes = (np.frombuffer(lanes, dtype="<u2").copy() if lanes
                       else np.zeros(LANES, dtype="<u2"))
        self._committed_lanes = self._lanes.copy()
        self.app_hash = self._meta("app_hash") or b""
        self._settings = {
            str(name)[len(_SETTING):]: int.from_bytes(bytes(value), "big", signed=True)
            for name, value in self._db.execute(
                "SELECT name, value FROM meta WHERE substr(name, 1, ?) = ?",
                (len(_SETTING), _SETTING))}
        self._staged_settings: dict[str, int] = {}

    # -------------------------------------------------------------------------------- reads

    def _meta(self, name: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def setting(self, name: str) -> int | None:
        """A committed setting, None if never set. Reads no SQLite (safe from any thread)."""
        return self._settings.get(name)

    def get(self, ns: bytes, key: bytes) -> bytes | None:
        """The value of a row, staged writes included; None if absent."""
        if (ns, key) in self._staged:
            return self._staged[(ns, key)]
        return self.committed(ns, key)

    def committed(self, ns: bytes, key: bytes) -> bytes | None:
        """The value as of the last commit (what queries and CheckTx read)."""
        row = self._db.execute("SELECT value FROM rows WHERE ns = ? AND key = ?",
                               (ns, key)).fetchone()
        return None if row is None else bytes(row[0])

    def scan(self, ns: bytes, *, committed: bool = False) -> Iterator[tuple[bytes, bytes]]:
        """Rows of a namespace in key order (staged writes merged unless ``committed``)."""
        rows = {bytes(k): bytes(v) for k, v in
                self._db.execute("SELECT key, value FROM rows WHERE ns = ?", (ns,))}
        if not committed:
            for (sns, key), value in self._staged.items():
                if sns != ns:
                    continue
                if value is None:
                    rows.pop(key, None)
                else:
                    rows[key] = value
        for key in sorted(rows):
            yield key, rows[key]

    # ------------------------------------------------------------------------------- writes

    def put(self, ns: bytes, key: bytes, value: bytes) -> None:
        """Stage a row write for the current block."""
        if ns == _META:
            raise CommitteeError("the meta namespace is reserved")
        old = self.get(ns, key)
        if old == value:
            return
        if old is not None:
            self._lanes -= row_lanes(ns, key, old)
        self._lanes += row_lanes(ns, key, value)
        self._staged[(ns, key)] = value

    def delete(self, ns: bytes, key: bytes) -> None:
        """Stage a row deletion (no-op when absent)."""
        old = self.get(ns, key)
        if old is None:
            return
        self._lanes -= row_lanes(ns, key, old)
        self._staged[(ns, key)] = None

    def stage_setting(self, name: str, value: int) -> None:
        """Set a setting at the next :meth:`commit` (dropped by :meth:`discard`)."""
        if not -(2**63) <= value < 2**63:
            raise CommitteeError(f"setting {name} out of range: {value}")
        self._staged_settings[name] = value

    def staged_hash(self, height: int) -> bytes:
        """The app hash the state would have if committed now at ``height``."""
        return hashlib.sha256(b"permamesh/ledger/v1\x00" + height.to_bytes(8, "big")
                              + self._lanes.tobytes()).digest()

    def commit(self, height: int) -> bytes:
        """Write staged rows and settings, the height and the lanes in one SQLite transaction.

        ``height`` 0 commits the genesis state (allowed only before any block)."""
        if height <= self.height and self.height:
            raise CommitteeError(f"commit of height {height} after height {self.height}")
        app_hash = self.staged_hash(height)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for (ns, key), value in self._staged.items():
                if value is None:
                    db.execute("DELETE FROM rows WHERE ns = ? AND key = ?", (ns, key))
                else:
                    db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?, ?)", (ns, key, value))
            meta = [("height", height.to_bytes(8, "big")), ("lanes", self._lanes.tobytes()),
                    ("app_hash", app_hash)]
            meta += [(_SETTING + name, value.to_bytes(8, "big", signed=True))
                     for name, value in sorted(self._staged_settings.items())]
            for name, value in meta:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._staged.clear()
        self._settings.update(self._staged_settings)
        self._staged_settings.clear()
        self._committed_lanes = self._lanes.copy()
        self.height, self.app_hash = height, app_hash
        return app_hash

    def discard(self) -> None:
        """Drop staged writes (a block that was finalized but will not be committed)."""
        self._staged.clear()
        self._staged_settings.clear()
        self._lanes = self._committed_lanes.copy()

    def recompute_lanes(self) -> np.ndarray:
        """The lanes recomputed from every committed row (audits and tests)."""
        lanes = np.zeros(LANES, dtype="<u2")
        for ns, key, value in self._db.execute("SELECT ns, key, value FROM rows"):
            lanes += row_lanes(bytes(ns), bytes(key), bytes(value))
        return lanes

    def lanes(self) -> np.ndarray:
        return self._lanes.copy()

    def close(self) -> None:
        self._db.close()
