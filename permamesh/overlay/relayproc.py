"""``permamesh relay``: run one relay in a mesh joined through its committee; stop cleanly on signals.

The process prints one line ``READY <endpoint> <node_id>`` on stdout once it serves (the
embedded mesh waits for that line instead of sleeping); everything else goes to the log on
stderr. It reads the committee's directory (``--join``, required) for next hops and entry
workers, refreshed on a thread and looked up through :class:`CachedLookup`, and publishes its
signed descriptor there once it serves. Its ISP, grid and location are what its partner
registered (``permamesh register``), not flags of its own. SIGINT and SIGTERM stop it.

Who calls it: :mod:`permamesh.cli` wires :func:`add_relay_arguments` and
:func:`run_relay_from_args` into ``permamesh relay`` (the CLI adds ``--data-dir`` and
``--log-level`` itself); the embedded mesh starts that command as a child process.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from permamesh.directory.announce import advertised, announce
from permamesh.directory.committee import CommitteeDirectory
from permamesh.identity import NodeIdentity
from permamesh.directory.workers import default_data_dir
from permamesh.directory.relays import CachedLookup
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.relay import DEFAULT_EPOCH_S, RelayConfig, RelayServer
from permamesh.transport import serve_until_signalled

log = logging.getLogger(__name__)

__all__ = ["RelayOptions", "add_relay_arguments", "run_relay", "run_relay_from_args"]


@dataclasses.dataclass(frozen=True)
class RelayOptions:
    data_dir: Path
    join: tuple[str, ...]  # committee validators: next hops and entry workers come from its directory
    name: str = "relay"  # key file name under <data_dir>/keys
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    rate_per_s: float = 1000.0  # frames per second per upstream peer
    burst: int = 2000  # frames an upstream peer may send at once
    epoch_s: float = DEFAULT_EPOCH_S  # seconds per replay-guard epoch (clients must agree)
    fail_after: int = 0  # drills: drop everything after this many cells (0 = never)
    directory_refresh_s: float = 10.0  # seconds between lookups in the directory copy (misses look sooner)
    metrics_port: int | None = 0  # Prometheus /metrics on this port (0 = any free); None = no metrics
    advertise: str | None = None  # HOST:PORT others reach this relay at (default: the bound address)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise OverlayError(f"relay port {self.port} is not in 0..65535")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise OverlayError(f"relay metrics port {self.metrics_port} is not in 0..65535 (or -1 for none)")
        if not (self.directory_refresh_s >= 0):
            raise OverlayError("directory refresh period must be >= 0")
        if not self.join:
            raise OverlayError("a relay needs the committee's directory (next hops and entry workers come from it): "
                               "pass --join VALIDATOR, or set $PERMAMESH_JOIN (its partner registers it first: "
                               "permamesh register)")

    def relay_config(self) -> RelayConfig:
        return RelayConfig(host=self.host, port=self.port, rate_per_s=self.rate_per_s, burst=self.burst,
                           epoch_s=self.epoch_s, fail_after=self.fail_after)


def run_relay(opts: RelayOptions) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit status (0)."""
    data_dir = Path(opts.data_dir)
    config = opts.relay_config()  # checks the limits before any key file is touched
    identity = NodeIdentity.load_or_create(data_dir / "keys", opts.name)
    # read once now (a wrong committee address fails here, with the reason), then refreshed
    # on a thread so the relay's loop never waits on the committee
    directory = CommitteeDirectory(list(opts.join), data_dir / "directory" / f"{opts.name}.json").start()
    relays = CachedLookup(directory.relay_endpoints, opts.directory_refresh_s)
    workers = CachedLookup(directory.worker_endpoints, opts.directory_refresh_s)
    server = RelayServer(identity, config, relays, workers)
    exporter = None
    if opts.metrics_port is not None:
        from permamesh.ops.metrics import Exporter, Gauges, new_registry

        registry = new_registry()
        Gauges(lambda: relay_figures(server), registry)
        exporter = Exporter(registry, data_dir, identity.node_id, "relay", opts.host, opts.metrics_port)
    try:
        serve_until_signalled(server, identity.node_id,
                              lambda endpoint: announce(identity, opts.join, advertised(endpoint, opts.advertise)),
                              lambda: None)
    finally:
        directory.close()
        if exporter is not None:
            exporter.close()
    return 0


def relay_figures(server: RelayServer) -> list:
    """The relay's counters as metrics (read at scrape time)."""
    from permamesh.ops.metrics import Figure

    st = server.stats()
    out = [Figure("permamesh_relay_cells_total", "Cells by what happened to them", value, "counter", {"event": event})
           for event, value in (("in", st.cells_in), ("forwarded", st.forwarded), ("exited", st.exited),
                                ("delivered", st.delivered), ("rate_limited", st.rate_limited),
                                ("bad_frame", st.bad_frames))]
    out += [Figure("permamesh_relay_dropped_total", "Cells dropped, by reason (cloves lost here)", n, "counter",
                   {"reason": reason}) for reason, n in sorted(st.dropped_by_reason.items())]
    out.append(Figure("permamesh_relay_attached_clients", "Clients attached for deliveries", st.attached))
    return out


def add_relay_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``permamesh relay`` (not ``--data-dir`` / ``--log-level``: the CLI's own)."""
    parser.description = (
        "Run an overlay relay: peel one onion layer of each cell and pass it on (to the next relay, "
        "to an entry worker, or back to an attached client). The relay never sees a whole prompt or "
        "answer. Joins a mesh through its committee (--join): its partner registers it first "
        "(permamesh register: ISP, grid and location come from there); prints 'READY <endpoint> <node_id>' "
        "once serving and publishes its signed descriptor; SIGINT/SIGTERM stop it.")
    add = parser.add_argument
    add("--name", default="relay", help="identity name: keys live in DATA_DIR/keys/NAME.ed25519|.x25519 (default: relay)")
    add("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    add("--port", type=int, default=0, help="TCP port to bind, 0 = any free port (default: 0)")
    add("--rate", type=float, default=1000.0, dest="rate_per_s", metavar="PER_S", help="frames per second each upstream connection may send on average (default: 1000)")
    add("--burst", type=int, default=2000, help="frames an upstream connection may send at once; more are dropped (count, default: 2000)")
    add("--epoch-s", type=float, default=DEFAULT_EPOCH_S, metavar="SECONDS", help=f"seconds per replay-guard epoch; clients must use the same (default: {DEFAULT_EPOCH_S:g})")
    add("--metrics-port", type=int, default=0, help="Prometheus text metrics at http://HOST:PORT/metrics (0 = any "
        "free port, recorded in DATA_DIR/run/metrics; -1 = none; default: 0)")
    add("--join", action="append", default=None, metavar="VALIDATOR",
        help="required: join a mesh through its committee (a validator's address, https://HOST:PORT?key=HEX or "
             "tcp://HOST:PORT?key=HEX; comma-separated or repeatable; default: $PERMAMESH_JOIN): next hops "
             "and entry workers come from the committee's directory, and the relay publishes its signed "
             "descriptor there (its partner must have registered it)")
    add("--advertise", default=None, metavar="HOST:PORT",
        help="with --join: where others reach this relay (needed when --host is 0.0.0.0; default: the bound address)")
    add("--fail-after", type=int, default=0, metavar="CELLS", help="failure drills: silently drop every cell after this many (count, default: 0 = never)")


def run_relay_from_args(args: argparse.Namespace) -> int:
    """``permamesh relay``: build :class:`RelayOptions` from parsed ``args`` and run the relay."""
    from permamesh.directory.join import resolve_join

    data_dir = Path(getattr(args, "data_dir", None) or default_data_dir()).expanduser()
    join = resolve_join(args.join, None)  # none: RelayOptions says how to give one, after the other checks
    opts = RelayOptions(data_dir, join, args.name, args.host, args.port, args.rate_per_s, args.burst, args.epoch_s,
                        args.fail_after, metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                        advertise=args.advertise)
    return run_relay(opts)
