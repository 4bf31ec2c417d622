"""`permamesh payouts`: the scheduler reads the committee's registry (real devnet processes)
and prints each partner's monthly payment with its why; a third node at one location is a
donation."""

from __future__ import annotations

import subprocess
import sys

from permamesh.committee import txs
from permamesh.committee.client import CommitteeClient
from permamesh.committee.devnet.cluster import Devnet, DevnetConfig
from permamesh.identity import NodeIdentity
from tests.committee.test_devnet import Signer


def test_payouts_from_the_committee_registry(tmp_path):
    net = Devnet(DevnetConfig(tmp_path / "devnet"))
    net.start()
    try:
        with CommitteeClient(net.endpoints, timeout_s=5.0) as client:
            seed = Signer(net.partner)
            raw = []
            for i, (lat, lon, isp) in enumerate([(52.52, 13.405, "isp-a"), (52.52, 13.405, "isp-b"),
                                                 (52.52, 13.405, "isp-c"), (35.68, 139.69, "isp-d")]):
                node = NodeIdentity.generate()
                raw.append(seed.sign(txs.RegisterNode, node_key=node.public.sign_key,
                                     kex_key=node.public.kex_key, role="worker", endpoint="",
                                     profile=txs.NodeProfile(int(lat * 1e6), int(lon * 1e6),
                                                             "grid", isp, 64500 + i, silicon_year=2012 + i,
                                                             cpu_mhz=2000, idle_w=10, loaded_w=30)))
            assert all(o.ok for o in client.submit_many(raw))
        out = subprocess.run([sys.executable, "-m", "permamesh", "payouts", "--data-dir", str(tmp_path),
                              *[a for e in net.endpoints for a in ("--endpoint", e)]],
                             capture_output=True, text=True, timeout=60)
    finally:
        net.stop()
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"partner {net.partner.public.sign_key.hex()[:16]}:")
    assert "3 of 4 nodes paid" in out.stdout
    assert "a donation" in out.stdout and "(not paid)" in out.stdout
    assert out.stdout.count("why:") > 8
