"""One mesh for the gateway tests (module scope: it takes ~30 s to start): a 1-validator
CometBFT committee the workers and relays join through (registered by its seed partner,
signed descriptors, counted running by the member's probes, as in the demo), 12 relay
processes and 2 worker processes (tiny-random, the same seeded weights, so greedy
answers agree across workers), and a gateway on its own thread with an API key."""

from __future__ import annotations

import os

import pytest

from permamesh.committee.client import CommitteeClient
from permamesh.committee.cometbft.network import CometNet, CometNetConfig
from permamesh.committee.genesis import LedgerRules
from permamesh.gateway.accounts import KeyRing
from permamesh.gateway.process import build_gateway
from permamesh.gateway.server import GatewayThread
from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
from permamesh.transport import open_sockets

WORKERS, RELAYS = 2, 12


class Stack:
    def __init__(self, home, devnet, committee, mesh, gateway, url, key):
        self.home, self.devnet, self.committee, self.mesh = home, devnet, committee, mesh
        self.gateway, self.url, self.key = gateway, url, key


@pytest.fixture(autouse=True)
def no_leaks():
    """Replaces the suite's per-test leak check here: the gateway pools its overlay clients, so
    their sockets stay open between requests by design. The stack's teardown checks instead
    that stopping the gateway closes every socket it opened."""
    yield


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    sockets_before = {id(s) for s in open_sockets()}
    home = tmp_path_factory.mktemp("gateway-home")
    old = os.environ.get("PERMAMESH_HOME")
    os.environ["PERMAMESH_HOME"] = str(home)
    devnet = CometNet(CometNetConfig(home / "cometbft", validators=1,
                                     rules=LedgerRules(blocks_per_epoch=20)))  # the production engine, one node
    devnet.start()
    committee = CommitteeClient(devnet.endpoints, timeout_s=10.0)
    mesh = EmbeddedMesh(MeshConfig(home, workers=WORKERS, model="tiny-random", device="cpu", relays=RELAYS,
                                   threads_per_worker=1, worker_args=("--prefix-cache-mb", "8"), committee=devnet))
    thread = None
    try:
        mesh.start()
        key = KeyRing(home).new_key("alice")
        gateway = build_gateway(home, committee=tuple(devnet.endpoints), timeout_s=60.0)
        thread = GatewayThread(gateway)
        url = thread.start()
        yield Stack(home, devnet, committee, mesh, gateway, url, key)
    finally:
        if thread is not None:
            thread.stop()
        mesh.stop()
        committee.close()
        devnet.stop()
        if old is None:
            os.environ.pop("PERMAMESH_HOME", None)
        else:
            os.environ["PERMAMESH_HOME"] = old
    leaked = [s for s in open_sockets() if id(s) not in sockets_before]
    for sock in leaked:
        sock.close(0)
    assert not leaked, f"the gateway stack left {len(leaked)} zmq socket(s) open"
