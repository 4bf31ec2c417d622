"""Worker groups' salts on the ledger: founded once, sealed member to member, opened by no one else.

The story: a partner registers four workers and a relay; three workers announce group "g1",
one "g2". The first worker of g1 founds its salt by sealing one to itself; members seal it to
newcomers; every refusal (a second founder in the same block, a duplicate, a sender outside
the group, a recipient outside it or unregistered, malformed sealed bytes, another salt) comes
back with its code and a reason and changes nothing. A worker that moves to another group, is
made a relay or gets a new key gives its share up. Driven through LedgerApp's ABCI methods.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from permamesh.committee import sealing, txs
from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.app import LedgerApp
from permamesh.committee.groupshares import GROUP, GWAIT, SHARE
from permamesh.identity import NodeIdentity

from .ledger_helpers import CHAIN, Party, announce_tx, block, check, committee, node_tx, query, row_count, start

SALT = bytes(range(32))


class World:
    """A committee of four, a partner admitted by both seeds, workers a, b, c (group g1), d (g2)
    and a relay, each announced."""

    def __init__(self) -> None:
        self.com = committee()
        self.app = LedgerApp(None)
        start(self.app, self.com.genesis)
        self.partner, self.relay = Party(), Party()
        self.a, self.b, self.c1, self.d = Party(), Party(), Party(), Party()
        self.seq = 1
        assert block(self.app, [s.sign(txs.Vouch, subject=self.partner.key) for s in self.com.seeds]) == [0, 0]
        regs = [node_tx(self.partner, w) for w in self.workers] + [node_tx(self.partner, self.relay, "relay")]
        assert block(self.app, regs) == [txs.OK] * 5
        groups = {self.a.key: "g1", self.b.key: "g1", self.c1.key: "g1", self.d.key: "g2"}
        self.announce(*((w, groups[w.key]) for w in self.workers))
        assert block(self.app, [announce_tx(self.relay)]) == [txs.OK]

    @property
    def workers(self) -> list[Party]:
        return [self.a, self.b, self.c1, self.d]

    def announce(self, *moves: tuple[Party, str]) -> None:
        self.seq += 1
        assert block(self.app, [announce_tx(w, seq=self.seq, model="m", group=g) for w, g in moves]) == \
            [txs.OK] * len(moves)

    def share_tx(self, sender: Party, to: Party, group: str = "g1", salt: bytes = SALT, **fields) -> bytes:
        me = to.ident.public
        base = dict(group=group, recipient=me.sign_key, fingerprint=sealing.fingerprint(salt, group),
                    sealed=sealing.seal(salt, chain_id=CHAIN, group=group, recipient=me.sign_key,
                                        recipient_kex=me.kex_key))
        return sender.sign(txs.GroupShare, **(base | fields))

    def result(self, raw: bytes) -> tuple[int, str]:
        resp = self.app.finalize_block(pb.RequestFinalizeBlock(txs=[raw], height=self.app.store.height + 1))
        self.app.commit(pb.RequestCommit())
        return resp.tx_results[0].code, resp.tx_results[0].log

    def share_of(self, party: Party) -> dict:
        return query(self.app, "/group_share", party.key)

    def waiting(self, group: str = "g1") -> dict:
        return query(self.app, "/group_waiting", group.encode())

    def opened(self, party: Party | NodeIdentity, group: str = "g1") -> bytes | None:
        ident = party if isinstance(party, NodeIdentity) else party.ident
        answer = query(self.app, "/group_share", ident.public.sign_key)
        if not answer["share"]:
            return None
        return sealing.open_sealed(bytes.fromhex(answer["share"]["sealed"]), ident, chain_id=CHAIN, group=group)


@pytest.fixture
def world():
    w = World()
    yield w
    w.app.close()


def test_the_first_worker_founds_the_salt_and_members_seal_it_to_newcomers(world):
    w = world
    before = w.waiting()
    assert before["founded"] is False and before["shares"] == 0
    assert before["waiting"] == sorted(p.key.hex() for p in (w.a, w.b, w.c1))
    assert w.share_of(w.a) == {"node": w.a.key.hex(), "group": "g1", "founded": False, "fingerprint": "",
                               "share": None}

    assert block(w.app, [w.share_tx(w.a, w.a)]) == [txs.OK]  # a founds g1
    assert w.opened(w.a) == SALT
    assert w.share_of(w.a)["fingerprint"] == sealing.fingerprint(SALT, "g1").hex()
    assert w.share_of(w.b)["founded"] is True and w.share_of(w.b)["share"] is None

    assert block(w.app, [w.share_tx(w.a, w.b)]) == [txs.OK]  # a member seals to a newcomer
    assert block(w.app, [w.share_tx(w.b, w.c1)]) == [txs.OK]  # and that newcomer to the next
    assert w.opened(w.b) == w.opened(w.c1) == SALT
    assert w.share_of(w.c1)["share"]["sender"] == w.b.key.hex()
    after = w.waiting()
    assert after["waiting"] == [] and after["shares"] == 3
    assert w.waiting("g2")["waiting"] == [w.d.key.hex()] and not w.waiting("g2")["founded"]


def test_two_founders_in_one_block_the_first_wins_the_second_then_receives_a_share(world):
    w = world
    first, second = w.share_tx(w.a, w.a), w.share_tx(w.b, w.b, salt=b"\x07" * 32)
    assert check(w.app, first) == check(w.app, second) == txs.OK  # both look fine against committed state
    resp = w.app.finalize_block(pb.RequestFinalizeBlock(txs=[first, second], height=w.app.store.height + 1))
    w.app.commit(pb.RequestCommit())
    assert [r.code for r in resp.tx_results] == [txs.OK, txs.UNAUTHORIZED]
    assert "already has a salt" in resp.tx_results[1].log
    assert w.opened(w.b) is None and w.waiting()["shares"] == 1
    assert block(w.app, [w.share_tx(w.a, w.b)]) == [txs.OK]
    assert w.opened(w.b) == w.opened(w.a) == SALT


def test_every_refusal_has_a_code_and_a_reason_and_changes_nothing(world):
    w = world
    assert block(w.app, [w.share_tx(w.a, w.a), w.share_tx(w.a, w.b)]) == [txs.OK, txs.OK]
    stranger = Party()
    small_order = b"\x01" + bytes(31)
    cases = [
        (w.share_tx(w.a, w.b), txs.DUPLICATE, "already holds a share"),
        (w.share_tx(w.b, w.b), txs.DUPLICATE, "already holds a share"),
        (w.share_tx(w.c1, w.c1), txs.UNAUTHORIZED, "holds no share"),  # a late founder
        (w.share_tx(w.d, w.c1), txs.UNAUTHORIZED, "only a worker announced in group 'g1'"),
        (w.share_tx(w.relay, w.c1), txs.UNAUTHORIZED, "only a worker announced in group 'g1'"),
        (w.share_tx(w.partner, w.c1), txs.UNAUTHORIZED, "only a worker announced in group 'g1'"),
        (w.share_tx(w.a, w.d), txs.INVALID, "is not a worker announced in group 'g1' (its group is 'g2')"),
        (w.share_tx(w.a, w.relay), txs.INVALID, "is not a worker announced in group 'g1'"),
        (w.share_tx(w.a, stranger), txs.UNKNOWN, "is not registered"),
        (w.share_tx(w.a, w.c1, salt=b"\x09" * 32), txs.INVALID, "fingerprint is not group 'g1'"),
        (w.share_tx(w.a, w.c1, sealed=b"\x05" * 79), txs.INVALID, "sealed must be 80 bytes"),
        (w.share_tx(w.a, w.c1, sealed=small_order + bytes(48)), txs.INVALID, "small-order"),
        (w.share_tx(w.a, w.c1, fingerprint=b"x"), txs.INVALID, "fingerprint must be 16 bytes"),
        (w.share_tx(w.a, w.c1, recipient=w.c1.key[:31]), txs.INVALID, "32-byte node key"),
        (w.share_tx(w.a, w.c1, group=""), txs.INVALID, "group ''"),
        (w.share_tx(w.a, w.c1, group="g 1"), txs.INVALID, "group 'g 1'"),
    ]
    rows = [row_count(w.app, ns) for ns in (SHARE, GROUP, GWAIT)]
    for raw, code, reason in cases:
        got, log = w.result(raw)
        assert (got, reason in log) == (code, True), (code, reason, got, log)
        assert [row_count(w.app, ns) for ns in (SHARE, GROUP, GWAIT)] == rows
    assert w.waiting()["waiting"] == [w.c1.key.hex()] and w.waiting()["shares"] == 2


def test_a_share_opens_for_its_recipient_only(world):
    """Another worker, a relay, a committee member: none opens a share; nor does the recipient
    under another chain or group (the AAD binds both), nor after a bit flip."""
    w = world
    assert block(w.app, [w.share_tx(w.a, w.a), w.share_tx(w.a, w.b)]) == [txs.OK, txs.OK]
    sealed = bytes.fromhex(w.share_of(w.b)["share"]["sealed"])
    outsiders = [w.a.ident, w.c1.ident, w.relay.ident, w.com.members[0].ident, NodeIdentity.generate()]
    assert all(sealing.open_sealed(sealed, o, chain_id=CHAIN, group="g1") is None for o in outsiders)
    assert sealing.open_sealed(sealed, w.b.ident, chain_id=CHAIN, group="g1") == SALT
    assert sealing.open_sealed(sealed, w.b.ident, chain_id="other-chain", group="g1") is None
    assert sealing.open_sealed(sealed, w.b.ident, chain_id=CHAIN, group="g2") is None
    flipped = sealed[:40] + bytes([sealed[40] ^ 1]) + sealed[41:]
    assert sealing.open_sealed(flipped, w.b.ident, chain_id=CHAIN, group="g1") is None
    assert SALT.hex() not in str(query(w.app, "/registry")) + str(query(w.app, "/directory"))


def test_moving_to_another_group_gives_the_share_up_and_state_stays_bounded(world):
    """Decision: re-announcing into another group drops the worker's share of the old one (it
    waits for a share of the new group); a group whose last share goes is unfounded."""
    w = world
    assert block(w.app, [w.share_tx(w.a, w.a), w.share_tx(w.a, w.b), w.share_tx(w.d, w.d, "g2")]) == [0, 0, 0]
    w.announce((w.b, "g2"))
    assert w.share_of(w.b) == {"node": w.b.key.hex(), "group": "g2", "founded": True,
                               "fingerprint": sealing.fingerprint(SALT, "g2").hex(), "share": None}
    assert w.waiting()["shares"] == 1 and w.waiting()["waiting"] == [w.c1.key.hex()]
    assert w.waiting("g2")["waiting"] == [w.b.key.hex()]
    assert w.result(w.share_tx(w.b, w.c1))[0] == txs.UNAUTHORIZED  # no longer a member of g1
    assert block(w.app, [w.share_tx(w.d, w.b, "g2")]) == [txs.OK]

    w.announce((w.a, "g3"))  # g1's last share holder leaves: g1 is unfounded
    assert not w.waiting()["founded"] and row_count(w.app, GROUP) == 1  # g2 only: g3 has no salt yet
    assert block(w.app, [w.share_tx(w.c1, w.c1, salt=b"\x02" * 32)]) == [txs.OK]  # a fresh salt

    sizes = set()
    for hop in range(12):  # a worker hopping through groups leaves nothing behind
        w.announce((w.a, f"hop{hop}"))
        assert block(w.app, [w.share_tx(w.a, w.a, f"hop{hop}")]) == [txs.OK]
        sizes.add(tuple(row_count(w.app, ns) for ns in (SHARE, GROUP, GWAIT)))
    assert sizes == {(4, 3, 0)}  # a, b, c1, d hold one share each, in hop11, g2, g1
    assert w.app.store.recompute_lanes().tolist() == w.app.store.lanes().tolist()


def test_a_relay_role_or_a_new_kex_key_gives_the_share_up(world):
    w = world
    assert block(w.app, [w.share_tx(w.a, w.a), w.share_tx(w.a, w.b), w.share_tx(w.a, w.c1)]) == [0, 0, 0]
    w.b.ident = NodeIdentity(w.b.ident.signing, NodeIdentity.generate().kex)  # the partner rekeys b
    assert block(w.app, [node_tx(w.partner, w.b)]) == [txs.OK]
    assert w.share_of(w.b)["share"] is None and w.waiting()["waiting"] == [w.b.key.hex()]
    assert block(w.app, [w.share_tx(w.a, w.b)]) == [txs.OK]  # sealed to the new key, it opens
    assert w.opened(w.b) == SALT
    assert block(w.app, [node_tx(w.partner, w.c1, "relay")]) == [txs.OK]
    assert w.share_of(w.c1)["group"] == "" and w.share_of(w.c1)["share"] is None
    assert w.waiting()["shares"] == 2 and w.waiting()["waiting"] == []


def test_queries_refuse_bad_data(world):
    for path, data in (("/group_share", b"short"), ("/group_waiting", b""), ("/group_waiting", b"\xff"),
                       ("/group_waiting", b"a b")):
        resp = world.app.query(pb.RequestQuery(path=path, data=data))
        assert resp.code == txs.INVALID and resp.log


# --------------------------------------------------------------------------------- fuzz

_keys = st.binary(min_size=32, max_size=32)


@settings(max_examples=60, deadline=None)
@given(group=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}", fullmatch=True), recipient=_keys,
       sealed=st.binary(min_size=80, max_size=80).filter(lambda b: b[0] > 1),
       fingerprint=st.binary(min_size=16, max_size=16), nonce=st.integers(1, 2**62))
def test_group_share_encoding_round_trips(group, recipient, sealed, fingerprint, nonce):
    signer = Party()
    tx = txs.GroupShare(chain_id=CHAIN, nonce=nonce, group=group, recipient=recipient, sealed=sealed,
                        fingerprint=fingerprint)
    raw = txs.sign_tx(tx, signer.ident)
    parsed, sender = txs.parse_tx(raw, CHAIN)
    assert parsed == tx and sender == signer.key
    assert txs.sign_tx(parsed, signer.ident) == raw  # canonical: the same bytes again


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(group=st.text(max_size=140), recipient=st.binary(max_size=40), sealed=st.binary(max_size=100),
       fingerprint=st.binary(max_size=20))
def test_group_share_fields_are_refused_cleanly(group, recipient, sealed, fingerprint):
    w = World()
    lanes = w.app.store.lanes().tolist()
    fields = dict(group=group, recipient=recipient, sealed=sealed, fingerprint=fingerprint)
    try:
        raw = w.a.sign(txs.GroupShare, **fields)
    except txs.WireError:
        return  # not encodable (a lone surrogate): nobody can send it
    resp = w.app.check_tx(pb.RequestCheckTx(tx=raw))
    assert resp.code in txs.CODE_NAMES and (resp.code == txs.OK or resp.log)
    if resp.code == txs.OK:  # only a founding share a sealed to itself can pass
        assert recipient == w.a.key and group == "g1" and len(sealed) == 80
    else:
        assert w.app.store.lanes().tolist() == lanes
    w.app.close()
