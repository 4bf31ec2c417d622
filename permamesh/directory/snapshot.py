"""The committee's directory as a node reads it: checked entries, not trusted JSON.

:func:`parse_directory` turns the ledger's ``/directory`` answer (docs/committee.md) into a
:class:`Snapshot` of :class:`Entry` values. The answer comes from a peer, so every field is
checked: a malformed answer raises :class:`~permamesh.directory.errors.DirectoryError`, and a
malformed entry is dropped with a log line (one bad descriptor never hides the others).

An entry's :attr:`Entry.link` is what a node connects to: its advertised endpoint with its
transport key (``tcp://HOST:PORT?key=HEX``), so every link to it is encrypted and the server
authenticated (:mod:`permamesh.transport`). :meth:`Entry.worker_record` and
:meth:`Entry.relay_record` give the shapes the rest of the code already takes.

Who calls it: :class:`permamesh.directory.committee.CommitteeDirectory`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from permamesh.committee.endpoints import is_loopback
from permamesh.directory.errors import DirectoryError
from permamesh.directory.relays import RelayRecord
from permamesh.directory.workers import WorkerRecord
from permamesh.identity import PublicIdentity
from permamesh.transport import with_key

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_ENDPOINT = re.compile(r"tcp://[A-Za-z0-9.\-\[\]:]{1,190}:[0-9]{1,5}")
_NAME = re.compile(r"[\x20-\x7e]{0,256}")
ROLES = ("worker", "relay", "validator", "gateway")
MAX_NODES = 100_000


@dataclass(frozen=True)
class Entry:
    """One node of the directory, checked."""

    node_key: bytes  # Ed25519 public key
    node_id: str
    role: str
    kex_key: bytes  # X25519 public key (onion layers)
    transport_key: bytes  # CurveZMQ server key; b"" until the node announced itself
    endpoint: str  # advertised tcp://HOST:PORT ("" until announced)
    model: str
    group: str
    layers: str  # layer server endpoint or ""
    version: str
    isp: str
    grid: str
    location: str
    reputation: float  # [0, 1]
    excluded: bool
    running: bool  # the committee's probes found it up, recently enough
    rtt_us: int | None
    engine: str = ""  # what computes a worker's answers ("" = torch)

    @property
    def link(self) -> str:
        """The endpoint to connect to, naming the server's transport key."""
        return with_key(self.endpoint, self.transport_key or None)

    @property
    def reachable(self) -> bool:
        return bool(self.endpoint and self.transport_key)

    def worker_record(self) -> WorkerRecord:
        layers = with_key(self.layers, self.transport_key) if self.layers else ""
        return WorkerRecord(self.node_id, self.link, self.node_key.hex(), self.model, self.group, layers,
                            self.engine or "torch")

    def relay_record(self) -> RelayRecord:
        return RelayRecord(self.node_id, self.link, self.node_key.hex(), self.kex_key.hex(), self.isp or "?",
                           self.grid or "?", self.location or "?", self.reputation)


@dataclass(frozen=True)
class Snapshot:
    """The directory at one committed height, with whom it was checked against."""

    height: int
    app_hash: bytes
    period: int
    entries: tuple[Entry, ...]  # sorted by node key
    source: str = ""  # the validator that answered
    confirmed_by: tuple[str, ...] = ()  # validators whose app hash at ``height`` matched

    def running(self, role: str) -> list[Entry]:
        """Announced nodes of ``role`` the committee finds running, not excluded."""
        return [e for e in self.entries if e.role == role and e.running and e.reachable and not e.excluded]

    def validators(self, scheme: str = "tcp") -> list[str]:
        """The addresses of the committee's validators that published one, for a reader that
        used ``scheme``, each pinned to the key its row holds. Validators publish
        ``tcp://HOST:PORT``; it becomes ``tcp://HOST:PORT?key=<transport key>`` for a devnet
        reader (``tcp``), ``https://HOST:PORT?key=<node key>`` for a CometBFT RPC reader
        (``https``; ``http`` too, except that a loopback validator stays plain ``http://``
        for local tooling, :mod:`permamesh.committee.endpoints`)."""
        out = []
        for e in self.entries:
            if e.role != "validator" or not e.endpoint or e.excluded:
                continue
            hostport = e.endpoint.removeprefix("tcp://")
            if scheme == "tcp":
                if e.transport_key:
                    out.append(with_key(e.endpoint, e.transport_key))
            elif scheme == "http" and is_loopback(hostport.rpartition(":")[0]):
                out.append(f"http://{hostport}")
            else:
                out.append(f"https://{hostport}?key={e.node_key.hex()}")
        return out

    def by_id(self) -> dict[str, Entry]:
        return {e.node_id: e for e in self.entries}


def _hexkey(value: object, what: str, empty_ok: bool = False) -> bytes:
    if empty_ok and value in ("", None):
        return b""
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ValueError(f"{what} is not 64 lowercase hex characters")
    return bytes.fromhex(value)


def _text(row: dict, name: str) -> str:
    value = row.get(name, "")
    value = "" if value is None else value
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{name} is not a short printable string")
    return value


def _endpoint(row: dict, name: str) -> str:
    value = _text(row, name)
    if value and not _ENDPOINT.fullmatch(value):
        raise ValueError(f"{name} {value!r} is not tcp://HOST:PORT")
    return value


def _int(value: object, what: str, low: int = 0) -> int:
    if type(value) is not int or value < low:
        raise ValueError(f"{what} is not an integer >= {low}")
    return value


def parse_entry(row: object) -> Entry:
    """One ``/directory`` node row -> :class:`Entry`; ValueError says what is wrong."""
    if not isinstance(row, dict):
        raise ValueError("a node is not a JSON object")
    node_key = _hexkey(row.get("node"), "node")
    kex_key = _hexkey(row.get("kex_key"), "kex_key")
    node_id = PublicIdentity(node_key, kex_key).node_id
    if row.get("node_id", node_id) != node_id:
        raise ValueError(f"node_id does not match the node key ({node_id})")
    role = row.get("role")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    profile = row.get("profile") or {}
    if not isinstance(profile, dict):
        raise ValueError("profile is not a JSON object")
    rep = row.get("reputation_ppm")
    reputation = 0.5 if rep is None else _int(rep, "reputation_ppm") / 1e6
    rtt = row.get("rtt_us")
    location = _text(profile, "datacenter") or (
        f"{_int(abs(profile.get('lat_e6', 0)), 'lat') // 10**5}:{_int(abs(profile.get('lon_e6', 0)), 'lon') // 10**5}")
    return Entry(node_key, node_id, role, kex_key, _hexkey(row.get("transport_key"), "transport_key", True),
                 _endpoint(row, "endpoint"), _text(row, "model"), _text(row, "group"), _endpoint(row, "layers"),
                 _text(row, "version"), _text(profile, "isp"), _text(profile, "grid"), location,
                 min(1.0, reputation), bool(row.get("excluded")), row.get("running") is True,
                 None if rtt is None else _int(rtt, "rtt_us"), _text(row, "engine"))


def parse_directory(value: object, source: str = "") -> Snapshot:
    """The ``/directory`` answer -> :class:`Snapshot` (bad entries dropped, logged)."""
    if not isinstance(value, dict):
        raise DirectoryError("the directory is not a JSON object")
    try:
        height = _int(value.get("height"), "height")
        period = _int(value.get("period", 0), "period")
        app_hash = bytes.fromhex(value.get("app_hash", "")) if isinstance(value.get("app_hash"), str) else None
    except ValueError as exc:
        raise DirectoryError(f"the directory from {source or 'the committee'}: {exc}") from None
    nodes = value.get("nodes")
    if app_hash is None or not isinstance(nodes, list) or len(nodes) > MAX_NODES:
        raise DirectoryError(f"the directory from {source or 'the committee'} lacks app_hash or a bounded node list")
    entries = {}
    for row in nodes:
        try:
            entry = parse_entry(row)
        except (ValueError, TypeError) as exc:
            log.warning("directory from %s: dropping a node: %s", source or "the committee", exc)
            continue
        entries[entry.node_key] = entry
    return Snapshot(height, app_hash, period, tuple(entries[k] for k in sorted(entries)), source)
