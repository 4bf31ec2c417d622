"""Devnet: N validator processes on loopback, their keys, genesis and configuration.

``Devnet(home, n=4).start()`` creates (once) a directory per validator under ``home``
(``v0`` .. ``v{n-1}``: key files, ``node.json``, the ledger and block store in SQLite), a
shared ``genesis.json``, a seed partner key (``partner``) so the demo can admit partners and
register nodes, then starts ``python -m permamesh validator --engine devnet --home vI`` for
each and waits for their READY lines. Ports are chosen once and kept, so a validator killed
with SIGKILL and restarted (:meth:`Devnet.restart`) rejoins at the same address, replays its
own block store and catches up from its peers.

Every validator's ROUTER is a CurveZMQ server with its transport key, so
:attr:`Devnet.endpoints` (and each peer list in ``node.json``) are ``tcp://127.0.0.1:PORT?key=HEX``:
clients and peers authenticate the validator, and nobody on the path reads the traffic.

Who calls it: ``permamesh demo``, ``permamesh validator --engine devnet --devnet N``, the
committee benchmark and tests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import sys
from pathlib import Path

from permamesh.committee.devnet.chain import DevnetGenesis
from permamesh.committee.endpoints import devnet_endpoint
from permamesh.committee.errors import CommitteeError
from permamesh.committee.genesis import Genesis, LedgerRules
from permamesh.identity import NodeIdentity
from permamesh.ops.procs import Child, spawn, stop_all, wait_ready

log = logging.getLogger(__name__)

CHAIN_ID = "permamesh-devnet"


def devnet_endpoints(home: Path) -> list[str]:
    """The validator endpoints of the devnet under ``home``, naming their transport keys (from
    each ``v*/node.json``)."""
    endpoints = []
    for path in sorted(Path(home).glob("v*/node.json")):
        try:
            config = json.loads(path.read_text())
            key = bytes.fromhex(config["transport_key"]) if config.get("transport_key") else None
            endpoints.append(devnet_endpoint("127.0.0.1", config["port"], key))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CommitteeError(f"cannot read {path}: {exc}") from None
    if not endpoints:
        raise CommitteeError(f"no devnet under {home} (start one with `permamesh validator "
                             "--devnet 4`, or pass --endpoint)")
    return endpoints


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class DevnetConfig:
    home: Path
    validators: int = 4
    rules: LedgerRules = LedgerRules()
    byzantine: tuple[int, ...] = ()  # indices of validators that equivocate
    start_timeout_s: float = 60.0
    data_dir: Path | None = None  # where validators record their metrics endpoints (default: home's parent)


class Devnet:
    def __init__(self, config: DevnetConfig) -> None:
        self.config = config
        self.home = Path(config.home)
        self.chain_id = CHAIN_ID
        self.children: list[Child | None] = [None] * config.validators
        self.endpoints: list[str] = []

    def vdir(self, i: int) -> Path:
        return self.home / f"v{i}"

    def identity(self, i: int) -> NodeIdentity:
        return NodeIdentity.load_or_create(self.vdir(i) / "keys", "validator")

    @property
    def partner(self) -> NodeIdentity:
        """The seed partner of this devnet (tier 3: may vouch and register nodes)."""
        return NodeIdentity.load_or_create(self.home / "partner", "partner")

    def init(self) -> None:
        """Write keys, genesis and node configs, unless they exist."""
        genesis_path = self.home / "genesis.json"
        idents = [self.identity(i) for i in range(self.config.validators)]
        keys = tuple(sorted(ident.public.sign_key for ident in idents))
        if not genesis_path.exists():
            app = Genesis(CHAIN_ID, keys, (self.partner.public.sign_key,), self.config.rules)
            DevnetGenesis(CHAIN_ID, keys, app.to_json()).dump(genesis_path)
        genesis = DevnetGenesis.load(genesis_path)
        if tuple(sorted(genesis.validators)) != keys:
            raise CommitteeError(f"{genesis_path} names other validators than {self.home}")
        ports = [self._port(i) for i in range(self.config.validators)]
        transport = [ident.transport.public_bytes for ident in idents]
        self.endpoints = [devnet_endpoint("127.0.0.1", p, key) for p, key in zip(ports, transport)]
        for i, ident in enumerate(idents):
            peers = [[idents[j].public.sign_key.hex(), self.endpoints[j]]
                     for j in range(len(idents)) if j != i]
            config = {"genesis": str(genesis_path), "port": ports[i], "transport_key": transport[i].hex(),
                      "peers": peers, "byzantine": "equivocate" if i in self.config.byzantine else ""}
            (self.vdir(i) / "node.json").write_text(json.dumps(config, indent=1))

    def _port(self, i: int) -> int:
        path = self.vdir(i) / "node.json"
        if path.exists():
            return json.loads(path.read_text())["port"]
        return free_port()

    def start(self) -> list[str]:
        self.init()
        try:
            for i in range(self.config.validators):
                self._spawn(i)
            wait_ready([c for c in self.children if c], self.config.start_timeout_s, CommitteeError)
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def _spawn(self, i: int) -> None:
        data_dir = self.config.data_dir or self.home.parent
        cmd = [sys.executable, "-m", "permamesh", "validator", "--engine", "devnet",
               "--home", str(self.vdir(i)), "--data-dir", str(data_dir)]
        self.children[i] = spawn(f"validator-{i}", cmd, self.home / "logs")

    def kill(self, i: int) -> None:
        """SIGKILL validator ``i`` (drills and tests)."""
        child = self.children[i]
        if child is not None:
            child.kill()
        self.children[i] = None

    def restart(self, i: int) -> None:
        if self.children[i] is not None and self.children[i].alive():
            raise CommitteeError(f"validator {i} is still running")
        self._spawn(i)
        wait_ready([self.children[i]], self.config.start_timeout_s, CommitteeError)

    def alive(self) -> list[int]:
        return [i for i, c in enumerate(self.children) if c is not None and c.alive()]

    def stop(self) -> None:
        stop_all([c for c in self.children if c is not None])
        self.children = [None] * self.config.validators

    def __enter__(self) -> Devnet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
