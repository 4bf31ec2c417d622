"""``permamesh gateway``: the OpenAI-compatible gateway process.

Builds the backend (overlay by default, ``--direct`` for streamed tokens straight from
workers), the key ring, the credit (``--committee ENDPOINT``: admission and receipts on the
ledger), the dashboard's view and the health monitor, then serves until SIGINT or SIGTERM,
printing ``READY <url> gateway`` once it listens and recording its metrics endpoint
(``<url>/metrics``) in ``DATA_DIR/run/metrics``. Workers and relays come from the committee's
directory (``--join``). Unless ``--unlisted``, the gateway has a descriptor there too: its
partner registers its key (``permamesh register --role gateway``), and once it listens it
announces its advertised address, signed; members probe it over HTTP
(:mod:`permamesh.directory.presence`).

Who calls it: :mod:`permamesh.cli`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from permamesh.gateway.accounts import Credit, KeyRing
from permamesh.gateway.backend import MeshBackend
from permamesh.gateway.server import Gateway, GatewayConfig

log = logging.getLogger(__name__)


def add_gateway_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port, 0 = any free port (default: 8000)")
    p.add_argument("--direct", action="store_true", help="send jobs straight to workers (tokens stream as they are "
                   "made; not anonymous) instead of through the overlay")
    p.add_argument("--committee", action="append", default=None, metavar="ENDPOINT",
                   help="committee validator (repeatable): each API key's jobs are admitted by its credit on the "
                        "ledger and paid to the worker by a signed receipt")
    p.add_argument("--join", action="append", default=None, metavar="VALIDATOR",
                   help="find workers and relays in the committee's directory: a validator's address (comma-separated or "
                        "repeatable; default: $PERMAMESH_JOIN, else DATA_DIR/join); also the committee for credit unless "
                        "--committee is given")
    p.add_argument("--name", default="gateway", help="identity name: keys in DATA_DIR/keys/NAME.* (default: gateway)")
    p.add_argument("--advertise", default=None, metavar="HOST:PORT",
                   help="where clients reach this gateway (needed when --host is 0.0.0.0; default: the bound address)")
    p.add_argument("--unlisted", action="store_true",
                   help="publish no descriptor in the committee's directory (a private gateway; its partner need "
                        "not register it)")
    p.add_argument("--chain-id", default=None, help="the committee's chain id, which receipts are signed for "
                   "(default: asked of the committee)")
    p.add_argument("--new-key", metavar="NAME", default=None, help="make an API key for NAME, print it once, and exit")
    p.add_argument("--open", action="store_true", help="accept requests without a valid key (all as 'anonymous'); "
                   "for a gateway on a private machine")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a job may take in the mesh (default: 300)")


def build_gateway(data_dir: Path, host: str = "127.0.0.1", port: int = 0, direct: bool = False,
                  committee: tuple[str, ...] = (), chain_id: str | None = None, open_access: bool = False,
                  timeout_s: float = 300.0, join: tuple[str, ...] = (), identity=None) -> Gateway:
    """``identity``: the key of the gateway's directory descriptor (it then answers members'
    presence probes); None for an unlisted gateway."""
    from permamesh.gateway.dashboard import MeshView
    from permamesh.ops.health import HealthMonitor, directory_targets

    from permamesh.directory.committee import CommitteeDirectory
    from permamesh.directory.join import resolve_join

    join = resolve_join(join or committee, data_dir, required="the gateway")
    directory = CommitteeDirectory(list(join), Path(data_dir) / "directory" / "gateway.json").start()
    committee = committee or tuple(join)
    client = None
    if committee:
        from permamesh.committee.client import CommitteeClient
        from permamesh.gateway.accounts import SharedCommittee

        client = SharedCommittee(CommitteeClient(list(committee), timeout_s=10.0))
    monitor = HealthMonitor(data_dir)

    def health() -> dict:
        """The local metrics endpoints and every node of the committee's directory."""
        try:
            targets = directory_targets(directory.snapshot())
        except Exception as exc:  # noqa: BLE001 - the local nodes are still checked
            log.warning("directory unreadable for the health checks: %s", exc)
            targets = []
        return monitor.check(targets)

    view = MeshView(data_dir, client, health, directory, monitor.availability)
    return Gateway(GatewayConfig(data_dir, host, port, identity=identity), MeshBackend(data_dir, "direct" if direct else "overlay",
                                                                     timeout_s, directory=directory),
                   KeyRing(data_dir, open_access), Credit(client, chain_id), view.snapshot, health)


def run_gateway_from_args(args: argparse.Namespace, data_dir: Path) -> int:
    from permamesh.ops.metrics import MetricsRecord, register_metrics, unregister_metrics
    from permamesh.transport import serve_until_signalled

    if args.new_key:
        print(KeyRing(data_dir).new_key(args.new_key))
        return 0
    from permamesh.directory.announce import advertised, announce
    from permamesh.directory.errors import DirectoryError
    from permamesh.directory.join import resolve_join
    from permamesh.identity import NodeIdentity

    join = resolve_join(args.join, data_dir, required="the gateway")
    identity = None if args.unlisted else NodeIdentity.load_or_create(data_dir / "keys", args.name)
    gateway = build_gateway(data_dir, args.host, args.port, args.direct, tuple(args.committee or ()), args.chain_id,
                            args.open, args.timeout, join, identity)
    node_id = identity.node_id if identity is not None else f"gateway-{args.port or os.getpid()}"

    def ready(url: str) -> None:
        register_metrics(data_dir, MetricsRecord(node_id, "gateway", url + "/metrics"))
        if identity is not None:
            try:
                announce(identity, join, advertised("tcp://" + url.removeprefix("http://"), args.advertise))
            except DirectoryError as exc:
                raise DirectoryError(f"{exc} (its partner registers it with `permamesh register --role gateway`; "
                                     "or run it --unlisted)") from None

    serve_until_signalled(gateway, node_id, ready, lambda: unregister_metrics(data_dir, node_id))
    return 0
