"""The ledger on real CometBFT v0.38: four validators, each a `permamesh validator --engine
cometbft` app and a `cometbft node`, driven through the same CommitteeClient as the devnet.

Stories (one module-scoped network; each story leaves all four validators running):
- ledger txs submitted through the client commit, replays and forgeries change nothing, and
  every node reaches the same app hash at every height;
- a validator killed with SIGKILL does not stop the other three; restarted, it catches up to
  the same app hash;
- with two of four stopped the chain halts (no new height over a window, no divergence) and a
  tx sent meanwhile waits in the mempool; when one returns, commits resume and the tx commits;
- (its own network) a validator whose app computes a different state is halted by
  CometBFT, while the honest three carry on and agree.
"""

from __future__ import annotations

import time

import psutil
import pytest

from permamesh.committee import txs
from permamesh.committee.client import CommitteeClient
from permamesh.committee.cometbft.binary import CometBFTMissing, find_cometbft
from permamesh.committee.cometbft.network import CometNet, CometNetConfig
from permamesh.committee.genesis import LedgerRules
from permamesh.committee.telemetry import validator_figures
from permamesh.identity import NodeIdentity
from permamesh.transport import open_sockets

_RUNNING: list[CometNet] = []  # networks that outlive single tests (the leak check skips them)


def need_cometbft() -> None:
    try:
        find_cometbft()
    except CometBFTMissing as exc:
        pytest.skip(f"CometBFT is not installed: {exc}")


@pytest.fixture(autouse=True)
def no_leaks():
    """conftest's leak check, except for the processes of this module's running networks (a
    restarted validator is a new process that belongs to the network, not to the test)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    sockets_before = {id(s) for s in open_sockets()}
    yield
    leaked_sockets = [s for s in open_sockets() if id(s) not in sockets_before]
    for sock in leaked_sockets:
        sock.close(0)
    ours = {c.proc.pid for net in _RUNNING for c in net.apps + net.nodes if c is not None}
    new = [p for p in me.children(recursive=True) if p.pid not in before and p.pid not in ours]
    _, alive = psutil.wait_procs(new, timeout=10)
    for proc in alive:
        proc.kill()
    assert not leaked_sockets, f"test left {len(leaked_sockets)} zmq socket(s) open"
    assert not alive, f"test left child processes running: {[p.pid for p in alive]}"


def started(config: CometNetConfig) -> CometNet:
    net = CometNet(config)
    net.start()
    _RUNNING.append(net)
    return net


def stopped(net: CometNet) -> None:
    net.stop()
    _RUNNING.remove(net)


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    need_cometbft()
    net = started(CometNetConfig(tmp_path_factory.mktemp("cometnet"), rules=LedgerRules(vouches_required=1)))
    client = CommitteeClient(net.endpoints, timeout_s=10.0)
    try:
        yield net, client
    finally:
        client.close()
        stopped(net)


# ------------------------------------------------------------------------------- helpers


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def height_of(client: CommitteeClient, endpoint: str) -> int:
    status = client.status_of(endpoint, timeout_s=2.0)
    return 0 if status is None else status.height


def heights(client: CommitteeClient, endpoints: list[str]) -> list[int]:
    return [height_of(client, e) for e in endpoints]


def assert_agree(client: CommitteeClient, endpoints: list[str], up_to: int) -> None:
    """Every node has heights 1..up_to, with the same app hash after each."""
    maps = []
    for endpoint in endpoints:
        status = client.status_of(endpoint, 1, up_to)
        assert status is not None, f"{endpoint} did not answer"
        maps.append(dict(zip(status.heights, status.app_hashes)))
    for height in range(1, up_to + 1):
        assert all(height in m for m in maps), f"a node lacks height {height}"
        assert len({m[height] for m in maps}) == 1, f"nodes disagree at height {height}"


def assert_no_progress(client: CommitteeClient, endpoints: list[str], window_s: float) -> int:
    """Once the nodes settle on one height (the same in two looks 0.5 s apart, so votes still
    in flight have landed), it stays there for ``window_s``; returns it."""
    looks: list[tuple[float, list[int]]] = []

    def settled():
        now = heights(client, endpoints)
        if len(set(now)) != 1 or not now[0]:
            looks.clear()
            return 0
        if looks and looks[0][1] != now:
            looks.clear()
        if not looks:
            looks.append((time.monotonic(), now))
        return now[0] if time.monotonic() - looks[0][0] >= 0.5 else 0

    settled = wait_for(settled, 10.0, "the remaining nodes to settle on one height")
    end = time.monotonic() + window_s
    while time.monotonic() < end:
        now = heights(client, endpoints)
        assert now == [settled] * len(endpoints), f"height moved from {settled} to {now} without a quorum"
        time.sleep(0.1)
    return settled


class Signer:
    def __init__(self, chain_id: str, ident: NodeIdentity | None = None) -> None:
        self.chain_id, self.ident, self.nonce = chain_id, ident or NodeIdentity.generate(), 0

    def sign(self, make, **fields) -> bytes:
        self.nonce += 1
        return txs.sign_tx(make(chain_id=self.chain_id, nonce=self.nonce, **fields), self.ident)

    def vouch(self) -> bytes:
        return self.sign(txs.Vouch, subject=NodeIdentity.generate().public.sign_key)


def seed_of(net: CometNet, client: CommitteeClient) -> Signer:
    """The seed partner, its nonce picked up from the ledger (stories share one network)."""
    seed = Signer(net.chain_id, net.partner)
    seed.nonce = client.next_nonce(seed.ident.public.sign_key) - 1
    return seed


# -------------------------------------------------------------------------------- stories


def test_ledger_txs_commit_and_every_node_agrees(network):
    net, client = network
    seed, partner, node = seed_of(net, client), Signer(net.chain_id), NodeIdentity.generate()
    outcome = client.submit(seed.sign(txs.Vouch, subject=partner.ident.public.sign_key))
    assert outcome.ok and outcome.committed and outcome.height >= 1
    register = partner.sign(txs.RegisterNode, node_key=node.public.sign_key,
                            kex_key=node.public.kex_key, role="worker", endpoint="tcp://x:1",
                            profile=txs.NodeProfile(1, 2, "grid", "isp", 1))
    first = client.submit(register)
    assert first.ok and first.committed
    replay = client.submit(register)  # the same bytes: answered from the committed result
    assert replay.height == first.height and "already committed" in replay.log
    resigned = txs.sign_tx(txs.Vouch(chain_id=net.chain_id, nonce=1, subject=b"\x02" * 32),
                           seed.ident)  # an old nonce in new bytes
    assert client.submit(resigned).code == txs.BAD_NONCE
    forged = bytearray(seed.vouch())
    forged[-3] ^= 0xFF
    assert client.submit(bytes(forged)).code == txs.MALFORMED
    seed.nonce -= 1  # the forged tx consumed nothing
    assert [n["node"] for n in client.query("/registry")] == [node.public.sign_key.hex()]

    batch = [seed.vouch() for _ in range(100)]  # pipelined: broadcast all, then wait for all
    outcomes = client.submit_many(batch, timeout_s=60.0)
    assert all(o.ok and o.committed for o in outcomes), {o.log for o in outcomes if not o.ok}
    assert len(client.query("/partners")["partners"]) == 1 + 1 + 100
    top = max(o.height for o in outcomes)
    wait_for(lambda: min(heights(client, net.endpoints)) >= top, what="every node at the last tx's height")
    assert_agree(client, net.endpoints, top)

    with CommitteeClient([net.endpoints[1]], timeout_s=5.0) as own:  # a validator's metrics, as the devnet's
        figures = {f.name: f.value for f in validator_figures(own)}
    assert figures["permamesh_chain_height"] >= top and figures["permamesh_misbehaviour_total"] == 0


def test_killed_validator_does_not_stop_the_others_and_catches_up(network):
    net, client = network
    net.kill(2)
    assert 2 not in net.alive()
    alive = [e for i, e in enumerate(net.endpoints) if i != 2]
    start = height_of(client, alive[0])
    seed = seed_of(net, client)
    for _ in range(3):  # txs still commit through whichever validator answers
        assert client.submit(seed.vouch()).ok
    wait_for(lambda: min(heights(client, alive)) >= start + 5, what="progress without v2")
    net.restart(2)
    target = height_of(client, alive[0])
    wait_for(lambda: height_of(client, net.endpoints[2]) >= target, what="v2 catching up")
    assert_agree(client, net.endpoints, min(heights(client, net.endpoints)))


def test_two_of_four_stopped_halts_the_chain_until_one_returns(network):
    net, client = network
    seed = seed_of(net, client)
    net.stop_node(2)
    net.stop_node(3)
    left = net.endpoints[:2]
    try:
        halted = assert_no_progress(client, left, window_s=3.0)
        assert_agree(client, left, halted)
        pending = seed.vouch()
        sent = client.submit(pending, wait_commit=False)  # CheckTx passes; no block can take it
        assert sent.ok and not sent.committed
        net.restart(2)
        back = left + [net.endpoints[2]]
        wait_for(lambda: min(heights(client, back)) > halted + 2, what="commits resuming with 3 of 4")
        again = client.submit(pending)  # by now in a block: answered from the committed result
        assert again.ok and again.committed and again.height > halted
    finally:
        for i in (2, 3):
            if i not in net.alive():
                net.restart(i)
    target = height_of(client, net.endpoints[0])
    wait_for(lambda: height_of(client, net.endpoints[3]) >= target, what="v3 catching up")
    assert_agree(client, net.endpoints, min(heights(client, net.endpoints)))


def test_corrupted_app_is_halted_while_the_honest_three_continue(tmp_path):
    need_cometbft()
    net = started(CometNetConfig(tmp_path / "cometnet", corrupt=(3,), corrupt_from=3))
    client = CommitteeClient(net.endpoints, timeout_s=5.0)
    honest = net.endpoints[:3]
    log = net.home / "logs" / "cometbft-3.log"
    try:
        wait_for(lambda: all(text in log.read_text(errors="replace") for text in
                             ("CONSENSUS FAILURE", "wrong Block.Header.AppHash")), 60.0,
                 "CometBFT to halt the corrupt validator over its app hash")
        stuck = height_of(client, net.endpoints[3])
        assert stuck <= net.config.corrupt_from + 1
        wait_for(lambda: min(heights(client, honest)) >= stuck + 10, 60.0, "the honest three going on")
        assert height_of(client, net.endpoints[3]) == stuck  # halted (or gone), never advancing
        assert client.submit(seed_of(net, client).vouch()).ok
        assert_agree(client, honest, min(heights(client, honest)))
    finally:
        client.close()
        stopped(net)
