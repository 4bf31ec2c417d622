"""Every port of a running mesh under attack (permamesh/bench/fuzz.py), one test per port and
attack (fuzzzmq, fuzzhttp, and fuzzoverlay's real onion cells and cloves): a worker (with
containers where a runtime exists, so its layer server too), 3 relays, a 1-validator devnet, a
gateway on a thread and every /metrics endpoint. After each attack every process is alive, none
logged a traceback, the port still serves a real request (the validator: commits, app hashes
agree), and its processes' memory grew by at most fuzz.RSS_BUDGET_MIB. Randomness is seeded
(PERMAMESH_FUZZ_SEED, printed); the last test prints the table of all rows. CometBFT's ports:
test_fuzz_comet.py; signed consensus messages against four validators: test_fuzz_devnet.py."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil

import pytest

from permamesh.bench import fuzz, fuzzdevnet, fuzzhttp, fuzzoverlay, fuzzzmq
from permamesh.client import Client
from permamesh.committee.devnet.cluster import Devnet, DevnetConfig
from permamesh.committee.devnet.messages import StatusMsg
from permamesh.containers.transfer import HoldingsRequest, ask_holdings
from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
from permamesh.gateway.process import build_gateway
from permamesh.gateway.server import GatewayThread
from permamesh.identity import NodeIdentity
from permamesh.ops.metrics import discover_metrics
from permamesh.overlay.messages import RelayAttach
from permamesh.overlay.sender import OverlayClient, OverlayConfig
from permamesh.transport import open_sockets
from permamesh.wire.codec import encode
from permamesh.wire.messages import GenerateRequest, StatusRequest

SEED = int(os.environ.get("PERMAMESH_FUZZ_SEED", "20261205"))
CONTAINERS = bool(shutil.which("runc") or shutil.which("bwrap"))
RELAYS = 3
ZMQ_PORTS = ["worker", "relay", "validator"] + (["layers"] if CONTAINERS else [])
METRICS_PORTS = ["metrics:worker", *(f"metrics:relay-{i}" for i in range(RELAYS)), "metrics:validator",
                 "metrics:gateway"]
OVERLAY_CASES = [("relay", "onion_mutated"), ("relay", "onion_replay"), ("relay", "onion_junk_inside"),
                 ("worker", "clove_mutated"), ("worker", "clove_duplicates")]  # fuzzoverlay: real cells and cloves
CASES = ([(p, a) for p in ZMQ_PORTS for a in fuzzzmq.ZMQ_ATTACKS] + OVERLAY_CASES
         + [(p, a) for p in ["gateway", *METRICS_PORTS] for a in fuzzhttp.HTTP_ATTACKS])
STALLED_METRICS = pytest.param("metrics:worker", "stalled_during", id="metrics:worker-stalled_during")
# (found by this harness: 4 stalled connections used to hold every slot of a metrics server;
# slots are now held only while an answer is computed, ops/metrics.py _limited)
ROWS: list[fuzz.Row] = []
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(autouse=True)
def no_leaks():
    """Replaces the suite's per-test leak check: the mesh lives for the module; its teardown
    checks that no zmq socket and no child process outlives it."""
    yield


class Stack:
    def __init__(self, home, ports: dict[str, fuzz.Port], pids: list[int], overlay: dict, logs: tuple) -> None:
        self.home, self.ports, self.pids, self.overlay, self.logs = home, ports, pids, overlay, logs

    def tracebacks(self) -> int:
        """Tracebacks in the processes' logs (the mesh's and the devnet's) so far."""
        return sum(fuzz.log_errors(d) for d in self.logs)


def _generates(endpoint: str) -> bool:
    with Client([endpoint], timeout_s=20.0, accept_timeout_s=10.0) as client:
        return client.generate("fuzz check", max_tokens=2).completion_tokens >= 1


def _overlay_generates(mesh) -> bool:
    # one clove over one 3-hop path: 3 relays give one disjoint path (every relay forwards)
    config = OverlayConfig(n=1, k=1, max_cloves=1, ack_timeout_s=2.0, answer_grace_s=1.0, answer_timeout_s=20.0)
    with OverlayClient(mesh.relays(), mesh.workers(), config, random.Random(SEED)) as client:
        return client.generate("relay check", max_tokens=2).completion_tokens >= 1


def _commits(endpoints: list[str]) -> bool:
    """Every validator commits past its height, and all agree on the app hashes of the last
    few heights (one validator here; tests/test_fuzz_devnet.py runs four)."""
    return fuzzdevnet.committee_agrees(endpoints, wait_s=10.0)[0]


def _signed(msg):
    return encode(msg, NodeIdentity.generate())


def _zmq_ports(mesh, worker, worker_pid, relay_pids, devnet) -> dict[str, fuzz.Port]:
    ports = {
        "worker": fuzz.Port(
            "worker", worker.endpoint, (worker_pid,), lambda: _generates(worker.endpoint),
            valid=lambda rng: _signed(GenerateRequest(rng.randbytes(8).hex(), prompt="fuzz", max_tokens=1)),
            chatty=lambda rng: _signed(StatusRequest(rng.randbytes(8).hex())), once_tag="accepted"),
        "relay": fuzz.Port(
            "relay", mesh.relays()[0].endpoint, tuple(relay_pids), lambda: _overlay_generates(mesh),
            valid=lambda rng: _signed(RelayAttach(rng.randbytes(16))), chatty=lambda rng: rng.randbytes(32)),
        "validator": fuzz.Port(
            "validator", devnet.endpoints[0], (devnet.children[0].proc.pid,), lambda: _commits(devnet.endpoints),
            valid=lambda rng: _signed(StatusMsg(ref=rng.randrange(1 << 30))),
            chatty=lambda rng: _signed(StatusMsg(ref=rng.randrange(1 << 30)))),
    }
    if worker.layers:
        ports["layers"] = fuzz.Port(
            "layers", worker.layers, (worker_pid,), lambda: ask_holdings(worker.layers, [DIGEST], 5.0) is not None,
            valid=lambda rng: _signed(HoldingsRequest((DIGEST,))),
            chatty=lambda rng: _signed(HoldingsRequest((DIGEST,))))
    return ports


def _http_ports(home, gateway_url: str, pids: dict[str, int]) -> dict[str, fuzz.Port]:
    """``pids``: node id -> the process the test started for it (what must survive)."""
    me = (os.getpid(),)
    ports = {"gateway": fuzz.Port("gateway", gateway_url + "/healthz", me,
                                  lambda: fuzzhttp.http_get(gateway_url + "/healthz") == 200),
             "metrics:gateway": fuzz.Port("metrics:gateway", gateway_url + "/metrics", me,
                                          lambda: fuzzhttp.http_get(gateway_url + "/metrics") == 200)}
    relays = 0
    for record in sorted(discover_metrics(home), key=lambda r: r.node_id):
        name = f"metrics:{record.role}"
        if record.role == "relay":
            name, relays = f"metrics:relay-{relays}", relays + 1
        ports[name] = fuzz.Port(name, record.url, (pids[record.node_id],),
                                lambda url=record.url: fuzzhttp.http_get(url) == 200)
    return ports


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    print(f"\nfuzz seed {SEED} (set PERMAMESH_FUZZ_SEED to reproduce)")
    sockets_before = {id(s) for s in open_sockets()}
    home = tmp_path_factory.mktemp("fuzz-home")
    old = os.environ.get("PERMAMESH_HOME")
    os.environ["PERMAMESH_HOME"] = str(home)
    devnet = Devnet(DevnetConfig(home / "devnet", validators=1))
    mesh = EmbeddedMesh(MeshConfig(home, workers=1, model="tiny-random", device="cpu", relays=RELAYS,
                                   threads_per_worker=1, worker_args=("--containers",) if CONTAINERS else (),
                                   committee=devnet))
    thread = None
    try:
        devnet.start()
        mesh.start()
        thread = GatewayThread(build_gateway(home, open_access=True, committee=tuple(devnet.endpoints),
                                             timeout_s=30.0))
        url = thread.start().rstrip("/")
        (worker,) = mesh.workers()
        relay_pids = [c.proc.pid for c in mesh.relay_children]
        started = {c.node_id: c.proc.pid for c in mesh.children + mesh.relay_children}
        started[devnet.identity(0).node_id] = devnet.children[0].proc.pid
        ports = {**_zmq_ports(mesh, worker, started[worker.node_id], relay_pids, devnet),
                 **_http_ports(home, url, started)}
        pids = [c.proc.pid for c in mesh.children] + relay_pids + [devnet.children[0].proc.pid, os.getpid()]
        metrics = {r.node_id: r.url for r in discover_metrics(home)}
        path = tuple(mesh.relays()[:RELAYS])  # relays()[0] is the relay port: the path's first hop
        overlay = fuzzoverlay.overlay_attacks(fuzzoverlay.OverlayTarget(
            path, worker, metrics[path[0].node_id], metrics[worker.node_id]))
        yield Stack(home, ports, pids, overlay, (mesh.log_dir, devnet.home / "logs"))
    finally:
        if thread is not None:
            thread.stop()
        mesh.stop()
        devnet.stop()
        if old is None:
            os.environ.pop("PERMAMESH_HOME", None)
        else:
            os.environ["PERMAMESH_HOME"] = old
    leaked = [s for s in open_sockets() if id(s) not in sockets_before]
    for sock in leaked:
        sock.close(0)
    assert not leaked, f"the fuzz stack left {len(leaked)} zmq socket(s) open"


@pytest.mark.parametrize(("port", "attack"), [*(pytest.param(p, a, id=f"{p}-{a}") for p, a in CASES),
                                              pytest.param("gateway", "stalled_during", id="gateway-stalled_during"),
                                              STALLED_METRICS])
def test_port_survives_attack(stack, port, attack):
    target = stack.ports[port]
    fn = (stack.overlay.get(port, {}).get(attack) or fuzzzmq.ZMQ_ATTACKS.get(attack)
          or fuzzhttp.HTTP_ATTACKS.get(attack) or fuzzhttp.attack_http_stalled_during)
    if port == "gateway" and attack == "bad_json":
        fn = lambda p, rng: fuzzhttp.attack_http_bad_json(  # noqa: E731
            p, rng, ("/v1/chat/completions", "/v1/completions"))
    errors = stack.tracebacks()
    row = fuzz.run_attack(target, attack, fn, random.Random(f"{SEED}:{port}:{attack}"), stack.pids)
    if stack.tracebacks() > errors:
        row = dataclasses.replace(row, note=f"a traceback was logged (see {stack.logs})")
    ROWS.append(row)
    assert row.ok, (f"seed {SEED}: {port} under {attack}: alive={row.alive} serves={row.serves} "
                    f"rss_growth={row.rss_growth_mib} MiB (budget {fuzz.RSS_BUDGET_MIB}) {row.note}")


def test_zz_print_table(capsys):
    with capsys.disabled():
        print(f"\nfuzz seed {SEED}, RSS budget {fuzz.RSS_BUDGET_MIB} MiB per attack")
        print(fuzz.format_table(ROWS))
    assert ROWS
