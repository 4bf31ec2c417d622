"""A validator's Prometheus metrics: chain height, mempool, misbehaviour seen, and the
verification scores the ledger holds (each node's reputation and whether it is excluded).

The figures are read at scrape time by asking the validator itself over its own socket
(:class:`~permamesh.committee.client.CommitteeClient` to its own endpoint), so the ledger's
SQLite connection is only ever used by the validator's own thread.

The status is a :class:`~permamesh.committee.client.CommitteeStatus`, the same under either
engine, so the figures read the same from a devnet validator (``tcp://``) or a CometBFT node's
RPC (``http://``; misbehaviour is 0 there: CometBFT keeps evidence in its blocks).

Who calls it: :mod:`permamesh.committee.validator` (devnet engine).
"""

from __future__ import annotations

import logging

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
                   "counter")]
    reputations = client.query("/reputation")
    for key in sorted(reputations):
        row = reputations[key]
        labels = {"node": node_id_of(key)}
        out.append(Figure("permamesh_verification_reputation", "A node's reputation from verification (0..1)",
                          row.get("reputation_ppm", 0) / PPM, labels=labels))
        out.append(Figure("permamesh_verification_excluded", "1 when verification excluded the node",
                          1.0 if row.get("excluded") else 0.0, labels=labels))
    return out
