"""Challenges travel like user requests: drawn from the pool, sent through real relays on
loopback (onion cells, cloves) with OverlayClient.submit, answered by a real worker, and scored
by the verifier. An honest worker earns full credit; an impostor serving another model under
the registered name does not."""

from __future__ import annotations

import dataclasses
import random

import pytest

from permamesh.identity import NodeIdentity
from permamesh.directory.workers import WorkerRecord
from permamesh.directory.relays import CachedLookup
from permamesh.overlay.sender import OverlayClient, OverlayConfig
from permamesh.verify.challenges import ChallengePool
from permamesh.verify.profile import TrafficProfile
from permamesh.verify.traffic import user_requests
from permamesh.verify.verifier import Verifier, epoch_credit
from permamesh.workers.engine import Engine
from permamesh.workers.inbox import Inbox
from permamesh.workers.server import ServerThread, WorkerServer
from tests.overlay.test_overlay_e2e import _start_relays
from tests.verify.test_verifier import peaked_tiny


@pytest.fixture
def mesh(home):
    """In-process relays and workers find each other in an in-memory table standing in for
    the committee's directory (joining through a committee: tests/directory/test_join.py)."""
    links: dict[bytes, str] = {}
    threads, records = _start_relays(links, 12, set())
    workers = []

    def worker(seed: int) -> WorkerRecord:
        loaded = peaked_tiny(seed)
        loaded.name = "tiny-random"  # an impostor (seed != 0) claims the registered name too
        server = WorkerServer(Engine(loaded), NodeIdentity.generate())
        server.inbox = Inbox(server, CachedLookup(lambda: links, 0.0))
        thread = ServerThread(server)
        record = WorkerRecord(server.worker_id, thread.start(), server.identity.public.sign_key.hex(), loaded.name)
        links[server.worker_id.encode("ascii")] = record.endpoint
        workers.append(thread)
        return record

    yield records, worker
    for thread in workers + threads:
        thread.stop()


def test_challenges_through_the_overlay_credit_the_honest_and_catch_the_impostor(mesh):
    relays, start_worker = mesh
    honest, impostor = start_worker(0), start_worker(1)
    traffic = [req for _, req in user_requests(300, 3, 1.0)]
    pool = ChallengePool(TrafficProfile.observe(traffic))
    verifier, rng = Verifier(peaked_tiny(0)), random.Random(4)
    config = OverlayConfig(ack_timeout_s=0.5, answer_timeout_s=30.0)
    with OverlayClient(relays, [honest, impostor], config, random.Random(5)) as client:
        credits = {}
        for record in (honest, impostor):
            scored = []
            for _ in range(3):
                challenge = pool.draw(rng)
                req = dataclasses.replace(challenge.request, max_tokens=min(challenge.request.max_tokens, 16))
                answer = client.submit(req, entry=record.node_id)
                assert answer.model == "tiny-random" and len(answer.logprobs) == answer.completion_tokens
                scored.append(verifier.score(req, answer))
            credits[record.node_id] = epoch_credit(scored)
    assert credits[honest.node_id] == 1_000_000
    assert credits[impostor.node_id] < 400_000  # an abnormal epoch
