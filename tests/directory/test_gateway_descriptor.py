"""A gateway is a node of the directory like the others: its partner registers its key, it
announces its advertised address once it listens, and committee members probe it over HTTP
(a signed answer to a fresh challenge). Real processes: a one-validator devnet, the
`permamesh gateway` process, the member's liveness prober."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

import pytest

from permamesh.committee.client import CommitteeClient
from permamesh.committee.devnet.cluster import Devnet, DevnetConfig
from permamesh.committee.genesis import LedgerRules
from permamesh.demo import enroll
from permamesh.directory.presence import probe_http
from permamesh.identity import NodeIdentity
from permamesh.ops.procs import spawn, stop_all, wait_ready

from tests.conftest import wait_for


@pytest.fixture
def committee(tmp_path):
    devnet = Devnet(DevnetConfig(tmp_path / "committee", validators=1, rules=LedgerRules(probe_blocks=4)))
    devnet.start()
    client = CommitteeClient(devnet.endpoints)
    try:
        yield devnet, client
    finally:
        client.close()
        devnet.stop()


def _row(client, node_id: str) -> dict | None:
    return next((r for r in client.query("/directory")["nodes"] if r["node_id"] == node_id), None)


def test_a_registered_gateway_announces_answers_probes_and_leaves_the_running_set_when_killed(committee, tmp_path):
    devnet, client = committee
    home = tmp_path / "gw-host"
    enroll.register_nodes(devnet, client, home, [], [], "", gateways=["gw"])
    identity = NodeIdentity.load_or_create(home / "keys", "gw")
    gateway = spawn("gateway", [sys.executable, "-m", "permamesh", "gateway", "--data-dir", str(home), "--name", "gw",
                                "--port", "0", "--join", devnet.endpoints[0]], tmp_path / "logs")
    probers = []
    try:
        wait_ready([gateway], 60)
        row = _row(client, identity.node_id)
        assert row["role"] == "gateway" and row["endpoint"] == "tcp://" + gateway.endpoint.removeprefix("http://")

        assert probe_http(row["endpoint"], identity.public.sign_key, 5.0) > 0
        assert probe_http(row["endpoint"], NodeIdentity.generate().public.sign_key, 5.0) is None  # not its key
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(gateway.endpoint + "/api/presence?challenge=zz", timeout=10)
        assert bad.value.code == 400 and "challenge" in json.loads(bad.value.read())["error"]["message"]

        probers = enroll.start_probers(devnet, tmp_path / "logs")
        wait_for(lambda: _row(client, identity.node_id)["running"], 30, "the gateway in the running set")
        gateway.kill()
        wait_for(lambda: not _row(client, identity.node_id)["running"], 30, "the killed gateway out of it")
    finally:
        stop_all([gateway, *probers])
