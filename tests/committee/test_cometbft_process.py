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

import pytest

from permamesh.cli import main
from permamesh.committee import txs
from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.client import SocketClient
from permamesh.committee.abci.framing import encode_uvarint
from permamesh.committee.devnet.cluster import free_port

from .ledger_helpers import CHAIN, Party, committee, node_tx


def start(home, port, *extra: str):
    proc = subprocess.Popen([sys.executable, "-m", "permamesh", "validator", "--engine", "cometbft",
                             "--home", str(home), "--abci", f"tcp://127.0.0.1:{port}", *extra],
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


def test_max_frame_bytes_option_overrides_the_block_size(tmp_path):
    """``--max-frame-bytes`` wins over the limit the ledger derives from block.max_bytes (-1
    here, which alone would allow 108 MiB): a frame of exactly the limit is served, one byte
    more is refused from its length prefix."""
    limit = 1024 * 1024
    home, port = tmp_path / "validator", free_port()
    address = f"tcp://127.0.0.1:{port}"
    proc = start(home, port, "--max-frame-bytes", str(limit))
    try:
        with SocketClient(address) as consensus:
            init = pb.RequestInitChain(chain_id=CHAIN, initial_height=1,
                                       app_state_bytes=committee().genesis.to_json())
            init.consensus_params.block.max_bytes = -1
            consensus.init_chain(init)
            length = limit - 8  # an Echo whose frame body is exactly `limit` bytes
            assert pb.Request(echo=pb.RequestEcho(message="x" * length)).ByteSize() == limit
            assert len(consensus.echo(pb.RequestEcho(message="x" * length)).message) == length
            with SocketClient(address) as mallory:
                mallory.send_raw(encode_uvarint(limit + 1))
                with pytest.raises(ConnectionError):
                    mallory.receive()
            assert consensus.echo(pb.RequestEcho(message="ok")).message == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        proc.stdout.close()


@pytest.mark.parametrize("bad, why", [("0", "outside"), ("1048575", "outside"), ("2147483648", "outside"),
                                      ("-5", "outside"), ("64MiB", "not a whole number"),
                                      ("", "not a whole number")])
def test_max_frame_bytes_option_refuses_bad_values(tmp_path, capsys, bad, why):
    with pytest.raises(SystemExit) as exit_:
        main(["validator", "--data-dir", str(tmp_path), "--engine", "cometbft",
              "--max-frame-bytes", bad])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--max-frame-bytes" in err and why in err


def test_max_frame_bytes_option_is_for_the_cometbft_engine_only(tmp_path, capsys):
    assert main(["validator", "--data-dir", str(tmp_path), "--engine", "devnet",
                 "--home", str(tmp_path / "v"), "--max-frame-bytes", "2000000"]) == 2
    assert "applies to --engine cometbft only" in capsys.readouterr().err
