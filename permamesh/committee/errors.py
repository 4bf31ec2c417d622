"""The committee package's exception family."""

from __future__ import annotations

from permamesh.errors import PermameshError


class CommitteeError(PermameshError):
    """Base of every committee error (ledger, ABCI server, devnet engine, validator)."""


class ProtocolError(CommitteeError):
    """A peer (CometBFT, an ABCI client, a devnet validator) sent something malformed."""


class TxError(CommitteeError):
    """A transaction was rejected; ``code`` is the ABCI result code sent back."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
