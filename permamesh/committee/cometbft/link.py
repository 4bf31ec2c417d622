"""CometLink: what :class:`~permamesh.committee.client.CommitteeClient` asks of one CometBFT
node, in the answers the devnet gives (a tx's outcome once committed, a query, a status).

- **Submit** = ``broadcast_tx_sync`` (CheckTx on that node), then wait for the commit by
  following the chain from the height seen *before* broadcasting: each new block's txs are
  hashed, and a block holding ours is matched with its ``block_results`` (same order). A tx the
  node already holds in its cache (a replay, or a resend after failover) is looked up by hash
  in the kv tx index instead, and reported like the devnet does: ``already committed at
  height H``. A CheckTx ``bad nonce`` for bytes that are already committed is reported the
  same way (the index lags a commit by a moment: a genuinely stale nonce is answered up to
  :data:`INDEX_LAG_S` later). Before answering, we wait until the app itself reports the
  height committed (``abci_info``): CometBFT stores a block's results before the app's
  Commit, and a query right after the answer must see the tx's effects.
- **Submit many** broadcasts in JSON-RPC batches, then follows the chain once for all.
- **Status**: the last committed height and the app hash *after* it (``block_results``; a
  header carries the hash after the previous height), app hashes for a range of heights
  (headers of the next heights), and the mempool's size. CometBFT keeps evidence of
  misbehaviour in blocks; we do not count it (``misbehaviour`` is 0).

Every wait is bounded by the caller's deadline. ``None`` means "no complete answer in time"
(the client then fails over, as for a silent devnet validator); a malformed answer raises
:class:`~permamesh.committee.errors.ProtocolError`.

Who calls it: :class:`permamesh.committee.client.CommitteeClient` for ``http(s)://`` endpoints.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from permamesh.committee import txs
from permamesh.committee.cometbft.answers import BlockResults
from permamesh.committee.cometbft.rpc import CometRPC, RPCError, RPCUnreachable
from permamesh.committee.errors import ProtocolError

log = logging.getLogger(__name__)

NODE_REFUSED = 20  # the node refused the tx before CheckTx (mempool full, too large), as the devnet's code
POLL_S = 0.025  # between looks at the chain while waiting for a commit
INDEX_LAG_S = 0.5  # how long a committed tx may take to reach the kv tx index
MAX_STATUS_HEIGHTS = 1000  # app hashes per status call, as the devnet


@dataclass(frozen=True)
class Outcome:
    code: int
    log: str
    height: int  # 0 until committed
    committed: bool


@dataclass(frozen=True)
class ChainView:
    height: int
    app_hash: bytes  # after ``height``
    heights: tuple[int, ...]
    app_hashes: tuple[bytes, ...]  # after each of ``heights``
    mempool: int


def _already(height: int, code: int, log_: str) -> Outcome:
    return Outcome(code, f"already committed at height {height}; {log_}".rstrip("; "), height, True)


class CometLink:
    def __init__(self, endpoint: str, timeout_s: float = 10.0) -> None:
        self.endpoint = endpoint
        self.rpc = CometRPC(endpoint, timeout_s)

    def _rpc(self, deadline: float) -> CometRPC:
        """The RPC with its per-request timeout cut to what is left until ``deadline``."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.rpc.timeout_s = max(0.05, left)
        return self.rpc

    # ------------------------------------------------------------------------------ submit

    def submit(self, tx: bytes, wait_commit: bool, timeout_s: float) -> Outcome | None:
        return self.submit_many([tx], timeout_s, wait_commit)[0]

    def submit_many(self, raw_txs: list[bytes], timeout_s: float,
                    wait_commit: bool = True) -> list[Outcome | None]:
        """Outcomes in the order of ``raw_txs``; None for a tx without one by the deadline, or
        for all of them if the node stopped answering."""
        deadline = time.monotonic() + timeout_s
        out: list[Outcome | None] = [None] * len(raw_txs)
        try:
            start = self._rpc(deadline).status().height
            answers = self._rpc(deadline).broadcast_many(raw_txs)
            pending: dict[bytes, int] = {}  # tx hash -> index, waiting in blocks after ``start``
            indexed: dict[bytes, int] = {}  # tx hash -> index, waiting in the tx index
            stale: dict[bytes, int] = {}  # tx hash -> index, refused for its nonce: committed before?
            for i, (tx, answer) in enumerate(zip(raw_txs, answers)):
                key = hashlib.sha256(tx).digest()
                if isinstance(answer, RPCError):
                    if "already exists in cache" in answer.data:
                        indexed[key] = i
                    else:
                        out[i] = Outcome(NODE_REFUSED, f"the node refused the tx: "
                                         f"{answer.data or answer.message}", 0, False)
                elif answer.hash != key:
                    raise ProtocolError(f"{self.endpoint}: broadcast_tx_sync answered hash "
                                        f"{answer.hash.hex()} for tx {key.hex()}")
                elif answer.code:
                    if answer.code == txs.BAD_NONCE:
                        stale[key] = i
                    out[i] = Outcome(answer.code, answer.log, 0, False)
                elif wait_commit:
                    pending[key] = i
                else:
                    out[i] = Outcome(0, "", 0, False)
            self._committed_before(stale, deadline, out)
            if not wait_commit:
                return [o or Outcome(0, "", 0, False) for o in out]
            self._wait(pending, indexed, start, deadline, out)
            self._app_reached(max((o.height for o in out if o and o.committed), default=0), deadline)
        except (RPCUnreachable, TimeoutError) as exc:
            log.debug("%s: no complete answer: %s", self.endpoint, exc)
        return out

    def _committed_before(self, stale: dict[bytes, int], deadline: float,
                          out: list[Outcome | None]) -> None:
        """For txs refused for their nonce: if these very bytes are committed, answer as the
        devnet does for a replay. The tx index lags a commit by a moment, so look again for
        up to :data:`INDEX_LAG_S` (all of them together) before keeping the refusal."""
        until = min(deadline, time.monotonic() + INDEX_LAG_S)
        while stale:
            for key, i in list(stale.items()):
                done = self._rpc(deadline).tx(key)
                if done is not None:
                    out[i] = _already(done.height, done.result.code, done.result.log)
                    del stale[key]
            if not stale or time.monotonic() + POLL_S >= until:
                return
            time.sleep(POLL_S)

    def _app_reached(self, height: int, deadline: float) -> None:
        """Wait until the app has committed ``height``: CometBFT saves a block's results before
        the app's Commit, so a query right after could otherwise miss the tx's effects."""
        while height and self._rpc(deadline).abci_info().last_block_height < height:
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def _wait(self, pending: dict[bytes, int], indexed: dict[bytes, int], start: int,
              deadline: float, out: list[Outcome | None]) -> None:
        """Follow blocks after ``start`` for ``pending`` and poll the tx index for ``indexed``
        until every one has an outcome or the deadline passes."""
        next_height = start + 1
        while pending or indexed:
            for key, i in list(indexed.items()):
                done = self._rpc(deadline).tx(key)
                if done is not None:
                    out[i] = _already(done.height, done.result.code, done.result.log)
                    del indexed[key]
            top = self._rpc(deadline).status().height if pending else next_height - 1
            while pending and next_height <= top and self._scan(next_height, pending, out):
                next_height += 1
            if pending or indexed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                time.sleep(min(POLL_S, left))

    def _scan(self, height: int, pending: dict[bytes, int], out: list[Outcome | None]) -> bool:
        """Match block ``height``'s txs with ``pending``; False if its results are not saved yet."""
        block = self.rpc.block(height)
        if block.height != height:
            raise ProtocolError(f"{self.endpoint}: asked for block {height}, got {block.height}")
        hits = [(n, hashlib.sha256(tx).digest()) for n, tx in enumerate(block.txs)]
        hits = [(n, key) for n, key in hits if key in pending]
        if not hits:
            return True
        results = self._results(height)
        if results is None:
            return False
        if results.height != height or len(results.tx_results) != len(block.txs):
            raise ProtocolError(f"{self.endpoint}: block_results {results.height} holds "
                                f"{len(results.tx_results)} results for {len(block.txs)} txs")
        for n, key in hits:
            r = results.tx_results[n]
            out[pending.pop(key)] = Outcome(r.code, r.log, height, True)
        return True

    def _results(self, height: int) -> BlockResults | None:
        """block_results, or None while the node has stored the block but not yet its results
        (CometBFT saves a block before it applies it)."""
        try:
            return self.rpc.block_results(height)
        except RPCError as exc:
            if "could not find results" in exc.data:
                return None
            raise

    # ------------------------------------------------------------------------ query, status

    def query(self, path: str, data: bytes, timeout_s: float) -> tuple[int, str, bytes, int] | None:
        try:
            q = self._rpc(time.monotonic() + timeout_s).abci_query(path, data)
        except (RPCUnreachable, TimeoutError):
            return None
        return q.code, q.log, q.value, q.height

    def status(self, first: int, last: int, timeout_s: float) -> ChainView | None:
        deadline = time.monotonic() + timeout_s
        try:
            rpc = self._rpc(deadline)
            top = rpc.status().height
            results = self._results(top) if top else None
            if top and results is None:  # block ``top`` is stored but not yet applied
                top -= 1
                results = self._results(top) if top else None
            app_hash = b"" if results is None else results.app_hash
            hashes: dict[int, bytes] = {}
            first = max(first, 1)
            last = min(last, top, first + MAX_STATUS_HEIGHTS - 1)
            if first <= last:
                for header in self._rpc(deadline).headers(first + 1, min(last + 1, top)):
                    hashes[header.height - 1] = header.app_hash
                if last == top:
                    hashes[top] = app_hash
            mempool = self._rpc(deadline).num_unconfirmed_txs()
        except (RPCUnreachable, TimeoutError):
            return None
        heights = tuple(sorted(hashes))
        return ChainView(top, app_hash, heights, tuple(hashes[h] for h in heights), mempool)

    def close(self) -> None:
        self.rpc.close()
