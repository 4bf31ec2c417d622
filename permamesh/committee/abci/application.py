"""The ABCI 2.0 application interface (CometBFT v0.38) and the request dispatcher.

Who calls what: CometBFT (through ``server.ABCIServer``) or the embedded devnet engine
(through ``client.LocalClient``) turns each incoming ``Request`` into one call of
:func:`dispatch`, which calls the matching :class:`Application` method and wraps its
result in a ``Response``. Subclasses (the committee ledger) override the methods they
need; every method takes the ``Request*`` message and returns the ``Response*`` message.

The order CometBFT calls them in:

* Handshake, on every start: ``info`` (the app reports ``last_block_height`` and
  ``last_block_app_hash``). At height 0 CometBFT then sends ``init_chain`` with the
  genesis; otherwise it replays any blocks the app is missing (``finalize_block`` +
  ``commit`` per block) from its own store.
* Per height, on the consensus connection: the proposer gets ``prepare_proposal``; every
  validator gets ``process_proposal`` for the proposal it receives (possibly several
  rounds); with vote extensions enabled, ``extend_vote`` when precommitting and
  ``verify_vote_extension`` for each peer's precommit; then exactly once
  ``finalize_block`` for the decided block and ``commit`` to persist it.
* ``check_tx`` on the mempool connection for every new tx (and RECHECK after commits).
* ``info`` and ``query`` on the query ("info") connection; the four snapshot calls on
  the snapshot connection (state sync).

CometBFT opens those four connections (consensus, mempool, query, snapshot) at once and
they run concurrently on its side. We serve all four under one lock, so the application
never sees two calls at the same time and may be plain single-threaded code. The app must
be deterministic in everything that feeds ``app_hash``.

An exception inside the app becomes ``Response(exception=...)`` and a log line; it never
takes the server down (CometBFT itself treats an exception response as fatal).

Two things that are not ABCI calls: :func:`proto_tx_size` is how CometBFT counts a tx
against ``max_tx_bytes``, and :meth:`Application.max_request_bytes` is how an app tells
the socket server how large a request frame to accept (the server asks it, outside the
lock, whenever a frame's length prefix arrives).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.framing import uvarint_size

log = logging.getLogger(__name__)

# The oneof field names of Request, in field-number order; each is also the method name.
CALLS: tuple[str, ...] = (
    "echo",
    "flush",
    "info",
    "init_chain",
    "query",
    "check_tx",
    "commit",
    "list_snapshots",
    "offer_snapshot",
    "load_snapshot_chunk",
    "apply_snapshot_chunk",
    "prepare_proposal",
    "process_proposal",
    "extend_vote",
    "verify_vote_extension",
    "finalize_block",
)


def proto_tx_size(tx: bytes) -> int:
    """The bytes ``tx`` takes in a block, as CometBFT counts them against ``max_tx_bytes``.

    CometBFT's ``types.ComputeProtoSizeForTxs`` is the protobuf size of ``Data{txs}``:
    per tx, the field tag (1 byte), the uvarint length and the bytes. After
    PrepareProposal, CometBFT sums it over the returned txs (``Txs.Validate``) and fails
    the proposal (a panic) when the sum exceeds ``max_tx_bytes``.
    """
    return 1 + uvarint_size(len(tx)) + len(tx)


class Application:
    """Base ABCI application: every call answered with a harmless default.

    Defaults: echo echoes; info, init_chain, query, commit and the snapshot calls return
    empty responses (snapshots are refused: offer -> REJECT, apply -> ABORT); check_tx
    accepts (code 0); prepare_proposal keeps the proposed txs, in order, while they fit in
    ``max_tx_bytes`` (counted by :func:`proto_tx_size`); process_proposal and
    verify_vote_extension ACCEPT; extend_vote returns an empty extension; finalize_block
    returns one OK result per tx.
    """

    def max_request_bytes(self) -> int | None:
        """The largest Request frame this app expects, or None for the server's default.

        Not an ABCI call: the socket server asks it from its own thread whenever a length
        prefix completes, without the app lock, so it must be a cheap read of settled state.
        """
        return None

    def echo(self, req: pb.RequestEcho) -> pb.ResponseEcho:
        return pb.ResponseEcho(message=req.message)

    def flush(self, req: pb.RequestFlush) -> pb.ResponseFlush:
        return pb.ResponseFlush()

    def info(self, req: pb.RequestInfo) -> pb.ResponseInfo:
        return pb.ResponseInfo()

    def init_chain(self, req: pb.RequestInitChain) -> pb.ResponseInitChain:
        return pb.ResponseInitChain()

    def query(self, req: pb.RequestQuery) -> pb.ResponseQuery:
        return pb.ResponseQuery()

    def check_tx(self, req: pb.RequestCheckTx) -> pb.ResponseCheckTx:
        return pb.ResponseCheckTx(code=0)

    def commit(self, req: pb.RequestCommit) -> pb.ResponseCommit:
        return pb.ResponseCommit()

    def list_snapshots(self, req: pb.RequestListSnapshots) -> pb.ResponseListSnapshots:
        return pb.ResponseListSnapshots()

    def offer_snapshot(self, req: pb.RequestOfferSnapshot) -> pb.ResponseOfferSnapshot:
        return pb.ResponseOfferSnapshot(result=pb.ResponseOfferSnapshot.REJECT)

    def load_snapshot_chunk(
        self, req: pb.RequestLoadSnapshotChunk
    ) -> pb.ResponseLoadSnapshotChunk:
        return pb.ResponseLoadSnapshotChunk()

    def apply_snapshot_chunk(
        self, req: pb.RequestApplySnapshotChunk
    ) -> pb.ResponseApplySnapshotChunk:
        return pb.ResponseApplySnapshotChunk(result=pb.ResponseApplySnapshotChunk.ABORT)

    def prepare_proposal(self, req: pb.RequestPrepareProposal) -> pb.ResponsePrepareProposal:
        kept: list[bytes] = []
        total = 0
        for tx in req.txs:
            size = proto_tx_size(tx)
            if total + size > req.max_tx_bytes:
                break
            kept.append(tx)
            total += size
        return pb.ResponsePrepareProposal(txs=kept)

    def process_proposal(self, req: pb.RequestProcessProposal) -> pb.ResponseProcessProposal:
        return pb.ResponseProcessProposal(status=pb.ResponseProcessProposal.ACCEPT)

    def extend_vote(self, req: pb.RequestExtendVote) -> pb.ResponseExtendVote:
        return pb.ResponseExtendVote()

    def verify_vote_extension(
        self, req: pb.RequestVerifyVoteExtension
    ) -> pb.ResponseVerifyVoteExtension:
        return pb.ResponseVerifyVoteExtension(status=pb.ResponseVerifyVoteExtension.ACCEPT)

    def finalize_block(self, req: pb.RequestFinalizeBlock) -> pb.ResponseFinalizeBlock:
        return pb.ResponseFinalizeBlock(tx_results=[pb.ExecTxResult(code=0) for _ in req.txs])


def exception_response(error: str) -> pb.Response:
    return pb.Response(exception=pb.ResponseException(error=error))


def dispatch(app: Application, request: pb.Request) -> pb.Response:
    """Run one request against ``app``; never raises.

    The caller holds whatever lock serializes calls into ``app``. A request with no
    oneof set, an app exception, or an app returning the wrong message type all become
    ``Response(exception=...)``.
    """
    which = request.WhichOneof("value")
    if which is None:
        log.warning("ABCI request with no call set")
        return exception_response("unknown request: no call set")
    method: Callable[[object], object] = getattr(app, which)
    try:
        result = method(getattr(request, which))
        response = pb.Response()
        getattr(response, which).CopyFrom(result)
    except Exception as exc:  # the app's bug must not take the server down
        log.exception("ABCI %s failed in %s", which, type(app).__name__)
        return exception_response(f"{which}: {type(exc).__name__}: {exc}")
    return response
