"""A validator's Prometheus metrics: chain height, mempool, misbehaviour seen, and the
verification scores the ledger holds (each node's reputation and whether it is excluded).

The figures come from asking the validator itself over its own socket
(:class:`~permamesh.committee.client.CommitteeClient` to its own endpoint), so the ledger's
SQLite connection is only ever used by the validator's own thread. A zmq socket must never be
used by two threads at once (libzmq asserts and aborts the process), and the metrics server
answers scrapes on a thread each, so scrapes never touch the client: :class:`FigureCache`
owns it on one thread of its own, refreshes a snapshot every ``interval_s`` seconds, and a
scrape only reads the latest snapshot (a list swapped whole, never mutated).

The status is a :class:`~permamesh.committee.client.CommitteeStatus`, the same under either
engine, so the figures read the same from a devnet validator (``tcp://``) or a CometBFT node's
RPC (``https://``, pinned; misbehaviour is 0 there: CometBFT keeps evidence in its blocks).

Who calls it: :mod:`permamesh.committee.validator` (devnet engine).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from permamesh.committee.trust import node_id_of
from permamesh.ops.metrics import Figure

log = logging.getLogger(__name__)

PPM = 1_000_000


def validator_figures(client) -> list[Figure]:
    """``client``: a CommitteeClient with this validator's endpoint only (either engine)."""
    out: list[Figure] = []
    status = client.status()
    out += [Figure("permamesh_chain_height", "Last committed height", status.height),
            Figure("permamesh_mempool_txs", "Transactions waiting for a block", status.mempool),
            Figure("permamesh_misbehaviour_total", "Equivocations and other misbehaviour seen", status.misbehaviour,
                   "counter"),
            Figure("permamesh_status_asks_dropped_total", "Status asks left unanswered over their budget (devnet)",
                   status.status_dropped, "counter")]
    reputations = client.query("/reputation")
    for key in sorted(reputations):
        row = reputations[key]
        labels = {"node": node_id_of(key)}
        out.append(Figure("permamesh_verification_reputation", "A node's reputation from verification (0..1)",
                          row.get("reputation_ppm", 0) / PPM, labels=labels))
        out.append(Figure("permamesh_verification_excluded", "1 when verification excluded the node",
                          1.0 if row.get("excluded") else 0.0, labels=labels))
    return out


class FigureCache:
    """The latest :func:`validator_figures`, refreshed by one owner thread.

    ``make_client()`` is called on the owner thread, and the client it returns is used and
    closed only there. :meth:`figures` is safe from any thread and never blocks on the
    validator: it returns the last snapshot plus its age (``permamesh_metrics_age_seconds``),
    so a validator that stopped answering shows as stale figures, not as a hung scrape.
    """

    def __init__(self, make_client: Callable[[], object], interval_s: float = 1.0) -> None:
        self._make_client, self.interval_s = make_client, interval_s
        self._snapshot: tuple[float, list[Figure]] = (0.0, [])  # (monotonic time, figures)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="validator-telemetry", daemon=True)

    def start(self) -> FigureCache:
        self._thread.start()
        return self

    def figures(self) -> list[Figure]:
        taken, figures = self._snapshot
        age = time.monotonic() - taken if taken else -1.0
        return [*figures, Figure("permamesh_metrics_age_seconds",
                                 "Seconds since the validator's figures were read (-1: not yet)", age)]

    def _run(self) -> None:
        client = None
        try:
            while not self._stop.is_set():
                try:
                    if client is None:
                        client = self._make_client()
                    self._snapshot = (time.monotonic(), validator_figures(client))
                except Exception:  # noqa: BLE001 - keep the last snapshot; try again later
                    log.debug("reading the validator's figures failed", exc_info=True)
                self._stop.wait(self.interval_s)
        finally:
            if client is not None:
                client.close()

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
