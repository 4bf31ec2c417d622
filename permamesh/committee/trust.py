"""TrustView: the committee's published reputations, as routing reads them.

Routing calls :meth:`TrustView.reputation` with a worker id on its event loop, so the call
never touches the network: a daemon thread refreshes a snapshot of the committee's
``/reputation`` and ``/registry`` queries every ``refresh_s`` and swaps it in whole. A node
the committee excluded reads 0 (below every routing floor); a registered node reads its
reputation; a node the committee does not know reads ``unknown`` (default 0: with a
committee, unregistered workers get no traffic). Until the first snapshot arrives every node
reads ``unknown`` too, and a failed refresh keeps the previous snapshot (logged).

Who calls it: the worker process (``--committee``) hands :meth:`reputation` to its
:class:`~permamesh.workers.group.GroupLink`; the demo gives the overlay client
:func:`scored_relays` (relay records carrying the committee's reputations, so path selection's
floor reads the ledger too); tests read :meth:`snapshot`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field

from permamesh.committee.client import CommitteeClient
from permamesh.committee.errors import CommitteeError

log = logging.getLogger(__name__)


def node_id_of(key_hex: str) -> str:
    """The short worker id (as :class:`permamesh.identity.PublicIdentity` names it) of a key."""
    return hashlib.sha256(bytes.fromhex(key_hex)).hexdigest()[:16]


@dataclass(frozen=True)
class TrustSnapshot:
    height: int = -1
    reputation: dict[str, float] = field(default_factory=dict)  # worker id -> routing reputation
    roles: dict[str, str] = field(default_factory=dict)


def fetch_snapshot(client: CommitteeClient) -> TrustSnapshot:
    status = client.query("/status")
    reps, roles = {}, {}
    for row in client.query("/registry"):
        node = node_id_of(row["node"])
        roles[node] = row["role"]
        reps[node] = 0.0 if row["excluded"] else row["reputation_ppm"] / 1_000_000
    return TrustSnapshot(status["height"], reps, roles)


def scored_relays(relays: list, snapshot: TrustSnapshot, unknown: float = 0.0) -> list:
    """Relay registry records with the committee's reputation instead of the local one, so
    the overlay's path selection applies its floor to what the committee measured."""
    import dataclasses

    return [dataclasses.replace(r, reputation=snapshot.reputation.get(r.node_id, unknown))
            for r in relays]


class TrustView:
    def __init__(self, endpoints: list[str], refresh_s: float = 2.0, unknown: float = 0.0) -> None:
        self.endpoints, self.refresh_s, self.unknown = list(endpoints), refresh_s, unknown
        self._snapshot = TrustSnapshot()
        self._stop = threading.Event()
        self._fresh = threading.Event()
        self._thread = threading.Thread(target=self._main, name="trust-view", daemon=True)

    def start(self) -> TrustView:
        self._thread.start()
        return self

    def _main(self) -> None:
        with CommitteeClient(self.endpoints, timeout_s=max(1.0, self.refresh_s)) as client:
            while not self._stop.is_set():
                try:
                    self._snapshot = fetch_snapshot(client)
                    self._fresh.set()
                except CommitteeError as exc:
                    log.warning("committee reputation refresh failed (keeping the last): %s", exc)
                self._stop.wait(self.refresh_s)

    def wait_fresh(self, timeout_s: float = 10.0) -> bool:
        """Block until a refresh after this call has landed (tests, demo)."""
        self._fresh.clear()
        return self._fresh.wait(timeout_s)

    def snapshot(self) -> TrustSnapshot:
        return self._snapshot

    def reputation(self, worker_id: str) -> float:
        """Routing reputation of ``worker_id`` in [0, 1]; never blocks."""
        return self._snapshot.reputation.get(worker_id, self.unknown)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10.0)
