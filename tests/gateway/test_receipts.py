"""Every job a key is served is paid: receipts of one key, settled at once from many threads
against the real committee (the ``stack`` fixture's devnet), each get their own nonce; a
receipt another signer slipped in behind the gateway's back costs one resync, not a payment."""

from __future__ import annotations

import os
import threading

from permamesh.committee import txs
from permamesh.committee.trust import node_id_of

JOBS = 8
UNITS = 3  # prompt 2 + completion 1 tokens, under the reservation


def _worker_id(stack) -> str:
    return node_id_of(stack.committee.query("/registry")[0]["node"])


def _settle_at_once(credit, caller, worker_id: str, jobs: int) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(jobs)

    def settle() -> None:
        try:
            start.wait()
            credit.settle(caller, 100, worker_id, 2, 1)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=settle) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def test_eight_concurrent_settles_of_one_key_are_all_paid(stack):
    credit = stack.gateway.credit
    caller = stack.gateway.keys.authorize(f"Bearer {stack.key}")
    key = caller.identity.public.sign_key
    before = stack.committee.query("/account", key)["balance"]
    paid_before = credit.usage()[caller.name]["units_paid"] if caller.name in credit.usage() else 0

    assert _settle_at_once(credit, caller, _worker_id(stack), JOBS) == []

    assert credit.usage()[caller.name]["units_paid"] - paid_before == JOBS * UNITS
    assert before - stack.committee.query("/account", key)["balance"] == JOBS * UNITS


def test_a_nonce_used_behind_the_gateways_back_is_resynced_and_the_job_still_paid(stack):
    credit = stack.gateway.credit
    caller = stack.gateway.keys.authorize(f"Bearer {stack.key}")
    key = caller.identity.public.sign_key
    worker = bytes.fromhex(stack.committee.query("/registry")[0]["node"])
    credit.settle(caller, 100, _worker_id(stack), 2, 1)  # the gateway's counter is seeded now

    # another gateway process with the same key pays a job of its own: the counter is stale
    nonce = stack.committee.query("/nonce", key)["next"]
    tx = txs.JobReceipt(chain_id=stack.committee.query("/status")["chain_id"], nonce=nonce, worker=worker,
                        units=1, job_id=os.urandom(16))
    assert stack.committee.submit(txs.sign_tx(tx, caller.identity)).code == 0

    paid = credit.usage()[caller.name]["units_paid"]
    credit.settle(caller, 100, _worker_id(stack), 2, 1)
    assert credit.usage()[caller.name]["units_paid"] - paid == UNITS
