"""A partner puts a node into the directory: ``permamesh register`` and ``permamesh keys``.

A new host joins in three steps (docs/joining.md): the node's owner runs ``permamesh keys
--name NAME`` there and sends its public keys to the partner; the partner runs ``permamesh
register`` (signing a ``RegisterNode`` transaction with the partner's key: role and the
partner's claims about the machine: place, grid, ISP, hardware); the node then starts with
``--join`` and publishes its own descriptor. Nothing but public keys crosses between them.

Who calls it: :mod:`permamesh.cli`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from permamesh.committee import txs
from permamesh.committee.client import CommitteeClient
from permamesh.committee.errors import CommitteeError
from permamesh.directory.committee import parse_join
from permamesh.directory.errors import DirectoryError
from permamesh.identity import NodeIdentity, PublicIdentity

log = logging.getLogger(__name__)

ROLES = ("worker", "relay", "validator", "gateway")


def add_keys_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="worker", help="identity name under DATA_DIR/keys (created if missing; default: worker)")


def show_keys(data_dir: Path, name: str) -> int:
    ident = NodeIdentity.load_or_create(Path(data_dir) / "keys", name)
    print(f"node_id       {ident.node_id}")
    print(f"node_key      {ident.public.sign_key.hex()}")
    print(f"kex_key       {ident.public.kex_key.hex()}")
    print(f"transport_key {ident.transport.public_bytes.hex()}")
    return 0


def add_register_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--join", action="append", required=True, metavar="VALIDATOR",
                   help="the committee: a validator address, https://HOST:PORT?key=HEX or tcp://HOST:PORT?key=HEX "
                        "(repeatable)")
    p.add_argument("--partner", default="partner", help="the partner's identity name under DATA_DIR/keys (default: partner)")
    p.add_argument("--node-key", required=True, help="the node's Ed25519 public key, 64 hex chars (from `permamesh keys`)")
    p.add_argument("--kex-key", required=True, help="the node's X25519 public key, 64 hex chars (from `permamesh keys`)")
    p.add_argument("--role", required=True, choices=ROLES, help="what the node runs")
    p.add_argument("--isp", required=True, help="its network operator (paths and replicas never share one)")
    p.add_argument("--grid", required=True, help="the power grid it draws from")
    p.add_argument("--asn", type=int, default=0, help="its autonomous system number (default: 0)")
    p.add_argument("--lat", type=float, default=0.0, help="latitude in degrees (checked against round trips)")
    p.add_argument("--lon", type=float, default=0.0, help="longitude in degrees")
    p.add_argument("--datacenter", default="", help="site name (one location: at most two paid nodes)")
    p.add_argument("--silicon-year", type=int, default=0, help="year the CPU or GPU was made")
    p.add_argument("--model", action="append", default=None, help="a model it serves (workers; repeatable)")


def _key(text: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise DirectoryError(f"--{what} must be 64 hex characters (from `permamesh keys` on the node)")
    return raw


def register_from_args(args: argparse.Namespace, data_dir: Path) -> int:
    node_key, kex_key = _key(args.node_key, "node-key"), _key(args.kex_key, "kex-key")
    if not (-90 <= args.lat <= 90 and -180 <= args.lon <= 180):
        raise DirectoryError("--lat must be within -90..90 and --lon within -180..180")
    partner = NodeIdentity.load_or_create(Path(data_dir) / "keys", args.partner)
    profile = txs.NodeProfile(round(args.lat * 1e6), round(args.lon * 1e6), args.grid, args.isp, args.asn,
                              datacenter=args.datacenter, silicon_year=args.silicon_year,
                              models=tuple(args.model or ()))
    try:
        with CommitteeClient(parse_join(args.join)) as client:
            chain_id = client.query("/status")["chain_id"]
            tx = txs.RegisterNode(chain_id=chain_id, nonce=client.next_nonce(partner.public.sign_key),
                                  node_key=node_key, kex_key=kex_key, role=args.role, endpoint="", profile=profile)
            outcome = client.submit(txs.sign_tx(tx, partner))
    except CommitteeError as exc:
        raise DirectoryError(f"cannot reach the committee: {exc}") from None
    if not outcome.ok:
        raise DirectoryError(f"the committee refused the registration ({outcome.code}): {outcome.log}")
    node_id = PublicIdentity(node_key, kex_key).node_id
    print(f"registered {args.role} {node_id} at height {outcome.height}; start it with --join {args.join[0]}")
    return 0
