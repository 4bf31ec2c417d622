"""Installing and configuring CometBFT: the pinned binary is found or the error says how to get
it; the Makefile and the Python pin agree; config.toml edits land in the right section and a
setting CometBFT's file lacks is an error; the network's configuration refuses nonsense."""

from __future__ import annotations

import re
import tomllib

import pytest

from permamesh.committee.cometbft import binary, layout
from permamesh.committee.cometbft.network import CometNetConfig
from permamesh.committee.errors import CommitteeError


def fake_binary(tmp_path, version: str):
    path = tmp_path / "cometbft"
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


def test_the_makefile_pins_the_version_the_code_checks():
    makefile = (binary.REPO_ROOT / "Makefile").read_text()
    pin = re.search(r"^COMETBFT_VERSION\s*:=\s*v(\S+)$", makefile, re.M)
    assert pin and pin.group(1) == binary.COMETBFT_VERSION
    assert re.search(r"^setup:.*\btools\b", makefile, re.M), "make setup must install the tools"
    assert ".tools/" in (binary.REPO_ROOT / ".gitignore").read_text().split()


def test_an_explicit_binary_of_the_pinned_version_is_used(tmp_path, monkeypatch):
    path = fake_binary(tmp_path, binary.COMETBFT_VERSION)
    monkeypatch.setenv(binary.ENV_VAR, str(path))
    assert binary.find_cometbft() == path


def test_a_wrong_or_missing_binary_says_how_to_install_the_right_one(tmp_path, monkeypatch):
    monkeypatch.setenv(binary.ENV_VAR, str(fake_binary(tmp_path, "0.37.4")))
    with pytest.raises(binary.CometBFTMissing, match=r"version 0\.37\.4.*make tools"):
        binary.find_cometbft()
    monkeypatch.setenv(binary.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(binary.CometBFTMissing, match="does not exist.*make tools"):
        binary.find_cometbft()
    monkeypatch.delenv(binary.ENV_VAR)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(binary, "TOOLS_BIN", tmp_path / "no-tools")
    with pytest.raises(binary.CometBFTMissing, match="not found.*make tools"):
        binary.find_cometbft()


CONFIG = """\
proxy_app = "tcp://127.0.0.1:26658"
moniker = "vm"

[rpc]
laddr = "tcp://127.0.0.1:26657"
pprof_laddr = ""

[p2p]
laddr = "tcp://0.0.0.0:26656"
addr_book_strict = true
"""


def test_config_edits_land_in_their_section_and_read_back(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.toml").write_text(CONFIG)
    layout.configure(tmp_path, {"": {"moniker": "v0"},
                                "rpc": {"laddr": "tcp://10.0.0.2:5000"},
                                "p2p": {"laddr": "tcp://10.0.0.2:5001", "addr_book_strict": False}})
    parsed = tomllib.loads((tmp_path / "config" / "config.toml").read_text())
    assert parsed["moniker"] == "v0" and parsed["proxy_app"] == "tcp://127.0.0.1:26658"
    assert parsed["rpc"]["laddr"] == "tcp://10.0.0.2:5000"
    assert parsed["p2p"] == {"laddr": "tcp://10.0.0.2:5001", "addr_book_strict": False}


def test_a_setting_the_file_lacks_is_an_error_not_a_silent_default():
    with pytest.raises(CommitteeError, match=r"\[p2p\] pex"):
        layout.set_toml(CONFIG, {"p2p": {"pex": False}})
    with pytest.raises(CommitteeError, match=r"\[rpc\] moniker"):
        layout.set_toml(CONFIG, {"rpc": {"moniker": "x"}})  # right key, wrong section


def test_network_config_hosts_and_drill_indices_are_checked(tmp_path):
    config = CometNetConfig(tmp_path, validators=2, hosts=("10.0.0.1", "10.0.0.2"))
    assert [config.host(i) for i in range(2)] == ["10.0.0.1", "10.0.0.2"]
    assert CometNetConfig(tmp_path).host(3) == "127.0.0.1"
    with pytest.raises(CommitteeError, match="hosts"):
        CometNetConfig(tmp_path, validators=3, hosts=("10.0.0.1",))
    with pytest.raises(CommitteeError, match="corrupt"):
        CometNetConfig(tmp_path, corrupt=(4,))


def test_the_drill_app_diverges_from_its_height_on_and_only_when_asked(monkeypatch):
    from permamesh.committee.app import LedgerApp
    from permamesh.committee.cometbft import drill

    from .ledger_helpers import block, committee, start

    c = committee()
    honest_app, corrupt_app = LedgerApp(None), drill.CorruptLedgerApp(None, from_height=3)
    per_height = []
    for app in (honest_app, corrupt_app):
        start(app, c.genesis)
        seen = []
        for _ in range(4):
            block(app, [])
            seen.append(app.store.app_hash)
        per_height.append(seen)
        app.close()
    assert per_height[0][:2] == per_height[1][:2]  # heights 1 and 2 agree
    assert all(a != b for a, b in zip(per_height[0][2:], per_height[1][2:]))  # 3 and 4 do not

    monkeypatch.delenv(drill.ENV_VAR, raising=False)
    assert type(drill.ledger_app(None)) is LedgerApp
    monkeypatch.setenv(drill.ENV_VAR, "5")
    assert drill.ledger_app(None).from_height == 5
    monkeypatch.setenv(drill.ENV_VAR, "soon")
    with pytest.raises(CommitteeError, match=drill.ENV_VAR):
        drill.ledger_app(None)


def test_fresh_ports_are_distinct_free_and_below_the_ephemeral_range():
    low, _ = layout._ephemeral_range()
    ports = layout.free_ports(["127.0.0.1"] * 12 + ["203.0.113.7"] * 3, exclude={20000})
    assert len(set(ports)) == 15 and 20000 not in ports
    if low > 11000:  # outgoing connections never take these between the choice and the bind
        assert all(10000 <= p < low for p in ports)
