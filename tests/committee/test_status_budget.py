"""Status asks within a budget: a devnet validator answers each peer's ``StatusMsg`` from a
token bucket of its own (and one shared by all peers), drops the rest and counts them. The
story first on a clock we turn by hand, then against a running validator that one peer floods
with status asks while it must keep committing."""

from __future__ import annotations

import threading
import time

import pytest

from permamesh.committee.devnet import messages as m
from permamesh.committee.devnet.askbudget import AskBudget, AskBudgetConfig
from permamesh.identity import NodeIdentity
from permamesh.transport import DealerClient
from permamesh.wire.codec import encode

from tests.conftest import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_quiet_peer_gets_its_burst_then_the_rate():
    clock = Clock()
    budget = AskBudget(AskBudgetConfig(rate_per_s=10, burst=5), clock)
    assert [budget.allow(b"alice") for _ in range(7)] == [True] * 5 + [False] * 2
    assert budget.dropped == 2
    clock.now += 0.25  # 2.5 tokens back: two asks answered, the third dropped
    assert [budget.allow(b"alice") for _ in range(3)] == [True, True, False]
    clock.now += 60  # a long silence refills to the burst, no further
    assert sum(budget.allow(b"alice") for _ in range(10)) == 5
    assert budget.dropped == 3 + 5


def test_one_flooder_does_not_spend_another_peers_budget():
    clock = Clock()
    budget = AskBudget(AskBudgetConfig(rate_per_s=10, burst=5), clock)
    for _ in range(1000):
        budget.allow(b"mallory")
    assert budget.dropped == 995
    assert all(budget.allow(b"bob") for _ in range(5))


def test_many_peers_together_are_held_by_the_shared_bucket_and_the_table_stays_bounded():
    clock = Clock()
    budget = AskBudget(AskBudgetConfig(rate_per_s=10, burst=5, total_rate_per_s=100, total_burst=50,
                                       peers=64), clock)
    answered = sum(budget.allow(i.to_bytes(4, "big")) for i in range(10_000))  # a new connection each
    assert answered == 50 and budget.dropped == 10_000 - 50
    assert len(budget) == 64
    clock.now += 0.125  # 12.5 shared tokens back
    assert sum(budget.allow(i.to_bytes(4, "big")) for i in range(100)) == 12


def test_a_config_that_answers_nothing_is_refused():
    with pytest.raises(ValueError):
        AskBudgetConfig(rate_per_s=0)
    with pytest.raises(ValueError):
        AskBudgetConfig(peers=0)


# ------------------------------------------------------------------------ a running validator

class Flooder:
    """Mallory on one connection: the largest status ask, as fast as zmq takes it, never reading
    an answer. The socket stays open after :meth:`stop`, so every ask sent is delivered."""

    def __init__(self, endpoint: str) -> None:
        self.sock = DealerClient(endpoint)
        self.ask = encode(m.StatusMsg(1, 1000), NodeIdentity.generate())
        self.sent, self.started = 0, time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sock.send(self.ask)
            self.sent += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def close(self) -> None:
        self.stop()
        self.sock.close()


def test_a_status_flood_from_one_peer_neither_stops_commits_nor_gets_answered(validator):
    """Before: one peer asking for its status as fast as it could kept the validator's loop
    busy (a recv that finds a frame waiting never yields), its height stood still for as long
    as the flood lasted, and every ask was answered. Now commits go on under the flood, and all
    but the flooder's budget (burst plus rate times the time it flooded) is dropped and counted."""
    net, client = validator
    cfg = AskBudgetConfig()
    wait_for(lambda: client.status().height >= 2, 30.0, "the first commits")
    mallory = Flooder(net.endpoints[0])
    try:
        wait_for(lambda: mallory.sent > 5 * cfg.burst, 30.0, "the flood to start")
        start = client.status().height
        wait_for(lambda: client.status().height >= start + 5, 30.0, "5 commits under the flood")
        mallory.stop()
        assert mallory.sent > 10 * cfg.burst, "the flood was not a flood"

        def counted() -> bool:
            answerable = cfg.burst + cfg.rate_per_s * (time.monotonic() - mallory.started)
            return client.status().status_dropped >= mallory.sent - answerable

        wait_for(counted, 60.0, "the flooder's excess counted as dropped")
    finally:
        mallory.close()
    start = client.status().height  # and after it: still committing, our own asks answered
    wait_for(lambda: client.status().height >= start + 2, 30.0, "commits after the flood")
