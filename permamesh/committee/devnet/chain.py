"""Chain: one devnet validator's side of ABCI, the block store and the devnet genesis.

The devnet engine drives the application exactly as CometBFT would, through an ABCI client
(:class:`~permamesh.committee.abci.client.LocalClient` here; the same Request/Response
messages the socket server carries):

- :meth:`Chain.handshake`: ``Info``; ``InitChain`` when the app is at height 0 and the block
  store is empty; then the blocks the store holds and the app has not committed are replayed
  (``FinalizeBlock`` + ``Commit``), as CometBFT's handshake replays them.
- :meth:`Chain.propose` (we are the round's proposer): ``PrepareProposal`` over the mempool.
- :meth:`Chain.validate` (everyone, once per block): block bytes, height, previous block
  hash, the previous app hash, then ``ProcessProposal``.
- :meth:`Chain.apply` (a block was decided): save it with its commit, ``FinalizeBlock``,
  ``Commit``, record the app hash.

Who calls it: :class:`permamesh.committee.devnet.node.DevnetNode`, on its event loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import msgpack

from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.devnet.blocks import MAX_BLOCK_TXS, Block, BlockStore
from permamesh.committee.devnet.votes import Validator, ValidatorSet, Vote
from permamesh.committee.errors import CommitteeError, ProtocolError

log = logging.getLogger(__name__)

MAX_PROPOSAL_TX_BYTES = 2 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class DevnetGenesis:
    """What every devnet validator starts from (``genesis.json`` in the devnet's home)."""

    chain_id: str
    validators: tuple[bytes, ...]  # Ed25519 public keys, power 1 each
    app_state: bytes  # the application's genesis (LedgerApp: Genesis JSON)

    def validator_set(self) -> ValidatorSet:
        return ValidatorSet(tuple(Validator(k, 1) for k in sorted(self.validators)))

    def dump(self, path: pathlib.Path) -> None:
        path.write_text(json.dumps({"chain_id": self.chain_id,
                                    "validators": sorted(k.hex() for k in self.validators),
                                    "app_state": self.app_state.decode()}, indent=1))

    @classmethod
    def load(cls, path: pathlib.Path) -> DevnetGenesis:
        try:
            data = json.loads(pathlib.Path(path).read_text())
            return cls(data["chain_id"], tuple(bytes.fromhex(k) for k in data["validators"]),
                       data["app_state"].encode())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CommitteeError(f"cannot read devnet genesis {path}: {exc}") from None


def encode_commit(votes: tuple[Vote, ...]) -> bytes:
    return msgpack.packb([dataclasses.astuple(v) for v in votes], use_bin_type=True)


def decode_commit(raw: bytes) -> tuple[Vote, ...]:
    return tuple(Vote(*fields) for fields in msgpack.unpackb(raw, raw=False))


class Chain:
    def __init__(self, client, store: BlockStore, genesis: DevnetGenesis, me: bytes) -> None:
        self.client, self.store, self.genesis, self.me = client, store, genesis, me
        self.height = 0  # last committed height
        self.app_hash = b""
        self._valid: dict[bytes, bool] = {}
        self.tx_results: dict[bytes, tuple[int, str, int]] = {}  # tx hash -> (code, log, h)

    def handshake(self) -> int:
        info = self.client.info(pb.RequestInfo(version="devnet"))
        app_height = info.last_block_height
        if app_height == 0:
            resp = self.client.init_chain(pb.RequestInitChain(
                chain_id=self.genesis.chain_id, app_state_bytes=self.genesis.app_state,
                initial_height=1))
            self.app_hash = resp.app_hash
        else:
            self.app_hash = info.last_block_app_hash
        if app_height > self.store.height:
            raise CommitteeError(f"app at height {app_height} is ahead of the block store "
                                 f"({self.store.height}): wrong data directory?")
        self.height = app_height
        for height in range(app_height + 1, self.store.height + 1):
            raw, round_, commit = self.store.get(height)
            self._execute(height, raw)
        if self.store.height:
            log.info("handshake: app height %d, replayed to %d", app_height, self.height)
        return self.height

    def propose(self, height: int, mempool: list[bytes], time_ms: int) -> bytes:
        resp = self.client.prepare_proposal(pb.RequestPrepareProposal(
            max_tx_bytes=MAX_PROPOSAL_TX_BYTES, txs=mempool[:MAX_BLOCK_TXS], height=height,
            proposer_address=self.me))
        return Block(height, self.store.block_hash(height - 1), self.app_hash, self.me, time_ms,
                     tuple(resp.txs)).encode()

    def validate(self, height: int, raw: bytes) -> bool:
        key = Block.hash_of(raw)
        if key not in self._valid:
            self._valid[key] = self._check(height, raw)
        return self._valid[key]

    def _check(self, height: int, raw: bytes) -> bool:
        try:
            block = Block.decode(raw)
        except ProtocolError as exc:
            log.warning("invalid proposal at height %d: %s", height, exc)
            return False
        if (block.height, block.prev_hash, block.last_app_hash) != (
                height, self.store.block_hash(height - 1), self.app_hash):
            log.warning("proposal at height %d does not extend our chain (height, previous "
                        "block or app hash differ)", height)
            return False
        resp = self.client.process_proposal(pb.RequestProcessProposal(
            txs=block.txs, hash=Block.hash_of(raw), height=height,
            proposer_address=block.proposer))
        return resp.status == pb.ResponseProcessProposal.ACCEPT

    def apply(self, height: int, raw: bytes, round_: int, commit: tuple[Vote, ...]) -> Block:
        """Persist and execute a decided block (the next one)."""
        if height != self.height + 1:
            raise CommitteeError(f"apply of height {height} at height {self.height}")
        self.store.save(height, raw, round_, encode_commit(commit))
        return self._execute(height, raw)

    def _execute(self, height: int, raw: bytes) -> Block:
        block = Block.decode(raw)
        resp = self.client.finalize_block(pb.RequestFinalizeBlock(
            txs=block.txs, hash=Block.hash_of(raw), height=height,
            proposer_address=block.proposer))
        self.client.commit(pb.RequestCommit())
        self.height, self.app_hash = height, resp.app_hash
        self.store.set_app_hash(height, resp.app_hash)
        self._valid.clear()
        for tx, result in zip(block.txs, resp.tx_results):
            self.tx_results[Block.hash_of(tx)] = (result.code, result.log, height)
        while len(self.tx_results) > 100_000:
            self.tx_results.pop(next(iter(self.tx_results)))
        return block
