"""The embedded devnet: real validator processes, Tendermint over zmq on loopback, the ledger.

Stories: honest validators commit and agree on the app hash at every height; a validator
killed with SIGKILL does not stop the others and catches up after a restart; an equivocating
validator changes nothing for the honest ones; forged and replayed txs never change state.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from permamesh.committee import txs
from permamesh.committee.client import CommitteeClient
from permamesh.committee.devnet.cluster import CHAIN_ID, Devnet, DevnetConfig
from permamesh.committee.genesis import LedgerRules
from permamesh.identity import NodeIdentity


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def hashes_by_node(client: CommitteeClient, endpoints: list[str]) -> list[dict[int, bytes]]:
    out = []
    for endpoint in endpoints:
        status = client.status_of(endpoint, 1, 10_000)
        assert status is not None, f"{endpoint} did not answer"
        out.append(dict(zip(status.heights, status.app_hashes)))
    return out


def assert_agree(client: CommitteeClient, endpoints: list[str], up_to: int) -> None:
    maps = hashes_by_node(client, endpoints)
    for height in range(1, up_to + 1):
        seen = {m[height] for m in maps if height in m}
        assert len(seen) == 1, f"validators disagree at height {height}"
        assert all(height in m for m in maps), f"a validator lacks height {height}"


class Signer:
    def __init__(self, ident: NodeIdentity | None = None) -> None:
        self.ident = ident or NodeIdentity.generate()
        self.nonce = 0

    def sign(self, make, **fields) -> bytes:
        self.nonce += 1
        return txs.sign_tx(make(chain_id=CHAIN_ID, nonce=self.nonce, **fields), self.ident)


@contextlib.contextmanager
def running_devnet(home, rules: LedgerRules = LedgerRules(), byzantine: tuple[int, ...] = (), validators: int = 4):
    """A started devnet (4 validators unless told) and a client of it; both stopped on the way out."""
    net = Devnet(DevnetConfig(home, validators=validators, rules=rules, byzantine=byzantine))
    net.start()
    client = CommitteeClient(net.endpoints, timeout_s=5.0)
    try:
        yield net, client
    finally:
        client.close()
        net.stop()


@pytest.fixture
def devnet(tmp_path, request):
    with running_devnet(tmp_path / "devnet", LedgerRules(vouches_required=1),
                        getattr(request, "param", ())) as running:
        yield running


def height_of(client, endpoint) -> int:
    status = client.status_of(endpoint)
    return 0 if status is None else status.height


def test_validators_commit_txs_and_agree_at_every_height(devnet):
    net, client = devnet
    seed = Signer(net.partner)
    partner, node = Signer(), NodeIdentity.generate()
    outcome = client.submit(seed.sign(txs.Vouch, subject=partner.ident.public.sign_key))
    assert outcome.ok and outcome.committed and outcome.height >= 1
    register = partner.sign(txs.RegisterNode, node_key=node.public.sign_key,
                            kex_key=node.public.kex_key, role="worker", endpoint="tcp://x:1",
                            profile=txs.NodeProfile(1, 2, "grid", "isp", 1))
    first = client.submit(register)
    assert first.ok
    replay = client.submit(register)  # the same bytes: answered from the committed result
    assert replay.height == first.height and "already committed" in replay.log
    resigned = txs.sign_tx(txs.Vouch(chain_id=CHAIN_ID, nonce=1, subject=b"\x02" * 32),
                           seed.ident)  # an old nonce in new bytes
    assert client.submit(resigned).code == txs.BAD_NONCE
    forged = bytearray(seed.sign(txs.Vouch, subject=b"\x01" * 32))
    forged[-3] ^= 0xFF
    assert client.submit(bytes(forged)).code == txs.MALFORMED
    registry = client.query("/registry")
    assert [n["node"] for n in registry] == [node.public.sign_key.hex()]
    top = wait_for(lambda: min(height_of(client, e) for e in net.endpoints) >= 10 and
                   min(height_of(client, e) for e in net.endpoints), what="10 heights")
    assert_agree(client, net.endpoints, top)


def test_killed_validator_does_not_stop_the_others_and_catches_up(devnet):
    net, client = devnet
    wait_for(lambda: height_of(client, net.endpoints[0]) >= 3, what="first blocks")
    net.kill(2)
    alive = [e for i, e in enumerate(net.endpoints) if i != 2]
    start = height_of(client, alive[0])
    seed = Signer(net.partner)
    for _ in range(5):  # txs still commit through whichever validator answers
        assert client.submit(seed.sign(txs.Vouch, subject=NodeIdentity.generate().public.sign_key)).ok
    wait_for(lambda: height_of(client, alive[0]) >= start + 20, what="progress without v2")
    net.restart(2)
    target = height_of(client, alive[0])
    wait_for(lambda: height_of(client, net.endpoints[2]) >= target, what="v2 catching up")
    top = min(height_of(client, e) for e in net.endpoints)
    assert_agree(client, net.endpoints, top)
    assert len(client.query("/partners")["partners"]) == 6  # the seed + 5 admitted


@pytest.mark.parametrize("devnet", [(3,)], indirect=True)
def test_equivocating_validator_changes_nothing_for_honest_ones(devnet):
    net, client = devnet
    honest = net.endpoints[:3]
    seed = Signer(net.partner)
    for _ in range(3):
        assert client.submit(seed.sign(txs.Vouch, subject=NodeIdentity.generate().public.sign_key)).ok
    wait_for(lambda: min(height_of(client, e) for e in honest) >= 15, what="15 heights")
    top = min(height_of(client, e) for e in honest)
    assert_agree(client, honest, top)
    assert any(client.status_of(e).misbehaviour > 0 for e in honest)


def test_garbage_and_forged_consensus_messages_change_nothing(devnet):
    """Mallory (not a validator) sends junk frames, votes signed by herself, and a vote from a
    real validator's key that she tampered with; the validators keep committing and agree."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from permamesh.committee.devnet import messages as m
    from permamesh.committee.devnet.votes import sign_vote
    from permamesh.transport import DealerClient
    from permamesh.wire.codec import encode

    net, client = devnet
    mallory = NodeIdentity.generate()
    target = net.endpoints[0]
    before = height_of(client, target)
    with DealerClient(target) as sock:
        vote = sign_vote(CHAIN_ID, mallory, "precommit", before + 1, 0, b"\x07" * 32)
        sock.send(encode(m.VoteMsg(vote), mallory))  # a non-validator's frame
        real = sign_vote(CHAIN_ID, net.identity(1), "precommit", before + 1, 0, b"\x07" * 32)
        import dataclasses

        forged = dataclasses.replace(real, block_hash=b"\x08" * 32)  # signature no longer matches
        sock.send(encode(m.VoteMsg(forged), net.identity(1)))
        sock.send(encode(m.BlocksReply((m.CommittedBlock(before + 1, b"\x93\x01", 0, (real,)),)),
                         net.identity(1)))  # a "block" with a one-vote commit
        sock.send_parts([b"a", b"b", b"c"])

        @settings(max_examples=60, deadline=None)
        @given(st.binary(max_size=300))
        def junk(data):
            sock.send(data)

        junk()
    wait_for(lambda: height_of(client, target) >= before + 5, what="progress after the junk")
    top = min(height_of(client, e) for e in net.endpoints)
    assert_agree(client, net.endpoints, top)
    log_text = net.children[0].log_path.read_text()
    assert "Traceback" not in log_text and "error handling" not in log_text  # rejected, not crashed


def test_block_decoder_fuzz():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from permamesh.committee.devnet.blocks import Block
    from permamesh.committee.errors import ProtocolError

    good = Block(3, b"p" * 32, b"a" * 32, b"k" * 32, 123, (b"tx1", b"tx2")).encode()
    assert Block.decode(good).txs == (b"tx1", b"tx2")

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200), st.integers(0, 10_000))
    def fuzz(data, flip):
        for raw in (data, good[: flip % len(good)], bytes(b ^ (i == flip % len(good)) for i, b in enumerate(good))):
            try:
                Block.decode(raw)
            except ProtocolError:
                pass

    fuzz()
