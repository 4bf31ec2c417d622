"""The corrupt-app drill hook: a ledger that deliberately computes a different state.

**For drills and tests only.** When the validator process finds
``PERMAMESH_DRILL_CORRUPT_FROM=H`` in its environment, :func:`ledger_app` hands it a
:class:`CorruptLedgerApp` instead of the honest :class:`~permamesh.committee.app.LedgerApp`:
from height ``H`` on, every FinalizeBlock stages one extra row (namespace ``drill``) before
the app hash is taken, so this validator's app hash differs from the honest ones' while
everything else (txs, results, queries) looks normal. CometBFT must notice: the node's next
block header disagrees with the committed one, and CometBFT halts it ("wrong
Block.Header.AppHash"), while the honest validators carry on.

:class:`~permamesh.committee.cometbft.network.CometNet` sets the variable for the validators
named in ``CometNetConfig.corrupt``; nothing else does. The honest code path is unchanged
when the variable is absent.

Who calls it: :func:`permamesh.committee.validator._cometbft` (``ledger_app``).
"""

from __future__ import annotations

import logging
import os
import pathlib

from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.app import LedgerApp
from permamesh.committee.errors import CommitteeError

log = logging.getLogger(__name__)

ENV_VAR = "PERMAMESH_DRILL_CORRUPT_FROM"
DRILL_NAMESPACE = b"drill"


class CorruptLedgerApp(LedgerApp):
    """A LedgerApp whose staged state gains an extra row at every height >= ``from_height``."""

    def __init__(self, path: pathlib.Path | str | None, from_height: int) -> None:
        super().__init__(path)
        self.from_height = from_height

    def finalize_block(self, req: pb.RequestFinalizeBlock) -> pb.ResponseFinalizeBlock:
        resp = super().finalize_block(req)
        if req.height >= self.from_height:
            self.store.put(DRILL_NAMESPACE, b"corrupt", req.height.to_bytes(8, "big"))
            resp.app_hash = self.store.staged_hash(req.height)
        return resp


def ledger_app(path: pathlib.Path | str | None) -> LedgerApp:
    """The validator's ledger: honest, unless the drill variable asks for a corrupt one."""
    raw = os.environ.get(ENV_VAR, "")
    if not raw:
        return LedgerApp(path)
    if not raw.isdigit() or int(raw) < 1:
        raise CommitteeError(f"{ENV_VAR} must be a height >= 1, not {raw!r}")
    log.warning("DRILL: this validator's ledger diverges from height %s on (%s is set)", raw, ENV_VAR)
    return CorruptLedgerApp(path, int(raw))
