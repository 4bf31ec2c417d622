"""A four-validator devnet under attack with signed consensus messages (permamesh/bench/
fuzzdevnet.py), sent to validator 0's CurveZMQ port with the server key from its endpoint. The
attacker holds validator 3's member key (a Byzantine member whose process stays honest) and keys
of its own. After each attack all four processes live, none logged a traceback, every validator
commits past the height it had, all four hold the same app hash at every height of a common window, and validator 0
grew by at most fuzz.RSS_BUDGET_MIB. Seeded like test_fuzz_ports (PERMAMESH_FUZZ_SEED)."""

from __future__ import annotations

import dataclasses
import os
import random

import pytest

from permamesh.bench import fuzz, fuzzdevnet, fuzzzmq
from permamesh.committee.devnet.cluster import Devnet, DevnetConfig
from permamesh.committee.devnet.messages import StatusMsg
from permamesh.identity import NodeIdentity
from permamesh.transport import open_sockets
from permamesh.wire.codec import encode

SEED = int(os.environ.get("PERMAMESH_FUZZ_SEED", "20261205"))
VALIDATORS = 4
ATTACKS = ["stranger", "bad_heights", "equivocation", "nested_mutants", "vote_flood"]
# the generic zmq attacks too (fuzzzmq; `valid` is a member's vote), now checked for agreement
GENERIC = ["random_bytes", "mutated", "resigned", "replay", "flood_identities", "slow_reader"]
ROWS: list[fuzz.Row] = []


@pytest.fixture(autouse=True)
def no_leaks():
    """The devnet lives for the module; its teardown stops every validator and checks that no
    zmq socket outlives it."""
    yield


@pytest.fixture(scope="module")
def devnet(tmp_path_factory):
    sockets_before = {id(s) for s in open_sockets()}
    home = tmp_path_factory.mktemp("fuzz-devnet")
    net = Devnet(DevnetConfig(home / "devnet", validators=VALIDATORS, data_dir=home))
    net.start()
    try:
        target = fuzzdevnet.DevnetTarget(net.chain_id, tuple(net.endpoints),
                                         (net.identity(VALIDATORS - 1),))
        seen: dict[str, str] = {}

        def serves() -> bool:
            ok, seen["agreement"] = fuzzdevnet.committee_agrees(net.endpoints)
            return ok

        pids = tuple(c.proc.pid for c in net.children)
        port = fuzz.Port("devnet:v0", net.endpoints[0], pids[:1], serves,
                         valid=lambda rng: fuzzdevnet.member_vote(target, rng),
                         chatty=lambda rng: encode(StatusMsg(ref=rng.randrange(1 << 30)), NodeIdentity.generate()))
        seen["logs"] = str(net.home / "logs")
        yield target, port, pids, seen
    finally:
        net.stop()
    leaked = [s for s in open_sockets() if id(s) not in sockets_before]
    for sock in leaked:
        sock.close(0)
    assert not leaked, f"the devnet fuzz left {len(leaked)} zmq socket(s) open"


def test_the_committee_agrees_before_any_attack(devnet):
    _, port, _, seen = devnet
    assert port.serves(), seen


@pytest.mark.parametrize("attack", ATTACKS + GENERIC)
def test_validator_survives_signed_consensus_attack(devnet, attack):
    target, port, pids, seen = devnet
    fn = fuzzdevnet.devnet_attacks(target).get(attack) or fuzzzmq.ZMQ_ATTACKS[attack]
    errors, synced = fuzz.log_errors(seen["logs"]), fuzz.log_errors(seen["logs"], ("caught up to height",))
    row = fuzz.run_attack(port, attack, fn, random.Random(f"{SEED}:devnet:{attack}"), pids)
    if fuzz.log_errors(seen["logs"]) > errors:
        row = dataclasses.replace(row, note=f"a validator logged a traceback (see {seen['logs']})")
    synced = fuzz.log_errors(seen["logs"], ("caught up to height",)) - synced  # fell behind, then block-synced
    found = [row.found, f"{synced} block syncs" if synced else "", seen.get("agreement", "")]
    row = dataclasses.replace(row, found="; ".join(x for x in found if x))
    ROWS.append(row)
    assert row.ok, (f"seed {SEED}: devnet under {attack}: alive={row.alive} agrees={row.serves} "
                    f"({seen.get('agreement')}) rss_growth={row.rss_growth_mib} MiB {row.note}")


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(1, 6))
@pytest.mark.parametrize("attack", ATTACKS + GENERIC)
def test_validator_survives_attack_under_more_seeds(devnet, attack, round_):
    """The longer run (`make test-slow`): every attack again under five more seeds."""
    target, port, pids, seen = devnet
    fn = fuzzdevnet.devnet_attacks(target).get(attack) or fuzzzmq.ZMQ_ATTACKS[attack]
    errors = fuzz.log_errors(seen["logs"])
    row = fuzz.run_attack(port, attack, fn, random.Random(f"{SEED}:{round_}:devnet:{attack}"), pids)
    if fuzz.log_errors(seen["logs"]) > errors:
        row = dataclasses.replace(row, note=f"a validator logged a traceback (see {seen['logs']})")
    ROWS.append(row)
    assert row.ok, f"seed {SEED}:{round_}: devnet under {attack}: {row} ({seen.get('agreement')})"


def test_zz_print_table(capsys):
    with capsys.disabled():
        print(f"\nfuzz seed {SEED} (devnet consensus), RSS budget {fuzz.RSS_BUDGET_MIB} MiB per attack")
        print(fuzz.format_table(ROWS))
    assert ROWS
