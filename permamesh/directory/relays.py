"""What a client or relay knows of a relay (:class:`RelayRecord`), and :class:`CachedLookup`.

Relays are found only through the committee's directory
(:class:`~permamesh.directory.committee.CommitteeDirectory`): each record comes from a running
relay's signed descriptor and its partner's registered profile (ISP, grid, location) with its
reputation. Clients build their :class:`~permamesh.overlay.paths.PathSelector` from records
(:meth:`RelayRecord.descriptor`) and onion paths (:meth:`RelayRecord.hop`); relays and workers
find the next hop of a cell through a :class:`CachedLookup` over the directory's links, which
refreshes at most once per ``max_age_s`` and sooner on a miss. Nothing here reads a shared
file or a PID.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Mapping

from permamesh.overlay.cells import HopInfo
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.paths import RelayDescriptor

log = logging.getLogger(__name__)

__all__ = ["CachedLookup", "RelayRecord"]

_NODE_ID = re.compile(r"[0-9a-f]{16}")
_KEY_HEX = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class RelayRecord:
    """One running relay as the directory describes it."""

    node_id: str  # 16 lowercase hex chars, NodeIdentity.node_id
    endpoint: str  # tcp://host:port
    sign_key: str  # hex Ed25519 public key (64 chars): signs the frames the relay sends
    kex_key: str  # hex X25519 public key (64 chars): clients wrap this hop's layer for it
    isp: str  # network operator
    grid: str  # power grid
    location: str  # site: city or building
    reputation: float = 1.0  # [0, 1]; from the committee's reputation
    bandwidth: float = 1e7  # advertised forwarding rate, bytes/s

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


class CachedLookup:
    """A directory view that reloads at most once per ``max_age_s`` seconds, and again (at
    most once per ``miss_interval_s``) when a name is missing: a relay or worker that just
    started is found on the first cell for it, and a mesh of N relays does not re-read N
    directory copies per relay every second (which costs more CPU than forwarding, at N = 100).

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
