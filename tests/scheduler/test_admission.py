"""Admission reads the committee: a job within the user's credit is admitted and paid by a
receipt (the worker earns it); one beyond it is refused with a clear reason, before it runs and,
if it slipped past, again by the ledger."""

from __future__ import annotations

import pytest

from permamesh.committee import txs
from permamesh.committee.devnet.cluster import CHAIN_ID
from permamesh.committee.genesis import LedgerRules
from permamesh.identity import NodeIdentity
from permamesh.scheduler.admission import Admission, OutOfCredit, job_cost
from permamesh.scheduler.errors import SchedulerError
from tests.committee.test_devnet import Signer, running_devnet


@pytest.fixture
def committee(tmp_path):
    with running_devnet(tmp_path / "devnet", LedgerRules(base_allowance=100)) as running:
        yield running


def test_admission_by_credit_end_to_end(committee):
    net, client = committee
    worker = NodeIdentity.generate()
    seed = Signer(net.partner)
    assert client.submit(seed.sign(txs.RegisterNode, node_key=worker.public.sign_key,
                                   kex_key=worker.public.kex_key, role="worker", endpoint="",
                                   profile=txs.NodeProfile(0, 0, "g", "i", 1))).ok
    user = NodeIdentity.generate()
    admission = Admission(client.query, CHAIN_ID)
    assert admission.admit(user.public.sign_key, 20, 40).cost == 60
    outcome = client.submit(admission.receipt(user, worker.public.sign_key, 60))
    assert outcome.ok
    assert admission.account(user.public.sign_key)["available"] == 40
    assert client.query("/account", worker.public.sign_key)["earned"] == 60
    with pytest.raises(OutOfCredit, match="out of credit: this job may cost 41 units .* 40 available"):
        admission.admit(user.public.sign_key, 1, 40)
    # a receipt past the limit (a race past admission) is refused by the ledger too
    late = client.submit(admission.receipt(user, worker.public.sign_key, 41))
    assert late.code == txs.NO_CREDIT and "out of credit" in late.log
    assert admission.account(user.public.sign_key)["balance"] == -60


def test_job_cost_rejects_nonsense():
    assert job_cost(0, 0) == 1
    with pytest.raises(SchedulerError):
        job_cost(-1, 5)
