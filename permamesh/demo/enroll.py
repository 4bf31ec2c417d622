"""Enrolling a launcher's nodes with its committee, as partners and members would by hand.

What a mesh on one machine needs before its nodes can ``--join`` is what a multi-host mesh
needs (docs/joining.md), done by the launcher on their behalf:

- :func:`register_nodes`: the seed partner registers each worker and relay (keys made now in
  the data directory their processes will use; signed profiles: location, grid, ISP,
  hardware, models), skipping nodes the ledger already has;
- :func:`publish_validators`: the committee's members appear in the directory once, so a
  client that knows one validator finds a second one to check the directory against;
- :func:`start_probers`: each member's liveness prober (``python -m
  permamesh.committee.liveness``), which commits who answers, each probe period.

Who calls it: :class:`permamesh.demo.mesh.EmbeddedMesh` (the demo, tests and benchmarks).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from permamesh.committee import txs
from permamesh.committee.client import CommitteeClient
from permamesh.committee.trust import node_id_of
from permamesh.directory import announce
from permamesh.errors import PermameshError
from permamesh.identity import NodeIdentity
from permamesh.ops.procs import Child, spawn, wait_ready

log = logging.getLogger(__name__)


class EnrollError(PermameshError):
    """The committee refused to register the launcher's nodes."""


def relay_placement(i: int) -> tuple[str, str, str]:
    """(isp, grid, location) claimed for the i-th node of a mesh on one machine: 8 ISPs, 4
    grids, every node its own location, so any 3 consecutive relays differ in all three (the
    diversity rules of docs/paths.md; on one machine every node is really in one place)."""
    return f"isp-{i % 8}", f"grid-{i % 4}", f"loc-{i}"


def _known(client: CommitteeClient) -> dict[str, str]:
    """node id -> role of every node the ledger has."""
    return {node_id_of(row["node"]): row["role"] for row in client.query("/directory")["nodes"]}


def register_nodes(net, client: CommitteeClient, data_dir: Path, workers: Sequence[str], relays: Sequence[str],
                   model: str, say=lambda _: None, gateways: Sequence[str] = ()) -> None:
    """Register the named workers, relays and gateways (keys under ``data_dir/keys``) as
    ``net``'s seed partner, pipelined; nodes already registered are left as they are."""
    partner, known = net.partner, _known(client)
    nonce = client.next_nonce(partner.public.sign_key)
    raw = []
    named = [(w, "worker") for w in workers] + [(r, "relay") for r in relays] + [(g, "gateway") for g in gateways]
    for i, (name, role) in enumerate(named):
        ident = NodeIdentity.load_or_create(Path(data_dir) / "keys", name)
        if ident.node_id in known:
            continue
        isp, grid, location = relay_placement(i - len(workers) if role == "relay" else i + 3)
        profile = txs.NodeProfile(lat_e6=(40 + (3 * i) % 20) * 10**6, lon_e6=(-10 + (7 * i) % 40) * 10**6,
                                  grid=grid, isp=isp, asn=64500 + i, datacenter=location, silicon_year=2012 + i % 8,
                                  cpu_mhz=2400, idle_w=12, loaded_w=40, ram_mb=16384,
                                  software="permamesh-0.1", models=(model,) if role == "worker" else ())
        raw.append(txs.sign_tx(txs.RegisterNode(
            chain_id=net.chain_id, nonce=nonce + len(raw), node_key=ident.public.sign_key,
            kex_key=ident.public.kex_key, role=role, endpoint="", profile=profile), partner))
    if not raw:
        return
    outcomes = client.submit_many(raw, timeout_s=60.0)
    failed = [o.log for o in outcomes if not o.ok]
    if failed:
        raise EnrollError(f"registering nodes failed: {failed[0]}")
    say(f"committee: registered {len(raw)} nodes (signed profiles) by height {max(o.height for o in outcomes)}")


def publish_validators(net, client: CommitteeClient) -> None:
    """Put ``net``'s members in its directory, unless they are there already."""
    if "validator" in _known(client).values():
        return
    members = [net.identity(i) for i in range(len(net.endpoints))]
    announce.publish_validators(client, net.chain_id, net.partner, members, net.endpoints)


def start_probers(net, log_dir: Path, timeout_s: float = 0.5) -> list[Child]:
    """One liveness prober per member of ``net``, each reporting to its own validator; returns
    once every prober finished its first round."""
    probers = [spawn(f"prober-{i}", [sys.executable, "-m", "permamesh.committee.liveness", "--keys",
                                     str(net.vdir(i) / "keys"), "--endpoint", endpoint, "--timeout", str(timeout_s)],
                     log_dir)
               for i, endpoint in enumerate(net.endpoints)]
    wait_ready(probers, 60.0, EnrollError)
    return probers
