"""One CometBFT node's home: keys from ``cometbft init``, the shared genesis, config.toml.

Layout of a validator directory ``vI`` (see :mod:`.network`):

- ``cometbft/``: CometBFT's home (``config/config.toml``, ``config/genesis.json``,
  ``config/priv_validator_key.json``, ``config/node_key.json``, ``data/``);
- ``node.json``: what we chose once and keep (:class:`NodeRecord`: advertised host, the p2p,
  RPC and ABCI ports, the node's p2p id), so a restarted node comes back at the same address;
  fresh ports come from :func:`free_ports`, below the kernel's ephemeral range;
- ``keys/``, ``ledger.sqlite``: the permamesh validator's identity and its ledger.

config.toml is edited in place (:func:`configure`): each setting replaces its line in its
section, a setting CometBFT's file does not have is an error (so a version that renamed one
is noticed), and the result is read back with :mod:`tomllib` to check every value.

Who calls it: :class:`permamesh.committee.cometbft.network.CometNet`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import socket
import subprocess
import tomllib
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from permamesh.committee.errors import CommitteeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeRecord:
    host: str  # the address this node advertises (p2p and RPC listen there)
    p2p_port: int
    rpc_port: int
    abci_port: int  # the node's own app listens here (on the ABCI host, never advertised)
    node_id: str  # CometBFT's p2p id (hex of its node key's address)

    @classmethod
    def load(cls, path: Path) -> NodeRecord | None:
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise CommitteeError(f"cannot read {path}: {exc}") from None

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out for outgoing connections (and for bind to port 0)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(hosts: list[str], exclude: set[int] = frozenset()) -> list[int]:
    """One free TCP port for each of ``hosts``, all distinct (and none in ``exclude``): every
    one is held open until all are chosen.

    They come from below the kernel's ephemeral range when there is room (10000 and up), so
    no outgoing connection (a node dialling its peers, a client) can take one between now and
    the node binding it; otherwise from the kernel (port 0)."""
    low, _ = _ephemeral_range()
    candidates = random.sample(range(10000, low), min(low - 10000, 500)) if low > 11000 else []
    with ExitStack() as stack:
        ports: list[int] = []
        pool = iter([p for p in candidates if p not in exclude] + [0] * (2 * len(hosts) + 10))
        for host in hosts:
            for port in pool:
                s = stack.enter_context(socket.socket())
                if _bind(s, host, port) and s.getsockname()[1] not in exclude:
                    ports.append(s.getsockname()[1])
                    break
        if len(ports) < len(hosts):
            raise CommitteeError(f"could not find {len(hosts)} free ports")
        return ports


def _bind(sock: socket.socket, host: str, port: int) -> bool:
    for address in (host, "127.0.0.1"):  # the host may live in another network namespace
        try:
            sock.bind((address, port))
            return True
        except OSError:
            continue
    return False


def _run(binary: Path, *args: str) -> str:
    try:
        return subprocess.run([str(binary), *args], capture_output=True, text=True, check=True,
                              timeout=60).stdout.strip()
    except subprocess.CalledProcessError as exc:
        raise CommitteeError(f"`cometbft {' '.join(args)}` failed: {exc.stderr.strip()[-500:]}") from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise CommitteeError(f"`cometbft {' '.join(args)}` did not run: {exc}") from None


def init_home(binary: Path, home: Path) -> str:
    """``cometbft init`` (keys, default config) unless done before; returns the p2p node id."""
    if not (home / "config" / "priv_validator_key.json").exists():
        _run(binary, "init", "--home", str(home))
        log.info("cometbft init --home %s", home)
    return _run(binary, "show-node-id", "--home", str(home))


def validator_entry(home: Path, name: str, power: int = 10) -> dict:
    """This node's consensus key as an entry of genesis.json's ``validators``."""
    try:
        key = json.loads((home / "config" / "priv_validator_key.json").read_text())
        return {"address": key["address"], "pub_key": key["pub_key"], "power": str(power),
                "name": name}
    except (OSError, ValueError, KeyError) as exc:
        raise CommitteeError(f"no consensus key under {home}: {exc}") from None


def genesis_doc(template: Path, chain_id: str, validators: list[dict], app_state: bytes) -> str:
    """genesis.json: CometBFT's default consensus params (from ``template``, one node's own
    genesis after init), our validators, and the ledger's Genesis JSON as ``app_state``."""
    doc = json.loads(template.read_text())
    doc.update({
        "genesis_time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "chain_id": chain_id,
        "initial_height": "1",
        "validators": validators,
        "app_hash": "",
        "app_state": json.loads(app_state),
    })
    return json.dumps(doc, indent=2)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for the values we write
    raise CommitteeError(f"cannot write {value!r} into config.toml")


def set_toml(text: str, settings: dict[str, dict[str, object]]) -> str:
    """Replace ``key = value`` lines in their sections (``""``: before the first section)."""
    lines, section, seen = text.splitlines(), "", set()
    header = re.compile(r"^\s*\[([A-Za-z0-9_.-]+)\]\s*$")
    assign = re.compile(r"^(\s*)([A-Za-z0-9_-]+)(\s*=\s*).*$")
    for n, line in enumerate(lines):
        if match := header.match(line):
            section = match.group(1)
            continue
        match = assign.match(line)
        if match and match.group(2) in settings.get(section, {}):
            key = match.group(2)
            lines[n] = f"{match.group(1)}{key}{match.group(3)}{_toml_value(settings[section][key])}"
            seen.add((section, key))
    missing = [f"[{s}] {k}" for s, keys in settings.items() for k in keys if (s, k) not in seen]
    if missing:
        raise CommitteeError(f"config.toml has no line for {', '.join(missing)} (another "
                             "CometBFT version?)")
    return "\n".join(lines) + "\n"


def configure(home: Path, settings: dict[str, dict[str, object]]) -> None:
    path = home / "config" / "config.toml"
    text = set_toml(path.read_text(), settings)
    parsed = tomllib.loads(text)
    for section, keys in settings.items():
        table = parsed if not section else parsed.get(section, {})
        for key, value in keys.items():
            if table.get(key) != value:
                raise CommitteeError(f"config.toml [{section}] {key} reads back as "
                                     f"{table.get(key)!r}, not {value!r}")
    path.write_text(text)
