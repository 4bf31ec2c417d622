"""Mallory against the committee's sockets: the ABCI socket (who may connect, how many, what a
stranger's Commit does, what a huge announced frame costs) and a devnet validator's ROUTER
(clients that never read, junk streams, absurd heights). Memory is measured on the real
process, as resident set growth under a stated budget, and the validator must still commit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.client import SocketClient
from permamesh.committee.abci.framing import encode_message, encode_uvarint
from permamesh.committee.abci.server import ABCIServer, ABCIServerThread, ServerConfig
from permamesh.committee.app import LedgerApp
from permamesh.committee.devnet import messages as m
from permamesh.committee.devnet.blocks import Block, BlockStore
from permamesh.committee.devnet.cluster import free_port
from permamesh.committee.devnet.node import ROUTER_HWM
from permamesh.committee.errors import CommitteeError, ProtocolError
from permamesh.identity import NodeIdentity
from permamesh.transport import DealerClient
from permamesh.wire.codec import WireError, decode, encode

from tests.conftest import wait_for

from .ledger_helpers import CHAIN, committee

MiB = 1024 * 1024


def start_abci(home, port, *extra: str):
    proc = subprocess.Popen([sys.executable, "-m", "permamesh", "validator", "--engine", "cometbft",
                             "--home", str(home), "--abci", f"tcp://127.0.0.1:{port}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().split()
    assert line[:1] == ["READY"], f"validator did not start: {line}"
    return proc


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def settled_rss(pid: int, wait_s: float = 1.0) -> int:
    time.sleep(wait_s)
    return rss(pid)


class PeakRss:
    """The highest resident set of process ``pid`` while the block runs (sampled every 10 ms on
    a thread of the test: a queue that fills and drains between two reads is still seen)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))


# ------------------------------------------------------------------------------ the ABCI socket

def test_a_non_loopback_abci_address_is_refused_unless_allowed(tmp_path):
    app = LedgerApp(tmp_path / "ledger.sqlite")
    try:
        with pytest.raises(ValueError, match="not loopback"):
            ABCIServer(app, "tcp://0.0.0.0:26658")
        ABCIServer(app, "tcp://0.0.0.0:26658", ServerConfig(allow_remote=True))  # explicit: allowed
        ABCIServer(app, "tcp://[::1]:26658")
        ABCIServer(app, f"unix://{tmp_path}/abci.sock")
    finally:
        app.close()
    out = subprocess.run([sys.executable, "-m", "permamesh", "validator", "--engine", "cometbft",
                          "--home", str(tmp_path / "v"), "--abci", f"tcp://0.0.0.0:{free_port()}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "loopback" in out.stderr and "--abci-allow-remote" in out.stderr


def test_a_fifth_abci_connection_is_refused_and_logged(tmp_path, caplog):
    app = LedgerApp(tmp_path / "ledger.sqlite")
    try:
        with ABCIServerThread(app) as server:
            address = server.bound_address
            clients = [SocketClient(address) for _ in range(4)]
            try:
                for c in clients:
                    assert c.echo(pb.RequestEcho(message="hi")).message == "hi"
                host, port = address[len("tcp://"):].rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=5) as fifth:
                    fifth.sendall(encode_message(pb.Request(echo=pb.RequestEcho(message="me too"))))
                    try:
                        assert fifth.recv(100) == b""  # closed without an answer
                    except ConnectionResetError:  # closed with our request unread: the same
                        pass
                assert server.server.refused == 1
            finally:
                for c in clients:
                    c.close()
    finally:
        app.close()
    assert any("refused ABCI connection" in r.getMessage() for r in caplog.records)


def test_a_strangers_commit_commits_nothing(tmp_path):
    c = committee()
    home, port = tmp_path / "validator", free_port()
    proc = start_abci(home, port)
    address = f"tcp://127.0.0.1:{port}"
    try:
        with SocketClient(address) as consensus, SocketClient(address) as stranger:
            consensus.init_chain(pb.RequestInitChain(chain_id=CHAIN, initial_height=1,
                                                     app_state_bytes=c.genesis.to_json()))
            with pytest.raises(ProtocolError, match="FinalizeBlock"):
                stranger.commit(pb.RequestCommit())  # a bare Commit: refused
            assert consensus.info(pb.RequestInfo()).last_block_height == 0
            final = consensus.finalize_block(pb.RequestFinalizeBlock(txs=[], height=1))
            with pytest.raises(ProtocolError, match="FinalizeBlock"):
                stranger.commit(pb.RequestCommit())  # not on the connection that finalized
            assert consensus.info(pb.RequestInfo()).last_block_height == 0
            consensus.commit(pb.RequestCommit())  # CometBFT's own Commit still works
            info = consensus.info(pb.RequestInfo())
            assert info.last_block_height == 1 and info.last_block_app_hash == final.app_hash
            with pytest.raises(ProtocolError, match="FinalizeBlock"):
                consensus.commit(pb.RequestCommit())  # and only once
            assert consensus.info(pb.RequestInfo()).last_block_height == 1
    finally:
        stop(proc)


def test_huge_announced_frames_cost_only_what_arrives(tmp_path):
    """Sixty connections each announce a 60 MiB frame and send 1 MiB of it, then trickle: four are
    served (CometBFT's count), the rest refused; growth stays within 4 frames' worth so far."""
    home, port = tmp_path / "validator", free_port()
    proc = start_abci(home, port)
    budget = 4 * MiB + 24 * MiB  # four partial frames plus the interpreter's own slack
    socks = []
    try:
        before = settled_rss(proc.pid)
        for _ in range(60):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                sock.sendall(encode_uvarint(60 * MiB) + os.urandom(MiB))
            except OSError:  # refused and closed mid-send: what we want
                sock.close()
                continue
            socks.append(sock)
        for _ in range(20):  # trickle
            for sock in socks:
                try:
                    sock.send(b"x")
                except OSError:
                    pass
            time.sleep(0.01)
        grown = settled_rss(proc.pid) - before
        assert grown < budget, f"grew {grown / MiB:.1f} MiB (budget {budget / MiB:.0f} MiB)"
        for sock in socks:
            sock.close()
        socks = []
        time.sleep(0.5)
        with SocketClient(f"tcp://127.0.0.1:{port}") as fresh:  # slots freed: still serving
            assert fresh.echo(pb.RequestEcho(message="ok")).message == "ok"
        assert proc.poll() is None
    finally:
        for sock in socks:
            sock.close()
        stop(proc)


# ------------------------------------------------------------------------ a devnet validator

def commits(client, more: int = 3, timeout_s: float = 30.0) -> None:
    start = client.status().height
    deadline = time.monotonic() + timeout_s
    while client.status().height < start + more:
        assert time.monotonic() < deadline, "the validator stopped committing"
        time.sleep(0.1)


def answers(client) -> bool:
    try:
        client.status()
        return True
    except CommitteeError:
        return False


def test_clients_that_never_read_cost_a_bounded_queue(validator):
    """Eight connections ask 40,000 queries and never read an answer (queries: status asks are
    budgeted, see test_status_budget.py, so queries are what reaches the reply queues). The
    answers that do not fit a peer's queue are dropped, so the validator's peak growth stays
    small; before PeerRouter (304497e) each waited in a task of its own: +55 MiB at the peak,
    and no status answered for seconds."""
    net, client = validator
    pid = net.children[0].proc.pid
    mallory = NodeIdentity.generate()
    commits(client, 10)
    before = settled_rss(pid)
    ask = encode(m.QueryMsg("/status"), mallory)
    readers = [DealerClient(net.endpoints[0]) for _ in range(8)]
    try:
        with PeakRss(pid) as peak:
            for _ in range(5000):
                for sock in readers:
                    sock.send(ask)
            time.sleep(3.0)  # the validator answers (or drops) what it was asked
            wait_for(lambda: answers(client), 60.0, "a status answer after the flood")
        grown = peak.peak - before
        assert grown < 24 * MiB, f"grew {grown / MiB:.1f} MiB for clients that never read"
        commits(client)
    finally:
        for sock in readers:
            sock.close()


def nil_array(size: int) -> bytes:
    """``size`` bytes of valid msgpack that are dear to refuse: one array of ``size - 5`` nils
    (the decoder builds a tuple that long before it finds the frame is not 5 items)."""
    return b"\xdd" + (size - 5).to_bytes(4, "big") + b"\xc0" * (size - 5)


def test_a_junk_stream_leaves_nothing_behind(validator):
    """375 MiB of random junk (refused at once), then 188 MiB of junk that is dear to refuse,
    sent faster than the validator refuses it: at most ROUTER_HWM frames of it wait (zmq stops
    reading the peer beyond that), never all that was sent. Before the ROUTER's receive
    high-water mark (PeerRouter, 304497e) zmq took up to 1,000: +124 MiB at the peak."""
    net, client = validator
    pid = net.children[0].proc.pid
    before = settled_rss(pid)
    junk = [os.urandom(256 * 1024) for _ in range(8)]
    dear = nil_array(128 * 1024)
    with PeakRss(pid) as peak, DealerClient(net.endpoints[0]) as sock:
        for i in range(1500):
            sock.send(junk[i % len(junk)])
        for _ in range(1500):
            sock.send(dear)
        sock.send(encode(m.StatusMsg(ref=7), NodeIdentity.generate()))  # answered after the junk
        answer = sock.recv(120.0)
        assert answer is not None and decode(answer, m.StatusAnswer).msg.ref == 7
    grown, budget = peak.peak - before, ROUTER_HWM * len(dear) + 16 * MiB
    assert grown < budget, f"junk held {grown / MiB:.1f} MiB at the peak (budget {budget / MiB:.0f} MiB)"
    grown = settled_rss(pid, 2.0) - before
    assert grown < 48 * MiB, f"junk left {grown / MiB:.1f} MiB behind"
    commits(client)
    assert "Traceback" not in net.children[0].log_path.read_text()


def _raw_status(first: int, last: int) -> m.StatusMsg:
    """A StatusMsg with any heights (the constructor refuses out-of-range ones; Mallory does not)."""
    msg = object.__new__(m.StatusMsg)
    for name, value in (("first", first), ("last", last), ("ref", 1)):
        object.__setattr__(msg, name, value)
    return msg


def test_absurd_heights_are_refused_on_decode_and_ranges_clamped(validator, tmp_path):
    mallory = NodeIdentity.generate()
    huge = 2**64 - 1
    with pytest.raises(WireError, match="height"):
        decode(encode(_raw_status(huge, huge), mallory))
    store = BlockStore(tmp_path / "blocks.sqlite")
    try:
        assert store.app_hashes(huge, huge) == [] and store.app_hashes(-huge, huge) == []
    finally:
        store.close()
    with pytest.raises(ProtocolError, match="height"):
        Block.decode(Block(huge, b"p" * 32, b"a" * 32, b"k" * 32, 1, ()).encode())

    net, client = validator
    commits(client, 2)
    with DealerClient(net.endpoints[0]) as sock:
        sock.send(encode(_raw_status(huge, huge), mallory))
        sock.send(encode(m.StatusMsg(2**63 - 1, 2**63 - 1, 2), mallory))  # in range: clamped
        answer = sock.recv(5.0)
        assert answer is not None and decode(answer, m.StatusAnswer).msg.ref == 2
        assert decode(answer, m.StatusAnswer).msg.heights == ()
    commits(client)
    log_text = net.children[0].log_path.read_text()
    assert "OverflowError" not in log_text and "error handling" not in log_text


def test_a_nonce_another_tx_of_the_same_key_took_is_asked_for_again(validator):
    """A member's prober and its score report sign with one key: the tx that loses the race
    for a nonce is submitted again at the next one, not dropped."""
    from permamesh.committee import txs

    net, client = validator
    partner, chain_id = net.partner, client.query("/status")["chain_id"]
    nonces: list[int] = []

    def vouch(nonce: int) -> bytes:
        return txs.sign_tx(txs.Vouch(chain_id=chain_id, nonce=nonce,
                                     subject=NodeIdentity.generate().public.sign_key), partner)

    def make(nonce: int) -> bytes:
        nonces.append(nonce)
        if len(nonces) == 1:  # another tx of the same key commits at this nonce first
            assert client.submit(vouch(nonce)).ok
        return vouch(nonce)

    outcome = client.submit_signed(make, partner.public.sign_key)
    assert outcome.ok and nonces == [nonces[0], nonces[0] + 1]
