"""CometNet: N validators, each a ``permamesh validator --engine cometbft`` app plus a real
``cometbft node`` driving it, with one shared genesis. Same public API as
:class:`~permamesh.committee.devnet.cluster.Devnet`, so callers can swap them.

``CometNet(CometNetConfig(home)).start()`` creates (once) under ``home``:

- ``partner/``: the seed partner (:attr:`CometNet.partner`), as the devnet's;
- ``genesis.json``: chain id, the nodes' consensus keys as validators, and as ``app_state``
  the ledger's :class:`~permamesh.committee.genesis.Genesis` (members: each validator's
  permamesh identity, ``vI/keys``); copied byte for byte into every node's home;
- ``vI/``: one validator (:mod:`.layout`), its ports chosen once and kept;
- ``logs/``: ``app-I.log`` and ``cometbft-I.log``.

Every node serves its RPC over TLS (``CometNetConfig.tls``, on by default): the key is the
member's own identity key (``vI/keys/validator.ed25519``), the certificate ``vI/rpc_cert.pem``
(:mod:`.tls`), and :attr:`CometNet.endpoints` are ``https://HOST:PORT?key=HEX`` pinned to each
member's node key, the form ``permamesh validator --cometbft N`` prints and ``--join`` takes.

Then it starts every app (waiting for its ``READY`` line), then every CometBFT node, and waits
until every node's RPC answers and the chain has committed a block. Each node advertises its
own host (``CometNetConfig.hosts``; 127.0.0.1 for all by default), so the same tooling runs
one validator per network namespace. An app listens for its own node only, on
``abci_host`` (loopback by default).

Who calls it: ``permamesh validator --cometbft N`` (:mod:`.runner`), tests, and any caller of
``Devnet`` that wants the real engine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from permamesh.committee import txs
from permamesh.committee.cometbft import drill, layout, tls
from permamesh.committee.cometbft.binary import find_cometbft
from permamesh.committee.cometbft.rpc import CometRPC
from permamesh.committee.endpoints import rpc_endpoint
from permamesh.committee.errors import CommitteeError
from permamesh.committee.genesis import Genesis, LedgerRules
from permamesh.identity import NodeIdentity
from permamesh.ops.procs import Child, spawn, stop_all, wait_ready

log = logging.getLogger(__name__)

CHAIN_ID = "permamesh-cometbft"


@dataclasses.dataclass(frozen=True)
class CometNetConfig:
    home: Path
    validators: int = 4
    rules: LedgerRules = LedgerRules()
    hosts: tuple[str, ...] = ()  # advertised IP per validator; () = 127.0.0.1 for every one
    abci_host: str = "127.0.0.1"  # where each app listens for its own node (not advertised)
    tls: bool = True  # RPC over TLS pinned to each member's key; False: plain HTTP (loopback tooling only)
    # consensus timeouts (ms): fast local defaults (blocks every ~0.4 s on loopback)
    timeout_propose_ms: int = 1000
    timeout_propose_delta_ms: int = 200
    timeout_prevote_ms: int = 200
    timeout_prevote_delta_ms: int = 100
    timeout_precommit_ms: int = 200
    timeout_precommit_delta_ms: int = 100
    timeout_commit_ms: int = 300  # the pause after a commit: sets the block rate when idle
    gossip_sleep_ms: int = 10  # consensus gossip pause per peer (CometBFT's default: 100)
    flush_throttle_ms: int = 10  # p2p send batching (CometBFT's default: 100)
    log_level: str = "info"  # CometBFT's, e.g. "*:error,state:info"
    start_timeout_s: float = 60.0
    data_dir: Path | None = None  # where the apps record their metrics endpoints (default: home's parent)
    corrupt: tuple[int, ...] = ()  # drill: validators whose app computes a different state
    corrupt_from: int = 3  # drill: the height from which those apps diverge
    wrap: tuple[tuple[str, ...], ...] = ()  # per validator, a command prefix that puts its two processes on
    # their host (e.g. `ip netns exec NS` of the multi-host harness); () = this machine

    def __post_init__(self) -> None:
        if self.validators < 1:
            raise CommitteeError("a CometNet needs at least one validator")
        if self.hosts and len(self.hosts) != self.validators:
            raise CommitteeError(f"hosts names {len(self.hosts)} addresses for {self.validators} validators")
        if self.wrap and len(self.wrap) != self.validators:
            raise CommitteeError(f"wrap names {len(self.wrap)} command prefixes for {self.validators} validators")
        if any(not 0 <= i < self.validators for i in self.corrupt) or self.corrupt_from < 1:
            raise CommitteeError("corrupt names validators that do not exist (or corrupt_from < 1)")

    def host(self, i: int) -> str:
        return self.hosts[i] if self.hosts else "127.0.0.1"


class CometNet:
    def __init__(self, config: CometNetConfig) -> None:
        self.config = config
        self.home = Path(config.home)
        self.chain_id = CHAIN_ID
        self.apps: list[Child | None] = [None] * config.validators
        self.nodes: list[Child | None] = [None] * config.validators
        self.records: list[layout.NodeRecord] = []
        self.endpoints: list[str] = []
        self._binary: Path | None = None

    def vdir(self, i: int) -> Path:
        return self.home / f"v{i}"

    def cometbft_home(self, i: int) -> Path:
        return self.vdir(i) / "cometbft"

    def identity(self, i: int) -> NodeIdentity:
        return NodeIdentity.load_or_create(self.vdir(i) / "keys", "validator")

    def key_file(self, i: int) -> Path:
        """Validator ``i``'s identity key: it signs the ledger's txs and is its RPC's TLS key."""
        return (self.vdir(i) / "keys" / "validator.ed25519").absolute()

    def cert_file(self, i: int) -> Path:
        return (self.vdir(i) / tls.CERT_NAME).absolute()

    @property
    def partner(self) -> NodeIdentity:
        """The seed partner of this network (tier 3: may vouch and register nodes)."""
        return NodeIdentity.load_or_create(self.home / "partner", "partner")

    # -------------------------------------------------------------------------------- init

    def init(self) -> None:
        """Keys, genesis, ports and config.toml for every node, unless they exist."""
        self._binary = find_cometbft()
        cfg, n = self.config, self.config.validators
        self.home.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            self.vdir(i).mkdir(parents=True, exist_ok=True)
        old = [layout.NodeRecord.load(self.vdir(i) / "node.json") for i in range(n)]
        kept = {p for r in old if r for p in (r.p2p_port, r.rpc_port, r.abci_port)}
        fresh = iter(layout.free_ports([cfg.host(i) for i in range(n) if old[i] is None for _ in range(3)], kept))
        self.records = [self._record(i, old[i], fresh) for i in range(n)]
        genesis_path = self.home / "genesis.json"
        entries = [layout.validator_entry(self.cometbft_home(i), f"v{i}") for i in range(n)]
        if not genesis_path.exists():
            members = tuple(sorted(self.identity(i).public.sign_key for i in range(n)))
            app = Genesis(CHAIN_ID, members, (self.partner.public.sign_key,), cfg.rules)
            genesis_path.write_text(layout.genesis_doc(
                self.cometbft_home(0) / "config" / "genesis.json", CHAIN_ID, entries, app.to_json()))
        text = genesis_path.read_text()
        if [v["address"] for v in json.loads(text)["validators"]] != [e["address"] for e in entries]:
            raise CommitteeError(f"{genesis_path} names other validators than {self.home}")
        for i, record in enumerate(self.records):
            (self.cometbft_home(i) / "config" / "genesis.json").write_text(text)
            peers = [f"{r.node_id}@{r.host}:{r.p2p_port}" for j, r in enumerate(self.records) if j != i]
            if cfg.tls:
                tls.write_certificate(self.identity(i), self.cert_file(i))
            layout.configure(self.cometbft_home(i), self._settings(i, record, peers))
        self.endpoints = [rpc_endpoint(r.host, r.rpc_port, self.identity(i).public.sign_key if cfg.tls else None)
                          for i, r in enumerate(self.records)]

    def _record(self, i: int, old: layout.NodeRecord | None, fresh) -> layout.NodeRecord:
        """Validator ``i``'s ports (kept from ``old``, else the next three of ``fresh``),
        host and node id, written to ``vI/node.json``."""
        node_id = layout.init_home(self._binary, self.cometbft_home(i))
        ports = (old.p2p_port, old.rpc_port, old.abci_port) if old else (next(fresh) for _ in range(3))
        record = layout.NodeRecord(self.config.host(i), *ports, node_id)
        if record != old:
            record.dump(self.vdir(i) / "node.json")
        return record

    def _settings(self, i: int, r: layout.NodeRecord, peers: list[str]) -> dict:
        c = self.config

        def ms(value: int) -> str:
            return f"{value}ms"

        return {
            "": {"proxy_app": f"tcp://{c.abci_host}:{r.abci_port}", "abci": "socket",
                 "moniker": f"v{i}", "log_level": c.log_level},
            "rpc": {"laddr": f"tcp://{r.host}:{r.rpc_port}", "pprof_laddr": "", "grpc_laddr": "",
                    "tls_cert_file": str(self.cert_file(i)) if c.tls else "",
                    "tls_key_file": str(self.key_file(i)) if c.tls else ""},
            "p2p": {"laddr": f"tcp://{r.host}:{r.p2p_port}", "external_address": f"{r.host}:{r.p2p_port}",
                    "persistent_peers": ",".join(peers), "addr_book_strict": False,
                    "allow_duplicate_ip": True, "flush_throttle_timeout": ms(c.flush_throttle_ms)},
            "mempool": {"recheck": True, "broadcast": True, "max_tx_bytes": txs.MAX_TX_BYTES + 256},
            "consensus": {"timeout_propose": ms(c.timeout_propose_ms),
                          "timeout_propose_delta": ms(c.timeout_propose_delta_ms),
                          "timeout_prevote": ms(c.timeout_prevote_ms),
                          "timeout_prevote_delta": ms(c.timeout_prevote_delta_ms),
                          "timeout_precommit": ms(c.timeout_precommit_ms),
                          "timeout_precommit_delta": ms(c.timeout_precommit_delta_ms),
                          "timeout_commit": ms(c.timeout_commit_ms),
                          "peer_gossip_sleep_duration": ms(c.gossip_sleep_ms),
                          "create_empty_blocks": True, "create_empty_blocks_interval": "0s"},
            "tx_index": {"indexer": "kv"},
            "instrumentation": {"prometheus": False},
        }

    # --------------------------------------------------------------------------- processes

    def start(self) -> list[str]:
        self.init()
        try:
            for i in range(self.config.validators):
                self._spawn_app(i)
            wait_ready([c for c in self.apps if c], self.config.start_timeout_s, CommitteeError)
            for i in range(self.config.validators):
                self._spawn_node(i)
            self._wait_serving(range(self.config.validators), min_height=1)
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def _spawn_app(self, i: int) -> None:
        r = self.records[i]
        cmd = [sys.executable, "-m", "permamesh", "validator", "--engine", "cometbft",
               "--abci", f"tcp://{self.config.abci_host}:{r.abci_port}", "--home", str(self.vdir(i)),
               "--data-dir", str(self.config.data_dir or self.home.parent)]
        if i in self.config.corrupt:  # the drill hook (drill.py); never set for honest validators
            cmd = ["env", f"{drill.ENV_VAR}={self.config.corrupt_from}", *cmd]
        self.apps[i] = spawn(f"app-{i}", self._wrapped(i, cmd), self.home / "logs")

    def _wrapped(self, i: int, cmd: list[str]) -> list[str]:
        return [*self.config.wrap[i], *cmd] if self.config.wrap else cmd

    def _spawn_node(self, i: int) -> None:
        # CometBFT logs to stdout: send it to stderr, which spawn() writes to the log file
        cmd = ["/bin/sh", "-c", 'exec "$0" "$@" >&2', str(self._binary), "node",
               "--home", str(self.cometbft_home(i))]
        self.nodes[i] = spawn(f"cometbft-{i}", self._wrapped(i, cmd), self.home / "logs")

    def _wait_serving(self, indices, min_height: int = 0) -> None:
        """Until each node's RPC answers /status with height >= ``min_height``."""
        deadline = time.monotonic() + self.config.start_timeout_s
        waiting = set(indices)
        rpcs = {i: CometRPC(self.endpoints[i], timeout_s=1.0) for i in waiting}
        try:
            while waiting:
                for i in sorted(waiting):
                    for child in (self.apps[i], self.nodes[i]):
                        if child is not None and not child.alive():
                            raise CommitteeError(f"{child.name} exited with code {child.proc.returncode}:"
                                                 f"\n{child.log_tail()}")
                    try:
                        if rpcs[i].status().height >= min_height:
                            waiting.discard(i)
                    except tls.PinMismatch:
                        raise
                    except CommitteeError:
                        pass
                if waiting and time.monotonic() > deadline:
                    raise CommitteeError(f"cometbft node(s) {sorted(waiting)} not serving after "
                                         f"{self.config.start_timeout_s:g} s; logs in {self.home / 'logs'}")
                if waiting:
                    time.sleep(0.1)
        finally:
            for rpc in rpcs.values():
                rpc.close()

    def kill(self, i: int) -> None:
        """SIGKILL both processes of validator ``i`` (drills and tests)."""
        for group in (self.nodes, self.apps):
            if group[i] is not None:
                group[i].kill()
            group[i] = None

    def stop_node(self, i: int) -> None:
        """SIGTERM validator ``i``: its CometBFT node first, then its app."""
        for group in (self.nodes, self.apps):
            if group[i] is not None:
                stop_all([group[i]])
            group[i] = None

    def restart(self, i: int) -> None:
        """Start validator ``i`` again: its app reports its last committed height, CometBFT
        replays its own blocks above that and catches up from its peers."""
        if i in self.alive():
            raise CommitteeError(f"validator {i} is still running")
        self.stop_node(i)  # whichever of its two processes is left
        self._spawn_app(i)
        wait_ready([self.apps[i]], self.config.start_timeout_s, CommitteeError)
        self._spawn_node(i)
        self._wait_serving([i])

    def alive(self) -> list[int]:
        """Validators whose app and CometBFT node both run."""
        return [i for i in range(self.config.validators)
                if all(c is not None and c.alive() for c in (self.apps[i], self.nodes[i]))]

    def stop(self) -> None:
        stop_all([c for c in self.nodes if c is not None])
        stop_all([c for c in self.apps if c is not None])
        self.apps = [None] * self.config.validators
        self.nodes = [None] * self.config.validators

    def __enter__(self) -> CometNet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
