"""LedgerApp: the committee's ABCI 2.0 application (a deterministic replicated state machine).

CometBFT (or the devnet engine) calls, in this order:

- ``info`` at the handshake: the last committed height and app hash (from SQLite), so the
  engine replays only the blocks this store has not committed;
- ``init_chain`` once, at genesis: ``app_state_bytes`` is :class:`Genesis` JSON;
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

Nothing here reads the clock, iterates an unordered container, or uses floats in state.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
from collections import OrderedDict

from permamesh.committee import epochs, queries, txs
from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.application import Application
from permamesh.committee.errors import CommitteeError, TxError
from permamesh.committee.genesis import Genesis
from permamesh.committee.ledger import META, Ledger, pack, unpack
from permamesh.committee.store import Store

log = logging.getLogger(__name__)

APP_VERSION = 1
PARSE_CACHE = 200_000  # parsed txs remembered (a few hundred bytes each)


class LedgerApp(Application):
    """One validator's copy of the ledger. ``path=None`` keeps state in memory."""

    def __init__(self, path: pathlib.Path | str | None = None) -> None:
        self.store = Store(path)
        raw = self.store.committed(META, b"genesis")
        self.ledger: Ledger | None = None if raw is None else Ledger(
            self.store, Genesis.from_json(unpack(raw)))
        self._pending_nonce: dict[bytes, int] = {}  # mempool view: sender -> last nonce let in
        self._parsed: OrderedDict[bytes, tuple | TxError] = OrderedDict()
        self._finalized = False  # a block is finalized and not yet committed
        self.counts = {"check_ok": 0, "check_rejected": 0, "tx_ok": 0, "tx_failed": 0}

    @property
    def chain_id(self) -> str:
        return "" if self.ledger is None else self.ledger.genesis.chain_id

    # --------------------------------------------------------------------------- handshake

    def info(self, req: pb.RequestInfo) -> pb.ResponseInfo:
        return pb.ResponseInfo(data="permamesh-ledger", version="0.1.0", app_version=APP_VERSION,
                               last_block_height=self.store.height,
                               last_block_app_hash=self.store.app_hash)

    def init_chain(self, req: pb.RequestInitChain) -> pb.ResponseInitChain:
        genesis = Genesis.from_json(req.app_state_bytes)
        if req.chain_id and req.chain_id != genesis.chain_id:
            raise CommitteeError(f"chain_id {req.chain_id!r} differs from app state's "
                                 f"{genesis.chain_id!r}")
        if self.ledger is not None:
            if self.ledger.genesis != genesis:
                raise CommitteeError("this store was initialised with a different genesis")
            return pb.ResponseInitChain(app_hash=self.store.app_hash)
        self.ledger = Ledger(self.store, genesis)
        self.store.put(META, b"genesis", pack(genesis.to_json()))
        return pb.ResponseInitChain(app_hash=self.store.staged_hash(0))

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
            ledger.apply(tx, sender, self.store.height + 1, dry_run=True)
        except TxError as exc:
            self.counts["check_rejected"] += 1
            return pb.ResponseCheckTx(code=exc.code, log=exc.reason, codespace=txs.CODESPACE)
        self._pending_nonce[sender] = tx.nonce
        self.counts["check_ok"] += 1
        return pb.ResponseCheckTx(code=txs.OK)

    # ------------------------------------------------------------------------------ blocks

    def prepare_proposal(self, req: pb.RequestPrepareProposal) -> pb.ResponsePrepareProposal:
        chosen, size = [], 0
        for raw in req.txs:
            if size + len(raw) > req.max_tx_bytes > 0:
                break
            try:
                self._parse(raw)
            except TxError:
                continue
            chosen.append(raw)
            size += len(raw)
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
        if req.height != self.store.height + 1:
            raise CommitteeError(f"FinalizeBlock height {req.height}, expected "
                                 f"{self.store.height + 1}")
        if self._finalized:  # the same height finalized again without a commit: start clean
            self.store.discard()
        self._finalized = True
        results = [self._deliver(ledger, raw, req.height) for raw in req.txs]
        events = []
        epoch = epochs.closing_epoch(ledger, req.height)
        if epoch is not None:
            record = epochs.close_epoch(ledger, epoch)
            events.append(pb.Event(type="epoch_closed", attributes=[
                pb.EventAttribute(key=k, value=str(record[k]), index=True)
                for k in ("epoch", "reports", "scored", "paid")]))
        return pb.ResponseFinalizeBlock(tx_results=results, events=events,
                                        app_hash=self.store.staged_hash(req.height))

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
        self.store.commit(self.store.height + 1)
        self._finalized = False
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

