"""``permamesh validator --cometbft N``: run a CometNet in the foreground until Ctrl-C.

Starts (or restarts: keys, genesis and ports are kept under ``home``) an N-validator
:class:`~permamesh.committee.cometbft.network.CometNet`, prints each validator's RPC endpoint
(``https://HOST:PORT?key=HEX``, pinned to the member's node key: what nodes pass to ``--join``),
then one line per committed block (height, txs, app hash after it) as the first validator
that answers reports it. SIGINT or SIGTERM stops every process.

Who calls it: :mod:`permamesh.committee.validator`.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from permamesh.committee.cometbft.network import CometNet, CometNetConfig
from permamesh.committee.cometbft.rpc import CometRPC
from permamesh.committee.errors import CommitteeError

log = logging.getLogger(__name__)

POLL_S = 0.2


def _stop_event() -> threading.Event:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    return done


def follow_blocks(endpoints: list[str], done: threading.Event, printed: int = 0,
                  out=print) -> int:
    """Print blocks above ``printed`` as they commit, until ``done``; returns the last height."""
    rpcs = [CometRPC(e, timeout_s=2.0) for e in endpoints]
    try:
        while not done.is_set():
            for rpc in rpcs:
                try:
                    top = rpc.status().height
                    for height in range(max(printed + 1, top - 20), top + 1):
                        block, results = rpc.block(height), rpc.block_results(height)
                        out(f"height {height:>7}  txs {len(block.txs):>4}  "
                            f"app hash {results.app_hash.hex()[:16]}  (from {rpc.endpoint})", flush=True)
                        printed = height
                    break
                except CommitteeError as exc:
                    log.debug("%s: %s", rpc.endpoint, exc)
            done.wait(POLL_S)
    finally:
        for rpc in rpcs:
            rpc.close()
    return printed


def run_cometnet(home: Path, validators: int, data_dir: Path) -> int:
    done = _stop_event()
    with CometNet(CometNetConfig(home, validators, data_dir=data_dir)) as net:
        for i, endpoint in enumerate(net.endpoints):
            print(f"validator {i}: {endpoint}  (home {net.vdir(i)}, chain {net.chain_id})")
        print(f"nodes join with --join {net.endpoints[0]} (any validator's line; the key pins its "
              "RPC's TLS certificate)")
        print("cometbft network running; Ctrl-C stops it", flush=True)
        follow_blocks(net.endpoints, done)
    return 0
