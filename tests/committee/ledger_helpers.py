"""Shared pieces of the ledger tests: a small committee, signed txs, blocks driven through ABCI."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from permamesh.committee import txs
from permamesh.committee.abci import abci_pb2 as pb
from permamesh.committee.app import LedgerApp
from permamesh.committee.genesis import Genesis, LedgerRules
from permamesh.identity import NodeIdentity

CHAIN = "permamesh-test"


@dataclass
class Party:
    """A key that signs txs, with its own nonce counter."""

    ident: NodeIdentity = field(default_factory=NodeIdentity.generate)
    nonce: int = 0

    @property
    def key(self) -> bytes:
        return self.ident.public.sign_key

    def sign(self, make, **fields) -> bytes:
        self.nonce += 1
        return txs.sign_tx(make(chain_id=CHAIN, nonce=self.nonce, **fields), self.ident)


def profile(**kw) -> txs.NodeProfile:
    base = dict(lat_e6=52_520_000, lon_e6=13_405_000, grid="de-50hz", isp="isp-a", asn=64500,
                silicon_year=2014, cpu_mhz=2400, idle_w=10, loaded_w=45, ram_mb=16384)
    return txs.NodeProfile(**(base | kw))


@dataclass
class Committee:
    members: list[Party]
    seeds: list[Party]
    genesis: Genesis


def committee(n_members: int = 4, n_seeds: int = 2, **rules) -> Committee:
    members = [Party() for _ in range(n_members)]
    seeds = [Party() for _ in range(n_seeds)]
    genesis = Genesis(CHAIN, tuple(sorted(m.key for m in members)),
                      tuple(sorted(s.key for s in seeds)),
                      LedgerRules(**({"blocks_per_epoch": 5, "trial_epochs": 2} | rules)))
    return Committee(members, seeds, genesis)


def start(app: LedgerApp, genesis: Genesis) -> None:
    app.init_chain(pb.RequestInitChain(chain_id=genesis.chain_id,
                                       app_state_bytes=genesis.to_json(), initial_height=1))


def block(app: LedgerApp, raw_txs: list[bytes]) -> list[int]:
    """Finalize and commit the next block; returns each tx's result code."""
    height = app.store.height + 1
    resp = app.finalize_block(pb.RequestFinalizeBlock(txs=raw_txs, height=height))
    app.commit(pb.RequestCommit())
    assert app.store.app_hash == resp.app_hash
    return [r.code for r in resp.tx_results]


def check(app: LedgerApp, raw: bytes) -> int:
    return app.check_tx(pb.RequestCheckTx(tx=raw)).code


def query(app: LedgerApp, path: str, data: bytes = b""):
    resp = app.query(pb.RequestQuery(path=path, data=data))
    assert resp.code == 0, resp.log
    return json.loads(resp.value)


def node_tx(partner: Party, node: Party, role: str = "worker", **prof) -> bytes:
    return partner.sign(txs.RegisterNode, node_key=node.key, kex_key=node.ident.public.kex_key,
                        role=role, endpoint="tcp://127.0.0.1:1", profile=profile(**prof))


# ----------------------------------------------------------------- descriptors and liveness


def announce_tx(node: Party, seq: int = 1, **fields) -> bytes:
    """The node's own descriptor, signed by the node (its partner registered it)."""
    base = dict(transport_key=node.ident.transport.public_bytes,
                endpoint="tcp://node.example.org:7001", model="", group="", layers="",
                version="permamesh-0.1", seq=seq)
    return node.sign(txs.Announce, **(base | fields))


def liveness_tx(member: Party, period: int, up: dict[bytes, int]) -> bytes:
    """A member's report of the nodes it found up (node key -> rtt in microseconds)."""
    return member.sign(txs.Liveness, period=period,
                       up=tuple(txs.Seen(key, rtt) for key, rtt in sorted(up.items())))


def advance_to(app: LedgerApp, height: int) -> None:
    """Commit empty blocks until the last committed height is ``height``."""
    while app.store.height < height:
        block(app, [])


def row_count(app: LedgerApp, ns: bytes) -> int:
    return sum(1 for _ in app.store.scan(ns, committed=True))
