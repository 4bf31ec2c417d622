"""The local relay directory: which relays run on this machine, and what clients need of them.

A relay started with a data directory writes ``<data_dir>/run/relays/<node_id>.json`` (a
:class:`RelayRecord`) once it is serving and removes it when it stops, as workers do in
:mod:`permamesh.directory.workers`. Clients read the records to build their
:class:`~permamesh.overlay.paths.PathSelector` (:meth:`RelayRecord.descriptor`) and
onion paths (:meth:`RelayRecord.hop`); relays read them to find the next hop of a cell.
Records whose process is gone are ignored and removed; unreadable or malformed records are
skipped with a log line. This is discovery for one machine only: the committee's registry
(reputation, measured bandwidth) replaces it across machines.

:class:`CachedLookup` keeps a relay's view of the directory fresh without reading the disk
for every cell: at most one reload per ``max_age_s``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from permamesh.directory.workers import read_records, write_record  # the same registry rules as workers
from permamesh.directory.workers import discover as discover_workers
from permamesh.overlay.cells import HopInfo
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.paths import RelayDescriptor

log = logging.getLogger(__name__)

__all__ = [
    "CachedLookup", "RelayRecord", "discover_relays", "register_relay", "relay_endpoints",
    "unregister_relay", "worker_endpoints",
]

_NODE_ID = re.compile(r"[0-9a-f]{16}")
_KEY_HEX = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class RelayRecord:
    """One running relay as its registry file describes it."""

    node_id: str  # 16 lowercase hex chars, NodeIdentity.node_id
    endpoint: str  # tcp://host:port
    sign_key: str  # hex Ed25519 public key (64 chars): signs the frames the relay sends
    kex_key: str  # hex X25519 public key (64 chars): clients wrap this hop's layer for it
    isp: str  # network operator
    grid: str  # power grid
    location: str  # site: city or building
    reputation: float = 1.0  # [0, 1]; local records are trusted, the committee's are scored
    bandwidth: float = 1e7  # advertised forwarding rate, bytes/s
    pid: int = 0  # the relay process, for liveness checks

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not _NODE_ID.fullmatch(self.node_id):
            raise OverlayError(f"relay record: node_id {self.node_id!r} is not 16 hex chars")
        for name in ("sign_key", "kex_key"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _KEY_HEX.fullmatch(value):
                raise OverlayError(f"relay record {self.node_id}: {name} is not 64 hex chars")
        for name in ("endpoint", "isp", "grid", "location"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise OverlayError(f"relay record {self.node_id}: {name} must be a non-empty str")
        for name in ("reputation", "bandwidth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise OverlayError(f"relay record {self.node_id}: {name} must be a finite number")
        if isinstance(self.pid, bool) or not isinstance(self.pid, int) or self.pid < 0:
            raise OverlayError(f"relay record {self.node_id}: pid must be an int >= 0")

    @property
    def node_id_bytes(self) -> bytes:
        """The node id as cells carry it (16 ASCII bytes)."""
        return self.node_id.encode("ascii")

    def hop(self) -> HopInfo:
        """What :func:`~permamesh.overlay.onion.build_forward` needs of this relay."""
        return HopInfo(self.node_id_bytes, bytes.fromhex(self.kex_key))

    def descriptor(self) -> RelayDescriptor:
        """What :class:`~permamesh.overlay.paths.PathSelector` needs of this relay."""
        return RelayDescriptor(self.node_id_bytes, bytes.fromhex(self.kex_key), self.endpoint,
                               self.isp, self.grid, self.location, float(self.reputation),
                               float(self.bandwidth))


def _dir(data_dir: Path) -> Path:
    return Path(data_dir) / "run" / "relays"


def register_relay(data_dir: Path, record: RelayRecord) -> Path:
    """Write ``record`` atomically (a temporary file renamed into place); returns its path."""
    return write_record(_dir(data_dir), record)


def unregister_relay(data_dir: Path, node_id: str) -> None:
    """Remove the record of ``node_id`` if present."""
    if _NODE_ID.fullmatch(node_id):
        (_dir(data_dir) / f"{node_id}.json").unlink(missing_ok=True)


def discover_relays(data_dir: Path) -> list[RelayRecord]:
    """Live relays registered under ``data_dir``, sorted by node id."""
    return read_records(_dir(data_dir), RelayRecord, (OverlayError,), "relay record")


def relay_endpoints(data_dir: Path) -> dict[bytes, str]:
    """Live local relays by node id bytes (as cells name them) -> endpoint."""
    return {r.node_id_bytes: r.endpoint for r in discover_relays(data_dir)}


def worker_endpoints(data_dir: Path) -> dict[bytes, str]:
    """Live local workers by node id bytes (as exit commands name them) -> endpoint."""
    return {w.node_id.encode("ascii"): w.endpoint for w in discover_workers(data_dir)
            if w.node_id.isascii()}


class CachedLookup:
    """A directory view that reloads at most once per ``max_age_s`` seconds, and again (at
    most once per ``miss_interval_s``) when a name is missing: a relay or worker that just
    started is found on the first cell for it, and a mesh of N relays does not re-read N
    registry files per relay every second (which costs more CPU than forwarding, at N = 100).

    A failing ``load`` is logged and the previous result kept, so a relay never stops on a
    transient file-system error. Not thread-safe: one event loop calls it.
    """

    def __init__(self, load: Callable[[], Mapping[bytes, str]], max_age_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, miss_interval_s: float = 0.25) -> None:
        self._load, self._max_age_s, self._clock = load, max_age_s, clock
        self._miss_interval_s = miss_interval_s
        self._value: dict[bytes, str] = {}
        self._loaded_at: float | None = None
        self._view = _ReloadOnMiss(self)

    def __call__(self) -> Mapping[bytes, str]:
        self._reload_if_older(self._max_age_s)
        return self._view

    def _reload_if_older(self, age_s: float) -> None:
        now = self._clock()
        if self._loaded_at is None or now - self._loaded_at >= age_s:
            self._loaded_at = now
            try:
                self._value = dict(self._load())
            except Exception as exc:  # keep the last view rather than stop forwarding
                log.warning("directory reload failed, keeping %d entries: %s", len(self._value), exc)


class _ReloadOnMiss(Mapping):
    def __init__(self, owner: CachedLookup) -> None:
        self._owner = owner

    def __getitem__(self, key: bytes) -> str:
        value = self._owner._value.get(key)
        if value is None:
            self._owner._reload_if_older(self._owner._miss_interval_s)
            value = self._owner._value.get(key)
            if value is None:
                raise KeyError(key)
        return value

    def __iter__(self):
        return iter(self._owner._value)

    def __len__(self) -> int:
        return len(self._owner._value)
