"""A committee member's free health checks of every announced node, committed each period.

:class:`Prober` reads the member's own view of ``/directory``, opens an encrypted link to each
announced node (its advertised endpoint, authenticated by its transport key), sends a signed
``StatusRequest`` and times the first signed answer that comes back from the node's own key
(workers answer with their status, relays with a signed refusal: either proves the node holds
its keys and serves); a gateway, which speaks HTTP, signs a fresh challenge on its own port
(:mod:`permamesh.directory.presence`). The reachable nodes and their round trips go into one signed
``Liveness`` transaction per probe period; the ledger marks a node running when more than 2/3
of the members found it up (docs/committee.md). Probes run concurrently, each bounded by
``timeout_s``, so one dead node costs one timeout, not a round.

Nothing here reads a PID: a node is up when it answers over the network.

Who calls it: ``permamesh validator`` (a member with ``--probe``), the committee network
launcher, the demo and tests.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass

from permamesh.committee import txs
from permamesh.committee.client import CommitteeClient
from permamesh.committee.errors import CommitteeError
from permamesh.directory.presence import probe_http
from permamesh.identity import NodeIdentity
from permamesh.transport import DealerClient, TransportError, with_key
from permamesh.wire import StatusRequest, WireError, decode, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeConfig:
    interval_s: float = 0.25  # seconds between looks at the period: each new period is probed at once
    timeout_s: float = 1.0  # a node silent this long is down for this round
    parallel: int = 16  # probes in flight at once


def probe_node(link: str, node_key: bytes, identity: NodeIdentity, timeout_s: float) -> int | None:
    """Round trip in microseconds of a signed answer from ``node_key`` over ``link``, or None."""
    try:
        sock = DealerClient(link)
    except TransportError as exc:
        log.debug("probe of %s: %s", link, exc)
        return None
    with sock:
        started = time.monotonic()
        sock.send(encode(StatusRequest(f"probe-{int(started * 1e6)}"), identity))
        deadline = started + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            frame = sock.recv(left)
            if frame is None:
                return None
            try:
                received = decode(frame)
            except WireError:
                continue
            if received.sender == node_key:
                return max(1, int((time.monotonic() - started) * 1e6))
    return None


def up_nodes(directory: dict, identity: NodeIdentity, config: ProbeConfig) -> list[tuple[bytes, int]]:
    """Probe every announced node of a ``/directory`` answer: [(node key, rtt_us)] of those up,
    sorted by key."""
    targets = []
    for row in directory.get("nodes", []):
        try:
            key, tkey = bytes.fromhex(row["node"]), bytes.fromhex(row.get("transport_key") or "")
        except (KeyError, TypeError, ValueError):
            continue
        if row.get("endpoint") and len(tkey) == 32 and row.get("role") in ("worker", "relay"):
            targets.append((key, with_key(row["endpoint"], tkey), False))
        elif row.get("endpoint") and row.get("role") == "gateway":  # HTTP: a signed presence answer
            targets.append((key, row["endpoint"], True))
    if not targets:
        return []

    def probe(target: tuple[bytes, str, bool]) -> int | None:
        key, link, http = target
        return probe_http(link, key, config.timeout_s) if http else probe_node(link, key, identity, config.timeout_s)

    with concurrent.futures.ThreadPoolExecutor(min(config.parallel, len(targets)), "probe") as pool:
        rtts = list(pool.map(probe, targets))
    return sorted((key, rtt) for (key, _, _), rtt in zip(targets, rtts) if rtt is not None)


class Prober:
    """One member's probe loop: every ``interval_s`` it looks at the ledger's period, and probes
    and reports once for each new one."""

    def __init__(self, member: NodeIdentity, client: CommitteeClient, chain_id: str,
                 config: ProbeConfig = ProbeConfig()) -> None:
        self.member, self.client, self.chain_id, self.config = member, client, chain_id, config
        self.reported: dict[int, int] = {}  # period -> nodes reported up
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def round(self) -> int | None:
        """Probe and report if the ledger entered a period this member has not reported yet;
        the period reported, or None. Checking is one small query, so callers poll often and
        every period gets its report early (a report missed is a node's lost vote)."""
        period = self.client.query("/status").get("period", 0)
        if period in self.reported:
            return None
        directory = self.client.query("/directory")
        period = directory.get("period", period)
        up = up_nodes(directory, self.member, self.config)
        nonce = self.client.next_nonce(self.member.public.sign_key)
        tx = txs.Liveness(chain_id=self.chain_id, nonce=nonce, period=period,
                          up=tuple(txs.Seen(key, rtt) for key, rtt in up))
        outcome = self.client.submit(txs.sign_tx(tx, self.member))
        if not outcome.ok:
            log.warning("liveness report for period %d refused (%d): %s", period, outcome.code, outcome.log)
        self.reported = {p: n for p, n in self.reported.items() if p >= period - 1} | {period: len(up)}
        log.debug("period %d: %d nodes up", period, len(up))
        return period

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
            except (CommitteeError, OSError) as exc:
                log.warning("probe round failed: %s", exc)
            self._stop.wait(self.config.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.config.timeout_s * 4 + 10)


def main(argv: list[str] | None = None) -> int:
    """``python -m permamesh.committee.liveness``: one member's probe loop as its own process
    (what ``permamesh validator`` runs beside the app; tests and launchers start it alone).
    Prints ``READY <endpoint> <node_id>`` once its first round is done; stops on SIGTERM."""
    import argparse
    import signal
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m permamesh.committee.liveness", description=main.__doc__)
    p.add_argument("--keys", type=Path, required=True, help="the member's key directory")
    p.add_argument("--name", default="validator", help="the member's key name (default: validator)")
    p.add_argument("--endpoint", action="append", required=True,
                   help="the committee to report to, as nodes --join it: https://HOST:PORT?key=HEX or "
                        "tcp://HOST:PORT?key=HEX (repeatable)")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between looks at the ledger's probe period "
                   "(each new period is probed and reported once; default: 0.25)")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds a node may take to answer (default: 1)")
    args = p.parse_args(argv)
    if not (args.interval > 0 and args.timeout > 0):
        p.error("--interval and --timeout must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    member = NodeIdentity.load_or_create(args.keys, args.name)
    with CommitteeClient(args.endpoint) as client:
        prober = Prober(member, client, client.query("/status")["chain_id"], ProbeConfig(args.interval, args.timeout))
        signal.signal(signal.SIGTERM, lambda *_: prober._stop.set())
        prober.round()
        print(f"READY {args.endpoint[0]} {member.node_id}", flush=True)
        prober._run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
