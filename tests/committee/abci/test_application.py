"""dispatch() maps each Request to one Application method; failures become exceptions."""

from __future__ import annotations

import pytest

from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.application import CALLS, Application, dispatch
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
    kept = app.prepare_proposal(pb.RequestPrepareProposal(txs=[b"aaa", b"bb", b"c"], max_tx_bytes=5))
    assert list(kept.txs) == [b"aaa", b"bb"]
    assert (
        app.process_proposal(pb.RequestProcessProposal()).status
        == pb.ResponseProcessProposal.ACCEPT
    )
    done = app.finalize_block(pb.RequestFinalizeBlock(txs=[b"a", b"b"]))
    assert [r.code for r in done.tx_results] == [0, 0]


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
