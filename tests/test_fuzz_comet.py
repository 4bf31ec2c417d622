"""A real four-validator CometBFT network under attack (permamesh/bench/fuzzcomet.py), one test
per port and attack on validator 0: its app's ABCI socket (loopback, CometBFT holds its four
connections), its node's RPC (TLS pinned to the member key) and its p2p port. After each attack
all eight processes are alive, none logged a traceback or a panic, every validator commits a new
block and every app's last app hash equals the one in the chain's next header (the honest
validators' states agree), and validator 0's two processes grew by at most
fuzz.RSS_BUDGET_MIB. Seeded like test_fuzz_ports (PERMAMESH_FUZZ_SEED); the last test prints
the table of rows."""

from __future__ import annotations

import dataclasses
import os
import random

import pytest

from permamesh.bench import fuzz, fuzzcomet
from permamesh.committee.cometbft.binary import CometBFTMissing, find_cometbft
from permamesh.committee.cometbft.network import CometNet, CometNetConfig

SEED = int(os.environ.get("PERMAMESH_FUZZ_SEED", "20261205"))
CASES = [(p, a) for p, attacks in fuzzcomet.COMET_ATTACKS.items() for a in attacks]
ROWS: list[fuzz.Row] = []


@pytest.fixture(autouse=True)
def no_leaks():
    """The network lives for the module; its teardown stops both processes."""
    yield


@pytest.fixture(scope="module")
def comet(tmp_path_factory):
    try:
        find_cometbft()
    except CometBFTMissing as exc:
        pytest.skip(f"CometBFT is not installed: {exc}")
    home = tmp_path_factory.mktemp("fuzz-comet")
    net = CometNet(CometNetConfig(home / "net", validators=4, data_dir=home, log_level="*:error"))
    net.start()
    try:
        record = net.records[0]
        pids = (net.apps[0].proc.pid, net.nodes[0].proc.pid)  # the attacked validator's (RSS)
        every_pid = tuple(p.proc.pid for p in (*net.apps, *net.nodes))

        def serves() -> bool:
            return fuzzcomet.network_agrees(list(net.endpoints))

        ports = {"abci": fuzz.Port("cometbft:abci", f"tcp://127.0.0.1:{record.abci_port}", pids, serves),
                 "rpc": fuzz.Port("cometbft:rpc", net.endpoints[0], pids, serves),
                 "p2p": fuzz.Port("cometbft:p2p", f"tcp://{record.host}:{record.p2p_port}", pids, serves)}
        yield ports, every_pid, net.home / "logs" / "app-0.log"
    finally:
        net.stop()


def test_the_network_is_healthy_before_any_attack(comet):
    ports, _, _ = comet
    assert ports["rpc"].serves()


@pytest.mark.parametrize(("port", "attack"), [pytest.param(p, a, id=f"{p}-{a}") for p, a in CASES])
def test_cometbft_port_survives_attack(comet, port, attack):
    ports, pids, app_log = comet
    fn = fuzzcomet.COMET_ATTACKS[port][attack]
    errors = fuzz.log_errors(app_log.parent)
    row = fuzz.run_attack(ports[port], attack, fn, random.Random(f"{SEED}:comet:{port}:{attack}"), pids)
    if fuzz.log_errors(app_log.parent) > errors:
        row = dataclasses.replace(row, note=f"a traceback or panic was logged (see {app_log.parent})")
    ROWS.append(row)
    assert row.ok, (f"seed {SEED}: {port} under {attack}: alive={row.alive} serves={row.serves} "
                    f"rss_growth={row.rss_growth_mib} MiB (budget {fuzz.RSS_BUDGET_MIB}) {row.note}")


def test_the_app_refused_the_strangers_rather_than_serving_them(comet):
    """The ABCI rows say no stranger got an answer; the app's log says why: each was refused at
    connect because CometBFT holds all four connections."""
    _, _, app_log = comet
    strangers = sum(r.frames for r in ROWS if r.port == "cometbft:abci")
    refused = app_log.read_text(errors="replace").count("refused ABCI connection")
    assert strangers and refused >= strangers, f"{refused} refusals logged for {strangers} strangers"


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(1, 6))
@pytest.mark.parametrize(("port", "attack"), [pytest.param(p, a, id=f"{p}-{a}") for p, a in CASES])
def test_cometbft_port_survives_attack_under_more_seeds(comet, port, attack, round_):
    """The longer run (`make test-slow`): every attack again under five more seeds."""
    ports, pids, app_log = comet
    fn = fuzzcomet.COMET_ATTACKS[port][attack]
    errors = fuzz.log_errors(app_log.parent)
    row = fuzz.run_attack(ports[port], attack, fn, random.Random(f"{SEED}:{round_}:comet:{port}:{attack}"), pids)
    if fuzz.log_errors(app_log.parent) > errors:
        row = dataclasses.replace(row, note=f"a traceback or panic was logged (see {app_log.parent})")
    ROWS.append(row)
    assert row.ok, f"seed {SEED}:{round_}: {port} under {attack}: {row}"


def test_zz_print_table(capsys):
    with capsys.disabled():
        print(f"\nfuzz seed {SEED} (CometBFT ports), RSS budget {fuzz.RSS_BUDGET_MIB} MiB per attack")
        print(fuzz.format_table(ROWS))
    assert ROWS
