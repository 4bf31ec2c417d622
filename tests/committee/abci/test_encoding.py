"""The generated bindings put CometBFT v0.38's field numbers on the wire.

Expected bytes are worked out by hand from the field numbers: a key byte is
``(field_number << 3) | wire_type`` (wire type 0 = varint, 2 = length-delimited).
"""

from __future__ import annotations

import pytest

from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.abci.framing import encode_message

# cometbft v0.38 proto/tendermint/abci/types.proto, Request.value / Response.value.
REQUEST_NUMBERS = {
    "echo": 1, "flush": 2, "info": 3, "init_chain": 5, "query": 6, "check_tx": 8,
    "commit": 11, "list_snapshots": 12, "offer_snapshot": 13, "load_snapshot_chunk": 14,
    "apply_snapshot_chunk": 15, "prepare_proposal": 16, "process_proposal": 17,
    "extend_vote": 18, "verify_vote_extension": 19, "finalize_block": 20,
}
RESPONSE_NUMBERS = {
    "exception": 1, "echo": 2, "flush": 3, "info": 4, "init_chain": 6, "query": 7,
    "check_tx": 9, "commit": 12, "list_snapshots": 13, "offer_snapshot": 14,
    "load_snapshot_chunk": 15, "apply_snapshot_chunk": 16, "prepare_proposal": 17,
    "process_proposal": 18, "extend_vote": 19, "verify_vote_extension": 20,
    "finalize_block": 21,
}


def test_oneof_field_numbers():
    req = {f.name: f.number for f in pb.Request.DESCRIPTOR.oneofs_by_name["value"].fields}
    resp = {f.name: f.number for f in pb.Response.DESCRIPTOR.oneofs_by_name["value"].fields}
    assert req == REQUEST_NUMBERS
    assert resp == RESPONSE_NUMBERS


def test_request_echo_hi_framed():
    # RequestEcho{message="hi"}: key 0x0a (field 1, bytes), len 2, "hi"
    # Request{echo=...}:         key 0x0a (field 1, bytes), len 4
    # frame:                     uvarint length 6
    msg = pb.Request(echo=pb.RequestEcho(message="hi"))
    assert encode_message(msg) == bytes([0x06, 0x0A, 0x04, 0x0A, 0x02]) + b"hi"


@pytest.mark.parametrize(
    "message, expected",
    [
        # finalize_block = 20: key (20<<3)|2 = 162 = a2 01; height = 5 -> 28 05
        (pb.Request(finalize_block=pb.RequestFinalizeBlock(height=5)), "a2 01 02 28 05"),
        # check_tx = 8 -> 42; tx = 1 -> 0a 01 'a'; type = 2 (RECHECK = 1) -> 10 01
        (
            pb.Request(check_tx=pb.RequestCheckTx(tx=b"a", type=pb.RECHECK)),
            "42 05 0a 01 61 10 01",
        ),
        # init_chain = 5 -> 2a; consensus_params = 3 -> 1a; abci = 5 -> 2a;
        # vote_extensions_enable_height = 1 -> 08 01
        (
            pb.Request(
                init_chain=pb.RequestInitChain(
                    consensus_params=pb.ConsensusParams(
                        abci=pb.ABCIParams(vote_extensions_enable_height=1)
                    )
                )
            ),
            "2a 06 1a 04 2a 02 08 01",
        ),
        # decided_last_commit = 2 -> 12; votes = 2 -> 12; block_id_flag = 3, COMMIT = 2 -> 18 02
        (
            pb.Request(
                finalize_block=pb.RequestFinalizeBlock(
                    decided_last_commit=pb.CommitInfo(
                        votes=[pb.VoteInfo(block_id_flag=pb.BLOCK_ID_FLAG_COMMIT)]
                    )
                )
            ),
            "a2 01 06 12 04 12 02 18 02",
        ),
        # exception = 1 -> 0a; error = 1 -> 0a 01 'x'
        (pb.Response(exception=pb.ResponseException(error="x")), "0a 03 0a 01 78"),
        # finalize_block = 21 -> aa 01; app_hash = 5 -> 2a 01 01
        (
            pb.Response(finalize_block=pb.ResponseFinalizeBlock(app_hash=b"\x01")),
            "aa 01 03 2a 01 01",
        ),
        # commit = 12 -> 62; retain_height = 3 -> 18 07
        (pb.Response(commit=pb.ResponseCommit(retain_height=7)), "62 02 18 07"),
        # process_proposal = 18 -> 92 01; status = 1, ACCEPT = 1 -> 08 01
        (
            pb.Response(
                process_proposal=pb.ResponseProcessProposal(
                    status=pb.ResponseProcessProposal.ACCEPT
                )
            ),
            "92 01 02 08 01",
        ),
        # validator_updates = 3 -> 1a; pub_key = 1 -> 0a; ed25519 = 1 -> 0a 01 ff; power = 2 -> 10 0a
        (
            pb.Response(
                finalize_block=pb.ResponseFinalizeBlock(
                    validator_updates=[
                        pb.ValidatorUpdate(pub_key=pb.PublicKey(ed25519=b"\xff"), power=10)
                    ]
                )
            ),
            "aa 01 09 1a 07 0a 03 0a 01 ff 10 0a",
        ),
    ],
)
def test_hand_computed_bytes(message, expected):
    assert message.SerializeToString() == bytes.fromhex(expected)
    assert type(message).FromString(bytes.fromhex(expected)) == message


def test_retired_abci1_numbers_are_reserved():
    names = {f.name for f in pb.Request.DESCRIPTOR.fields}
    assert not names & {"begin_block", "deliver_tx", "end_block", "set_option"}
    assert {n for f in pb.ResponseCommit.DESCRIPTOR.fields for n in [f.number]} == {3}
