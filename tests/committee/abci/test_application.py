"""dispatch() maps each Request to one Application method; failures become exceptions."""

from __future__ import annotations

import pytest

from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.application import CALLS, Application, dispatch, proto_tx_size
from permamesh.committee.abci.client import LocalClient
from permamesh.committee.errors import ProtocolError

from .kvapp import KVApp


@pytest.mark.parametrize("call", CALLS)
def test_every_call_has_a_default_and_answers_in_kind(call):
    request = pb.Request()
    getattr(request, call).SetInParent()
    response = dispatch(Application(), request)
    assert response.WhichOneof("value") == call


def test_calls_cover_the_request_oneof():
    fields = [f.name for f in pb.Request.DESCRIPTOR.oneofs_by_name["value"].fields]
    assert list(CALLS) == fields


def test_defaults():
    app = Application()
    assert app.echo(pb.RequestEcho(message="hi")).message == "hi"
    assert app.info(pb.RequestInfo()) == pb.ResponseInfo()
    # each tx costs its length + tag + length prefix: 5, 4 and 3 bytes
    kept = app.prepare_proposal(pb.RequestPrepareProposal(txs=[b"aaa", b"bb", b"c"], max_tx_bytes=9))
    assert list(kept.txs) == [b"aaa", b"bb"]
    assert (
        app.process_proposal(pb.RequestProcessProposal()).status
        == pb.ResponseProcessProposal.ACCEPT
    )
    done = app.finalize_block(pb.RequestFinalizeBlock(txs=[b"a", b"b"]))
    assert [r.code for r in done.tx_results] == [0, 0]


def cometbft_data_size(txs: list[bytes]) -> int:
    """The protobuf size of CometBFT's ``Data{txs}`` (field 1, repeated bytes), which is what
    ``types.ComputeProtoSizeForTxs`` returns. ``ResponsePrepareProposal`` has the same shape."""
    return pb.ResponsePrepareProposal(txs=txs).ByteSize()


@pytest.mark.parametrize("length, size", [(0, 2), (1, 3), (127, 129), (128, 131), (187, 190),
                                          (16_383, 16_386), (16_384, 16_388),
                                          (2_097_151, 2_097_155), (2_097_152, 2_097_157)])
def test_tx_size_counts_tag_and_length_prefix_like_cometbft(length, size):
    tx = b"x" * length
    assert proto_tx_size(tx) == size == cometbft_data_size([tx])


def test_default_prepare_proposal_never_exceeds_max_tx_bytes_as_cometbft_counts():
    app = Application()
    txs = [b"a" * 187, b"b" * 187, b"c" * 127, b"d" * 128]
    for limit in range(0, cometbft_data_size(txs) + 2):
        kept = list(app.prepare_proposal(pb.RequestPrepareProposal(txs=txs, max_tx_bytes=limit)).txs)
        assert kept == txs[: len(kept)]  # a prefix, in order
        assert cometbft_data_size(kept) <= limit  # what CometBFT's Txs.Validate checks
        if len(kept) < len(txs):  # and it stopped only because the next tx did not fit
            assert cometbft_data_size(txs[: len(kept) + 1]) > limit


def test_app_exception_becomes_response_exception(caplog):
    response = dispatch(KVApp(), pb.Request(check_tx=pb.RequestCheckTx(tx=b"boom")))
    assert response.WhichOneof("value") == "exception"
    assert "the app blew up" in response.exception.error
    assert "check_tx failed" in caplog.text


def test_wrong_return_type_and_empty_request_become_exceptions():
    class Broken(Application):
        def info(self, req):
            return pb.ResponseEcho()

    assert dispatch(Broken(), pb.Request(info=pb.RequestInfo())).WhichOneof("value") == "exception"
    assert dispatch(Application(), pb.Request()).WhichOneof("value") == "exception"


def test_local_client_runs_a_block():
    app = KVApp()
    client = LocalClient(app)
    assert client.info().last_block_height == 0
    client.init_chain(pb.RequestInitChain(chain_id="t"))
    client.finalize_block(pb.RequestFinalizeBlock(height=1, txs=[b"a=1"]))
    client.commit()
    assert client.query(pb.RequestQuery(data=b"a")).value == b"1"
    with pytest.raises(ProtocolError, match="blew up"):
        client.check_tx(pb.RequestCheckTx(tx=b"boom"))
