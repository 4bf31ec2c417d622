"""A worker group on loopback: three tiny-random workers with prefix caches, real sockets,
real tree sync. Requests enter at any member and run where the prompt's prefix is cached."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from permamesh.client.blocking import Client, ClientError
from permamesh.identity import NodeIdentity
from permamesh.routing.blocks import BlockHasher
from permamesh.routing.messages import Load, TreeDelta
from permamesh.transport import DealerClient
from permamesh.wire import ErrorReply, ForwardedRequest, GenerateRequest, decode, encode
from permamesh.workers.engine import Engine
from permamesh.workers.group import GroupConfig, GroupLink, Peer
from permamesh.workers.prefix_cache import PrefixKVCache
from permamesh.workers.server import ServerThread, WorkerServer
from tests.conftest import wait_for

SALT = b"test-group-salt"
PREFIX = "You are a careful assistant for the permacomputer mesh. " * 8  # ~450 byte tokens


class GatedEngine(Engine):
    """The real engine held at a gate when ``hold`` is set (a test double around the real model)."""

    hold = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate, self.waiting = threading.Event(), threading.Semaphore(0)

    def start(self, *a, **kw):
        if self.hold:
            self.waiting.release()
            self.gate.wait(30)
        return super().start(*a, **kw)


@pytest.fixture
def group(tiny_loaded):
    """Three group members; yields (threads, servers, endpoints)."""
    peers: list[Peer] = []
    config = GroupConfig("g", SALT, 16, "permamesh", sync_interval_s=0.05, heartbeat_s=0.2,
                         member_timeout_s=2.0, forward_timeout_s=3.0, peer_refresh_s=0.1,
                         measure_full_tree=True)
    servers, threads = [], []
    for _ in range(3):
        engine = GatedEngine(tiny_loaded, prefix_cache=PrefixKVCache(BlockHasher(16, SALT), 64 * 2**20))
        server = WorkerServer(engine, NodeIdentity.generate())
        server.group = GroupLink(server, config, lambda: list(peers))
        servers.append(server)
        threads.append(ServerThread(server))
    endpoints = [t.start() for t in threads]
    peers += [Peer(s.worker_id, e, s.identity.public.sign_key) for s, e in zip(servers, endpoints)]
    for s in servers:
        wait_for(lambda: len(s.group.replica.members()) == 3, what="members to hear each other")
    yield threads, servers, endpoints
    for s in servers:
        s.engine.gate.set()
    for t in threads:
        t.stop()


def _ask(endpoint, text, **kw):
    with Client([endpoint]) as client:
        return client.generate(PREFIX + text, max_tokens=kw.pop("max_tokens", 4), **kw)


def test_a_request_entering_anywhere_runs_where_its_prefix_is_cached(group):
    threads, servers, endpoints = group
    first = _ask(endpoints[0], "first question?")
    holder = next(s for s in servers if s.worker_id == first.worker_id)
    chain = tuple(BlockHasher(16, SALT).chain(list((PREFIX + "second question?").encode())))
    others = [i for i, s in enumerate(servers) if s is not holder]
    for i in others:  # the holder's cache insert reaches every replica
        wait_for(lambda: servers[i].group.replica.tree.match(chain).get(holder.worker_id, 0) >= 25,
                 what="the holder's delta")
    for i in others:
        second = _ask(endpoints[i], "second question?")
        assert second.worker_id == holder.worker_id
        assert second.cached_tokens >= 16 * 25
    assert sum(s.group.forwarded for s in servers) >= 2


def test_forwarded_answers_equal_local_ones(group):
    threads, servers, endpoints = group
    local = _ask(endpoints[0], "same?", max_tokens=12)
    for endpoint in endpoints[1:]:
        again = _ask(endpoint, "same?", max_tokens=12)
        assert again.token_ids == local.token_ids and again.text == local.text


def test_a_member_that_stops_mid_job_does_not_lose_it(group):
    threads, servers, endpoints = group
    first = _ask(endpoints[0], "warm the holder")
    h = next(i for i, s in enumerate(servers) if s.worker_id == first.worker_id)
    entry = (h + 1) % 3
    chain = tuple(BlockHasher(16, SALT).chain(list((PREFIX + "x").encode())))
    wait_for(lambda: servers[entry].group.replica.tree.match(chain).get(first.worker_id, 0) > 0, what="sync")
    servers[h].engine.hold = True
    result: dict = {}
    asker = threading.Thread(target=lambda: result.setdefault("r", _ask(endpoints[entry], "survive?")))
    asker.start()
    assert servers[h].engine.waiting.acquire(timeout=10)  # the job was forwarded to the holder
    stopper = threading.Thread(target=threads[h].stop)
    stopper.start()
    servers[h].engine.gate.set()  # the holder cancels the job as it stops: shutting_down
    stopper.join(30)
    asker.join(30)
    assert result["r"].worker_id != first.worker_id and result["r"].completion_tokens >= 1


def test_a_stalled_entry_judges_its_members_only_after_reading_what_they_sent(group):
    """The entry's own event loop is blocked past the member timeout (as a long native call
    holding the GIL can): its members kept sending heartbeats, unread. Back, it reads what they
    sent before its upkeep judges them (pyzmq hands over every queued frame without yielding),
    so it expires nobody and still answers."""
    threads, servers, endpoints = group
    entry = servers[0].group
    expired: list[str] = []
    real_expire = entry.replica.expire

    def expire(now, timeout_s):  # the real one, its verdicts recorded
        gone = real_expire(now, timeout_s)
        expired.extend(gone)
        return gone

    entry.replica.expire = expire
    stalled, back = threading.Event(), []
    servers[0]._loop.call_soon_threadsafe(lambda: (time.sleep(2.5), back.append(time.monotonic()), stalled.set()))
    assert stalled.wait(10)  # 2.5 s > member_timeout_s (2.0)
    wait_for(lambda: all(heard > back[0] for w, (_, heard) in entry.replica.loads().items() if w != entry.me),
             what="fresh heartbeats from every member after the stall")
    assert expired == [] and len(entry.replica.members()) == 3
    assert _ask(endpoints[0], "still here?").completion_tokens >= 1


def test_strangers_cannot_feed_the_tree_or_forward_jobs(group):
    threads, servers, endpoints = group
    mallory = NodeIdentity.generate()
    chain = tuple(BlockHasher(16, SALT).chain(list(b"m" * 64)))
    delta = TreeDelta("g", mallory.node_id, 1, 1, (), (), Load(0, 0.0, 100.0, 10.0, 0), b"\0" * 32)
    forged_as_member = TreeDelta("g", servers[0].worker_id, 999, 1, (), (), Load(0, 0.0, 100.0, 10.0, 0), b"\0" * 32)
    job = ForwardedRequest(GenerateRequest(uuid.uuid4().hex, prompt="hi"), mallory.node_id, "g")
    with DealerClient(endpoints[1]) as sock:
        sock.send(encode(delta, mallory))
        sock.send(encode(forged_as_member, mallory))
        sock.send(encode(job, mallory))
        reply = decode(sock.recv(10)).msg
    assert isinstance(reply, ErrorReply) and reply.code == "forbidden"
    assert mallory.node_id not in servers[1].group.replica.members()
    assert servers[1].group.replica.state(servers[0].worker_id).epoch != 999
    assert servers[1].group.replica.tree.match(chain) == {}


def test_sync_counts_bytes_against_full_tree_broadcast(group):
    threads, servers, endpoints = group
    for i in range(6):
        _ask(endpoints[i % 3], f"question number {i} " * 10)
    # A full-tree protocol resends every block at each publish; deltas send only changes, so
    # once the caches are quiet each heartbeat costs a delta little and a full tree a lot.
    marks = [s.group.publisher.stats.deltas for s in servers]
    for s, mark in zip(servers, marks):
        wait_for(lambda: s.group.publisher.stats.deltas >= mark + 5, what="five quiet heartbeats")
    with Client(endpoints) as client:
        statuses = client.status()
    delta = sum(s.sync_delta_bytes for s in statuses)
    full = sum(s.sync_full_tree_bytes for s in statuses)
    assert delta > 0 and full > delta
    assert all(s.members == 2 and s.group == "g" for s in statuses)
