"""The directory from the committee, as Tor's clients take the consensus from its authorities.

:class:`CommitteeDirectory` needs only the address of one validator (``--join``). It asks a
validator for ``/directory``, then checks the answer against a second validator: that one's app
hash after the same height must equal the one the answer was computed on (a validator that
lies about the directory would have to lie about its state hash too, and the others would not
agree). Validators listed in the directory itself serve as second opinions, so one address is
enough to start. A checked snapshot is kept on disk (``cache_path``), so a restart works while
the committee is briefly out of reach; a snapshot is refreshed at most every ``refresh_s``.

Nothing here reads a PID or a shared file: liveness is the committee's ``running`` flag, from
its members' probes (docs/committee.md), plus whatever fast local evidence callers keep.

Who calls it: worker, relay and gateway processes and the clients started with ``--join``;
they read :meth:`workers`, :meth:`relays` and the lookups built from them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from permamesh.committee.client import CommitteeClient
from permamesh.committee.endpoints import EndpointError, parse_endpoint
from permamesh.committee.errors import CommitteeError
from permamesh.directory.errors import DirectoryError
from permamesh.directory.relays import RelayRecord
from permamesh.directory.snapshot import Snapshot, parse_directory
from permamesh.directory.workers import WorkerRecord

log = logging.getLogger(__name__)

CONFIRM_WAIT_S = 5.0  # how long a second validator may take to reach the answer's height


def parse_join(value: str | Sequence[str]) -> list[str]:
    """``--join`` values (comma-separated, repeatable) -> validator endpoints, checked and in
    canonical form: ``https://HOST:PORT?key=HEX`` (CometBFT RPC, pinned to the member's node
    key) or ``tcp://HOST:PORT?key=HEX`` (devnet, its transport key); plain ``http://`` and
    key-less ``tcp://`` only to this machine (:mod:`permamesh.committee.endpoints`)."""
    items = [value] if isinstance(value, str) else list(value)
    endpoints = []
    for text in (p.strip() for item in items for p in item.split(",") if p.strip()):
        try:
            endpoints.append(str(parse_endpoint(text)))
        except EndpointError as exc:
            raise DirectoryError(f"--join {exc}") from None
    if not endpoints:
        raise DirectoryError("--join needs at least one validator address")
    return endpoints


class CommitteeDirectory:
    """A node's view of the committee's directory; thread-safe."""

    def __init__(self, endpoints: Sequence[str], cache_path: Path | None = None, refresh_s: float = 2.0,
                 timeout_s: float = 5.0, confirm: bool = True,
                 client: Callable[[list[str], float], CommitteeClient] = lambda eps, t: CommitteeClient(eps, t)) -> None:
        self.endpoints = list(endpoints)
        if not self.endpoints:
            raise DirectoryError("no committee address to read the directory from")
        self.cache_path, self.refresh_s, self.timeout_s, self.confirm = cache_path, refresh_s, timeout_s, confirm
        self._client = client
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._fetched_at = float("-inf")
        if cache_path is not None:
            self._snapshot = self._load_cache(cache_path)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._warned_alone = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ background refresh
    def start(self) -> CommitteeDirectory:
        """Refresh on a daemon thread every ``refresh_s`` (and soon after :meth:`nudge`), so
        readers on an event loop never wait on the network. Reads the directory once first:
        a wrong committee address fails here, with the reason."""
        started = time.monotonic()
        snap = self.snapshot(0.0)
        checked = ", ".join(e.split("?")[0] for e in snap.confirmed_by) or "none"
        log.info("directory read at height %d from %s (checked by %s): %d nodes, %d running, in %.2f s", snap.height,
                 snap.source.split("?")[0], checked, len(snap.entries), sum(e.running for e in snap.entries),
                 time.monotonic() - started)
        self._thread = threading.Thread(target=self._run, name="directory", daemon=True)
        self._thread.start()
        return self

    def nudge(self) -> None:
        """Ask the refresh thread for a fresh copy now (a lookup missed a node)."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + CONFIRM_WAIT_S + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.refresh_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.snapshot(0.0, _background=True)
            except DirectoryError as exc:
                log.warning("%s", exc)
            self._stop.wait(0.25)  # at most four reads a second, however many misses

    # ------------------------------------------------------------------ reading
    def snapshot(self, max_age_s: float | None = None, _background: bool = False) -> Snapshot:
        """The current directory: refreshed when older than ``max_age_s`` (default
        ``refresh_s``); on failure the last good one (memory or disk), else DirectoryError.
        Once :meth:`start` ran, readers get the latest copy at once and the thread refreshes."""
        max_age_s = self.refresh_s if max_age_s is None else max_age_s
        if self._thread is not None and not _background and self._snapshot is not None:
            if time.monotonic() - self._fetched_at >= max_age_s:
                self.nudge()
            return self._snapshot
        with self._lock:
            if self._snapshot is not None and time.monotonic() - self._fetched_at < max_age_s:
                return self._snapshot
            try:
                self._snapshot = self._fetch()
                self._fetched_at = time.monotonic()
                if self.cache_path is not None:
                    self._save_cache(self.cache_path, self._snapshot)
            except (DirectoryError, CommitteeError) as exc:
                if self._snapshot is None:
                    raise DirectoryError(f"cannot read the directory from {', '.join(self.endpoints)}: {exc}") from None
                log.warning("directory refresh failed (%s); using the copy of height %d", exc, self._snapshot.height)
                self._fetched_at = time.monotonic()  # do not hammer a committee that is down
            return self._snapshot

    def workers(self, model: str | None = None, group: str | None = None) -> list[WorkerRecord]:
        """Running workers (optionally of one model or group), as records."""
        return [e.worker_record() for e in self.snapshot().running("worker")
                if (model is None or e.model == model) and (group is None or e.group == group)]

    def relays(self) -> list[RelayRecord]:
        return [e.relay_record() for e in self.snapshot().running("relay")]

    def relay_endpoints(self) -> dict[bytes, str]:
        """Every announced relay by node id bytes (as cells name them) -> link. Lookups take
        announced nodes, not only running ones: the client already chose them from its own
        copy, which may be a moment newer than ours. A miss asks for a fresh copy."""
        return self._links("relay")

    def worker_endpoints(self) -> dict[bytes, str]:
        """Every announced worker by node id bytes (as exit commands name them) -> link."""
        return self._links("worker")

    def _links(self, role: str) -> dict[bytes, str]:
        self.nudge()  # callers ask on a miss (CachedLookup): refresh soon
        return {e.node_id.encode("ascii"): e.link for e in self.snapshot().entries
                if e.role == role and e.reachable and not e.excluded}

    # ------------------------------------------------------------------ fetching
    def _fetch(self) -> Snapshot:
        errors = []
        for source in self._known(self._snapshot):
            try:
                with self._client([source], self.timeout_s) as client:
                    snap = parse_directory(client.query("/directory"), source)
            except (CommitteeError, DirectoryError, ValueError) as exc:
                errors.append(f"{source}: {exc}")
                continue
            if not self.confirm:
                return snap
            return self._confirmed(snap, [ep for ep in self._known(snap) if ep != source])
        raise DirectoryError("; ".join(errors) or "no validator to ask")

    def _known(self, snap: Snapshot | None) -> list[str]:
        """The validators to ask: the configured ones, then those the directory lists, in the
        scheme of the first configured one and pinned to their keys (:meth:`Snapshot.validators`)."""
        scheme = self.endpoints[0].split("://", 1)[0]
        extra = snap.validators(scheme) if snap is not None else []
        return list(dict.fromkeys(self.endpoints + extra))

    def _confirmed(self, snap: Snapshot, others: list[str]) -> Snapshot:
        """``snap`` if another validator's app hash after ``snap.height`` matches it."""
        if not others:
            if not self._warned_alone:  # once per directory: a one-validator committee says so at every refresh
                log.warning("only one validator known (%s): the directory is not cross-checked", snap.source)
                self._warned_alone = True
            return snap
        problems = []
        for other in others:
            deadline = time.monotonic() + CONFIRM_WAIT_S
            try:
                with self._client([other], self.timeout_s) as client:
                    while True:
                        status = client.status_of(other, snap.height, snap.height, timeout_s=self.timeout_s)
                        if status is None:
                            raise CommitteeError("no answer")
                        if snap.height in status.heights:
                            theirs = status.app_hashes[status.heights.index(snap.height)]
                            if theirs != snap.app_hash:
                                raise DirectoryError(
                                    f"validators disagree at height {snap.height}: {snap.source} says app hash "
                                    f"{snap.app_hash.hex()[:16]}, {other} says {theirs.hex()[:16]}")
                            return Snapshot(snap.height, snap.app_hash, snap.period, snap.entries, snap.source,
                                            (other,))
                        if status.height >= snap.height or time.monotonic() > deadline:
                            raise CommitteeError(f"has no app hash for height {snap.height} (at {status.height})")
                        time.sleep(0.1)  # bounded: waiting for the next block, at most CONFIRM_WAIT_S
            except CommitteeError as exc:
                problems.append(f"{other}: {exc}")
        raise DirectoryError(f"no second validator confirmed the directory at height {snap.height}: "
                             + "; ".join(problems))

    # ------------------------------------------------------------------ the copy on disk
    @staticmethod
    def _save_cache(path: Path, snap: Snapshot) -> None:
        """Write the copy atomically: a temporary file of its own (several directories of one
        process may share ``path``: each client of an AsyncClient has one) renamed into place.
        A copy that cannot be written is logged; the directory read still counts."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps({"snapshot": _to_json(snap)}))
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning("cannot keep the directory copy %s: %s", path, exc)

    @staticmethod
    def _load_cache(path: Path) -> Snapshot | None:
        try:
            return parse_directory(json.loads(path.read_text())["snapshot"], f"cache {path}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, DirectoryError) as exc:
            log.warning("ignoring the directory copy %s: %s", path, exc)
            return None


def _to_json(snap: Snapshot) -> dict:
    """A snapshot in the ledger's ``/directory`` shape (what :func:`parse_directory` reads)."""
    nodes = [{"node": e.node_key.hex(), "node_id": e.node_id, "role": e.role, "kex_key": e.kex_key.hex(),
              "transport_key": e.transport_key.hex(), "endpoint": e.endpoint, "model": e.model,
              "engine": e.engine, "group": e.group, "layers": e.layers, "version": e.version,
              "profile": {"isp": e.isp, "grid": e.grid, "datacenter": e.location},
              "reputation_ppm": int(e.reputation * 1e6), "excluded": e.excluded, "running": e.running,
              "rtt_us": e.rtt_us} for e in snap.entries]
    return {"height": snap.height, "app_hash": snap.app_hash.hex(), "period": snap.period, "nodes": nodes}
