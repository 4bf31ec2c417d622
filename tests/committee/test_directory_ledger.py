"""The directory on the ledger: nodes publish their own descriptors, members commit who is up.

The story: a partner registers a worker and a relay; each node announces itself with its own
key; the four committee members probe and report once per period; a node more than 2/3 of
them found up is running for that period and the next, then drops out unless probed up
again. Everything is driven through LedgerApp's ABCI methods, as CometBFT would.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from permamesh.committee import txs
from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.app import LedgerApp
from permamesh.committee.errors import TxError
from permamesh.committee.ledger import DESC, LIVE, NODE, PROBE
from permamesh.wire.codec import encode

from .ledger_helpers import (CHAIN, Party, advance_to, announce_tx, block, check, committee,
                             liveness_tx, node_tx, query, row_count, start)

P = 4  # probe_blocks in these tests: period q is heights 4q .. 4q+3


class World:
    """A committee of four, a partner admitted by both seeds, one worker and one relay."""

    def __init__(self) -> None:
        self.c = committee(probe_blocks=P)
        self.app = LedgerApp(None)
        start(self.app, self.c.genesis)
        self.members = self.c.members
        self.partner, self.worker, self.relay = Party(), Party(), Party()
        self.setup = [[s.sign(txs.Vouch, subject=self.partner.key) for s in self.c.seeds],
                      [node_tx(self.partner, self.worker),
                       node_tx(self.partner, self.relay, "relay")]]
        for raw_txs in self.setup:
            assert block(self.app, raw_txs) == [txs.OK, txs.OK]

    def twin(self) -> World:
        """A second replica of the same chain: the same parties, the same setup txs, with the
        two seeds' vouches in the other order."""
        twin = World.__new__(World)
        twin.__dict__.update(self.__dict__)
        twin.app = LedgerApp(None)
        start(twin.app, self.c.genesis)
        vouches, registrations = self.setup
        assert block(twin.app, vouches[::-1]) == [txs.OK] * 2
        assert block(twin.app, registrations) == [txs.OK] * 2  # one partner: its nonce order
        return twin

    def directory(self) -> dict:
        return query(self.app, "/directory")

    def entry(self, node: Party) -> dict:
        (row,) = [n for n in self.directory()["nodes"] if n["node"] == node.key.hex()]
        return row

    def report(self, members: list[Party], period: int, up: dict[bytes, int]) -> list[int]:
        return block(self.app, [liveness_tx(m, period, up) for m in members])


@pytest.fixture
def world():
    w = World()
    yield w
    w.app.close()


# ------------------------------------------------------------------------------- announce


def test_a_registered_node_announces_itself_and_the_directory_lists_it(world):
    w = world
    before = w.entry(w.worker)
    assert (before["endpoint"], before["transport_key"], before["seq"]) == ("", "", 0)
    worker_says = announce_tx(w.worker, seq=7, endpoint="tcp://10.0.0.5:7001",
                              model="HuggingFaceTB/SmolLM2-135M", group="HuggingFaceTB/SmolLM2-135M",
                              layers="tcp://10.0.0.5:7002", engine="llamacpp")
    assert check(w.app, worker_says) == txs.OK
    assert block(w.app, [worker_says, announce_tx(w.relay, endpoint="tcp://[2001:db8::7]:9000")]) \
        == [txs.OK, txs.OK]

    d = w.directory()
    assert (d["height"], d["app_hash"]) == (w.app.store.height, w.app.store.app_hash.hex())
    assert d["period"] == w.app.store.height // P
    assert [n["node"] for n in d["nodes"]] == sorted([w.worker.key.hex(), w.relay.key.hex()])
    worker = w.entry(w.worker)
    assert worker == worker | {
        "node_id": w.worker.ident.node_id, "role": "worker", "partner": w.partner.key.hex(),
        "kex_key": w.worker.ident.public.kex_key.hex(),
        "transport_key": w.worker.ident.transport.public_bytes.hex(),
        "endpoint": "tcp://10.0.0.5:7001", "model": "HuggingFaceTB/SmolLM2-135M",
        "group": "HuggingFaceTB/SmolLM2-135M",
        "layers": "tcp://10.0.0.5:7002", "version": "permamesh-0.1", "seq": 7, "engine": "llamacpp",
        "reputation_ppm": w.c.genesis.reputation.initial_ppm, "excluded": False,
        "running": False, "rtt_us": None, "seen_period": -1}
    assert set(worker) == {"node", "node_id", "role", "partner", "kex_key", "transport_key",
                           "endpoint", "model", "engine", "group", "layers", "version", "seq", "profile",
                           "reputation_ppm", "excluded", "running", "rtt_us", "seen_period"}
    registry = {n["node"]: n for n in query(w.app, "/registry")}
    assert worker["profile"] == registry[w.worker.key.hex()]["profile"]
    assert registry[w.worker.key.hex()]["endpoint"] == "tcp://127.0.0.1:1"  # as registered
    node = query(w.app, "/node", w.relay.key)
    assert node["descriptor"]["endpoint"] == "tcp://[2001:db8::7]:9000" and node["role"] == "relay"

    # a later descriptor replaces it; the partner re-registering the node does not touch it
    assert block(w.app, [announce_tx(w.worker, seq=8, endpoint="tcp://worker.example.org:7001"),
                         node_tx(w.partner, w.worker, isp="isp-b")]) == [txs.OK, txs.OK]
    worker = w.entry(w.worker)
    assert (worker["endpoint"], worker["seq"], worker["profile"]["isp"]) == (
        "tcp://worker.example.org:7001", 8, "isp-b")


def test_a_descriptor_must_fit_the_role_its_partner_registered(world):
    w = world
    serving = announce_tx(w.relay, model="smollm2-135m")
    assert check(w.app, serving) == txs.INVALID
    assert block(w.app, [serving]) == [txs.INVALID]
    assert block(w.app, [announce_tx(w.relay, seq=2, layers="tcp://10.0.0.9:1")]) == [txs.INVALID]
    assert block(w.app, [announce_tx(w.relay, seq=3, engine="torch")]) == [txs.INVALID]
    assert w.entry(w.relay)["endpoint"] == ""
    # the partner turns its worker into a relay: the worker's old descriptor no longer applies
    assert block(w.app, [announce_tx(w.worker, model="m")]) == [txs.OK]
    assert block(w.app, [node_tx(w.partner, w.worker, "relay")]) == [txs.OK]
    entry = w.entry(w.worker)
    assert (entry["role"], entry["endpoint"], entry["model"], entry["seq"]) == ("relay", "", "", 0)
    assert block(w.app, [announce_tx(w.worker, seq=1)]) == [txs.STALE]  # seq still counts
    assert block(w.app, [announce_tx(w.worker, seq=2)]) == [txs.OK]
    assert w.entry(w.worker)["endpoint"] == "tcp://node.example.org:7001"


def test_refused_announces_change_no_descriptor(world):
    w = world
    assert block(w.app, [announce_tx(w.worker, seq=5)]) == [txs.OK]
    outsider = Party()
    cases = {
        "signed by the partner": (announce_tx(w.partner, seq=9), txs.UNAUTHORIZED),
        "signed by a stranger": (announce_tx(outsider, seq=9), txs.UNKNOWN),
        "same seq": (announce_tx(w.worker, seq=5, endpoint="tcp://10.9.9.9:1"), txs.STALE),
        "lower seq": (announce_tx(w.worker, seq=4, endpoint="tcp://10.9.9.9:1"), txs.STALE),
        "bad endpoint": (announce_tx(w.worker, seq=9, endpoint="tcp://0.0.0.0:7001"), txs.INVALID),
        "bad engine": (announce_tx(w.worker, seq=9, engine="Llama CPP"), txs.INVALID),
    }
    directory = w.directory()["nodes"]
    descriptors = list(w.app.store.scan(DESC, committed=True))
    for name, (raw, code) in cases.items():
        if name == "lower seq":  # CheckTx expects the nonce "same seq" holds (it was refused)
            continue
        resp = w.app.check_tx(pb.RequestCheckTx(tx=raw))
        assert (resp.code, resp.codespace) == (code, txs.CODESPACE), name
        assert resp.log, name
    # in a block, a refusal by a rule consumes its nonce, so "lower seq" meets its own rule
    assert block(w.app, [raw for raw, _ in cases.values()]) == [code for _, code in cases.values()]
    assert list(w.app.store.scan(DESC, committed=True)) == descriptors
    assert w.directory()["nodes"] == directory


def test_stateless_refusals_consume_nothing(world):
    w = world
    lanes = w.app.store.lanes().tolist()
    bad = {
        "short key": dict(transport_key=b"\x01" * 31),
        "small-order key": dict(transport_key=bytes(32)),
        "small-order key, high bit": dict(transport_key=bytes(31) + b"\x80"),
        "unspecified v6": dict(endpoint="tcp://[::]:7001"),
        "empty endpoint": dict(endpoint=""),
        "bad layers": dict(layers="tcp://host:0"),
        "model with a space": dict(model="smol lm"),
        "group too long": dict(group="g" * 129),
        "group with a space": dict(group="my group"),
        "no version": dict(version=""),
        "seq 0": dict(seq=0),
    }
    for name, fields in bad.items():
        raw = announce_tx(w.worker, **({"seq": 1} | fields))
        w.worker.nonce -= 1  # none of them consumes a nonce
        resp = w.app.check_tx(pb.RequestCheckTx(tx=raw))
        assert resp.code == txs.INVALID and resp.log, (name, resp.log)
    vouch = encode(txs.Vouch(chain_id=CHAIN, nonce=1, subject=b"x" * 32), w.worker.ident)
    assert check(w.app, vouch.replace(b"tx.vouch", b"tx.oops!")) == txs.MALFORMED
    assert w.app.store.lanes().tolist() == lanes
    assert query(w.app, "/nonce", w.worker.key)["next"] == 1


GOOD_ENDPOINTS = ["tcp://127.0.0.1:5555", "tcp://10.0.0.1:1", "tcp://node-1.example.org:65535",
                  "tcp://localhost:7001", "tcp://[::1]:1", "tcp://[2001:db8::7]:443",
                  "tcp://[::ffff:192.0.2.1]:80", "tcp://Mixed-Case.Example:9", "tcp://x:1",
                  "tcp://" + "a" * 63 + "." + "b" * 63 + "." + "c" * 60 + ":65535"]  # 200
BAD_ENDPOINTS = ["", "tcp://0.0.0.0:7001", "tcp://[::]:7001", "tcp://[::ffff:0.0.0.0]:1",
                 "tcp://host:0", "tcp://host:65536", "tcp://host:080", "tcp://host", "tcp://:1",
                 "http://host:1", "TCP://host:1", "tcp://::1:5", "tcp://a_b.example:1",
                 "tcp://-a.example:1", "tcp://a-.example:1", "tcp://example.com.:1",
                 "tcp://a..b:1", "tcp://1.2.3.256:1", "tcp://01.2.3.4:1", "tcp://1.2.3:1",
                 "tcp://example.123:1", "tcp://224.0.0.1:1", "tcp://255.255.255.255:1",
                 "tcp://[ff02::1]:1", "tcp://[fe80::1%eth0]:1", "tcp://[1:2:3]:1", "tcp://h:1/x",
                 "tcp://h:1?key=" + "0" * 64, "tcp://user@h:1", "tcp://h :1", "tcp://hé:1",
                 "tcp://" + "a" * 64 + ".org:1",
                 "tcp://" + "a" * 63 + "." + "b" * 63 + "." + "c" * 61 + ":65535"]  # 201


@pytest.mark.parametrize("endpoint", GOOD_ENDPOINTS)
def test_dialable_endpoints_pass(endpoint):
    assert txs.endpoint_problem(endpoint) is None


@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS)
def test_undialable_endpoints_are_refused_with_a_reason(endpoint):
    assert txs.endpoint_problem(endpoint)


# ------------------------------------------------------------------------------- liveness


def test_more_than_two_thirds_of_the_members_make_a_node_running(world):
    w = world
    m = w.members
    advance_to(w.app, 2 * P - 1)  # the next block opens period 2
    assert w.report(m[:2], 2, {w.worker.key: 300, w.relay.key: 50}) == [txs.OK] * 2
    entry = w.entry(w.worker)
    assert w.directory()["period"] == 2
    assert (entry["running"], entry["rtt_us"], entry["seen_period"]) == (False, None, -1)
    assert w.report(m[2:3], 2, {w.worker.key: 100}) == [txs.OK]  # 3 of 4 for the worker only
    entry = w.entry(w.worker)
    assert (entry["running"], entry["rtt_us"], entry["seen_period"]) == (True, 300, 2)
    assert not w.entry(w.relay)["running"]  # 2 of 4 is not more than 2/3
    assert w.report(m[3:], 2, {w.worker.key: 200}) == [txs.OK]
    assert w.entry(w.worker)["rtt_us"] == 200  # lower median of 100, 200, 300, 300

    # no reports in period 3: still running (counted in the period before) ...
    advance_to(w.app, 3 * P)
    assert w.directory()["period"] == 3 and w.entry(w.worker)["running"]
    advance_to(w.app, 4 * P - 1)
    assert w.entry(w.worker)["running"]
    # ... and out at the first block of period 4; what was measured stays readable
    advance_to(w.app, 4 * P)
    entry = w.entry(w.worker)
    assert (entry["running"], entry["rtt_us"], entry["seen_period"]) == (False, 200, 2)
    assert not query(w.app, "/node", w.worker.key)["running"]

    # restarted and probed up again: back without anyone doing anything else
    assert w.report(m[1:], 4, {w.worker.key: 900}) == [txs.OK] * 3
    entry = w.entry(w.worker)
    assert (entry["running"], entry["rtt_us"], entry["seen_period"]) == (True, 900, 4)


def test_a_report_for_the_previous_period_still_counts(world):
    w = world
    advance_to(w.app, 2 * P)  # period 2 has begun
    assert w.report(w.members[:2], 2, {w.relay.key: 40}) == [txs.OK] * 2
    advance_to(w.app, 3 * P - 1)
    assert w.report(w.members[2:3], 2, {w.relay.key: 20}) == [txs.OK]  # in period 3 (block 12)
    assert w.directory()["period"] == 3
    entry = w.entry(w.relay)
    assert (entry["running"], entry["seen_period"], entry["rtt_us"]) == (True, 2, 40)
    # a later quorum for the older period never moves the node back
    assert w.report(w.members[:3], 3, {w.relay.key: 70}) == [txs.OK] * 3
    assert w.report(w.members[3:], 2, {w.relay.key: 10}) == [txs.OK]
    entry = w.entry(w.relay)
    assert (entry["seen_period"], entry["rtt_us"]) == (3, 70)


def test_an_addendum_adds_nodes_a_members_report_lacks_and_nothing_else(world):
    w = world
    m = w.members
    advance_to(w.app, 2 * P)
    assert w.report(m[:3], 2, {w.relay.key: 40}) == [txs.OK] * 3  # full reports, before the worker answered
    assert not w.entry(w.worker)["running"]
    assert w.report(m[:1], 2, {w.relay.key: 40}) == [txs.DUPLICATE]  # names nothing new
    assert w.report(m[:2], 2, {w.worker.key: 300, w.relay.key: 1}) == [txs.OK] * 2  # adds the worker
    assert not w.entry(w.worker)["running"]  # 2 of 4
    assert w.report(m[2:3], 2, {w.worker.key: 100}) == [txs.OK]
    worker, relay = w.entry(w.worker), w.entry(w.relay)
    assert (worker["running"], worker["rtt_us"], worker["seen_period"]) == (True, 300, 2)
    assert relay["rtt_us"] == 40  # the relay's round trips are the first reports', not the addendum's 1
    assert w.report(m[:3], 2, {w.worker.key: 5, w.relay.key: 5}) == [txs.DUPLICATE] * 3


def test_bad_reports_are_refused_with_their_code(world):
    w = world
    advance_to(w.app, 3 * P)  # period 3
    m, up = w.members, {w.worker.key: 100}
    assert w.report(m[:1], 3, up) == [txs.OK]
    lanes = w.app.store.lanes().tolist()
    probes = list(w.app.store.scan(PROBE, committed=True))
    keys = sorted([w.worker.key, w.relay.key])
    unsorted = m[3].sign(txs.Liveness, period=3, up=(txs.Seen(keys[1], 1), txs.Seen(keys[0], 1)))
    twice = m[3].sign(txs.Liveness, period=3, up=(txs.Seen(keys[0], 1), txs.Seen(keys[0], 2)))
    slow = m[3].sign(txs.Liveness, period=3, up=(txs.Seen(keys[0], txs.MAX_RTT_US + 1),))
    short = m[3].sign(txs.Liveness, period=3, up=(txs.Seen(b"k" * 31, 1),))
    m[3].nonce -= 4  # stateless refusals consume no nonce
    stateless = {unsorted: txs.INVALID, twice: txs.DUPLICATE, slow: txs.INVALID,
                 short: txs.INVALID}
    cases = {
        "again": (liveness_tx(m[0], 3, up), txs.DUPLICATE),
        "two periods back": (liveness_tx(m[1], 1, up), txs.STALE),
        "the next period": (liveness_tx(m[2], 4, up), txs.STALE),
        "not a member": (liveness_tx(Party(), 3, up), txs.UNAUTHORIZED),
        "a partner": (liveness_tx(w.partner, 3, up), txs.UNAUTHORIZED),
        "unknown node": (liveness_tx(m[3], 3, {Party().key: 5}), txs.UNKNOWN),
    }
    for raw, code in stateless.items():
        assert check(w.app, raw) == code
    for name, (raw, code) in cases.items():
        assert check(w.app, raw) == code, name
    raws = list(stateless) + [raw for raw, _ in cases.values()]
    assert block(w.app, raws) == list(stateless.values()) + [code for _, code in cases.values()]
    assert list(w.app.store.scan(PROBE, committed=True)) == probes
    assert w.app.store.recompute_lanes().tolist() == w.app.store.lanes().tolist()
    assert w.app.store.lanes().tolist() != lanes  # only nonces moved (rule refusals consume them)
    assert row_count(w.app, LIVE) == 0


def test_a_full_report_fits_a_tx_and_one_more_node_does_not():
    member = Party()
    keys = sorted(i.to_bytes(2, "big") * 16 for i in range(txs.MAX_SEEN + 1))
    full = liveness_tx(member, 0, {k: txs.MAX_RTT_US for k in keys[:-1]})
    tx, sender = txs.parse_tx(full, CHAIN)
    assert len(tx.up) == txs.MAX_SEEN and sender == member.key
    over = liveness_tx(member, 0, {k: 1 for k in keys})
    with pytest.raises(TxError) as err:
        txs.parse_tx(over, CHAIN)
    assert err.value.code == txs.INVALID


def test_an_empty_report_is_a_report():
    w = World()
    advance_to(w.app, P)
    assert w.report(w.members[:1], 1, {}) == [txs.OK]
    assert w.report(w.members[:1], 1, {}) == [txs.DUPLICATE]
    w.app.close()


# --------------------------------------------------------------------- determinism, bounds


def test_the_same_txs_in_another_order_reach_the_same_app_hash():
    """Two replicas get the same txs, ordered differently within and across blocks."""
    a = World()
    b = a.twin()
    assert a.app.store.app_hash == b.app.store.app_hash

    announces = [announce_tx(a.worker, endpoint="tcp://10.0.0.1:1", model="m"),
                 announce_tx(a.relay, endpoint="tcp://10.0.0.2:1")]
    advance_to(a.app, 2 * P - 1)
    advance_to(b.app, 2 * P - 1)
    up = {a.worker.key: 10, a.relay.key: 20}
    reports = [liveness_tx(m, 2, {k: v + i for k, v in up.items()}) for i, m in
               enumerate(a.members)]
    assert block(a.app, announces + reports[:2]) == [txs.OK] * 4
    assert block(a.app, reports[2:]) == [txs.OK] * 2
    assert block(b.app, [reports[3], announces[1], reports[2]]) == [txs.OK] * 3
    assert block(b.app, [reports[1], announces[0], reports[0]]) == [txs.OK] * 3
    assert a.app.store.app_hash == b.app.store.app_hash
    assert a.directory() == b.directory()
    assert a.entry(a.worker)["rtt_us"] == 11  # lower median of 10, 11, 12, 13
    for w in (a, b):
        assert w.app.store.recompute_lanes().tolist() == w.app.store.lanes().tolist()
        w.app.close()


def test_liveness_state_stays_bounded_over_many_periods():
    w = World()
    m, nodes = w.members, [w.worker, w.relay]
    sizes = []
    for period in range(1, 41):
        # the members report in turns, some late (in the next period's first block)
        on_time = m[:3] if period % 3 else m[:2]
        late = [x for x in m if x not in on_time]
        advance_to(w.app, period * P - 1)
        up = {n.key: 100 * period for n in nodes}
        assert w.report(on_time, period, up) == [txs.OK] * len(on_time)
        advance_to(w.app, (period + 1) * P - 1)
        assert w.report(late, period, {nodes[0].key: 1}) == [txs.OK] * len(late)
        probes = row_count(w.app, PROBE)
        assert probes <= 2 * len(m)
        sizes.append((probes, row_count(w.app, LIVE), row_count(w.app, NODE)))
        assert w.entry(nodes[0])["running"] and w.entry(nodes[0])["seen_period"] == period
    assert set(sizes[2:]) == {sizes[-1]}  # no growth, whatever the number of periods
    assert sizes[-1][1] == 2  # one liveness row per node
    w.app.close()


# --------------------------------------------------------------------------------- fuzz


def fuzz_world() -> World:
    """A fresh ledger per example (CheckTx remembers the nonces it let in), in period 1."""
    world = World()
    advance_to(world.app, P)
    return world


_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=24)
_endpoints = st.one_of(st.sampled_from(GOOD_ENDPOINTS + BAD_ENDPOINTS), _text,
                       st.builds(lambda h, p: f"tcp://{h}:{p}", _text,
                                 st.integers(-2, 70_000)))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), flips=st.lists(st.integers(0, 10_000), max_size=4),
       which=st.sampled_from(["announce", "liveness"]))
def test_fuzz_new_txs_check_tx_never_crashes_or_writes(data, flips, which):
    world = fuzz_world()
    app = world.app
    if which == "announce":
        original = announce_tx(world.worker, endpoint="tcp://10.1.2.3:4000", model="m")
    else:
        original = liveness_tx(world.members[0], 1, {world.worker.key: 5, world.relay.key: 6})
    flipped = bytearray(original)
    for flip in flips:
        flipped[flip % len(flipped)] ^= 1 + flip % 255
    lanes = app.store.lanes().tolist()
    codes = []
    for raw in (data, bytes(flipped)):
        resp = app.check_tx(pb.RequestCheckTx(tx=raw))
        assert resp.code in txs.CODE_NAMES and (resp.code == txs.OK or resp.log)
        codes.append(resp.code)
    assert codes[0] != txs.OK
    assert (codes[1] == txs.OK) == (bytes(flipped) == original)
    assert block(app, [data]) != [txs.OK]
    assert app.store.lanes().tolist() == lanes
    app.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(endpoint=_endpoints, layers=st.one_of(st.just(""), _endpoints),
       model=st.one_of(st.just(""), _text), group=st.one_of(st.just(""), _text),
       version=st.one_of(st.just("permamesh-0.1"), _text), seq=st.integers(-5, 2**63),
       key=st.one_of(st.just(b"\x09" + bytes(31)), st.binary(min_size=0, max_size=40)),
       seen=st.lists(st.tuples(st.one_of(st.sampled_from(["worker", "relay"]),
                                         st.binary(min_size=30, max_size=33)),
                               st.integers(-1, txs.MAX_RTT_US + 1)), max_size=6),
       period=st.one_of(st.integers(-1, 3), st.integers(-3, 2**63)))
def test_fuzz_new_txs_fields_are_refused_cleanly(endpoint, layers, model, group, version, seq,
                                                 key, seen, period):
    world = fuzz_world()
    app = world.app
    lanes = app.store.lanes().tolist()
    fields = dict(transport_key=key, endpoint=endpoint, layers=layers, model=model,
                  group=group, version=version, seq=seq)
    known = {"worker": world.worker.key, "relay": world.relay.key}
    up = tuple(txs.Seen(known.get(k, k), r) for k, r in seen)
    raws = [announce_tx(world.worker, **fields),
            world.members[0].sign(txs.Liveness, period=period, up=up)]
    for raw in raws:
        resp = app.check_tx(pb.RequestCheckTx(tx=raw))
        assert resp.code in txs.CODE_NAMES and (resp.code == txs.OK or resp.log)
        tx, _ = txs.parse_tx(raw, CHAIN) if resp.code == txs.OK else (None, None)
        if isinstance(tx, txs.Announce):
            assert txs.endpoint_problem(tx.endpoint) is None and len(tx.transport_key) == 32
            assert tx.layers == "" or txs.endpoint_problem(tx.layers) is None
        if isinstance(tx, txs.Liveness):
            keys = [s.node_key for s in tx.up]
            assert keys == sorted(set(keys)) and tx.period in (0, 1)
    assert app.store.lanes().tolist() == lanes  # CheckTx writes nothing
    app.close()
