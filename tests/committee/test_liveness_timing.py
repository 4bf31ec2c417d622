"""When committee members spend their one liveness report per period (committee/liveness.py).

The story: four members probe a worker and a relay that run, on a real ledger driven block by
block through LedgerApp's ABCI methods (txs go through CheckTx into the next block, as with
CometBFT). With nothing new, each member holds its report until the period is half over, and
the running nodes stay running at every height. A node that announces in the first half of a
period is a newcomer: every member probes it at once and it is counted running in the very
period it announced in, not one period later; one that announces after the members reported
is probed alone and added to their reports (an addendum), counted in that period too. A newcomer still starting (silent) does not spend
the report; one that never answers stops hurrying anyone after NEWCOMER_TRIES probes. A node
killed leaves the running set when the period after the last one that counted it ends, as the
ledger's rule says; a node that restarts announces again and is a newcomer again.

Only the network is replaced: ``probe_node`` answers for the nodes a test marks alive.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from permamesh.committee import liveness, txs
from permamesh.committee.app import LedgerApp
from permamesh.committee.liveness import NEWCOMER_TRIES, ProbeConfig, Prober

from .ledger_helpers import CHAIN, Party, advance_to, announce_tx, block, check, committee, node_tx, query, start

P = 8  # probe_blocks: period q is heights 8q .. 8q+7; a report is due once the next block is 8q+4 or later


@dataclass
class Outcome:
    ok: bool
    code: int
    log: str
    height: int


class LedgerClient:
    """What a Prober needs of a CommitteeClient, over one in-process ledger: queries read the
    committed state; a submitted tx passes CheckTx and waits in the chain's mempool for the
    next block."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain

    def query(self, path: str, data: bytes = b""):
        return query(self.chain.app, path, data)

    def next_nonce(self, key: bytes) -> int:
        return self.query("/nonce", key)["next"]

    def submit(self, raw: bytes, timeout_s: float = 10.0) -> Outcome:
        code = check(self.chain.app, raw)
        if code == txs.OK:
            self.chain.mempool.append(raw)
        return Outcome(code == txs.OK, code, "", self.chain.app.store.height + 1)

    def submit_signed(self, make, key: bytes, attempts: int = 3, timeout_s: float = 10.0) -> Outcome:
        return self.submit(make(self.next_nonce(key)), timeout_s)


class Chain:
    """A committee of four with its probers, a partner, and nodes the partner registered."""

    def __init__(self, monkeypatch) -> None:
        self.c = committee(probe_blocks=P)
        self.app = LedgerApp(None)
        start(self.app, self.c.genesis)
        self.mempool: list[bytes] = []
        self.alive: set[bytes] = set()  # node keys whose probes get an answer
        self.partner = Party()
        assert block(self.app, [s.sign(txs.Vouch, subject=self.partner.key) for s in self.c.seeds]) == [txs.OK] * 2
        self.probers = [Prober(m.ident, LedgerClient(self), CHAIN, ProbeConfig(timeout_s=0.1))
                        for m in self.c.members]
        monkeypatch.setattr(liveness, "probe_node",
                            lambda link, key, identity, timeout_s: 900 if key in self.alive else None)

    def register(self, role: str = "worker") -> Party:
        node = Party()
        assert block(self.app, [node_tx(self.partner, node, role)]) == [txs.OK]
        return node

    def announce(self, node: Party, seq: int) -> None:
        self.mempool.append(announce_tx(node, seq=seq, endpoint=f"tcp://10.0.0.{seq % 250}:7001"))

    def step(self) -> int:
        """Every member looks once (as its loop does every interval), then the next block with
        whatever they submitted; the height they looked at."""
        seen = self.app.store.height
        for prober in self.probers:
            prober.round()
        landed, self.mempool = self.mempool, []
        codes = block(self.app, landed)
        assert all(code == txs.OK for code in codes), codes
        return seen

    def entry(self, node: Party) -> dict:
        (row,) = [n for n in query(self.app, "/directory")["nodes"] if n["node"] == node.key.hex()]
        return row

    def period(self) -> int:
        return self.app.store.height // P


@pytest.fixture
def chain(monkeypatch):
    ch = Chain(monkeypatch)
    yield ch
    ch.app.close()


def running_mesh(chain: Chain) -> tuple[Party, Party]:
    """A worker and a relay, announced and counted running; the chain at a period's start."""
    worker, relay = chain.register(), chain.register("relay")
    chain.alive |= {worker.key, relay.key}
    chain.announce(worker, 1)
    chain.announce(relay, 2)
    while not (chain.entry(worker)["running"] and chain.entry(relay)["running"]):
        chain.step()
    advance_to(chain.app, (chain.period() + 1) * P - 1)  # next block starts a period
    return worker, relay


def test_with_nothing_new_members_report_once_the_period_is_half_over_and_nodes_stay_running(chain):
    worker, relay = running_mesh(chain)
    for _ in range(3 * P):
        seen = chain.step()
        period = seen // P
        due = seen + 1 - period * P >= P // 2  # the block after the one they saw is in the second half
        assert all((period in prober.reported) == due for prober in chain.probers), f"at height {seen}"
        assert chain.entry(worker)["running"] and chain.entry(relay)["running"], \
            f"dropped at height {chain.app.store.height}"
    assert chain.entry(worker)["seen_period"] == chain.period()


def test_a_node_announced_in_the_first_half_is_counted_in_that_same_period(chain):
    newcomer = chain.register()
    running_mesh(chain)
    chain.alive.add(newcomer.key)
    chain.step()
    chain.step()  # two blocks into a period: every member has looked, and held its report
    announced_in = chain.period()
    chain.announce(newcomer, 3)
    chain.step()  # the block with its announce
    assert not chain.entry(newcomer)["running"]
    chain.step()  # members see a newcomer: they probe it at once and report; the reports land
    assert chain.entry(newcomer)["running"] and chain.entry(newcomer)["seen_period"] == announced_in
    assert chain.app.store.height - announced_in * P < P // 2  # before the period's middle


def test_a_node_announced_after_the_members_reported_is_added_to_their_reports_in_that_period(chain):
    worker, relay = running_mesh(chain)
    newcomer = chain.register()
    chain.step()  # a new period
    while chain.app.store.height - chain.period() * P < P // 2:
        chain.step()  # past the middle: every member has reported this period
    announced_in = chain.period()
    assert all(announced_in in p.reported for p in chain.probers)
    assert chain.app.store.height - announced_in * P < P - 2  # two blocks left in the period
    chain.alive.add(newcomer.key)
    chain.announce(newcomer, 4)
    chain.step()  # the block with its announce
    probed: list[bytes] = []
    real = liveness.probe_node
    liveness.probe_node = lambda link, key, identity, timeout_s: probed.append(key) or real(link, key, identity, timeout_s)
    try:
        chain.step()  # members see a newcomer their reports lack: they probe it alone and add it
    finally:
        liveness.probe_node = real
    assert set(probed) == {newcomer.key}  # the nodes already reported are not probed again
    assert chain.period() == announced_in
    assert chain.entry(newcomer)["running"] and chain.entry(newcomer)["seen_period"] == announced_in
    assert all(newcomer.key in p.reported[announced_in] for p in chain.probers)
    assert chain.entry(worker)["running"] and chain.entry(relay)["running"]
    rows = query(chain.app, "/directory")["nodes"]
    assert all(r["running"] for r in rows if r["node"] in {worker.key.hex(), relay.key.hex(), newcomer.key.hex()})
    assert [p.round() for p in chain.probers] == [None] * 4  # nothing more to add: no tx


def test_a_silent_newcomer_keeps_the_report_open_and_stops_hurrying_after_its_tries(chain):
    starting, silent = chain.register(), chain.register("relay")
    worker, _ = running_mesh(chain)
    chain.announce(starting, 5)
    chain.announce(silent, 6)
    chain.step()  # the first block of a period: both announced, neither answers yet
    period = chain.period()
    assert chain.step() // P == period  # every member probes both newcomers alone: silent, so no report
    assert not any(period in p.reported for p in chain.probers)
    chain.alive.add(starting.key)  # it finished starting
    seen = chain.step()
    assert seen + 1 - period * P < P // 2  # not due by the period's middle: the newcomer made them report
    assert all(period in p.reported for p in chain.probers)
    assert chain.entry(starting)["running"] and not chain.entry(silent)["running"]
    assert all(p.misses[(silent.key, 6)] == NEWCOMER_TRIES for p in chain.probers)  # a full round found it down

    while chain.period() == period:
        chain.step()
    for _ in range(P // 2 - 1):  # the next period's first half: the silent node hurries no one
        chain.step()
        assert not any(chain.period() in p.reported for p in chain.probers)
    assert chain.entry(worker)["running"] and chain.entry(starting)["running"]


def test_a_killed_node_leaves_when_the_period_after_its_last_count_ends_and_returns_when_it_announces_again(chain):
    worker, relay = running_mesh(chain)
    while not all(chain.period() in p.reported for p in chain.probers):
        chain.step()
    counted = chain.period()  # the worker was counted up in this period
    chain.alive.discard(worker.key)  # SIGKILL
    while chain.period() <= counted + 1:
        assert chain.entry(worker)["running"]  # counted in the period before: still running
        chain.step()
    assert chain.app.store.height == (counted + 2) * P
    assert not chain.entry(worker)["running"] and chain.entry(relay)["running"]

    chain.alive.add(worker.key)  # restarted: it announces again, with a higher seq
    chain.announce(worker, 7)
    for _ in range(3):
        chain.step()
    assert chain.entry(worker)["running"] and chain.app.store.height - chain.period() * P < P // 2
