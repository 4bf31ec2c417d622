"""The ledger's ABCI frame limit follows the chain's block size, as CometBFT v0.38 sends blocks.

A FinalizeBlock request carries a whole block, and CometBFT allows blocks of
``block.max_bytes``, or 100 MiB when that is -1. Story: InitChain brings the consensus params;
the limit is derived and kept in the store; after a restart (CometBFT sends no InitChain then)
a FinalizeBlock of about 70 MiB, over the old fixed 64 MiB, is still accepted, and a frame
just over the derived limit is still refused before its body is read.
"""

from __future__ import annotations

import pytest

from permamesh.committee import txs
from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.client import SocketClient
from permamesh.committee.abci.framing import encode_uvarint
from permamesh.committee.abci.server import ABCIServerThread
from permamesh.committee.app import LedgerApp

from .ledger_helpers import CHAIN, committee

MIB = 1024 * 1024
LIMIT_UNBOUNDED = 104_857_600 + 8 * MIB  # block.max_bytes -1: CometBFT's 100 MiB + headroom


def init_request(genesis, max_bytes: int | None) -> pb.RequestInitChain:
    req = pb.RequestInitChain(chain_id=CHAIN, app_state_bytes=genesis.to_json(), initial_height=1)
    if max_bytes is not None:  # as CometBFT sends them (genesis consensus_params)
        req.consensus_params.block.max_bytes = max_bytes
        req.consensus_params.block.max_gas = -1
    return req


@pytest.mark.parametrize("max_bytes, limit", [(-1, LIMIT_UNBOUNDED), (90 * MIB, 98 * MIB),
                                              (22_020_096, 64 * MIB), (None, None)])
def test_limit_comes_from_init_chain_and_survives_a_restart(tmp_path, max_bytes, limit):
    path = tmp_path / "ledger.sqlite"
    app = LedgerApp(path)
    assert app.max_request_bytes() is None  # no chain yet: the server's default
    app.init_chain(init_request(committee().genesis, max_bytes))
    assert app.max_request_bytes() == limit
    app.close()
    again = LedgerApp(path)  # restarted before the first block
    assert again.max_request_bytes() == limit
    again.close()


class ResizingLedger(LedgerApp):
    """A ledger whose block at height 2 changes block.max_bytes (ours changes no params)."""

    def consensus_param_updates(self, height: int) -> pb.ConsensusParams | None:
        return pb.ConsensusParams(block=pb.BlockParams(max_bytes=90 * MIB, max_gas=-1)) \
            if height == 2 else None


def test_param_update_moves_the_limit_at_commit_and_survives_a_restart(tmp_path):
    path = tmp_path / "ledger.sqlite"
    app = ResizingLedger(path)
    app.init_chain(init_request(committee().genesis, 22_020_096))
    for height in (1, 2):
        resp = app.finalize_block(pb.RequestFinalizeBlock(height=height))
        assert resp.HasField("consensus_param_updates") == (height == 2)
        assert app.max_request_bytes() == 64 * MIB  # CometBFT uses new params after Commit
        app.commit(pb.RequestCommit())
    assert app.max_request_bytes() == 98 * MIB
    app.close()
    again = LedgerApp(path)
    assert again.max_request_bytes() == 98 * MIB
    again.close()


def test_finalize_block_over_64_mib_is_accepted_within_the_derived_limit(tmp_path):
    c = committee()
    path = tmp_path / "ledger.sqlite"
    app = LedgerApp(path)
    with ABCIServerThread(app) as server, SocketClient(server.bound_address) as consensus:
        assert server.server.max_message_bytes == 64 * MIB
        consensus.init_chain(init_request(c.genesis, -1))
        assert server.server.max_message_bytes == LIMIT_UNBOUNDED  # on the open connections too
        consensus.finalize_block(pb.RequestFinalizeBlock(height=1))
        consensus.commit()
    app.close()

    app = LedgerApp(path)  # a restart: CometBFT sends Info, no InitChain
    with ABCIServerThread(app) as server:
        with SocketClient(server.bound_address, timeout_s=120) as consensus:
            block = pb.RequestFinalizeBlock(height=2, txs=[bytes(MIB)] * 70)
            assert pb.Request(finalize_block=block).ByteSize() > 64 * MIB
            done = consensus.finalize_block(block)
            del block
            assert [r.code for r in done.tx_results] == [txs.MALFORMED] * 70  # junk, but read
            consensus.commit()
            assert consensus.info(pb.RequestInfo()).last_block_height == 2
        with SocketClient(server.bound_address) as mallory:
            mallory.send_raw(encode_uvarint(LIMIT_UNBOUNDED + 1))  # refused from the prefix
            with pytest.raises(ConnectionError):
                mallory.receive()
        assert server.server.max_message_bytes == LIMIT_UNBOUNDED
    app.close()
