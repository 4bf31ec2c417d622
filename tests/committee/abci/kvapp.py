"""A tiny deterministic KV-store ABCI app used by the ABCI tests (tx = b"key=value")."""

from __future__ import annotations

import hashlib
import threading

from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.application import Application


def parse_tx(tx: bytes) -> tuple[bytes, bytes] | None:
    key, sep, value = tx.partition(b"=")
    return (key, value) if sep and key else None


def state_hash(items: dict[bytes, bytes]) -> bytes:
    h = hashlib.sha256()
    for key, value in sorted(items.items()):
        h.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value)
    return h.digest()


class KVApp(Application):
    def __init__(self) -> None:
        self.committed: dict[bytes, bytes] = {}
        self.pending: dict[bytes, bytes] | None = None
        self.height = 0
        self.app_hash = b""
        self.calls: list[str] = []
        self._active = 0
        self.max_active = 0  # how many calls ever ran at once (must stay 1)
        self._guard = threading.Lock()

    def _enter(self, name: str) -> None:
        with self._guard:
            self._active += 1
            self.max_active = max(self.max_active, self._active)
            self.calls.append(name)

    def _leave(self) -> None:
        with self._guard:
            self._active -= 1

    def info(self, req):
        self._enter("info")
        try:
            return pb.ResponseInfo(
                data="kv", version="1", last_block_height=self.height,
                last_block_app_hash=self.app_hash,
            )
        finally:
            self._leave()

    def init_chain(self, req):
        self._enter("init_chain")
        try:
            self.app_hash = state_hash(self.committed)
            return pb.ResponseInitChain(app_hash=self.app_hash)
        finally:
            self._leave()

    def check_tx(self, req):
        self._enter("check_tx")
        try:
            if req.tx == b"boom":
                raise RuntimeError("the app blew up")
            ok = parse_tx(req.tx) is not None
            return pb.ResponseCheckTx(code=0 if ok else 1, log="" if ok else "want key=value")
        finally:
            self._leave()

    def process_proposal(self, req):
        self._enter("process_proposal")
        try:
            good = all(parse_tx(tx) for tx in req.txs)
            status = pb.ResponseProcessProposal.ACCEPT if good else pb.ResponseProcessProposal.REJECT
            return pb.ResponseProcessProposal(status=status)
        finally:
            self._leave()

    def finalize_block(self, req):
        self._enter("finalize_block")
        try:
            self.pending = dict(self.committed)
            results = []
            for tx in req.txs:
                kv = parse_tx(tx)
                if kv is None:
                    results.append(pb.ExecTxResult(code=1))
                    continue
                self.pending[kv[0]] = kv[1]
                results.append(pb.ExecTxResult(code=0))
            self.height = req.height
            self.app_hash = state_hash(self.pending)
            return pb.ResponseFinalizeBlock(tx_results=results, app_hash=self.app_hash)
        finally:
            self._leave()

    def commit(self, req):
        self._enter("commit")
        try:
            assert self.pending is not None, "commit without finalize_block"
            self.committed, self.pending = self.pending, None
            return pb.ResponseCommit()
        finally:
            self._leave()

    def query(self, req):
        self._enter("query")
        try:
            value = self.committed.get(req.data)
            if value is None:
                return pb.ResponseQuery(code=1, key=req.data, log="not found", height=self.height)
            return pb.ResponseQuery(code=0, key=req.data, value=value, height=self.height)
        finally:
            self._leave()
