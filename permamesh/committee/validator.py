"""The ``permamesh validator`` process: one committee member's ledger, under either engine.

- ``--engine cometbft --abci tcp://127.0.0.1:26658 --home DIR``: serve the ledger
  application on the ABCI socket; a CometBFT v0.38 node (``proxy_app`` pointing there) drives
  it. It also writes ``DIR/rpc_cert.pem`` (the certificate of the member's identity key) and
  prints the ``[rpc]`` TLS settings that make the node's RPC answer only over TLS pinned to
  that key, with the ``https://HOST:PORT?key=HEX`` form nodes join with. Configuration in ``docs/committee.md``. The largest request frame accepted follows the
  chain's ``block.max_bytes`` (learnt at InitChain and kept in the ledger's store);
  ``--max-frame-bytes N`` overrides it. The ABCI socket drives consensus, so a non-loopback
  tcp address is refused unless ``--abci-allow-remote`` is given.
- ``--engine devnet --home DIR``: one validator of the embedded devnet (``DIR/node.json``,
  written by :class:`~permamesh.committee.devnet.cluster.Devnet`); prints
  ``READY <endpoint> <node_id>`` once it serves.
- ``--devnet N --home DIR``: start a whole devnet of N validator processes, print their
  endpoints, run until Ctrl-C.
- ``--cometbft N --home DIR``: the same with real CometBFT v0.38 nodes
  (:class:`~permamesh.committee.cometbft.network.CometNet`); prints the RPC endpoints and
  each block as it commits.
- ``--query PATH --endpoint EP``: ask a running devnet (``/status``, ``/trusted``, ...).

Who calls it: :mod:`permamesh.cli`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from permamesh.committee.errors import CommitteeError

log = logging.getLogger(__name__)

MIN_FRAME_BYTES = 1024 * 1024  # CometBFT's default mempool max_tx_bytes must fit in a CheckTx


def frame_bytes(text: str) -> int:
    """``--max-frame-bytes``: a whole number of bytes within what CometBFT can send."""
    from permamesh.committee.abci.framing import MAX_FRAME_BYTES

    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes") from None
    if not MIN_FRAME_BYTES <= value <= MAX_FRAME_BYTES:
        raise argparse.ArgumentTypeError(
            f"{value} is outside {MIN_FRAME_BYTES}..{MAX_FRAME_BYTES} bytes (1 MiB up to "
            f"CometBFT's own 2 GiB message cap)")
    return value


def add_validator_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="devnet", choices=["devnet", "cometbft"],
                   help="devnet: the embedded BFT engine (local stand-in); cometbft: serve ABCI "
                        "for a CometBFT v0.38 node (default: devnet)")
    p.add_argument("--home", type=Path, default=None,
                   help="validator state: keys, ledger and block store (default: DATA_DIR/validator, "
                        "or DATA_DIR/devnet with --devnet)")
    p.add_argument("--abci", default="tcp://127.0.0.1:26658",
                   help="cometbft engine: ABCI address, tcp://HOST:PORT or unix:///PATH "
                        "(default: tcp://127.0.0.1:26658)")
    p.add_argument("--abci-allow-remote", action="store_true",
                   help="cometbft engine: allow a non-loopback tcp --abci address (anyone who can "
                        "connect to it can drive consensus: firewall it to CometBFT's host)")
    p.add_argument("--max-frame-bytes", type=frame_bytes, default=None, metavar="BYTES",
                   help="cometbft engine: the largest ABCI request accepted, in bytes (default: the "
                        "chain's block.max_bytes plus 8 MiB, 100 MiB blocks when it is -1, never "
                        "below 64 MiB)")
    p.add_argument("--devnet", type=int, default=0, metavar="N",
                   help="start a devnet of N validator processes under --home and wait for Ctrl-C")
    p.add_argument("--cometbft", type=int, default=0, metavar="N",
                   help="start N validators, each an app plus a CometBFT v0.38 node (`make tools` "
                        "installs it), under --home (default: DATA_DIR/cometnet); print their RPC "
                        "endpoints and blocks as they commit, until Ctrl-C")
    p.add_argument("--query", default=None, metavar="PATH",
                   help="query a running devnet (/status, /registry, /trusted, /reputation, "
                        "/balances, /payouts, /partners, /epochs) and print the JSON")
    p.add_argument("--data", default="", help="query data (a hex key for /node, /account, /nonce)")
    p.add_argument("--endpoint", action="append", default=None,
                   help="devnet validator endpoint for --query (repeatable; default: from --home)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="Prometheus text metrics at http://127.0.0.1:PORT/metrics: height, mempool, "
                        "verification scores (0 = any free port, recorded in DATA_DIR/run/metrics; -1 = none; "
                        "default: 0)")


def _wait_for_signal() -> None:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()


def run_validator_from_args(args: argparse.Namespace, data_dir: Path) -> int:
    if args.query:
        return _query(args, data_dir)
    if args.devnet:
        return _devnet(args, data_dir)
    if getattr(args, "cometbft", 0):
        from permamesh.committee.cometbft.runner import run_cometnet

        return run_cometnet((args.home or data_dir / "cometnet").expanduser(), args.cometbft, data_dir)
    home = (args.home or data_dir / "validator").expanduser()
    metrics = (data_dir, args.metrics_port) if args.metrics_port >= 0 else None
    max_frame_bytes = getattr(args, "max_frame_bytes", None)
    allow_remote = getattr(args, "abci_allow_remote", False)
    if args.engine == "cometbft":
        return _cometbft(args.abci, home, metrics, max_frame_bytes, allow_remote)
    if max_frame_bytes is not None:
        raise CommitteeError("--max-frame-bytes applies to --engine cometbft only")
    if allow_remote:
        raise CommitteeError("--abci-allow-remote applies to --engine cometbft only")
    return _devnet_node(home, metrics)


def _exporter(metrics, node_id: str, read):
    """Serve ``read()``'s figures plus the process's own (None when metrics are off)."""
    if metrics is None:
        return None
    from permamesh.ops.metrics import Exporter, Gauges, new_registry

    registry = new_registry()
    Gauges(read, registry)
    return Exporter(registry, metrics[0], node_id, "validator", port=metrics[1])


def _cometbft(address: str, home: Path, metrics=None, max_frame_bytes: int | None = None,
             allow_remote: bool = False) -> int:
    from permamesh.committee.abci.server import ABCIServerThread, ServerConfig, is_loopback, parse_address
    from permamesh.committee.cometbft.drill import ledger_app
    from permamesh.ops.metrics import Figure

    try:
        parsed = parse_address(address)
    except ValueError as exc:
        raise CommitteeError(str(exc)) from None
    if not allow_remote and not is_loopback(parsed):
        raise CommitteeError(
            f"--abci {address} is not a loopback address: anyone who can connect to the ABCI "
            "socket can drive consensus. Use tcp://127.0.0.1:PORT or unix:///PATH, or pass "
            "--abci-allow-remote (and firewall the port to CometBFT's host)")
    app = ledger_app(home / "ledger.sqlite")  # a LedgerApp; corrupt only in a drill (drill.py)
    if (home / "keys" / "validator.ed25519").exists():  # a CometNet member: its metrics under its node id
        from permamesh.identity import NodeIdentity

        node_id = NodeIdentity.load_or_create(home / "keys", "validator").node_id
    else:
        node_id = f"ledger-{home.name}"
    exporter = _exporter(metrics, node_id,
                         lambda: [Figure("permamesh_chain_height", "Last committed height", app.store.height)])
    try:
        with ABCIServerThread(app, address, config=ServerConfig(max_frame_bytes, allow_remote=allow_remote)) as server:
            print(f"READY {server.bound_address} ledger", flush=True)
            print(_rpc_tls_hint(home), flush=True)
            log.info("ledger at height %d serving ABCI on %s; frame limit %d bytes (%s)",
                     app.store.height, server.bound_address, server.server.max_message_bytes,
                     "--max-frame-bytes" if max_frame_bytes else
                     "block size" if app.max_request_bytes() else "default")
            _wait_for_signal()
    finally:
        if exporter is not None:
            exporter.close()
        app.close()
    return 0


def _rpc_tls_hint(home: Path) -> str:
    """Write ``home``'s RPC certificate (if missing) and say how to serve and reach the RPC."""
    from permamesh.committee.cometbft.tls import CERT_NAME, write_certificate
    from permamesh.identity import NodeIdentity

    ident = NodeIdentity.load_or_create(home / "keys", "validator")
    cert = write_certificate(ident, home / CERT_NAME).absolute()
    key = (home / "keys" / "validator.ed25519").absolute()
    return (f"rpc tls: in CometBFT's config.toml [rpc] set tls_cert_file = \"{cert}\" and tls_key_file = "
            f"\"{key}\"; nodes then join with https://HOST:RPC_PORT?key={ident.public.sign_key.hex()}")


def _devnet_node(home: Path, metrics=None) -> int:
    from permamesh.committee.abci.client import LocalClient
    from permamesh.committee.app import LedgerApp
    from permamesh.committee.devnet.blocks import BlockStore
    from permamesh.committee.devnet.chain import Chain, DevnetGenesis
    from permamesh.committee.devnet.node import DevnetNode, NodeOptions
    from permamesh.identity import NodeIdentity
    from permamesh.transport import serve_until_signalled

    try:
        config = json.loads((home / "node.json").read_text())
    except (OSError, ValueError) as exc:
        raise CommitteeError(f"cannot read {home / 'node.json'} (create a devnet with "
                             f"--devnet N): {exc}") from None
    ident = NodeIdentity.load_or_create(home / "keys", "validator")
    genesis = DevnetGenesis.load(Path(config["genesis"]))
    app = LedgerApp(home / "ledger.sqlite")
    store = BlockStore(home / "blocks.sqlite")
    chain = Chain(LocalClient(app), store, genesis, ident.public.sign_key)
    options = NodeOptions(port=config["port"], byzantine=config.get("byzantine", ""),
                          peers=tuple((bytes.fromhex(k), ep) for k, ep in config["peers"]))
    from permamesh.committee.client import CommitteeClient
    from permamesh.committee.telemetry import FigureCache

    cache = None
    if metrics is not None:  # the cache's own thread asks this validator over its own socket
        from permamesh.committee.endpoints import devnet_endpoint

        endpoint = devnet_endpoint("127.0.0.1", options.port, ident.transport.public_bytes)
        cache = FigureCache(lambda: CommitteeClient([endpoint], timeout_s=2.0)).start()
    exporter = _exporter(metrics, ident.node_id, cache.figures if cache is not None else None)
    try:
        serve_until_signalled(DevnetNode(chain, ident, options), ident.node_id,
                              lambda endpoint: None, lambda: None)
    finally:
        if exporter is not None:
            exporter.close()
        if cache is not None:
            cache.close()
        store.close()
        app.close()
    return 0


def _devnet(args: argparse.Namespace, data_dir: Path) -> int:
    from permamesh.committee.devnet.cluster import Devnet, DevnetConfig

    home = (args.home or data_dir / "devnet").expanduser()
    with Devnet(DevnetConfig(home, args.devnet)) as devnet:
        for i, endpoint in enumerate(devnet.endpoints):  # each names its validator's transport key
            print(f"validator {i}: {endpoint}  (home {devnet.vdir(i)})")
        print("devnet running; Ctrl-C stops it", flush=True)
        _wait_for_signal()
    return 0


def _query(args: argparse.Namespace, data_dir: Path) -> int:
    from permamesh.committee.client import CommitteeClient

    from permamesh.committee.devnet.cluster import devnet_endpoints

    endpoints = args.endpoint or devnet_endpoints((args.home or data_dir / "devnet").expanduser())
    with CommitteeClient(endpoints, timeout_s=5.0) as client:
        data = bytes.fromhex(args.data) if args.data else b""
        json.dump(client.query(args.query, data), sys.stdout, indent=1)
        print()
    return 0
