"""Routing reads the committee: members report scores (one lies), the ledger aggregates them
at the epoch's close, and a TrustView in routing sees the cheater excluded and the honest node
trusted, over real devnet validator processes."""

from __future__ import annotations

import pytest

from permamesh.committee import txs
from permamesh.committee.devnet.cluster import CHAIN_ID
from permamesh.committee.duties import EpochScores, Member
from permamesh.committee.genesis import LedgerRules
from permamesh.committee.trust import TrustView
from permamesh.identity import NodeIdentity
from permamesh.routing.policy import MemberState, PermameshPolicy, RouteQuery

from .test_devnet import Signer, running_devnet, wait_for


@pytest.fixture
def devnet(tmp_path):
    with running_devnet(tmp_path / "devnet", LedgerRules(blocks_per_epoch=10)) as running:
        yield running


def test_reports_reach_routing_through_committee_queries(devnet):
    net, client = devnet
    seed = Signer(net.partner)
    honest, cheat = NodeIdentity.generate(), NodeIdentity.generate()
    for node in (honest, cheat):
        tx = seed.sign(txs.RegisterNode, node_key=node.public.sign_key, kex_key=node.public.kex_key,
                       role="worker", endpoint="tcp://127.0.0.1:1",
                       profile=txs.NodeProfile(0, 0, "g", "i", 1, models=("tiny-random",)))
        assert client.submit(tx).ok
    trust = TrustView(net.endpoints, refresh_s=0.2).start()
    try:
        assert trust.wait_fresh()
        assert trust.reputation(honest.public.node_id) == pytest.approx(0.5)  # R(0)
        assert trust.reputation("not-registered") == 0.0
        epoch = client.query("/status")["epoch"]
        scores = EpochScores(epoch, {honest.public.sign_key: 1_000_000, cheat.public.sign_key: 0}, 2, {})
        members = [Member(net.identity(i), CHAIN_ID, lie=(i == 0)) for i in range(4)]
        for member in members:
            assert member.report(client, scores).ok
        wait_for(lambda: client.query("/epochs") and any(
            e["epoch"] == epoch for e in client.query("/epochs")), 30.0, "the epoch to close")
        record = next(e for e in client.query("/epochs") if e["epoch"] == epoch)
        assert record["reports"] == 4 and cheat.public.sign_key.hex() in record["excluded"]
        wait_for(lambda: trust.wait_fresh() and trust.reputation(cheat.public.node_id) == 0.0,
                 10.0, "the exclusion to reach routing")
        assert trust.reputation(honest.public.node_id) > 0.5  # the liar moved nothing
        # the routing policy, fed by the view, never picks the excluded worker
        query = RouteQuery((), 10, 8, 16, None)
        states = [MemberState(n.public.node_id, 0, 0.0, 1000.0, 50.0, trust.reputation(n.public.node_id))
                  for n in (honest, cheat)]
        for _ in range(5):
            assert PermameshPolicy().choose(query, states, {}) == honest.public.node_id
    finally:
        trust.stop()
