"""Wire messages of the devnet engine: among validators, and between clients and a validator.

Every frame is a signed :mod:`permamesh.wire.codec` frame. Among validators the frame's
signer must be a validator of the set (the node checks it); proposals and votes carry their
own signatures as well (:mod:`permamesh.committee.devnet.votes`), so a commit fetched from any
peer is verified vote by vote.

| message | from -> to | meaning |
|---|---|---|
| :class:`ProposalMsg`, :class:`VoteMsg` | validator -> validators | consensus |
| :class:`TxsMsg` | validator -> validators | mempool gossip |
| :class:`BlocksRequest` / :class:`BlocksReply` | lagging validator <-> a peer | catch-up |
| :class:`SubmitTx` / :class:`TxAck` | client <-> validator | like CometBFT's broadcast_tx_* RPC |
| :class:`QueryMsg` / :class:`QueryAnswer` | client <-> validator | like abci_query |
| :class:`StatusMsg` / :class:`StatusAnswer` | client <-> validator | height and app hashes |
"""

from __future__ import annotations

from permamesh.committee.devnet.votes import MAX_HEIGHT, Proposal, Vote
from permamesh.committee.txs import MAX_TX_BYTES
from permamesh.wire.codec import Message, message, struct

_BIG = 3 * 1024 * 1024


def _heights(*values: int) -> None:
    """Every height on the wire is in [0, MAX_HEIGHT) (SQLite's and the votes' range);
    anything else is refused at decode (the codec turns the ValueError into a WireError)."""
    if not all(0 <= v < MAX_HEIGHT for v in values):
        raise ValueError(f"height out of range [0, {MAX_HEIGHT})")


@message("devnet.proposal", max_bytes=_BIG)
class ProposalMsg(Message):
    proposal: Proposal


@message("devnet.vote", max_bytes=4 * 1024)
class VoteMsg(Message):
    vote: Vote


@message("devnet.txs", max_bytes=_BIG)
class TxsMsg(Message):
    txs: tuple[bytes, ...]


@struct
class CommittedBlock:
    height: int
    block: bytes
    round: int
    commit: tuple[Vote, ...]

    def __post_init__(self) -> None:
        _heights(self.height)


@message("devnet.blocks_request", max_bytes=1024)
class BlocksRequest(Message):
    from_height: int

    def __post_init__(self) -> None:
        _heights(self.from_height)


@message("devnet.blocks_reply", max_bytes=_BIG)
class BlocksReply(Message):
    blocks: tuple[CommittedBlock, ...]


@message("devnet.submit_tx", max_bytes=MAX_TX_BYTES + 1024)
class SubmitTx(Message):
    tx: bytes
    wait_commit: bool = True
    ref: int = 0  # echoed in the ack, so a client can pipeline


@message("devnet.tx_ack", max_bytes=8 * 1024)
class TxAck(Message):
    ref: int
    code: int  # the CheckTx code, or the FinalizeBlock code once committed
    log: str
    height: int  # 0 until committed
    committed: bool


@message("devnet.query", max_bytes=8 * 1024)
class QueryMsg(Message):
    path: str
    data: bytes = b""
    ref: int = 0


@message("devnet.query_answer", max_bytes=_BIG)
class QueryAnswer(Message):
    ref: int
    code: int
    log: str
    value: bytes
    height: int


@message("devnet.status", max_bytes=1024)
class StatusMsg(Message):
    first: int = 0  # app hashes for heights first..last (at most 1,000)
    last: int = 0
    ref: int = 0

    def __post_init__(self) -> None:
        _heights(self.first, self.last)


@message("devnet.status_answer", max_bytes=_BIG)
class StatusAnswer(Message):
    ref: int
    height: int
    app_hash: bytes
    heights: tuple[int, ...]
    app_hashes: tuple[bytes, ...]
    mempool: int
    misbehaviour: int
    status_dropped: int = 0  # status asks this validator left unanswered (over their budget)

    def __post_init__(self) -> None:
        _heights(self.height, *self.heights)
