"""How many status asks a devnet validator answers: a token bucket per peer, and one for all.

A ``StatusMsg`` is the cheapest thing to ask and among the dearest to answer (a store read of
up to 1,000 app hashes, an encode, a signature, a send). One peer asking as fast as it can
used to keep the validator's loop busy answering, and commits stopped for as long as it
asked. :class:`AskBudget` decides, per ask, whether it is answered: each peer (a ROUTER
connection, by its zmq routing id) has a bucket of ``burst`` tokens refilled at ``rate_per_s``;
all peers together have one more bucket (``total_rate_per_s``, ``total_burst``), so many
connections cannot add up to a flood. An ask with no token in either is dropped unanswered and
counted (:attr:`AskBudget.dropped`); the asker sees a timeout, as for any lost frame.

Memory is bounded: at most ``peers`` buckets are kept, the least recently seen peer forgotten
first (it comes back with a full bucket; the shared bucket still bounds the total).

Time is :func:`time.monotonic`, read here in the network layer only: nothing the committee
agrees on depends on it. Tests pass their own ``clock``.

Who calls it: :class:`permamesh.committee.devnet.node.DevnetNode` for every ``StatusMsg``
(``allow(peer)`` before answering); its count is in every ``StatusAnswer``
(``status_dropped``) and on the validator's metrics (``permamesh_status_asks_dropped_total``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AskBudgetConfig:
    rate_per_s: float = 100.0  # asks answered per second for one peer, sustained (pollers ask <= 50)
    burst: int = 200  # asks a peer that was quiet may have answered at once
    total_rate_per_s: float = 2_000.0  # asks answered per second for all peers together
    total_burst: int = 2_000
    peers: int = 1_024  # buckets kept; the least recently seen peer is forgotten beyond it

    def __post_init__(self) -> None:
        if min(self.rate_per_s, self.total_rate_per_s) <= 0 or min(self.burst, self.total_burst, self.peers) < 1:
            raise ValueError("ask budget rates must be > 0 and bursts and peers >= 1")


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens, self.at = tokens, at

    def refill(self, now: float, rate: float, burst: int) -> None:
        self.tokens = min(float(burst), self.tokens + max(0.0, now - self.at) * rate)
        self.at = now


class AskBudget:
    """Per-peer and shared token buckets. Only the validator's event-loop thread uses it."""

    def __init__(self, config: AskBudgetConfig = AskBudgetConfig(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self._clock = config, clock
        self._peers: OrderedDict[bytes, _Bucket] = OrderedDict()
        self._total = _Bucket(float(config.total_burst), clock())
        self.dropped = 0  # asks not answered: over the asker's budget or over everyone's

    def allow(self, peer: bytes) -> bool:
        """True: answer this ask (a token of the peer's and one of the shared bucket are spent).
        False: drop it; counted, and logged at the 1st, 2nd, 4th, 8th, ... drop."""
        c, now = self.config, self._clock()
        bucket = self._peers.get(peer)
        if bucket is None:
            bucket = self._peers[peer] = _Bucket(float(c.burst), now)
            if len(self._peers) > c.peers:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(peer)
            bucket.refill(now, c.rate_per_s, c.burst)
        self._total.refill(now, c.total_rate_per_s, c.total_burst)
        if bucket.tokens >= 1.0 and self._total.tokens >= 1.0:
            bucket.tokens -= 1.0
            self._total.tokens -= 1.0
            return True
        self.dropped += 1
        if self.dropped & (self.dropped - 1) == 0:
            log.info("dropped a status ask from %s over its budget; %d dropped so far",
                     peer.hex()[:16], self.dropped)
        return False

    def __len__(self) -> int:
        """Peers with a bucket now (at most ``config.peers``)."""
        return len(self._peers)
