"""LedgerApp: the committee's ABCI 2.0 application (a deterministic replicated state machine).

CometBFT (or the devnet engine) calls, in this order:

- ``info`` at the handshake: the last committed height and app hash (from SQLite), so the
  engine replays only the blocks this store has not committed; height 0 and no hash until
  the first block is committed, whatever the chain's initial height;
- ``init_chain`` at genesis (again after a restart before the first block): ``app_state_bytes``
  is :class:`Genesis` JSON. The genesis state, the chain's ``initial_height`` (the first
  block's height, often not 1 after a chain upgrade) and the block size from
  ``consensus_params`` are committed at once, so a restart before the first block keeps them;
- ``check_tx`` on the mempool connection: stateless checks (frame, signature, chain, field
  ranges), the sender's nonce against committed state plus the txs it already let into the
  mempool, and the ledger's rules against committed state; a rejection carries a code from
  :mod:`permamesh.committee.txs` and a reason;
- per block: ``prepare_proposal`` (proposer: drops txs that fail stateless checks or do not
  fit), ``process_proposal`` (everyone: rejects a block holding a tx that fails stateless
  checks, since an honest proposer never includes one), ``finalize_block`` (applies txs in
  order; each gets an ``ExecTxResult``; closes an epoch at its last block; returns the app
  hash of the staged state), ``commit`` (one SQLite transaction);
- ``query`` on the info connection, over committed state only (:mod:`queries`).

The socket server asks :meth:`LedgerApp.max_request_bytes` for its frame limit: it follows
the chain's ``block.max_bytes`` (InitChain, then any param update the app returns), since a
FinalizeBlock request carries a whole block (:func:`framing.frame_limit_for_block`).

Nothing here reads the clock, iterates an unordered container, or uses floats in state.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
from collections import OrderedDict

from permamesh.committee import epochs, queries, txs
from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.application import Application, proto_tx_size
from permamesh.committee.abci.framing import frame_limit_for_block
from permamesh.committee.errors import CommitteeError, TxError
from permamesh.committee.genesis import Genesis
from permamesh.committee.ledger import META, Ledger, pack, unpack
from permamesh.committee.store import Store

log = logging.getLogger(__name__)

APP_VERSION = 1
PARSE_CACHE = 200_000  # parsed txs remembered (a few hundred bytes each)
INITIAL_HEIGHT = "initial_height"  # store setting: the height of the chain's first block
BLOCK_MAX_BYTES = "block_max_bytes"  # store setting: consensus param block.max_bytes


class LedgerApp(Application):
    """One validator's copy of the ledger. ``path=None`` keeps state in memory."""

    def __init__(self, path: pathlib.Path | str | None = None) -> None:
        self.store = Store(path)
        raw = self.store.committed(META, b"genesis")
        self.ledger: Ledger | None = None if raw is None else Ledger(
            self.store, Genesis.from_json(unpack(raw)))
        self._pending_nonce: dict[bytes, int] = {}  # mempool view: sender -> last nonce let in
        self._parsed: OrderedDict[bytes, tuple | TxError] = OrderedDict()
        self._finalized: int | None = None  # the height finalized and not yet committed
        self._frame_limit = self._limit_from_store()
        self.counts = {"check_ok": 0, "check_rejected": 0, "tx_ok": 0, "tx_failed": 0}

    @property
    def chain_id(self) -> str:
        return "" if self.ledger is None else self.ledger.genesis.chain_id

    @property
    def initial_height(self) -> int:
        """The chain's first block height (genesis ``initial_height``; 1 unless set)."""
        return self.store.setting(INITIAL_HEIGHT) or 1

    @property
    def next_height(self) -> int:
        """The height of the next block to finalize."""
        return self.store.height + 1 if self.store.height else self.initial_height

    def max_request_bytes(self) -> int | None:
        """The frame limit for the chain's blocks (None until InitChain gave a block size)."""
        return self._frame_limit

    def _limit_from_store(self) -> int | None:
        max_bytes = self.store.setting(BLOCK_MAX_BYTES)
        return None if max_bytes is None else frame_limit_for_block(max_bytes)

    # --------------------------------------------------------------------------- handshake

    def info(self, req: pb.RequestInfo) -> pb.ResponseInfo:
        height = self.store.height  # 0 until a block is committed, as CometBFT expects
        return pb.ResponseInfo(data="permamesh-ledger", version="0.1.0", app_version=APP_VERSION,
                               last_block_height=height,
                               last_block_app_hash=self.store.app_hash if height else b"")

    def init_chain(self, req: pb.RequestInitChain) -> pb.ResponseInitChain:
        genesis = Genesis.from_json(req.app_state_bytes)
        if req.chain_id and req.chain_id != genesis.chain_id:
            raise CommitteeError(f"chain_id {req.chain_id!r} differs from app state's "
                                 f"{genesis.chain_id!r}")
        initial_height = req.initial_height or 1  # proto3 0: not set; CometBFT's default is 1
        if initial_height < 1:
            raise CommitteeError(f"initial_height {req.initial_height} must be at least 1")
        if self.ledger is not None:
            if self.ledger.genesis != genesis:
                raise CommitteeError("this store was initialised with a different genesis")
            if self.initial_height != initial_height:
                raise CommitteeError(f"this store was initialised with initial_height "
                                     f"{self.initial_height}, not {initial_height}")
            return pb.ResponseInitChain(app_hash=self.store.app_hash)
        params = req.consensus_params
        max_bytes = (params.block.max_bytes
                     if req.HasField("consensus_params") and params.HasField("block") else 0)
        self.ledger = Ledger(self.store, genesis)
        self.store.put(META, b"genesis", pack(genesis.to_json()))
        self.store.stage_setting(INITIAL_HEIGHT, initial_height)
        if frame_limit_for_block(max_bytes) is not None:
            self.store.stage_setting(BLOCK_MAX_BYTES, max_bytes)
        app_hash = self.store.commit(0)  # the genesis state, before any block
        self._frame_limit = self._limit_from_store()
        log.info("InitChain: chain %s starts at height %d; frame limit %s bytes",
                 genesis.chain_id, initial_height, self._frame_limit or "default")
        return pb.ResponseInitChain(app_hash=app_hash)

    # ----------------------------------------------------------------------------- mempool

    def _parse(self, raw: bytes):
        """:func:`txs.parse_tx`, remembered by tx hash: its outcome is a pure function of the
        bytes and the chain id, so CheckTx, RECHECK, ProcessProposal and FinalizeBlock check a
        tx's signature once per process, not four times."""
        key = hashlib.sha256(raw).digest()
        hit = self._parsed.get(key)
        if hit is None:
            try:
                hit = txs.parse_tx(raw, self.chain_id)
            except TxError as exc:
                hit = exc
            self._parsed[key] = hit
            if len(self._parsed) > PARSE_CACHE:
                self._parsed.popitem(last=False)
        if isinstance(hit, TxError):
            raise hit
        return hit

    def _ledger(self) -> Ledger:
        if self.ledger is None:
            raise CommitteeError("InitChain has not been called")
        return self.ledger

    def check_tx(self, req: pb.RequestCheckTx) -> pb.ResponseCheckTx:
        ledger = self._ledger()
        try:
            tx, sender = self._parse(req.tx)
            committed = unpack(self.store.committed(b"nonce", sender)) or 0
            expected = max(committed, self._pending_nonce.get(sender, 0)) + 1
            ledger.check_nonce(sender, tx.nonce, expected)
            ledger.apply(tx, sender, self.next_height, dry_run=True)
        except TxError as exc:
            self.counts["check_rejected"] += 1
            return pb.ResponseCheckTx(code=exc.code, log=exc.reason, codespace=txs.CODESPACE)
        self._pending_nonce[sender] = tx.nonce
        self.counts["check_ok"] += 1
        return pb.ResponseCheckTx(code=txs.OK)

    # ------------------------------------------------------------------------------ blocks

    def prepare_proposal(self, req: pb.RequestPrepareProposal) -> pb.ResponsePrepareProposal:
        """Keep the valid txs, in order, while their size as CometBFT counts it
        (:func:`proto_tx_size`, tag and length prefix included) fits ``max_tx_bytes``."""
        chosen, size = [], 0
        for raw in req.txs:
            cost = proto_tx_size(raw)
            if size + cost > req.max_tx_bytes > 0:
                break
            try:
                self._parse(raw)
            except TxError:
                continue
            chosen.append(raw)
            size += cost
        return pb.ResponsePrepareProposal(txs=chosen)

    def process_proposal(self, req: pb.RequestProcessProposal) -> pb.ResponseProcessProposal:
        for raw in req.txs:
            try:
                self._parse(raw)
            except TxError as exc:
                log.warning("rejecting proposal at height %d: %s", req.height, exc.reason)
                return pb.ResponseProcessProposal(status=pb.ResponseProcessProposal.REJECT)
        return pb.ResponseProcessProposal(status=pb.ResponseProcessProposal.ACCEPT)

    def finalize_block(self, req: pb.RequestFinalizeBlock) -> pb.ResponseFinalizeBlock:
        ledger = self._ledger()
        if req.height != self.next_height:
            raise CommitteeError(f"FinalizeBlock height {req.height}, expected {self.next_height}")
        if self._finalized is not None:  # finalized again without a commit: start clean
            self.store.discard()
        self._finalized = req.height
        results = [self._deliver(ledger, raw, req.height) for raw in req.txs]
        events = []
        epoch = epochs.closing_epoch(ledger, req.height)
        if epoch is not None:
            record = epochs.close_epoch(ledger, epoch)
            events.append(pb.Event(type="epoch_closed", attributes=[
                pb.EventAttribute(key=k, value=str(record[k]), index=True)
                for k in ("epoch", "reports", "scored", "paid")]))
        response = pb.ResponseFinalizeBlock(tx_results=results, events=events)
        updates = self.consensus_param_updates(req.height)
        if updates is not None:
            response.consensus_param_updates.CopyFrom(updates)
            if updates.HasField("block") and frame_limit_for_block(updates.block.max_bytes):
                self.store.stage_setting(BLOCK_MAX_BYTES, updates.block.max_bytes)
        response.app_hash = self.store.staged_hash(req.height)
        return response

    def consensus_param_updates(self, height: int) -> pb.ConsensusParams | None:
        """Consensus params that the block at ``height`` changes (CometBFT applies them from
        the next height). The ledger changes none; a rule that does returns them here, and a
        new ``block.max_bytes`` moves the frame limit at Commit."""
        return None

    def _deliver(self, ledger: Ledger, raw: bytes, height: int) -> pb.ExecTxResult:
        try:
            tx, sender = self._parse(raw)
            ledger.check_nonce(sender, tx.nonce)
        except TxError as exc:
            self.counts["tx_failed"] += 1
            return pb.ExecTxResult(code=exc.code, log=exc.reason, codespace=txs.CODESPACE)
        ledger.consume_nonce(sender, tx.nonce)
        try:
            applied = ledger.apply(tx, sender, height)
        except TxError as exc:
            self.counts["tx_failed"] += 1
            return pb.ExecTxResult(code=exc.code, log=exc.reason, codespace=txs.CODESPACE)
        self.counts["tx_ok"] += 1
        event = pb.Event(type=applied.kind, attributes=[
            pb.EventAttribute(key=k, value=v, index=True) for k, v in applied.attributes])
        return pb.ExecTxResult(code=txs.OK, events=[event])

    def commit(self, req: pb.RequestCommit) -> pb.ResponseCommit:
        if self._finalized is None:
            raise CommitteeError("Commit without a FinalizeBlock")
        self.store.commit(self._finalized)
        self._finalized = None
        self._frame_limit = self._limit_from_store()
        self._pending_nonce.clear()  # CometBFT rechecks the mempool after every commit
        return pb.ResponseCommit()

    # ------------------------------------------------------------------------------ query

    def query(self, req: pb.RequestQuery) -> pb.ResponseQuery:
        if self.ledger is None:
            return pb.ResponseQuery(code=txs.UNKNOWN, log="no genesis yet",
                                    codespace=txs.CODESPACE)
        try:
            value = queries.answer(self.ledger, req.path, bytes(req.data))
        except TxError as exc:
            return pb.ResponseQuery(code=exc.code, log=exc.reason, codespace=txs.CODESPACE,
                                    height=self.store.height)
        return pb.ResponseQuery(code=txs.OK, value=value, key=req.data,
                                height=self.store.height)

    def close(self) -> None:
        self.store.close()

