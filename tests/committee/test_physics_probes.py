"""The physics check fed by the members' real round trips.

The story: three committee members are registered by a seed partner in Frankfurt, New York
and Tokyo; a fourth is registered the way ``publish_validators`` does today, at (0, 0), i.e.
nowhere; a fifth is placed in Sydney by mallory, an admitted (trial) partner, before any seed
registered it: the ledger refuses that (only a seed partner registers members), and the query
layer would not count such a member as a probe either. A partner's nodes claim Dubai (answering Frankfurt in 2 ms: impossible),
Amsterdam (consistent with all three located members: possible), London (seen by two located
members only: insufficient) and one node only the unlocated and mallory-placed members saw
(no verdict). Everything goes through LedgerApp's ABCI methods as signed txs; the verdict
is read from ``/registry`` and ``/node``, and ``permamesh payouts`` refuses to pay the liar.

The last test does it for real: a one-validator devnet, a relay process, the member's own
``Prober`` timing it on loopback, and the member placed 18,200 km from the relay's claim.
"""

from __future__ import annotations

import pytest

from permamesh.committee import txs
from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.app import LedgerApp
from permamesh.scheduler.payouts import format_payments, registry_payments
from permamesh.scheduler.physics import reach_km
from permamesh.scheduler.profile import haversine_km
from permamesh.scheduler.weights import Weights

from tests.conftest import wait_for

from .ledger_helpers import Party, block, committee, liveness_tx, node_tx, query, start

P = 4  # probe_blocks: period q is heights 4q .. 4q+3
FRANKFURT, NEW_YORK, TOKYO = (50.110, 8.682), (40.713, -74.006), (35.690, 139.692)
SYDNEY, DUBAI, AMSTERDAM, LONDON = (-33.868, 151.209), (25.205, 55.271), (52.370, 4.895), (51.507, -0.128)


def at(place: tuple[float, float]) -> dict:
    return {"lat_e6": round(place[0] * 1e6), "lon_e6": round(place[1] * 1e6)}


class World:
    """Five members (three located by a seed, one at (0, 0), one placed by mallory), a partner
    admitted by both seeds, and its four nodes."""

    def __init__(self) -> None:
        self.c = committee(n_members=5, probe_blocks=P)
        self.app = LedgerApp(None)
        start(self.app, self.c.genesis)
        self.history: list[tuple[list[bytes], bool]] = []  # every block's txs; liveness blocks marked
        seed = self.c.seeds[0]
        self.frankfurt, self.new_york, self.tokyo, self.nowhere, self.sydney = self.c.members
        self.partner, self.mallory = Party(), Party()
        self.liar, self.honest, self.sparse, self.unseen = (Party() for _ in range(4))
        assert self.commit([s.sign(txs.Vouch, subject=p.key) for p in (self.partner, self.mallory)
                            for s in self.c.seeds]) == [txs.OK] * 4
        assert self.commit([node_tx(self.mallory, self.sydney, "validator", **at(SYDNEY))]
                           + [node_tx(seed, m, "validator", **at(place)) for m, place in
                              ((self.frankfurt, FRANKFURT), (self.new_york, NEW_YORK),
                               (self.tokyo, TOKYO), (self.nowhere, (0, 0)))]
                           + [node_tx(self.partner, n, **at(place)) for n, place in
                              ((self.liar, DUBAI), (self.honest, AMSTERDAM), (self.sparse, LONDON),
                               (self.unseen, AMSTERDAM))]) == [txs.UNAUTHORIZED] + [txs.OK] * 8

    def commit(self, raw_txs: list[bytes], liveness: bool = False) -> list[int]:
        self.history.append((raw_txs, liveness))
        return block(self.app, raw_txs)

    def at_period(self, q: int) -> int:
        """Commit empty blocks so that the next block is the first of period ``q``."""
        while self.app.store.height < q * P - 1:
            self.commit([])
        return q

    def report(self, period: int, ups: list[tuple[Party, list[tuple[Party, int]]]]) -> None:
        """Each member's liveness report, [(member, [(node, rtt_us)])], in one block."""
        assert self.commit([liveness_tx(m, period, {n.key: rtt for n, rtt in up}) for m, up in ups],
                           liveness=True) == [txs.OK] * len(ups)

    def physics(self, node: Party) -> dict | None:
        (row,) = [r for r in query(self.app, "/registry") if r["node"] == node.key.hex()]
        assert query(self.app, "/node", node.key)["physics"] == row["physics"]
        return row["physics"]


@pytest.fixture
def world():
    w = World()
    yield w
    w.app.close()


def measured(w: World) -> list:
    """One period's round trips (microseconds), as the members' probers would report them."""
    return [(w.frankfurt, [(w.liar, 2_000), (w.honest, 5_000), (w.sparse, 8_000)]),
            (w.new_york, [(w.liar, 80_000), (w.honest, 75_000), (w.sparse, 70_000)]),
            (w.tokyo, [(w.liar, 150_000), (w.honest, 130_000)]),
            (w.nowhere, [(w.liar, 100), (w.honest, 100), (w.sparse, 100), (w.unseen, 100)]),
            (w.sydney, [(w.honest, 1_000), (w.unseen, 1_000)])]


def test_each_node_gets_a_verdict_from_the_located_members_round_trips(world):
    w = world
    assert w.physics(w.liar) is None  # nobody measured anything yet
    w.report(w.at_period(1), measured(w))

    liar = w.physics(w.liar)
    too_far = haversine_km(DUBAI, FRANKFURT) - reach_km(2.0)  # 2 ms reach 300 km; Dubai is 4,836 km away
    assert liar == liar | {"possible": False, "probes": 3, "insufficient": False,
                           "worst_violation_km": round(too_far, 1), "member": w.frankfurt.key.hex()}
    assert liar["why"].startswith(f"impossible: member {w.frankfurt.key.hex()[:16]}'s probe at "
                                  "(50.110, 8.682) got an answer in 2 ms")

    honest = w.physics(w.honest)  # mallory's "Sydney" member answered in 1 ms: not a probe
    assert honest == {"possible": True, "probes": 3, "insufficient": False, "worst_violation_km": 0.0,
                      "member": None, "why": "possible: consistent with all 3 distinct probe locations"}
    sparse = w.physics(w.sparse)  # the (0, 0) member's 0.1 ms is skipped too
    assert (sparse["possible"], sparse["insufficient"], sparse["probes"]) == (True, True, 2)
    assert "insufficient probes" in sparse["why"]
    assert w.physics(w.unseen) is None  # only unlocated (or mallory-placed) members saw it
    assert all(w.physics(m) is None for m in w.c.members if m is not w.sydney)  # members are not probed


def test_the_verdict_uses_each_members_latest_round_trip_in_the_two_kept_periods(world):
    w = world
    w.report(w.at_period(1), [(w.frankfurt, [(w.liar, 2_000)])])
    assert w.physics(w.liar)["possible"] is False
    # the next period Frankfurt finds it 60 ms away (reach 6,100 km): Dubai is allowed again
    w.report(w.at_period(2), [(w.frankfurt, [(w.liar, 60_000)])])
    assert w.physics(w.liar) == w.physics(w.liar) | {"possible": True, "probes": 1, "insufficient": True}
    # two periods without a report: nothing in the window, no verdict
    w.at_period(4)
    w.commit([])
    assert w.physics(w.liar) is None


def test_every_replica_answers_alike_whatever_the_order_of_the_reports(world):
    w = world
    w.report(w.at_period(1), measured(w))
    twin = LedgerApp(None)
    try:
        start(twin, w.c.genesis)
        for raw_txs, liveness in w.history:  # the same blocks, each liveness block reversed
            block(twin, raw_txs[::-1] if liveness else raw_txs)
        ask = lambda app: app.query(pb.RequestQuery(path="/registry")).value  # noqa: E731
        assert ask(twin) == ask(w.app) and b'"possible":false' in ask(twin)
    finally:
        twin.close()


def test_payouts_pay_nothing_for_an_impossible_location_and_say_why(world):
    w = world
    w.report(w.at_period(1), measured(w))
    payments = registry_payments(lambda path, data: query(w.app, path, data), Weights())
    nodes = {n.node_id: n for n in payments[w.partner.key.hex()].nodes}
    liar = nodes[w.liar.key.hex()]
    km = w.physics(w.liar)["worst_violation_km"]
    assert (liar.paid, liar.amount) == (False, 0)
    assert liar.why[0].startswith(f"node {w.liar.key.hex()[:16]} claims location 25.205,55.271, which "
                                  f"member {w.frankfurt.key.hex()[:16]}'s round trip proves impossible "
                                  f"({km:g} km beyond light's reach)")
    assert nodes[w.honest.key.hex()].paid and nodes[w.sparse.key.hex()].paid  # insufficient is not refuted
    text = format_payments(payments)
    assert f"node {w.liar.key.hex()[:16]} at 25.205,55.271: 0.00 (not paid)" in text


# ----------------------------------------------------------------------- real round trips


def test_a_real_loopback_round_trip_refutes_a_claim_across_the_world(tmp_path):
    """A one-validator devnet, one relay process claiming (40, -10) off Portugal, and the
    member's own prober timing it on loopback; the seed partner then places the member in
    Sydney, 18,200 km away. The prober's round trip (a fresh encrypted link and a signed
    answer: a few ms on a busy machine, far below the ~180 ms light in fibre needs there and
    back) makes the committee's verdict "impossible", computed from the RTT it measured."""
    from permamesh.committee.devnet.cluster import Devnet, DevnetConfig
    from permamesh.committee.genesis import LedgerRules
    from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
    from permamesh.identity import NodeIdentity

    devnet = Devnet(DevnetConfig(tmp_path / "committee", validators=1, rules=LedgerRules(probe_blocks=4)))
    devnet.start()
    mesh = None
    try:
        mesh = EmbeddedMesh(MeshConfig(tmp_path / "nodes", workers=0, relays=1, committee=devnet,
                                       start_timeout_s=120.0))
        mesh.start()  # registers the relay and the member (at (0, 0)); the prober counts it running
        client, member, partner = mesh.committee, devnet.identity(0), devnet.partner
        relay = NodeIdentity.load_or_create(tmp_path / "nodes" / "keys", "mesh-relay-0").public.sign_key
        row = client.query("/node", relay)
        assert row["running"] and (row["profile"]["lat_e6"], row["profile"]["lon_e6"]) == (40_000_000, -10_000_000)
        assert row["physics"] is None  # the member claims no location: not a probe

        located = txs.RegisterNode(chain_id=devnet.chain_id, nonce=client.next_nonce(partner.public.sign_key),
                                   node_key=member.public.sign_key, kex_key=member.public.kex_key,
                                   role="validator", endpoint="",
                                   profile=txs.NodeProfile(*at(SYDNEY).values(), "committee", "committee", 0))
        assert client.submit(txs.sign_tx(located, partner)).ok
        wait_for(lambda: client.query("/node", relay)["physics"] is not None, 30, "a located probe's verdict")
        row = client.query("/node", relay)
        physics, rtt_ms = row["physics"], row["rtt_us"] / 1000
        assert 0 < rtt_ms < 500  # loopback, measured by the real Prober within its 0.5 s timeout
        assert physics["possible"] is False and physics["member"] == member.public.sign_key.hex()
        km = haversine_km((40.0, -10.0), SYDNEY)
        assert f"got an answer in {rtt_ms:g} ms" in physics["why"]
        assert physics["worst_violation_km"] == pytest.approx(km - reach_km(rtt_ms), abs=0.1)
        assert physics["probes"] == 1 and not physics["insufficient"]  # one refutation suffices

        payments = registry_payments(client.query, Weights())
        (refused,) = [n for p in payments.values() for n in p.nodes if n.node_id == relay.hex()]
        assert not refused.paid and f"member {member.public.sign_key.hex()[:16]}'s round trip" in refused.why[0]
    finally:
        if mesh is not None:
            mesh.stop()
        devnet.stop()
