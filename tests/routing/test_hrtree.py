"""The hash-radix tree: which worker holds which prompt prefix, told as a few stories and then
checked against a brute-force model over random operations."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from permamesh.routing import BlockHasher, HashRadixTree, RoutingError, chain_digests

Chain = tuple[bytes, ...]

HASHER = BlockHasher(block_size=4)
SYSTEM = list(range(1000, 1016))  # the shared system prompt: 4 blocks


def turn(seed: int, blocks: int = 1) -> list[int]:
    return [seed] * (4 * blocks)


# -- stories ---------------------------------------------------------------------------------


def test_three_workers_share_a_system_prompt_and_one_has_the_longer_conversation() -> None:
    tree = HashRadixTree()
    system = HASHER.chain(SYSTEM)
    alice_history = SYSTEM + turn(1) + turn(2) + turn(3)  # a multi-turn chat on gpu-b
    assert tree.insert(HASHER.chain(SYSTEM + turn(9)), "gpu-a", now=1.0) == 5
    assert tree.insert(HASHER.chain(alice_history), "gpu-b", now=2.0) == 7
    assert tree.insert(system, "gpu-c", now=3.0) == 4

    # Alice's next message: gpu-b holds all of her history, the others only the system prompt.
    request = HASHER.chain(alice_history + turn(4))
    assert tree.match(request) == {"gpu-a": 4, "gpu-b": 7, "gpu-c": 4}
    assert list(tree.match(request)) == ["gpu-a", "gpu-b", "gpu-c"]  # sorted, not by arrival
    # A stranger's prompt shares nothing; a partial system prompt matches partially.
    assert tree.match(HASHER.chain(turn(5, blocks=3))) == {}
    assert tree.match(system[:2]) == {"gpu-a": 2, "gpu-b": 2, "gpu-c": 2}
    assert tree.match([]) == {}

    assert len(tree) == 4 + 1 + 3  # distinct blocks: system, gpu-a's turn, Alice's turns
    assert tree.workers() == ["gpu-a", "gpu-b", "gpu-c"]
    assert [tree.blocks_held(w) for w in ("gpu-a", "gpu-b", "gpu-c", "gpu-z")] == [5, 7, 4, 0]


def test_inserting_what_a_worker_already_holds_adds_nothing() -> None:
    tree = HashRadixTree()
    chain = HASHER.chain(SYSTEM + turn(1))
    assert tree.insert(chain, "gpu-a", 1.0) == 5
    assert tree.insert(chain[:3], "gpu-a", 2.0) == 0  # a prefix it already has
    assert tree.insert(chain, "gpu-a", 3.0) == 0
    assert tree.insert(HASHER.chain(SYSTEM + turn(1) + turn(2)), "gpu-a", 4.0) == 1
    assert tree.insert([], "gpu-a", 5.0) == 0
    assert tree.blocks_held("gpu-a") == 6 and len(tree) == 6


def test_remove_means_the_worker_evicted_the_last_block_of_that_chain() -> None:
    tree = HashRadixTree()
    history = HASHER.chain(SYSTEM + turn(1) + turn(2) + turn(3))  # 7 blocks
    tree.insert(history, "gpu-b", 1.0)
    tree.insert(history[:4], "gpu-a", 1.0)

    # gpu-b dropped the last block of its history: it still holds the first six.
    assert tree.remove(history, "gpu-b") == 1
    assert tree.match(history) == {"gpu-a": 4, "gpu-b": 6}
    # Dropping the block at position 5 takes everything below it with it (here: nothing more).
    assert tree.remove(history[:5], "gpu-b") == 2
    assert tree.match(history) == {"gpu-a": 4, "gpu-b": 4}
    # Chains the worker does not fully hold are a no-op.
    assert tree.remove(history, "gpu-b") == 0
    assert tree.remove(history[:5], "gpu-a") == 0
    assert tree.remove(HASHER.chain(turn(8)), "gpu-a") == 0
    # Removing the second system block drops blocks 1..3; the first block stays.
    assert tree.remove(history[:2], "gpu-b") == 3
    assert tree.match(history) == {"gpu-a": 4, "gpu-b": 1}
    assert len(tree) == 4  # the blocks nobody holds were pruned
    # remove(()) is drop_worker.
    assert tree.remove([], "gpu-b") == 1
    assert tree.workers() == ["gpu-a"]


def test_a_worker_that_leaves_is_forgotten_everywhere() -> None:
    tree = HashRadixTree()
    for seed, worker in enumerate(["gpu-a", "gpu-b", "gpu-a", "gpu-c"]):
        tree.insert(HASHER.chain(SYSTEM + turn(seed, blocks=2)), worker, float(seed))
    assert tree.blocks_held("gpu-a") == 8
    assert tree.drop_worker("gpu-a") == 8
    assert tree.drop_worker("gpu-a") == 0
    assert tree.workers() == ["gpu-b", "gpu-c"]
    assert len(tree) == 4 + 2 + 2
    assert tree.match(HASHER.chain(SYSTEM + turn(0, blocks=2))) == {"gpu-b": 4, "gpu-c": 4}
    tree.drop_worker("gpu-b")
    tree.drop_worker("gpu-c")
    assert len(tree) == 0 and tree.workers() == [] and tree.snapshot() == []


def test_under_memory_pressure_the_stalest_conversation_goes_first() -> None:
    tree = HashRadixTree()
    old = HASHER.chain(SYSTEM + turn(1, blocks=3))
    recent = HASHER.chain(SYSTEM + turn(2, blocks=2))
    tree.insert(old, "gpu-a", now=10.0)
    tree.insert(recent, "gpu-a", now=20.0)
    assert tree.blocks_held("gpu-a") == 9

    # Shrinking to 7 trims the old conversation's last two blocks, as one delta.
    assert tree.evict_lru("gpu-a", max_blocks=7) == [tuple(old[:6])]
    assert tree.match(old) == {"gpu-a": 5}
    # Shrinking to 4 finishes the old conversation, then trims the recent one: the system prompt,
    # which both used (last at t=20), outlives the old turn.
    assert tree.evict_lru("gpu-a", max_blocks=4) == [tuple(old[:5]), tuple(recent[:5])]
    assert tree.match(recent) == {"gpu-a": 4}
    assert tree.evict_lru("gpu-a", max_blocks=4) == []
    assert tree.evict_lru("gpu-a", max_blocks=0) == [tuple(recent[:1])]
    assert tree.workers() == [] and len(tree) == 0


def test_touching_a_conversation_saves_it_from_eviction() -> None:
    tree = HashRadixTree()
    first = HASHER.chain(SYSTEM + turn(1))
    second = HASHER.chain(SYSTEM + turn(2))
    tree.insert(first, "gpu-a", 1.0)
    tree.insert(second, "gpu-a", 2.0)
    assert tree.touch(first, "gpu-a", 3.0) == 5
    assert tree.touch(first, "gpu-b", 3.0) == 0  # gpu-b holds none of it
    assert tree.touch(HASHER.chain(SYSTEM + turn(7)), "gpu-a", 4.0) == 4
    assert tree.evict_lru("gpu-a", max_blocks=5) == [tuple(second)]
    assert tree.match(first) == {"gpu-a": 5}


def test_evicted_chains_replay_on_a_replica() -> None:
    local, replica = HashRadixTree(), HashRadixTree()
    for seed in range(4):
        for tree in (local, replica):
            tree.insert(HASHER.chain(SYSTEM + turn(seed, blocks=seed + 1)), "gpu-a", float(seed))
    delta = local.evict_lru("gpu-a", max_blocks=6)
    assert local.blocks_held("gpu-a") == 6
    assert local.digest() != replica.digest()
    for chain in delta:
        replica.remove(chain, "gpu-a")
    assert replica.snapshot() == local.snapshot() and replica.digest() == local.digest()


def test_image_layers_route_like_prompts() -> None:
    tree = HashRadixTree()
    base = [b"sha256:debian", b"sha256:python3.11"]
    tree.insert(chain_digests(base + [b"sha256:torch"]), "node-1", 1.0)
    tree.insert(chain_digests(base[:1]), "node-2", 1.0)
    job = chain_digests(base + [b"sha256:torch", b"sha256:app"])
    assert tree.match(job) == {"node-1": 3, "node-2": 1}


def test_the_snapshot_lists_canonical_segments_and_ignores_time_and_order() -> None:
    a, b, c, d, e = (bytes([i]) * 2 for i in range(5))
    tree = HashRadixTree()
    tree.insert([a, b, c], "w1", 5.0)
    tree.insert([a, b, d, e], "w2", 1.0)
    tree.insert([a], "w3", 9.0)
    assert tree.snapshot() == [
        ((a,), ("w1", "w2", "w3")),
        ((a, b), ("w1", "w2")),
        ((a, b, c), ("w1",)),
        ((a, b, d, e), ("w2",)),
    ]
    other = HashRadixTree()
    other.insert([a], "w3", 0.0)
    other.insert([a, b, d], "w2", 0.0)
    other.insert([a, b, d, e], "w2", 0.0)
    other.insert([a, b], "w1", 0.0)
    other.insert([a, b, c], "w1", 0.0)
    assert other.snapshot() == tree.snapshot() and other.digest() == tree.digest()
    assert len(tree.digest()) == 32
    other.insert([a, b, c], "w2", 0.0)
    assert other.digest() != tree.digest()


def test_match_changes_nothing() -> None:
    tree = HashRadixTree()
    chain = HASHER.chain(SYSTEM + turn(1, blocks=4))
    tree.insert(chain, "gpu-a", 1.0)
    before = (tree.snapshot(), tree.digest(), len(tree))
    for k in range(len(chain) + 1):
        tree.match(chain[:k])
    tree.match(chain[:3] + HASHER.chain(turn(5)))
    assert (tree.snapshot(), tree.digest(), len(tree)) == before


def test_very_long_chains_need_no_recursion() -> None:
    tree = HashRadixTree()
    chain = [i.to_bytes(4, "little") for i in range(5000)]
    for end in range(50, 5001, 50):  # fragment the path into 100 nodes with distinct times
        tree.insert(chain[:end], "gpu-a", float(end))
    tree.insert(chain[:2500], "gpu-b", 0.0)
    assert tree.match(chain) == {"gpu-a": 5000, "gpu-b": 2500}
    assert tree.remove(chain[:1001], "gpu-a") == 4000
    assert len(tree.snapshot()) == 2
    assert tree.evict_lru("gpu-a", 10) == [tuple(chain[:11])]
    assert tree.drop_worker("gpu-b") == 2500
    assert len(tree) == 10


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.insert(["not bytes"], "w", 1.0),
        lambda t: t.insert(b"abc", "w", 1.0),  # a bytes object is not a chain of digests
        lambda t: t.insert([b"a"], "", 1.0),
        lambda t: t.insert([b"a"], 7, 1.0),
        lambda t: t.insert([b"a"], "w", math.nan),
        lambda t: t.insert([b"a"], "w", math.inf),
        lambda t: t.insert([b"a"], "w", True),
        lambda t: t.insert([b"a"], "w", "1"),
        lambda t: t.match([b"a", 3]),
        lambda t: t.touch([b"a"], None, 1.0),
        lambda t: t.remove([bytearray(b"a")], "w"),
        lambda t: t.drop_worker(""),
        lambda t: t.evict_lru("w", -1),
        lambda t: t.evict_lru("w", 1.5),
        lambda t: t.blocks_held(None),
    ],
)
def test_malformed_input_is_a_routing_error(call) -> None:  # type: ignore[no-untyped-def]
    tree = HashRadixTree()
    tree.insert([b"a"], "w", 0.0)
    with pytest.raises(RoutingError):
        call(tree)
    assert tree.snapshot() == [((b"a",), ("w",))]


# -- against a brute-force model -------------------------------------------------------------

ALPHABET = [b"a", b"b", b"c"]  # tiny, so prefixes collide all the time
WORKERS = ["w0", "w1", "w2"]
chains = st.lists(st.sampled_from(ALPHABET), max_size=5).map(tuple)
workers = st.sampled_from(WORKERS)
times = st.integers(0, 6).map(float)  # few distinct times, so ties happen


class Model:
    """worker -> {prefix: last-used}; every operation done the slow, obvious way."""

    def __init__(self) -> None:
        self.held: dict[str, dict[Chain, float]] = {}

    def copy(self) -> Model:
        twin = Model()
        twin.held = {w: dict(prefixes) for w, prefixes in self.held.items()}
        return twin

    def _tidy(self) -> None:
        self.held = {w: p for w, p in self.held.items() if p}

    def insert(self, chain: Chain, worker: str, now: float) -> int:
        mine = self.held.setdefault(worker, {})
        added = 0
        for k in range(1, len(chain) + 1):
            if chain[:k] in mine:
                mine[chain[:k]] = max(mine[chain[:k]], now)
            else:
                mine[chain[:k]] = now
                added += 1
        self._tidy()
        return added

    def touch(self, chain: Chain, worker: str, now: float) -> int:
        mine = self.held.get(worker, {})
        k = 0
        while k < len(chain) and chain[: k + 1] in mine:
            k += 1
            mine[chain[:k]] = max(mine[chain[:k]], now)
        return k

    def remove(self, chain: Chain, worker: str) -> int:
        mine = self.held.get(worker, {})
        if chain and chain not in mine:
            return 0
        gone = [p for p in mine if p[: len(chain)] == chain]
        for p in gone:
            del mine[p]
        self._tidy()
        return len(gone)

    def evict_lru(self, worker: str, max_blocks: int) -> None:
        mine = self.held.get(worker, {})
        while len(mine) > max_blocks:
            leaves = [p for p in mine if not any(p + (x,) in mine for x in ALPHABET)]
            del mine[min(leaves, key=lambda p: (mine[p], p))]
        self._tidy()

    def match(self, chain: Chain) -> dict[str, int]:
        found = {}
        for worker in sorted(self.held):
            k = 0
            while k < len(chain) and chain[: k + 1] in self.held[worker]:
                k += 1
            if k:
                found[worker] = k
        return found

    def blocks(self) -> dict[Chain, tuple[str, ...]]:
        out: dict[Chain, list[str]] = {}
        for worker in sorted(self.held):
            for p in self.held[worker]:
                out.setdefault(p, []).append(worker)
        return {p: tuple(ws) for p, ws in out.items()}

    def snapshot(self) -> list[tuple[Chain, tuple[str, ...]]]:
        blocks = self.blocks()
        out = []
        for p, holders in blocks.items():
            nexts = [p + (x,) for x in ALPHABET if p + (x,) in blocks]
            if len(nexts) != 1 or blocks[nexts[0]] != holders:
                out.append((p, holders))
        return sorted(out)


def rebuild(model: Model) -> HashRadixTree:
    """A fresh tree holding the model's content, built the simplest way."""
    tree = HashRadixTree()
    for worker in sorted(model.held):
        for p in sorted(model.held[worker]):
            tree.insert(p, worker, 0.0)
    return tree


class TreeAgainstModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tree = HashRadixTree()
        self.model = Model()

    @rule(chain=chains, worker=workers, now=times)
    def insert(self, chain: Chain, worker: str, now: float) -> None:
        assert self.tree.insert(chain, worker, now) == self.model.insert(chain, worker, now)

    @rule(chain=chains, worker=workers, now=times)
    def touch(self, chain: Chain, worker: str, now: float) -> None:
        assert self.tree.touch(chain, worker, now) == self.model.touch(chain, worker, now)

    @precondition(lambda self: self.model.held)
    @rule(data=st.data(), worker=workers)
    def remove_held(self, data: st.DataObject, worker: str) -> None:
        # Mostly chains somebody holds, so removals actually bite.
        held = sorted(p for ps in self.model.held.values() for p in ps)
        chain = data.draw(st.sampled_from(held) | chains)
        assert self.tree.remove(chain, worker) == self.model.remove(chain, worker)

    @rule(worker=workers)
    def drop_worker(self, worker: str) -> None:
        assert self.tree.drop_worker(worker) == self.model.remove((), worker)

    @rule(worker=workers, max_blocks=st.integers(0, 8))
    def evict_lru(self, worker: str, max_blocks: int) -> None:
        before = self.model.copy()
        evicted = self.tree.evict_lru(worker, max_blocks)
        self.model.evict_lru(worker, max_blocks)
        assert self.tree.blocks_held(worker) == min(
            len(before.held.get(worker, {})), max_blocks
        )
        # The returned chains are a delta: replaying them on the old state gives the new one.
        for chain in evicted:
            assert chain and before.remove(chain, worker) > 0
        assert before.snapshot() == self.model.snapshot()

    @invariant()
    def content_agrees(self) -> None:
        assert self.tree.snapshot() == self.model.snapshot()
        assert len(self.tree) == len(self.model.blocks())
        assert self.tree.workers() == sorted(self.model.held)
        for worker in WORKERS:
            assert self.tree.blocks_held(worker) == len(self.model.held.get(worker, {}))

    @invariant()
    def matches_agree(self) -> None:
        probes = [(), (b"a",), (b"a", b"b"), (b"b", b"a", b"c", b"a", b"b", b"c")]
        probes += sorted({p for ps in self.model.held.values() for p in ps})
        for chain in probes:
            assert self.tree.match(chain) == self.model.match(chain)
            assert self.tree.match(chain + (b"c",)) == self.model.match(chain + (b"c",))

    @invariant()
    def digest_depends_only_on_content(self) -> None:
        assert self.tree.digest() == rebuild(self.model).digest()


TreeAgainstModel.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
test_tree_against_model = TreeAgainstModel.TestCase


inserts = st.lists(st.tuples(chains, workers, times), max_size=12)


@given(ops=inserts, data=st.data())
def test_the_same_inserts_in_any_order_give_the_same_digest(
    ops: list[tuple[Chain, str, float]], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(ops))
    one, two = HashRadixTree(), HashRadixTree()
    for chain, worker, now in ops:
        one.insert(chain, worker, now)
    for chain, worker, _ in shuffled:
        two.insert(chain, worker, 100.0)  # timestamps never reach the digest
    assert one.snapshot() == two.snapshot()
    assert one.digest() == two.digest()
    for chain, _, _ in ops:
        assert one.match(chain) == two.match(chain)
