"""The ledger application, driven through its ABCI methods as CometBFT would call them."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from permamesh.committee import txs
from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.app import LedgerApp
from permamesh.committee.errors import CommitteeError

from .ledger_helpers import CHAIN, Party, block, check, committee, node_tx, query, start


@pytest.fixture
def world(tmp_path):
    c = committee()
    app = LedgerApp(tmp_path / "ledger.sqlite")
    start(app, c.genesis)
    yield c, app
    app.close()


def admit(c, app) -> Party:
    """A new partner vouched in by both seed partners."""
    partner = Party()
    codes = block(app, [s.sign(txs.Vouch, subject=partner.key) for s in c.seeds])
    assert codes == [txs.OK, txs.OK]
    return partner


def test_partner_admitted_by_vouches_then_registers_nodes(world):
    c, app = world
    partner, node = Party(), Party()
    assert block(app, [node_tx(partner, node)]) == [txs.UNAUTHORIZED]  # not admitted yet
    first = c.seeds[0].sign(txs.Vouch, subject=partner.key)
    assert block(app, [first]) == [txs.OK]
    assert query(app, "/partners")["candidates"][partner.key.hex()] == [c.seeds[0].key.hex()]
    assert block(app, [c.seeds[1].sign(txs.Vouch, subject=partner.key)]) == [txs.OK]
    assert query(app, "/partners")["partners"][partner.key.hex()]["tier"] == 1
    assert block(app, [node_tx(partner, node)]) == [txs.OK]
    registry = query(app, "/registry")
    assert [n["node"] for n in registry] == [node.key.hex()]
    assert registry[0]["reputation_ppm"] == c.genesis.reputation.initial_ppm
    # a trial partner may not vouch yet
    assert block(app, [partner.sign(txs.Vouch, subject=Party().key)]) == [txs.UNAUTHORIZED]


def test_forged_replayed_malformed_never_change_state(world):
    c, app = world
    good = c.seeds[0].sign(txs.Vouch, subject=Party().key)
    before = (app.store.app_hash, app.store.height)
    forged = bytearray(good)
    forged[-5] ^= 0x01  # inside the signature
    other_chain = txs.sign_tx(txs.Vouch(chain_id="elsewhere", nonce=1, subject=b"x" * 32),
                              c.seeds[1].ident)
    cases = {bytes(forged): txs.MALFORMED, b"\x93garbage": txs.MALFORMED, b"": txs.MALFORMED,
             other_chain: txs.WRONG_CHAIN}
    for raw, code in cases.items():
        assert check(app, raw) == code
    assert block(app, list(cases)) == list(cases.values())
    # no nonce consumed, no row written: only the height moved
    assert query(app, "/nonce", c.seeds[0].key)["next"] == 1
    assert app.store.recompute_lanes().tolist() == app.store.lanes().tolist()
    assert check(app, good) == txs.OK
    assert check(app, good) == txs.BAD_NONCE  # the same tx twice in the mempool
    assert block(app, [good, good]) == [txs.OK, txs.BAD_NONCE]
    assert check(app, good) == txs.BAD_NONCE  # replay after commit
    assert before[1] + 2 == app.store.height


def test_reports_median_and_epoch_close(world):
    c, app = world
    partner = admit(c, app)
    nodes = [Party() for _ in range(3)]
    assert block(app, [node_tx(partner, n) for n in nodes]) == [txs.OK] * 3
    epoch = query(app, "/status")["epoch"]
    honest = [{nodes[0].key: 1_000_000, nodes[1].key: 0, nodes[2].key: 1_000_000}] * 3
    liar = {nodes[0].key: 0, nodes[1].key: 1_000_000}  # lies, and skips node 2
    reports = [m.sign(txs.ScoreReport, epoch=epoch, scores=tuple(
        txs.Score(k, v, 3) for k, v in scores.items()))
        for m, scores in zip(c.members, honest + [liar])]
    assert block(app, reports) == [txs.OK] * 4
    dup = c.members[0].sign(txs.ScoreReport, epoch=epoch, scores=(txs.Score(nodes[0].key, 0),))
    assert block(app, [dup]) == [txs.DUPLICATE]
    outsider = Party().sign(txs.ScoreReport, epoch=epoch, scores=(txs.Score(nodes[0].key, 0),))
    assert block(app, [outsider]) == [txs.UNAUTHORIZED]
    while not query(app, "/epochs"):
        block(app, [])
    record = query(app, "/epochs")[0]
    assert record["epoch"] == epoch and record["reports"] == 4 and record["scored"] == 3
    rep = query(app, "/reputation")
    config = c.genesis.reputation
    # lower median of (1, 1, 1, 0) is 1: the liar moved nothing
    assert rep[nodes[0].key.hex()]["window"] == [1_000_000]
    assert rep[nodes[1].key.hex()]["window"] == [0]
    assert rep[nodes[1].key.hex()]["reputation_ppm"] < config.initial_ppm
    trusted = {t["node"] for t in query(app, "/trusted")}
    assert nodes[0].key.hex() in trusted
    stale = c.members[0].sign(txs.ScoreReport, epoch=epoch, scores=(txs.Score(nodes[0].key, 0),))
    assert block(app, [stale]) == [txs.STALE]


def test_too_few_reports_leave_a_node_unscored(world):
    c, app = world
    partner = admit(c, app)
    node = Party()
    block(app, [node_tx(partner, node)])
    epoch = query(app, "/status")["epoch"]
    block(app, [m.sign(txs.ScoreReport, epoch=epoch, scores=(txs.Score(node.key, 0),))
                for m in c.members[:2]])  # 2 of 4 is not more than 2/3
    while not query(app, "/epochs"):
        block(app, [])
    assert query(app, "/reputation")[node.key.hex()]["epochs"] == 0


def test_mutual_credit_limits_and_payouts(world):
    c, app = world
    partner = admit(c, app)
    worker, user = Party(), Party()
    block(app, [node_tx(partner, worker)])
    allowance = c.genesis.rules.base_allowance
    spend = user.sign(txs.JobReceipt, worker=worker.key, units=allowance, job_id=b"job-1")
    again = user.sign(txs.JobReceipt, worker=worker.key, units=1, job_id=b"job-1")
    broke = user.sign(txs.JobReceipt, worker=worker.key, units=1, job_id=b"job-2")
    assert block(app, [spend, again, broke]) == [txs.OK, txs.DUPLICATE, txs.NO_CREDIT]
    acct = query(app, "/account", user.key)
    assert acct["balance"] == -allowance and acct["available"] == 0
    balances = query(app, "/balances")
    assert sum(a["balance"] for a in balances) == 0  # mutual credit: it all nets out
    assert query(app, "/account", worker.key)["earned"] == allowance
    while not query(app, "/payouts"):
        block(app, [])
    (payout,) = query(app, "/payouts")
    rep = c.genesis.reputation.initial_ppm
    assert payout["node"] == worker.key.hex() and payout["payout"] == allowance * rep // 10**6
    assert "units served" in payout["why"]


def test_state_survives_restart_and_info_reports_it(tmp_path):
    c = committee()
    path = tmp_path / "ledger.sqlite"
    app = LedgerApp(path)
    start(app, c.genesis)
    partner = admit(c, app)
    block(app, [node_tx(partner, Party())])
    height, app_hash = app.store.height, app.store.app_hash
    # a block finalized but not committed must not survive
    app.finalize_block(pb.RequestFinalizeBlock(
        txs=[c.seeds[0].sign(txs.Vouch, subject=Party().key)], height=height + 1))
    app.close()
    again = LedgerApp(path)
    info = again.info(pb.RequestInfo())
    assert (info.last_block_height, info.last_block_app_hash) == (height, app_hash)
    assert again.chain_id == CHAIN
    assert len(query(again, "/registry")) == 1
    assert again.store.recompute_lanes().tolist() == again.store.lanes().tolist()
    with pytest.raises(CommitteeError):  # a different genesis must not be accepted
        start(again, dataclasses.replace(c.genesis, chain_id="other"))
    again.close()


def test_app_hash_is_canonical_state_not_history():
    """Two replicas applying independent txs in different orders agree on the hash."""
    c = committee()
    apps = [LedgerApp(None), LedgerApp(None)]
    for app in apps:
        start(app, c.genesis)
    partner = Party()
    vouches = [s.sign(txs.Vouch, subject=partner.key) for s in c.seeds]
    block(apps[0], vouches)
    block(apps[1], vouches[::-1])
    assert apps[0].store.app_hash == apps[1].store.app_hash
    for app in apps:
        assert app.store.recompute_lanes().tolist() == app.store.lanes().tolist()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), flips=st.lists(st.integers(0, 10_000), max_size=4))
def test_fuzz_check_tx_never_crashes_or_writes(data, flips):
    c = committee()
    app = LedgerApp(None)
    start(app, c.genesis)
    block(app, [])
    original = c.seeds[0].sign(txs.Vouch, subject=Party().key)
    good = bytearray(original)
    for flip in flips:
        good[flip % len(good)] ^= 1 + flip % 255
    lanes = app.store.lanes().tolist()
    codes = []
    for raw in (data, bytes(good)):
        resp = app.check_tx(pb.RequestCheckTx(tx=raw))
        assert resp.code in txs.CODE_NAMES
        assert resp.code == txs.OK or resp.log
        codes.append(resp.code)
    assert codes[0] != txs.OK
    assert (codes[1] == txs.OK) == (bytes(good) == original)
    assert block(app, [data]) != [txs.OK]
    assert app.store.lanes().tolist() == lanes  # rows unchanged (the height is not a row)
    app.close()


def test_trial_partner_may_vouch_after_its_trial(world):
    c, app = world
    partner = admit(c, app)
    block(app, [node_tx(partner, Party())])
    newcomer = Party()
    assert block(app, [partner.sign(txs.Vouch, subject=newcomer.key)]) == [txs.UNAUTHORIZED]
    admitted = query(app, "/partners")["partners"][partner.key.hex()]["admitted"]
    while not any(e["epoch"] >= admitted + c.genesis.rules.trial_epochs for e in query(app, "/epochs")):
        block(app, [])
    assert query(app, "/partners")["partners"][partner.key.hex()]["tier"] == 2
    assert any(partner.key.hex() in e["promoted"] for e in query(app, "/epochs"))
    assert block(app, [partner.sign(txs.Vouch, subject=newcomer.key)]) == [txs.OK]


def cometbft_data_size(raw_txs: list[bytes]) -> int:
    """CometBFT's ``types.ComputeProtoSizeForTxs``: the protobuf size of ``Data{txs}`` (field
    1, repeated bytes); ``ResponsePrepareProposal`` has the same shape, so protobuf says it."""
    return pb.ResponsePrepareProposal(txs=raw_txs).ByteSize()


def test_prepare_proposal_counts_each_tx_as_cometbft_does(world):
    """CometBFT checks the returned txs with ``Txs.Validate(max_tx_bytes)``, which counts each
    tx's tag and length prefix too, and panics when they exceed it (with block.max_bytes -1
    the mempool hands over everything and trimming is the app's job)."""
    c, app = world
    vouches = [s.sign(txs.Vouch, subject=Party().key) for s in c.seeds]
    assert [len(v) for v in vouches] == [187, 187]  # 374 raw bytes, 380 as CometBFT counts

    def kept(max_tx_bytes: int) -> list[bytes]:
        return list(app.prepare_proposal(pb.RequestPrepareProposal(
            txs=[b"junk"] + vouches, max_tx_bytes=max_tx_bytes, height=2)).txs)

    assert cometbft_data_size(vouches) == 380
    assert kept(380) == vouches  # exactly full
    assert kept(379) == vouches[:1]
    assert kept(374) == vouches[:1]  # the raw sum is not room enough (it was kept before)
    assert kept(190) == vouches[:1]
    assert kept(189) == []
    for limit in (189, 190, 374, 379, 380):
        assert cometbft_data_size(kept(limit)) <= limit


def finalize(app: LedgerApp, height: int, raw_txs: list[bytes]) -> pb.ResponseFinalizeBlock:
    resp = app.finalize_block(pb.RequestFinalizeBlock(txs=raw_txs, height=height))
    app.commit(pb.RequestCommit())
    return resp


def test_chain_starting_at_initial_height_1000_survives_restarts(tmp_path):
    """A genesis with ``initial_height`` 1000 (a chain restarted after an upgrade): the first
    FinalizeBlock comes at 1000, Info says 0 until it is committed, and a restart at any point
    continues where CometBFT expects, agreeing with a replica that never stopped."""
    c = committee()
    path = tmp_path / "ledger.sqlite"
    init = pb.RequestInitChain(chain_id=CHAIN, app_state_bytes=c.genesis.to_json(),
                               initial_height=1000)
    app, twin = LedgerApp(path), LedgerApp(None)
    genesis_hash = app.init_chain(init).app_hash
    assert twin.init_chain(init).app_hash == genesis_hash
    # restart before the first block: CometBFT sees height 0 and sends InitChain again
    app.close()
    app = LedgerApp(path)
    info = app.info(pb.RequestInfo())
    assert (info.last_block_height, info.last_block_app_hash) == (0, b"")
    with pytest.raises(CommitteeError, match="initial_height"):
        app.init_chain(pb.RequestInitChain(chain_id=CHAIN, app_state_bytes=c.genesis.to_json(),
                                           initial_height=999))
    assert app.init_chain(init).app_hash == genesis_hash
    with pytest.raises(CommitteeError, match="expected 1000"):
        app.finalize_block(pb.RequestFinalizeBlock(height=1))

    partner, worker = Party(), Party()
    vouches = [s.sign(txs.Vouch, subject=partner.key) for s in c.seeds]
    register = node_tx(partner, worker)
    for replica in (app, twin):
        assert [r.code for r in finalize(replica, 1000, vouches).tx_results] == [txs.OK] * 2
        assert [r.code for r in finalize(replica, 1001, [register]).tx_results] == [txs.OK]
    app.close()
    app = LedgerApp(path)
    info = app.info(pb.RequestInfo())
    assert (info.last_block_height, info.last_block_app_hash) == (1001, twin.store.app_hash)
    with pytest.raises(CommitteeError, match="expected 1002"):
        app.finalize_block(pb.RequestFinalizeBlock(height=1001))
    for height in range(1002, 1016):  # through epoch closes at 1005, 1010, 1015
        assert finalize(app, height, []).app_hash == finalize(twin, height, []).app_hash
    assert query(app, "/epochs") == query(twin, "/epochs") != []
    assert query(app, "/status")["height"] == 1015
    assert [n["node"] for n in query(app, "/registry")] == [worker.key.hex()]
    assert app.store.recompute_lanes().tolist() == app.store.lanes().tolist()
    app.close()
    twin.close()


def test_commit_without_finalize_is_refused(world):
    _, app = world
    height = app.store.height
    with pytest.raises(CommitteeError, match="without a FinalizeBlock"):
        app.commit(pb.RequestCommit())
    assert app.store.height == height
