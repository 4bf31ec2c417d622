"""Delta sync of hash-radix tree replicas, told as stories: workers serve chats, publish signed
deltas, and a replica of the group's tree must end up equal to every worker's own cache, even
when deltas are lost, reordered, or a worker restarts. Each worker's "truth" is a tree holding
only its own cache, evicted with ``HashRadixTree.evict_lru``."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.identity import NodeIdentity
from permamesh.routing import (
    BlockHasher,
    DeltaPublisher,
    GroupReplica,
    HashRadixTree,
    Insert,
    Load,
    RoutingError,
    SyncStats,
    TreeDelta,
    TreeSnapshot,
    TreeSyncRequest,
)
from permamesh.routing.messages import HOLDINGS_SIZE, MAX_DELTA_BLOCKS, MAX_RUN
from permamesh.routing.holdings import holdings_element
from permamesh.wire import WireError, decode, encode
from permamesh.wire.codec import DOMAIN, PROTOCOL_VERSION

Chain = tuple[bytes, ...]

GROUP = "smollm2-135m"
HASHER = BlockHasher(16)
SIGNER = NodeIdentity.generate()


def load(blocks: int = 0, queue: int = 0) -> Load:
    return Load(queue, 0.5 * queue, 2000.0, 40.0, blocks)


def restricted(tree: HashRadixTree, worker: str) -> HashRadixTree:
    """A tree holding exactly what ``worker`` holds in ``tree``."""
    out = HashRadixTree()
    for chain, holders in tree.snapshot():
        if worker in holders:
            out.insert(chain, worker, 0.0)
    return out


class Worker:
    """One group member: its prefix cache (the truth tree) and its publisher."""

    def __init__(self, name: str, *, epoch: int = 1, capacity: int = 600, **kwargs: object) -> None:
        self.name, self.capacity = name, capacity
        self.truth = HashRadixTree()
        self.pub = DeltaPublisher(GROUP, name, epoch, **kwargs)  # type: ignore[arg-type]
        self.chains: list[Chain] = []

    def serve(self, tokens: list[int], now: float) -> None:
        chain = tuple(HASHER.chain(tokens))
        self.truth.insert(chain, self.name, now)
        self.pub.record_insert(chain)
        for gone in self.truth.evict_lru(self.name, self.capacity):
            assert self.pub.record_evict(gone) > 0
        self.chains.append(chain)

    def load(self) -> Load:
        return load(self.truth.blocks_held(self.name), queue=len(self.chains) % 5)

    def delta(self) -> TreeDelta:
        return self.pub.make_delta(self.load())

    def answer(self, request: TreeSyncRequest) -> TreeSnapshot:
        snap = self.pub.answer(request, self.load())
        assert snap is not None
        return snap


def assert_converged(replica: GroupReplica, workers: list[Worker]) -> None:
    assert replica.needs_resync() == []
    for w in workers:
        assert restricted(replica.tree, w.name).digest() == w.truth.digest(), w.name
        state = replica.state(w.name)
        assert state is not None and state.in_sync
        assert state.holdings == w.pub.current.digest
        assert state.blocks == replica.tree.blocks_held(w.name) == w.truth.blocks_held(w.name)
        for chain in w.chains:
            assert replica.tree.match(chain).get(w.name, 0) == w.truth.match(chain).get(w.name, 0)


class Chats:
    """Multi-turn chats sharing a system prompt: each request is the whole history so far
    plus a new user turn and the answer, restarting a chat once it passes ``max_tokens``."""

    def __init__(self, rng: random.Random, *, system: int = 256, max_tokens: int = 2000) -> None:
        self.rng, self.max_tokens = rng, max_tokens
        self.system = [rng.randrange(32000) for _ in range(system)]
        self.open: list[list[int]] = []

    def next(self) -> list[int]:
        rng = self.rng
        if not self.open or rng.random() < 0.25:
            self.open.append(list(self.system))
        chat = rng.choice(self.open)
        chat.extend(rng.randrange(32000) for _ in range(rng.randint(60, 400)))
        if len(chat) > self.max_tokens:
            self.open.remove(chat)
            del chat[len(self.system) :]
            chat.extend(rng.randrange(32000) for _ in range(rng.randint(250, 500)))
            self.open.append(chat)
        return list(chat)


def resync(replica: GroupReplica, workers: dict[str, Worker], now: float) -> list[str]:
    asked: list[str] = []
    for request in replica.sync_requests(now, retry_s=0.0):
        assert request.group == GROUP and request.requester == replica.me
        asked.append(request.worker)
        assert replica.apply_snapshot(workers[request.worker].answer(request), now)
    return asked


# -- stories ---------------------------------------------------------------------------------


def test_a_replica_fed_every_delta_equals_each_workers_cache() -> None:
    rng = random.Random(1)
    workers = [Worker(f"gpu-{c}") for c in "abc"]
    chats = {w.name: Chats(rng) for w in workers}
    replica = GroupReplica(GROUP, "gpu-a")
    for step in range(150):
        w = rng.choice(workers)
        w.serve(chats[w.name].next(), now=float(step))
        assert replica.apply_delta(w.delta(), now=float(step))
        assert replica.needs_resync() == [] and replica.sync_requests(float(step)) == []
    assert sum(w.pub.stats.deltas for w in workers) == 0  # make_delta does not count frames
    assert all(w.truth.blocks_held(w.name) == w.capacity for w in workers)  # evictions happened
    assert_converged(replica, workers)
    assert replica.members() == ["gpu-a", "gpu-b", "gpu-c"]
    assert {w: l.cached_blocks for w, (l, _) in replica.loads().items()} == {
        w.name: w.truth.blocks_held(w.name) for w in workers
    }


def test_lost_and_reordered_deltas_are_detected_and_repaired_by_snapshots() -> None:
    rng = random.Random(7)
    workers = {n: Worker(n) for n in ("gpu-a", "gpu-b", "gpu-c")}
    chats = {n: Chats(rng) for n in workers}
    replica = GroupReplica(GROUP, "router")
    lost: set[str] = set()
    late: list[TreeDelta] = []
    asked: list[str] = []
    for step in range(300):
        now = float(step)
        w = workers[rng.choice(sorted(workers))]
        w.serve(chats[w.name].next(), now)
        delta = w.delta()
        if w.name != "gpu-c" and rng.random() < 0.2:
            lost.add(w.name)  # gpu-c's deltas always arrive, in order
        elif w.name != "gpu-c" and rng.random() < 0.15:
            late.append(delta)
        else:
            replica.apply_delta(delta, now)
            for old in late:
                replica.apply_delta(old, now)
            late.clear()
        if step % 10 == 9:
            asked += resync(replica, workers, now)
    for w in workers.values():  # a final heartbeat from everyone reveals lost last deltas
        replica.apply_delta(w.delta(), 300.0)
    asked += resync(replica, workers, 301.0)
    assert_converged(replica, list(workers.values()))
    assert set(asked) == lost == {"gpu-a", "gpu-b"}  # no false resync for gpu-c
    assert replica.apply_delta(workers["gpu-a"].delta(), 302.0)  # and deltas flow again


def test_reordering_and_lost_heartbeats_need_no_snapshot() -> None:
    rng = random.Random(3)
    a = Worker("gpu-a")
    chats = Chats(rng)
    replica = GroupReplica(GROUP, "router")
    for step in range(0, 120, 2):
        a.serve(chats.next(), float(step))
        first, heartbeat = a.delta(), a.delta()
        second = a.delta() if step % 3 == 0 else None  # another heartbeat, sometimes
        assert not heartbeat.changes
        if step % 4 == 0:  # the change arrives after the heartbeat that follows it
            assert not replica.apply_delta(heartbeat, step)
            assert replica.needs_resync() == ["gpu-a"]  # a gap, for now...
            assert replica.sync_requests(step, gap_grace_s=1.0) == []  # ...given time to heal
            assert replica.apply_delta(first, step)
        else:  # the heartbeat is lost
            assert replica.apply_delta(first, step)
        if second is not None:
            assert replica.apply_delta(second, step)  # proves the replica is in step
        assert replica.needs_resync() == []
    assert_converged(replica, [a])


def test_a_restarted_worker_is_detected_and_resynced() -> None:
    rng = random.Random(5)
    workers = {"gpu-a": Worker("gpu-a", epoch=1), "gpu-b": Worker("gpu-b")}
    chats = Chats(rng)
    replica = GroupReplica(GROUP, "gpu-b")
    for step in range(20):
        w = workers[["gpu-a", "gpu-b"][step % 2]]
        w.serve(chats.next(), float(step))
        assert replica.apply_delta(w.delta(), float(step))
    old_a = workers["gpu-a"].delta()  # still in flight when gpu-a dies
    assert replica.tree.blocks_held("gpu-a") > 0

    # gpu-a restarts: empty cache, epoch 2, seq from scratch. Its first delta is lost.
    workers["gpu-a"] = a = Worker("gpu-a", epoch=2)
    a.serve(chats.next(), 30.0)
    a.delta()
    a.serve(chats.next(), 31.0)
    assert not replica.apply_delta(a.delta(), 31.0)
    state = replica.state("gpu-a")
    assert state is not None and state.epoch == 2 and not state.in_sync
    assert replica.tree.blocks_held("gpu-a") == 0  # the old cache is gone at once
    assert resync(replica, workers, 33.0) == ["gpu-a"]
    assert_converged(replica, list(workers.values()))

    # A delta of the old epoch arriving late looks like one more restart: it costs a snapshot.
    assert not replica.apply_delta(old_a, 34.0)
    assert resync(replica, workers, 35.0) == ["gpu-a"]
    assert_converged(replica, list(workers.values()))

    # Restarting again (epochs are ids, not counters), with the first delta delivered: seq 1
    # of a new epoch applies to an empty holding, no snapshot needed.
    workers["gpu-a"] = a = Worker("gpu-a", epoch=2**62 + 12345)
    a.serve(chats.next(), 40.0)
    assert replica.apply_delta(a.delta(), 40.0)
    assert_converged(replica, list(workers.values()))


@pytest.mark.parametrize(
    ("workers", "warm_up"),
    [(1, 0), (3, 600)],
    ids=["one-worker-from-cold", "three-workers-with-full-caches"],
)
def test_delta_sync_moves_at_least_20x_fewer_bytes_than_full_tree_broadcast(
    workers: int, warm_up: int
) -> None:
    """200 chat requests of 300-2000 tokens, 16-token blocks, a publish after each request;
    each worker caches at most 4096 blocks (64k tokens). The baseline broadcasts the worker's
    full holdings (a signed snapshot frame) at every publish instead of a delta."""
    rng = random.Random(11)
    group = [
        Worker(f"gpu-{i}", capacity=4096, signer=SIGNER, track_full_tree=True) for i in range(workers)
    ]
    chats = [Chats(rng) for _ in group]
    replica = GroupReplica(GROUP, "router")
    sizes = []
    for step in range(warm_up + 200):
        if step == warm_up:
            for w in group:
                w.pub.stats = SyncStats()
        i = rng.randrange(workers)
        w, tokens = group[i], chats[i].next()
        sizes.append(len(tokens))
        w.serve(tokens, float(step))
        delta, frame = w.pub.publish(w.load())
        assert decode(frame).msg == delta
        assert replica.apply_delta(delta, float(step))
    assert_converged(replica, group)
    stats = sum((w.pub.stats for w in group), SyncStats())
    assert stats.deltas == 200 and stats.snapshot_bytes == 0
    print(
        f"\n{workers} worker(s), {warm_up} warm-up requests; prompts {min(sizes)}-{max(sizes)} "
        f"tokens; cached blocks {[w.truth.blocks_held(w.name) for w in group]}; delta sync "
        f"{stats.delta_bytes} B ({stats.delta_bytes / 200:.0f} B/publish), full-tree broadcast "
        f"{stats.full_tree_bytes} B ({stats.full_tree_bytes / 200:.0f} B/publish); "
        f"ratio {stats.savings:.1f}x"
    )
    assert stats.savings >= 20


def test_large_changes_are_split_across_deltas() -> None:
    a = Worker("gpu-a", max_delta_blocks=7)
    replica = GroupReplica(GROUP, "router")
    a.serve(list(range(16 * 40)), 1.0)  # 40 blocks: six deltas of at most 7
    deltas = []
    while a.pub.pending:
        deltas.append(a.delta())
    assert [sum(len(r.digests) for r in d.inserts) for d in deltas] == [7] * 5 + [5]
    for d in deltas:
        assert replica.apply_delta(d, 2.0)
    assert_converged(replica, [a])


# -- messages --------------------------------------------------------------------------------


def test_every_message_round_trips_through_the_wire() -> None:
    a = Worker("gpu-a", capacity=50)
    chats = Chats(random.Random(2), max_tokens=600)
    messages: list[object] = []
    for step in range(12):
        a.serve(chats.next(), float(step))
        messages.append(a.delta())
    messages += [TreeSyncRequest(GROUP, "gpu-a", "gpu-b"), a.pub.snapshot(a.load())]
    assert any(d.evicts for d in messages[:12]) and any(d.inserts for d in messages[:12])
    for msg in messages:
        received = decode(encode(msg, SIGNER))  # type: ignore[arg-type]
        assert received.msg == msg and received.sender == SIGNER.public.sign_key


def test_malformed_messages_are_refused() -> None:
    good = b"\x01" * 16
    for bad in (
        lambda: Insert(b"", (b"short",)),
        lambda: Insert(b"x" * 15, (good,)),
        lambda: Insert(b"", ()),
        lambda: Insert(b"", (good,) * (MAX_RUN + 1)),
        lambda: Load(-1, 0.0, 1.0, 1.0, 0),
        lambda: Load(0, float("nan"), 1.0, 1.0, 0),
        lambda: TreeDelta(GROUP, "w", 1, 0, (), (), load(), bytes(32)),  # seq starts at 1
        lambda: TreeDelta(GROUP, "w", 1, 1, (), (b"bad",), load(), bytes(32)),
        lambda: TreeDelta(GROUP, "w", 1, 1, (), (), load(), bytes(16)),
        lambda: TreeDelta(GROUP, "w", 1, 1, (Insert(b"", (good,) * 4000),) * 2, (), load(),
                          bytes(32)),  # too many blocks in one delta
        lambda: TreeSyncRequest(GROUP, "", "me"),
    ):
        with pytest.raises(WireError):
            bad()
    assert 2 * 4000 > MAX_DELTA_BLOCKS

    # A peer's frame with a short digest fails at decode, before any replica sees it.
    body = msgpack.packb(
        {"group": GROUP, "worker": "w", "epoch": 1, "seq": 1,
         "inserts": [{"anchor": b"", "digests": [good, b"\x02" * 15]}], "evicts": [],
         "load": {"queue_length": 0, "backlog_s": 0.0, "prefill_tok_per_s": 1.0,
                  "decode_tok_per_s": 1.0, "cached_blocks": 0},
         "holdings": bytes(32)},
        use_bin_type=True,
    )
    signed = DOMAIN + b"tree.delta\x00" + body
    frame = msgpack.packb(
        [PROTOCOL_VERSION, "tree.delta", body, SIGNER.public.sign_key, SIGNER.sign(signed)],
        use_bin_type=True,
    )
    with pytest.raises(WireError, match="16 bytes"):
        decode(frame)


def test_a_replica_ignores_other_groups_and_inconsistent_snapshots() -> None:
    other = DeltaPublisher("llama-70b", "gpu-z", 1)
    other.record_insert(HASHER.chain(list(range(64))))
    replica = GroupReplica(GROUP, "router")
    assert not replica.apply_delta(other.make_delta(load()), 1.0)
    assert not replica.apply_snapshot(other.snapshot(load()), 1.0)
    assert replica.members() == [] and len(replica.tree) == 0

    a = Worker("gpu-a")
    a.serve(list(range(64)), 1.0)
    a.delta()
    a.serve(list(range(96)), 2.0)
    assert not replica.apply_delta(a.delta(), 2.0)  # seq 2 first: a gap
    snap = a.pub.snapshot(a.load())
    forged = TreeSnapshot(GROUP, "gpu-a", snap.epoch, snap.seq, snap.chains[:-1], snap.load,
                          snap.holdings)
    assert not replica.apply_snapshot(forged, 3.0)  # content does not match its digest
    assert replica.needs_resync() == ["gpu-a"]
    assert replica.apply_snapshot(snap, 3.0)
    assert not replica.apply_snapshot(snap, 3.0)  # nothing new
    assert_converged(replica, [a])


def test_a_mallory_delta_changes_nothing_and_breaks_only_its_member() -> None:
    a = Worker("gpu-a")
    replica = GroupReplica(GROUP, "router")
    a.serve(list(range(64)), 1.0)
    assert replica.apply_delta(a.delta(), 1.0)
    chain, before = a.chains[0], replica.tree.snapshot()
    state = replica.state("gpu-a")
    assert state is not None
    held = int.from_bytes(state.holdings, "little")

    def forged(inserts: tuple[Insert, ...], evicts: tuple[bytes, ...], acc: int) -> TreeDelta:
        return TreeDelta(GROUP, "gpu-a", 1, 2, inserts, evicts, load(),
                         acc.to_bytes(HOLDINGS_SIZE, "little"))

    stranger = b"\x07" * 16
    for delta in (
        # the last block again, with the digest that XOR-ing it twice would give
        forged((Insert(chain[-2], (chain[-1],)),), (), held ^ holdings_element(chain[-1], chain[-2])),
        forged((Insert(stranger, (b"\x08" * 16,)),), (), held),  # below a block nobody holds
        forged((), (stranger,), held),  # evicting what it never held
        forged((), (chain[1], chain[2]), held),  # overlapping evictions
    ):
        fresh = GroupReplica(GROUP, "router")
        assert fresh.apply_snapshot(a.pub.snapshot(a.load()), 1.0)
        assert not fresh.apply_delta(delta, 2.0)
        assert fresh.needs_resync() == ["gpu-a"] and fresh.tree.snapshot() == before
    assert replica.tree.snapshot() == before


def test_the_newest_load_wins_even_out_of_order() -> None:
    pub = DeltaPublisher(GROUP, "gpu-a", 1)
    replica = GroupReplica(GROUP, "router")
    older, newer = pub.make_delta(load(queue=1)), pub.make_delta(load(queue=7))
    assert replica.apply_delta(newer, 5.0)  # heartbeats of an unchanged cache: nothing missed
    assert not replica.apply_delta(older, 6.0)  # stale
    assert replica.loads() == {"gpu-a": (load(queue=7), 6.0)}


def test_silent_members_expire_and_sync_requests_are_paced() -> None:
    replica = GroupReplica(GROUP, "gpu-a")
    workers = {n: Worker(n) for n in ("gpu-a", "gpu-b", "gpu-c")}
    for step, w in enumerate(workers.values()):
        w.serve(list(range(100 * step, 100 * step + 64)), float(step))
        w.delta()  # lost
        assert not replica.apply_delta(w.delta(), float(step))
    asked = replica.sync_requests(10.0, retry_s=5.0)
    assert [r.worker for r in asked] == ["gpu-a", "gpu-b", "gpu-c"]
    assert replica.sync_requests(12.0, retry_s=5.0) == []
    assert len(replica.sync_requests(15.0, retry_s=5.0)) == 3
    assert replica.expire(now=61.5, timeout_s=60.0) == ["gpu-b"]  # heard at 1.0; gpu-c at 2.0
    assert replica.members() == ["gpu-a", "gpu-c"] and replica.tree.workers() == []
    assert replica.expire(now=1000.0, timeout_s=60.0) == ["gpu-c"]  # never me
    with pytest.raises(RoutingError):
        replica.apply_delta(workers["gpu-a"].delta(), float("nan"))


def test_a_member_heard_through_its_answers_is_not_expired() -> None:
    """Relayed tokens and progress notes count as hearing from a member (``touch``), as its
    heartbeats do: one busy streaming answers stays; one silent in every way goes."""
    replica = GroupReplica(GROUP, "gpu-a")
    for t, name in enumerate(("gpu-b", "gpu-c")):
        assert replica.apply_delta(Worker(name).delta(), float(t))
    replica.touch("gpu-b", 5.0)  # its answers kept coming; gpu-c went quiet at 1.0
    replica.touch("stranger", 5.0)  # not a member: nothing to touch
    assert replica.expire(now=6.5, timeout_s=3.0) == ["gpu-c"]
    assert replica.members() == ["gpu-b"]
    assert replica.expire(now=8.5, timeout_s=3.0) == ["gpu-b"]


def test_publisher_rejects_bad_chains() -> None:
    pub = DeltaPublisher(GROUP, "gpu-a", 1)
    chain = HASHER.chain(list(range(48)))
    with pytest.raises(RoutingError):
        pub.record_insert([b"short"])
    pub.record_insert(chain)
    with pytest.raises(RoutingError):
        pub.record_insert([chain[0], chain[2]])  # chain[2] already held below chain[1]
    assert pub.record_evict([chain[0], chain[2]]) == 0  # not a chain it holds: nothing
    assert pub.record_evict(chain[:2]) == 2
    assert pub.record_evict(()) == 1
    with pytest.raises(RoutingError, match="signer"):
        pub.publish(load())


# -- random schedules against the truth ------------------------------------------------------

who = st.integers(0, 1)
serve = st.tuples(st.just("serve"), who, st.lists(st.integers(0, 2), min_size=1, max_size=7))
publish = st.tuples(st.just("publish"), who, st.sampled_from(["ok", "ok", "lose", "late"]))
steps = st.lists(
    st.one_of(
        serve,
        serve,
        publish,
        st.tuples(st.just("evict"), who, st.integers(0, 12)),
        st.tuples(st.sampled_from(["sync", "sync", "sync", "restart"]), who, st.just(0)),
    ),
    min_size=20,
    max_size=120,
)


@settings(max_examples=250, deadline=None)
@given(steps=steps, max_delta_blocks=st.integers(1, 6))
def test_random_schedules_converge_after_resync(steps: list[tuple], max_delta_blocks: int) -> None:
    hasher = BlockHasher(1)  # one token per block over 3 token values: lots of shared prefixes
    names = ["gpu-a", "gpu-b"]
    workers = {n: Worker(n, max_delta_blocks=max_delta_blocks) for n in names}
    replica = GroupReplica(GROUP, "gpu-a")
    late: list[TreeDelta] = []
    snaps: list[TreeSnapshot] = []
    clean = True  # nothing lost, late or restarted so far
    for now, (op, who, arg) in enumerate(steps):
        w = workers[names[who]]
        if op == "serve":
            chain = tuple(hasher.chain(arg))
            w.truth.insert(chain, w.name, now)
            w.pub.record_insert(chain)
            w.chains.append(chain)
        elif op == "evict":
            for gone in w.truth.evict_lru(w.name, arg):
                w.pub.record_evict(gone)
        elif op == "publish":
            delta = w.delta()
            clean = clean and arg == "ok"
            if arg == "ok":
                replica.apply_delta(delta, now)
                for snap in snaps:
                    replica.apply_snapshot(snap, now)
                snaps.clear()
            elif arg == "late":
                late.append(delta)
        elif op == "sync":
            snaps += [workers[r.worker].answer(r) for r in replica.sync_requests(now, retry_s=0.0)]
        else:
            epoch = (w.pub.epoch * 6364136223846793005 + 1442695040888963407) % 2**63  # an id
            workers[w.name] = Worker(w.name, epoch=epoch, max_delta_blocks=max_delta_blocks)
            clean = False
        if clean:
            assert replica.needs_resync() == []
    end = float(len(steps))
    for delta in late:
        replica.apply_delta(delta, end)
    for w in workers.values():  # flush pending changes, ending with a heartbeat
        while True:
            delta = w.delta()
            replica.apply_delta(delta, end)
            if not delta.changes:
                break
    resync(replica, workers, end + 1)
    present = [w for w in workers.values() if replica.state(w.name) is not None]
    assert_converged(replica, present)
    assert sorted(w.name for w in present) == replica.members() == names


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    loss=st.sampled_from([0.0, 0.1, 0.3]),
    late=st.sampled_from([0.0, 0.2]),
    max_delta_blocks=st.sampled_from([8, MAX_DELTA_BLOCKS]),
)
def test_long_lossy_runs_with_restarts_converge(
    seed: int, loss: float, late: float, max_delta_blocks: int
) -> None:
    rng = random.Random(seed)
    names = ["gpu-a", "gpu-b", "gpu-c"]
    workers = {n: Worker(n, capacity=150, max_delta_blocks=max_delta_blocks) for n in names}
    chats = {n: Chats(rng, system=64, max_tokens=800) for n in names}
    replica = GroupReplica(GROUP, "gpu-a")
    held_back: list[TreeDelta] = []
    snaps: list[TreeSnapshot] = []
    for now in map(float, range(150)):
        w = workers[rng.choice(names)]
        if rng.random() < 0.03:  # the worker restarts with an empty cache
            workers[w.name] = w = Worker(w.name, epoch=rng.randrange(2**63), capacity=150,
                                         max_delta_blocks=max_delta_blocks)
        w.serve(chats[w.name].next(), now)
        for _ in range(rng.randint(1, 2)):  # sometimes a heartbeat follows
            delta, fate = w.delta(), rng.random()
            if fate < loss:
                continue
            if fate < loss + late:
                held_back.append(delta)
            else:
                replica.apply_delta(delta, now)
        if held_back and rng.random() < 0.3:
            rng.shuffle(held_back)
            for delta in held_back:
                replica.apply_delta(delta, now)
            held_back.clear()
        if rng.random() < 0.1:
            snaps += [workers[r.worker].answer(r) for r in replica.sync_requests(now, retry_s=5.0)]
        if snaps and rng.random() < 0.3:  # snapshots arrive late, deltas go on meanwhile
            for snap in snaps:
                replica.apply_snapshot(snap, now)
            snaps.clear()
        if loss == late == 0.0:
            assert replica.needs_resync() == []
    for delta in held_back:
        replica.apply_delta(delta, 200.0)
    for w in workers.values():
        while w.pub.pending:
            replica.apply_delta(w.delta(), 200.0)
        replica.apply_delta(w.delta(), 200.0)  # a heartbeat
    asked = resync(replica, workers, 201.0)
    if loss == late == 0.0:
        assert asked == []
    assert_converged(replica, [workers[n] for n in replica.members()])
    assert replica.members() == names
