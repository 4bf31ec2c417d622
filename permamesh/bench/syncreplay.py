"""Tree-sync bytes for a simulated run: replay what each worker cached through real publishers.

The simulator (:mod:`permamesh.bench.sim`) does not move bytes. To report how much delta sync
costs against broadcasting full trees at the same moments, this module takes a simulated
run's records in completion order and, for a sample of workers, feeds each served prompt's
block chain (and the LRU evictions a cache of the simulated capacity would make) into a real
:class:`~permamesh.routing.sync.DeltaPublisher`, publishing one signed delta per request and
counting the full-tree frame that would have been sent instead. Answer blocks are left out
(the simulator may cache them), which makes caches smaller and the ratio conservative.

Who calls it: :mod:`permamesh.bench.routing` in sim mode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from permamesh.bench.stats import RequestRecord
from permamesh.bench.traces import TraceRequest
from permamesh.identity import NodeIdentity
from permamesh.routing.blocks import BlockHasher
from permamesh.routing.hrtree import HashRadixTree
from permamesh.routing.messages import Load
from permamesh.routing.sync import DeltaPublisher

log = logging.getLogger(__name__)


def replay_sync(trace: Sequence[TraceRequest], records: Sequence[RequestRecord], tokenize: Callable[[TraceRequest], list[int]],
                block_size: int, cache_blocks: int, max_workers: int = 8) -> dict[str, float]:
    """Delta and full-tree bytes for up to ``max_workers`` workers (the busiest first)."""
    counts: dict[str, int] = {}
    for r in records:
        if r.ok and r.worker:
            counts[r.worker] = counts.get(r.worker, 0) + 1
    sampled = sorted(counts, key=lambda w: (-counts[w], w))[:max_workers]
    signer = NodeIdentity.generate()
    hasher = BlockHasher(block_size)
    publishers = {w: DeltaPublisher("sim", w, 1, signer=signer, track_full_tree=True) for w in sampled}
    tree = HashRadixTree()
    finished = sorted((r for r in records if r.ok and r.worker in publishers), key=lambda r: (r.arrival_s + r.e2e_s, r.request_id))
    for r in finished:
        index = int(r.request_id.rsplit("-", 1)[1])
        chain = hasher.chain(tokenize(trace[index]))
        now = r.arrival_s + r.e2e_s
        pub = publishers[r.worker]
        if chain:
            tree.insert(chain, r.worker, now)
            for gone in tree.evict_lru(r.worker, cache_blocks):
                pub.record_evict(gone)
            pub.record_insert(tuple(chain[: tree.match(chain).get(r.worker, 0)]))
        pub.publish(Load(0, 0.0, 1.0, 1.0, tree.blocks_held(r.worker)))
    delta = sum(p.stats.delta_bytes for p in publishers.values())
    full = sum(p.stats.full_tree_bytes for p in publishers.values())
    return {
        "workers_sampled": len(sampled),
        "publishes": sum(p.stats.deltas for p in publishers.values()),
        "delta_bytes": delta,
        "full_tree_bytes": full,
        "ratio_full_vs_delta": full / delta if delta else 0.0,
    }
