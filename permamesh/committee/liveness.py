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

When a member reports. The ledger takes one report per member and period, counted for that
period and the next (:func:`~permamesh.committee.ledger.is_running`), plus *addenda* that add
nodes the report lacks. A member reports at once when the directory shows a *newcomer* that answers:
an announced node the committee does not count running (one that just announced, or restarted
and announced again). Otherwise it reports once the period is half over, so a node announced in
the first half is counted within a block or two of its announce rather than at the next period,
and the report still lands half a period before the next one needs it (running nodes never drop
out at a period's edge). A newcomer that announces after this member's report is probed alone at
once and added to the report by an addendum (the other nodes are not probed again). A round for newcomers reports only if one of them answered, so one that does not
answer yet (still busy starting) does not spend the report; after ``NEWCOMER_TRIES`` silent
rounds under its current descriptor, or once a report found it down, it hurries no one and
waits for the period's middle like every other node. A dead node leaves the running set as
before: at the latest when the period after the last one that counted it ends. All of this is
the members' timing: the ledger's rules and state stay as they were, deterministic and free of
clocks.

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

NEWCOMER_TRIES = 6  # silent rounds of a newcomer before it stops hurrying this member's report


@dataclass(frozen=True)
class ProbeConfig:
    interval_s: float = 0.25  # seconds between looks at the ledger (newcomers, the period's middle)
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


def probe_targets(directory: dict) -> list[tuple[bytes, str, bool, dict]]:
    """The announced nodes of a ``/directory`` answer to probe: (node key, link, over HTTP, row)."""
    targets = []
    for row in directory.get("nodes", []):
        try:
            key, tkey = bytes.fromhex(row["node"]), bytes.fromhex(row.get("transport_key") or "")
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        if row.get("endpoint") and len(tkey) == 32 and row.get("role") in ("worker", "relay"):
            targets.append((key, with_key(row["endpoint"], tkey), False, row))
        elif row.get("endpoint") and row.get("role") == "gateway":  # HTTP: a signed presence answer
            targets.append((key, row["endpoint"], True, row))
    return targets


def descriptor_of(row: dict) -> tuple[bytes, int]:
    """(node key, descriptor seq): a node that announces again is a new descriptor."""
    seq = row.get("seq")
    return bytes.fromhex(row["node"]), seq if isinstance(seq, int) else 0


def up_nodes(directory: dict, identity: NodeIdentity, config: ProbeConfig,
             only: set[bytes] | None = None) -> list[tuple[bytes, int]]:
    """Probe every announced node of a ``/directory`` answer (or those of ``only``):
    [(node key, rtt_us)] of those up, sorted by key."""
    targets = [(key, link, http) for key, link, http, _ in probe_targets(directory) if only is None or key in only]
    if not targets:
        return []

    def probe(target: tuple[bytes, str, bool]) -> int | None:
        key, link, http = target
        return probe_http(link, key, config.timeout_s) if http else probe_node(link, key, identity, config.timeout_s)

    with concurrent.futures.ThreadPoolExecutor(min(config.parallel, len(targets)), "probe") as pool:
        rtts = list(pool.map(probe, targets))
    return sorted((key, rtt) for (key, _, _), rtt in zip(targets, rtts) if rtt is not None)


class Prober:
    """One member's probe loop: every ``interval_s`` it looks at the ledger, and probes and
    reports once per period, when the module's rule says (a newcomer, or the period's middle)."""

    def __init__(self, member: NodeIdentity, client: CommitteeClient, chain_id: str,
                 config: ProbeConfig = ProbeConfig()) -> None:
        self.member, self.client, self.chain_id, self.config = member, client, chain_id, config
        self.reported: dict[int, set[bytes]] = {}  # period -> the nodes this member reported up in it
        self.misses: dict[tuple[bytes, int], int] = {}  # descriptor (key, seq) -> probes it did not answer
        self._seen: tuple[int, dict] | None = None  # (height, /directory) last read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def newcomers(self, directory: dict) -> list[dict]:
        """Announced nodes not counted running that have not yet been silent ``NEWCOMER_TRIES``
        times to this member as they are now described."""
        return [row for _, _, _, row in probe_targets(directory)
                if row.get("running") is not True and self.misses.get(descriptor_of(row), 0) < NEWCOMER_TRIES]

    def round(self, force: bool = False) -> int | None:
        """Probe and report if this period's report is due (``force``: if it is not spent yet);
        the period reported, or None. Checking is one small query, plus the directory once per
        new height while this period's report is open, so callers poll often."""
        status = self.client.query("/status")
        period, height = status.get("period", 0), status.get("height", 0)
        if period in self.reported and self._seen is not None and self._seen[0] == height:
            return None  # reported, and no new block that could show a newcomer
        if self._seen is None or self._seen[0] != height:
            self._seen = (height, self.client.query("/directory"))
        directory = self._seen[1]
        period, height = directory.get("period", period), directory.get("height", height)
        if period in self.reported:
            return self._addendum(directory, period)
        blocks = max(1, int(status.get("probe_blocks") or 1))
        half_over = height + 1 - period * blocks >= blocks // 2  # the next block is in the period's second half
        new = self.newcomers(directory)
        if not (force or half_over or new):
            return None
        up = up_nodes(directory, self.member, self.config)
        seen_up = {key for key, _ in up}
        answered = [row for row in new if descriptor_of(row)[0] in seen_up]
        if not (force or half_over):
            for row in new:
                if descriptor_of(row)[0] not in seen_up:
                    self.misses[descriptor_of(row)] = self.misses.get(descriptor_of(row), 0) + 1
            if not answered:
                return None  # no newcomer up yet: the report stays open for them (or the period's middle)
        new = answered
        seen = tuple(txs.Seen(key, rtt) for key, rtt in up)
        outcome = self.client.submit_signed(lambda nonce: txs.sign_tx(txs.Liveness(
            chain_id=self.chain_id, nonce=nonce, period=period, up=seen), self.member), self.member.public.sign_key)
        if not outcome.ok:
            log.warning("liveness report for period %d refused (%d): %s", period, outcome.code, outcome.log)
        described = {descriptor_of(row) for _, _, _, row in probe_targets(directory)}
        self.misses = {d: NEWCOMER_TRIES if d[0] not in seen_up else self.misses.get(d, 0)
                       for d in described}  # reported down: they stop hurrying us
        self.reported = {p: n for p, n in self.reported.items() if p >= period - 1} | {period: seen_up}
        if new:
            names = ", ".join(str(row.get("node_id") or row["node"][:16]) for row in new)
            log.info("period %d: probed at once for %d newcomer(s) (%s): %d of %d nodes up, reported at height %d",
                     period, len(new), names, len(up), len(described), outcome.height)
        else:
            log.debug("period %d: %d nodes up", period, len(up))
        return period

    def _addendum(self, directory: dict, period: int) -> int | None:
        """After this period's report: probe the newcomers it lacks (announced since) and add
        those that answer to it (the ledger takes an addendum that names a node the report
        lacks), so a node announced late in a period is counted within a block or two."""
        reported = self.reported[period]
        new = [row for row in self.newcomers(directory) if descriptor_of(row)[0] not in reported]
        if not new:
            return None
        up = up_nodes(directory, self.member, self.config, {descriptor_of(row)[0] for row in new})
        answered = {key for key, _ in up}
        for row in new:
            if descriptor_of(row)[0] not in answered:
                self.misses[descriptor_of(row)] = self.misses.get(descriptor_of(row), 0) + 1
        if not up:
            return None
        outcome = self.client.submit_signed(lambda nonce: txs.sign_tx(txs.Liveness(
            chain_id=self.chain_id, nonce=nonce, period=period, up=tuple(txs.Seen(k, rtt) for k, rtt in up)),
            self.member), self.member.public.sign_key)
        if not outcome.ok:
            log.warning("liveness addendum for period %d refused (%d): %s", period, outcome.code, outcome.log)
            return None
        reported |= answered
        names = ", ".join(str(row.get("node_id") or row["node"][:16]) for row in new
                          if descriptor_of(row)[0] in answered)
        log.info("period %d: probed at once for %d newcomer(s) (%s): added to this period's report at height %d",
                 period, len(answered), names, outcome.height)
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
    p.add_argument("--interval", type=float, default=0.25, help="seconds between looks at the ledger: newly "
                   "announced nodes are probed at once, every node once per probe period (default: 0.25)")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds a node may take to answer (default: 1)")
    args = p.parse_args(argv)
    if not (args.interval > 0 and args.timeout > 0):
        p.error("--interval and --timeout must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    member = NodeIdentity.load_or_create(args.keys, args.name)
    with CommitteeClient(args.endpoint) as client:
        prober = Prober(member, client, client.query("/status")["chain_id"], ProbeConfig(args.interval, args.timeout))
        signal.signal(signal.SIGTERM, lambda *_: prober._stop.set())
        prober.round(force=True)
        print(f"READY {args.endpoint[0]} {member.node_id}", flush=True)
        prober._run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
