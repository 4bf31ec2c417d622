"""The socket server, driven the way CometBFT v0.38 drives it.

Story: CometBFT connects (consensus, mempool, query), echoes and flushes, does the
Info handshake, sends InitChain, then runs three heights of PrepareProposal ->
ProcessProposal -> FinalizeBlock -> Commit while the mempool connection keeps sending
CheckTx. The query connection reads the state. The node restarts: a new server on the
same app object answers Info with the committed height and app hash.
"""

from __future__ import annotations

import socket
import threading

import pytest

from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.client import SocketClient
from permamesh.committee.abci.framing import encode_frame, encode_uvarint
from permamesh.committee.abci.server import ABCIServerThread, ServerConfig, parse_address
from permamesh.committee.errors import ProtocolError

from .kvapp import KVApp, state_hash

LOCAL = "tcp://127.0.0.1:0"


def abci_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("abci")]


@pytest.fixture(autouse=True)
def no_leaked_server_threads():
    before = set(abci_threads())
    yield
    assert set(abci_threads()) <= before, f"leaked threads: {abci_threads()}"


def run_heights(consensus: SocketClient, heights: range) -> None:
    for height in heights:
        txs = [f"k{height}=v{height}".encode(), b"shared=%d" % height, b"not-a-kv"]
        prepared = consensus.prepare_proposal(
            pb.RequestPrepareProposal(height=height, txs=txs, max_tx_bytes=1 << 20)
        )
        proposal = [tx for tx in prepared.txs if b"=" in tx]  # the proposer drops junk
        processed = consensus.process_proposal(
            pb.RequestProcessProposal(height=height, txs=proposal)
        )
        assert processed.status == pb.ResponseProcessProposal.ACCEPT
        done = consensus.finalize_block(pb.RequestFinalizeBlock(height=height, txs=proposal))
        assert [r.code for r in done.tx_results] == [0, 0]
        assert len(done.app_hash) == 32
        consensus.commit()


def test_cometbft_call_order_over_three_connections_and_a_restart():
    app = KVApp()
    with ABCIServerThread(app, LOCAL) as server:
        address = server.bound_address
        assert address.startswith("tcp://127.0.0.1:") and not address.endswith(":0")
        consensus, mempool, query = (SocketClient(address) for _ in range(3))
        try:
            assert consensus.echo(pb.RequestEcho(message="hello")).message == "hello"
            consensus.flush()
            info = consensus.info(pb.RequestInfo(version="0.38.17", abci_version="2.0.0"))
            assert info.last_block_height == 0 and info.last_block_app_hash == b""
            genesis = consensus.init_chain(pb.RequestInitChain(chain_id="permamesh-test"))
            assert genesis.app_hash == state_hash({})

            checked: list[int] = []
            mempool_done = threading.Event()

            def mempool_traffic() -> None:
                try:
                    for i in range(50):
                        tx = b"m%d=x" % i if i % 5 else b"junk"
                        checked.append(mempool.check_tx(pb.RequestCheckTx(tx=tx)).code)
                finally:
                    mempool_done.set()

            sender = threading.Thread(target=mempool_traffic, name="test-mempool")
            sender.start()
            run_heights(consensus, range(1, 4))
            assert mempool_done.wait(10), "mempool connection stalled"
            sender.join(10)
            assert checked == [1 if i % 5 == 0 else 0 for i in range(50)]

            hit = query.query(pb.RequestQuery(data=b"k2", path="/key"))
            assert (hit.code, hit.value, hit.height) == (0, b"v2", 3)
            assert query.query(pb.RequestQuery(data=b"shared")).value == b"3"
            assert query.query(pb.RequestQuery(data=b"nope")).code == 1
        finally:
            for client in (consensus, mempool, query):
                client.close()

    assert app.max_active == 1, "two app calls overlapped"
    expected_hash = state_hash(app.committed)

    with ABCIServerThread(app, LOCAL) as restarted, SocketClient(restarted.bound_address) as c:
        info = c.info(pb.RequestInfo())
        assert (info.last_block_height, info.last_block_app_hash) == (3, expected_hash)


def test_pipelined_requests_are_answered_in_order():
    with ABCIServerThread(KVApp(), LOCAL) as server, SocketClient(server.bound_address) as c:
        for i in range(20):  # CometBFT's mempool sends CheckTx async, then one Flush
            c.send(pb.Request(check_tx=pb.RequestCheckTx(tx=b"k=%d" % i if i % 2 else b"bad")))
        c.send(pb.Request(flush=pb.RequestFlush()))
        kinds = [c.receive() for _ in range(21)]
        assert [r.WhichOneof("value") for r in kinds] == ["check_tx"] * 20 + ["flush"]
        assert [r.check_tx.code for r in kinds[:20]] == [i % 2 == 0 for i in range(20)]


def test_app_exception_returns_response_exception_and_the_connection_survives():
    with ABCIServerThread(KVApp(), LOCAL) as server, SocketClient(server.bound_address) as c:
        c.send(pb.Request(check_tx=pb.RequestCheckTx(tx=b"boom")))
        response = c.receive()
        assert response.WhichOneof("value") == "exception"
        assert "the app blew up" in response.exception.error
        with pytest.raises(ProtocolError, match="blew up"):
            c.check_tx(pb.RequestCheckTx(tx=b"boom"))
        assert c.echo(pb.RequestEcho(message="still here")).message == "still here"


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x80" * 11,  # overlong varint
        encode_uvarint(1 << 30),  # a 1 GiB frame announced: refused before any body
        encode_frame(b"\xff\xff\xff"),  # a frame whose body is not a protobuf
    ],
    ids=["overlong-varint", "oversized", "undecodable"],
)
def test_garbage_closes_only_that_connection(garbage, caplog):
    with ABCIServerThread(KVApp(), LOCAL) as server:
        good = SocketClient(server.bound_address)
        mallory = SocketClient(server.bound_address)
        try:
            assert good.echo(pb.RequestEcho(message="a")).message == "a"
            mallory.send_raw(garbage)
            with pytest.raises(ConnectionError):
                mallory.receive()  # the server hung up on mallory
            assert good.echo(pb.RequestEcho(message="b")).message == "b"
            with SocketClient(server.bound_address) as fresh:
                assert fresh.echo(pb.RequestEcho(message="c")).message == "c"
        finally:
            good.close()
            mallory.close()
    assert "closing ABCI connection" in caplog.text


def test_unix_socket(tmp_path):
    path = tmp_path / "app.sock"
    with ABCIServerThread(KVApp(), f"unix://{path}") as server:
        assert server.bound_address == f"unix://{path}"
        with SocketClient(server.bound_address) as c:
            assert c.echo(pb.RequestEcho(message="u")).message == "u"
    assert not path.exists()


def test_stop_with_clients_still_connected_is_clean():
    server = ABCIServerThread(KVApp(), LOCAL)
    address = server.start()
    client = SocketClient(address)
    try:
        assert client.echo(pb.RequestEcho(message="x")).message == "x"
        server.stop(timeout_s=10)
        with pytest.raises((ConnectionError, OSError)):
            client.echo(pb.RequestEcho(message="y"))
    finally:
        client.close()
    with pytest.raises(OSError):  # the port is no longer listening
        socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])), timeout=2).close()


def test_bind_failure_is_reported_by_start():
    with ABCIServerThread(KVApp(), LOCAL) as first:
        taken = first.bound_address
        with pytest.raises(OSError):
            ABCIServerThread(KVApp(), taken).start()


@pytest.mark.parametrize(
    "bad", ["127.0.0.1:26658", "http://127.0.0.1:1", "tcp://127.0.0.1", "tcp://:5", "unix://rel.sock"]
)
def test_bad_addresses_are_refused_clearly(bad):
    with pytest.raises(ValueError, match="ABCI address"):
        parse_address(bad)


def test_address_round_trip():
    assert str(parse_address("tcp://0.0.0.0:26658")) == "tcp://0.0.0.0:26658"
    assert str(parse_address("unix:///tmp/x.sock")) == "unix:///tmp/x.sock"


class SizedApp(KVApp):
    """A KV app that asks for a frame limit (the ledger derives its own from the block size)."""

    def __init__(self, wanted: int | None) -> None:
        super().__init__()
        self.wanted = wanted

    def max_request_bytes(self) -> int | None:
        return self.wanted


def echo_of_size(size: int) -> pb.RequestEcho:
    """An Echo whose Request frame body is exactly ``size`` bytes."""
    length = size
    while (over := pb.Request(echo=pb.RequestEcho(message="x" * length)).ByteSize() - size) > 0:
        length -= over  # shrink by the tag and length prefixes (fewer once they shrink)
    request = pb.RequestEcho(message="x" * length)
    assert pb.Request(echo=request).ByteSize() == size
    return request


def hung_up_on(address: str, size: int) -> bool:
    """Announce a frame of ``size`` bytes (sending no body): did the server hang up?"""
    with SocketClient(address) as mallory:
        mallory.send_raw(encode_uvarint(size))
        mallory.send(pb.Request(flush=pb.RequestFlush()))  # read as body bytes when accepted
        try:
            mallory.receive()
        except ConnectionError:
            return True
        raise AssertionError("the server answered inside a frame it should still be reading")


def test_frame_limit_follows_the_app_on_open_connections():
    app = SizedApp(None)
    with ABCIServerThread(app, LOCAL) as server, SocketClient(server.bound_address) as c:
        assert server.server.max_message_bytes == 64 * 1024 * 1024  # the app has no opinion
        app.wanted = 5000  # what InitChain does to the ledger
        assert server.server.max_message_bytes == 5000
        request = echo_of_size(5000)
        assert c.echo(request).message == request.message  # exactly the limit, same connection
        assert hung_up_on(server.bound_address, 5001)
        assert c.echo(pb.RequestEcho(message="still here")).message == "still here"


def test_configured_frame_limit_overrides_the_app():
    app = SizedApp(100_000)
    config = ServerConfig(max_message_bytes=3000)
    with ABCIServerThread(app, LOCAL, config=config) as server, \
            SocketClient(server.bound_address) as c:
        assert server.server.max_message_bytes == 3000
        request = echo_of_size(3000)
        assert c.echo(request).message == request.message
        assert hung_up_on(server.bound_address, 3001)


@pytest.mark.parametrize("bad", [0, -1, 2**31])
def test_server_config_refuses_bad_limits(bad):
    with pytest.raises(ValueError, match="max_message_bytes"):
        ServerConfig(max_message_bytes=bad)
