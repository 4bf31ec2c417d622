"""`permamesh validator --engine cometbft`: the ledger behind a real ABCI socket, driven the way
CometBFT v0.38 drives it, including a SIGKILL and the restart's handshake.

CometBFT itself cannot be installed here (not in the Debian, PyPI or npm registries; no Go), so the
test plays CometBFT's side with our SocketClient: it opens the consensus, mempool and query
connections and sends the same protobuf requests in the same order (Info, InitChain, then per
height PrepareProposal, ProcessProposal, FinalizeBlock, Commit; CheckTx on the mempool
connection; Query on the query connection), over the uvarint-framed socket protocol.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from permamesh.committee import txs
from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.client import SocketClient
from permamesh.committee.devnet.cluster import free_port

from .ledger_helpers import CHAIN, Party, committee, node_tx


def start(home, port):
    proc = subprocess.Popen([sys.executable, "-m", "permamesh", "validator", "--engine", "cometbft",
                             "--home", str(home), "--abci", f"tcp://127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().split()
    assert line[:1] == ["READY"], f"validator did not start: {line}"
    return proc


def block(consensus: SocketClient, raw_txs: list[bytes], height: int) -> bytes:
    prepared = consensus.prepare_proposal(pb.RequestPrepareProposal(
        txs=raw_txs, max_tx_bytes=1 << 20, height=height))
    assert list(prepared.txs) == [t for t in raw_txs if t != b"junk"]
    status = consensus.process_proposal(pb.RequestProcessProposal(txs=prepared.txs, height=height))
    assert status.status == pb.ResponseProcessProposal.ACCEPT
    final = consensus.finalize_block(pb.RequestFinalizeBlock(txs=prepared.txs, height=height))
    assert all(r.code == 0 for r in final.tx_results), [r.log for r in final.tx_results]
    consensus.commit(pb.RequestCommit())
    return final.app_hash


def test_ledger_over_the_abci_socket_survives_sigkill(tmp_path):
    c = committee()
    home, port = tmp_path / "validator", free_port()
    proc = start(home, port)
    address = f"tcp://127.0.0.1:{port}"
    try:
        with SocketClient(address) as consensus, SocketClient(address) as mempool, \
                SocketClient(address) as query:
            assert consensus.echo(pb.RequestEcho(message="hello")).message == "hello"
            info = consensus.info(pb.RequestInfo(version="0.38.17", block_version=11, p2p_version=8,
                                                 abci_version="2.0.0"))
            assert info.last_block_height == 0
            consensus.init_chain(pb.RequestInitChain(chain_id=CHAIN, initial_height=1,
                                                     app_state_bytes=c.genesis.to_json()))
            partner = Party()
            vouches = [s.sign(txs.Vouch, subject=partner.key) for s in c.seeds]
            for raw in vouches:
                assert mempool.check_tx(pb.RequestCheckTx(tx=raw, type=pb.NEW)).code == 0
            bad = mempool.check_tx(pb.RequestCheckTx(tx=b"junk", type=pb.NEW))
            assert bad.code == txs.MALFORMED and bad.log and bad.codespace == "permamesh"
            block(consensus, vouches + [b"junk"], 1)
            node = Party()
            app_hash = block(consensus, [node_tx(partner, node)], 2)
            answer = query.query(pb.RequestQuery(path="/registry"))
            assert answer.code == 0 and answer.height == 2
            assert [n["node"] for n in json.loads(answer.value)] == [node.key.hex()]
            # FinalizeBlock of height 3 reaches the app, then the process dies before Commit
            consensus.finalize_block(pb.RequestFinalizeBlock(
                txs=[c.seeds[0].sign(txs.Vouch, subject=Party().key)], height=3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc = start(home, port)
        with SocketClient(address) as consensus, SocketClient(address) as query:
            info = consensus.info(pb.RequestInfo(version="0.38.17"))
            assert (info.last_block_height, info.last_block_app_hash) == (2, app_hash)
            # CometBFT replays height 3 from its block store: the app applies it afresh
            c.seeds[0].nonce -= 1
            block(consensus, [c.seeds[0].sign(txs.Vouch, subject=Party().key)], 3)
            status = json.loads(query.query(pb.RequestQuery(path="/status")).value)
            assert status["height"] == 3 and status["chain_id"] == CHAIN
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        proc.stdout.close()
