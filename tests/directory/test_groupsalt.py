"""A worker group's salt through a real committee: the same on every member, readable by no one else.

Real processes on loopback: a 4-validator devnet committee whose validators are in the
directory (so every share read is checked against a second validator). Workers here are
identities with descriptors, not model servers: the salt needs only the ledger and the
directory. The first worker of a group founds the salt; a newcomer gets it from a member's
duty within seconds of announcing; two founders racing end with one salt; a relay, a
committee member or a worker of another group cannot open a share; a worker that never
announced the group, or whose group has no running member, gets a clear error in bounded time.
"""

from __future__ import annotations

import threading
import time

import pytest

from permamesh.committee import sealing, txs
from permamesh.committee.client import CommitteeClient
from permamesh.committee.devnet.cluster import Devnet, DevnetConfig
from permamesh.committee.genesis import LedgerRules
from permamesh.directory.announce import announce, publish_validators
from permamesh.directory.committee import CommitteeDirectory
from permamesh.directory.errors import DirectoryError
from permamesh.directory.groupsalt import DutyConfig, SaltDuty, _rank, group_salt
from permamesh.identity import NodeIdentity

FAST = DutyConfig(poll_s=0.5, step_s=1.0)


@pytest.fixture(scope="module")
def committee(tmp_path_factory):
    base = tmp_path_factory.mktemp("groupsalt")
    devnet = Devnet(DevnetConfig(base / "committee", rules=LedgerRules(blocks_per_epoch=1000)))
    devnet.start()
    client = None
    try:
        client = CommitteeClient(devnet.endpoints)
        chain_id = client.query("/status")["chain_id"]
        publish_validators(client, chain_id, devnet.partner, [devnet.identity(i) for i in range(4)],
                           devnet.endpoints)
        yield devnet, client, chain_id
    finally:
        if client is not None:
            client.close()
        devnet.stop()


class Node:
    """A registered node with its own directory copy; ``join(group)`` announces it."""

    port = 7100

    def __init__(self, devnet: Devnet, client: CommitteeClient, role: str = "worker") -> None:
        self.devnet, self.identity = devnet, NodeIdentity.generate()
        partner = devnet.partner
        tx = txs.RegisterNode(chain_id=devnet.chain_id, nonce=client.next_nonce(partner.public.sign_key),
                              node_key=self.identity.public.sign_key, kex_key=self.identity.public.kex_key,
                              role=role, endpoint="", profile=txs.NodeProfile(0, 0, "grid", "isp", 1))
        assert client.submit(txs.sign_tx(tx, partner)).ok
        self.directory = CommitteeDirectory([devnet.endpoints[0]], refresh_s=1.0).start()
        self.duty: SaltDuty | None = None
        Node.port += 1
        self.endpoint = f"tcp://127.0.0.1:{Node.port}"

    def join(self, group: str) -> None:
        announce(self.identity, [self.devnet.endpoints[1]], self.endpoint, model="m" if group else "", group=group)

    def salt(self, group: str, timeout_s: float = 20.0) -> bytes:
        salt = group_salt(self.directory, self.identity, group, timeout_s)
        self.duty = SaltDuty(self.directory, self.identity, group, salt, FAST).start()
        return salt

    def close(self) -> None:
        if self.duty is not None:
            self.duty.stop()
        self.directory.close()


@pytest.fixture
def nodes(committee):
    devnet, client, _ = committee
    made: list[Node] = []

    def make(role: str = "worker") -> Node:
        made.append(Node(devnet, client, role))
        return made[-1]

    yield make
    for node in made:
        node.close()


def test_the_founder_and_a_newcomer_end_with_the_same_salt_within_seconds(committee, nodes):
    _, client, chain_id = committee
    founder, newcomer = nodes(), nodes()
    assert founder.directory.snapshot().confirmed_by  # shares are read from two validators
    founder.join("alpha")
    salt = founder.salt("alpha")  # no share yet: it founds the group
    assert len(salt) == 32
    assert client.query("/group_waiting", b"alpha") == {
        "group": "alpha", "founded": True, "shares": 1, "waiting": [],
        "fingerprint": sealing.fingerprint(salt, "alpha").hex()}

    newcomer.join("alpha")
    announced = time.monotonic()
    assert newcomer.salt("alpha") == salt
    waited = time.monotonic() - announced
    assert waited < 4.0, f"the newcomer waited {waited:.1f} s for its share"
    assert founder.duty.sealed == 1
    share = client.query("/group_share", newcomer.identity.public.sign_key)
    assert share["group"] == "alpha" and share["share"]["sender"] == founder.identity.public.sign_key.hex()
    assert salt.hex() not in str(share) + str(client.query("/directory")) + str(client.query("/registry"))


def test_nobody_outside_the_group_opens_a_share(committee, nodes):
    devnet, client, chain_id = committee
    member, newcomer, relay, other = nodes(), nodes(), nodes("relay"), nodes()
    member.join("beta")
    other.join("gamma")
    relay.join("")
    salt = member.salt("beta")
    newcomer.join("beta")
    assert newcomer.salt("beta") == salt
    sealed = bytes.fromhex(client.query("/group_share", newcomer.identity.public.sign_key)["share"]["sealed"])
    outsiders = [relay.identity, other.identity, member.identity, devnet.identity(0), devnet.partner]
    assert all(sealing.open_sealed(sealed, o, chain_id=chain_id, group="beta") is None for o in outsiders)
    assert sealing.open_sealed(sealed, newcomer.identity, chain_id=chain_id, group="beta") == salt
    assert other.salt("gamma") != salt  # another group founds its own salt


def test_two_founders_racing_end_with_one_salt(committee, nodes):
    _, client, _ = committee
    first, second = nodes(), nodes()
    first.join("delta")
    second.join("delta")
    salts: dict[int, bytes] = {}
    threads = [threading.Thread(target=lambda i=i, n=n: salts.__setitem__(i, n.salt("delta")))
               for i, n in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(salts) == 2 and salts[0] == salts[1]
    assert client.query("/group_waiting", b"delta")["shares"] == 2


def test_a_worker_gets_a_clear_error_in_bounded_time(committee, nodes):
    founder, late, elsewhere = nodes(), nodes(), nodes()
    founder.join("epsilon")
    group_salt(founder.directory, founder.identity, "epsilon", 10.0)  # founds it, but runs no duty
    late.join("epsilon")
    started = time.monotonic()
    with pytest.raises(DirectoryError, match="no member of group 'epsilon' sealed its salt"):
        group_salt(late.directory, late.identity, "epsilon", 1.5)
    elsewhere.join("zeta")
    with pytest.raises(DirectoryError, match="names group 'zeta', not 'epsilon': announce"):
        group_salt(elsewhere.directory, elsewhere.identity, "epsilon", 1.0)
    assert time.monotonic() - started < 10.0


def test_members_take_turns_in_an_order_every_member_computes_alike():
    members = {bytes([i]) * 32 for i in range(5)}
    firsts = set()
    for n in range(8):
        newcomer = bytes([0xE0 + n]) * 32
        ranks = {m: _rank(m, newcomer, members) for m in members}
        assert sorted(ranks.values()) == list(range(5))  # one member first, one second, ...
        firsts.add(min(ranks, key=ranks.get))
    assert len(firsts) > 1  # not always the same member
