"""Routing container jobs by the image layers a worker already holds.

The same hash-radix tree that routes prompts (:class:`~permamesh.routing.hrtree.HashRadixTree`)
keys workers by the chain of an image's layer digests
(:func:`~permamesh.routing.blocks.chain_digests`): a worker that holds the first k layers of
an image matches k blocks of its chain, whatever other images it holds. For each candidate:

    start_s = missing_bytes / fetch_bytes_per_s + running_jobs x job_s

(``missing_bytes``: the layers after its matched prefix, which it must fetch from a peer or
the source before it can start; ``job_s``: a running job's expected duration, so a busy warm
worker loses to an idle cold one when fetching is cheaper than waiting). The router picks the
smallest, ties by the longest match, then by worker id; every decision has a ``why``.

Who calls it: :class:`~permamesh.containers.host.ContainerMesh` (the local mesh of container
workers, the CLI and the benchmark). Pure: no sockets, no clock (``now`` is passed in).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Sequence

from permamesh.containers.errors import ContainerError
from permamesh.containers.images import Image
from permamesh.routing.blocks import chain_digests
from permamesh.routing.hrtree import HashRadixTree

log = logging.getLogger(__name__)


def layer_chain(image: Image) -> list[bytes]:
    """The image's layers as tree blocks (one per layer digest, chained)."""
    return chain_digests([d.digest.encode("ascii") for d in image.layers])


@dataclass(frozen=True)
class Candidate:
    worker: str
    running_jobs: int = 0
    fetch_bytes_per_s: float = 100e6  # how fast it can fetch missing layers (peer or source)


@dataclass(frozen=True)
class Choice:
    worker: str
    matched_layers: int
    missing_bytes: int
    start_s: float
    why: str


class LayerRouter:
    def __init__(self, job_s: float = 1.0) -> None:
        self.tree = HashRadixTree()
        self.job_s = job_s

    def holds(self, worker: str, image: Image, layers: int, now: float) -> None:
        """``worker`` now holds the first ``layers`` layers of ``image``."""
        chain = layer_chain(image)[:layers]
        if chain:
            self.tree.insert(chain, worker, now)

    def forget(self, worker: str, image: Image, from_layer: int = 0) -> None:
        """``worker`` evicted layers of ``image`` from ``from_layer`` on (or went away)."""
        chain = layer_chain(image)
        if from_layer < len(chain):
            self.tree.remove(chain[:from_layer + 1], worker)

    def drop(self, worker: str) -> None:
        self.tree.drop_worker(worker)

    def choose(self, image: Image, candidates: Sequence[Candidate]) -> Choice:
        if not candidates:
            raise ContainerError("no container worker to run the job on")
        matched = self.tree.match(layer_chain(image))
        sizes = [d.size for d in image.layers]
        best = None
        for c in sorted(candidates, key=lambda c: c.worker):
            k = matched.get(c.worker, 0)
            missing = sum(sizes[k:])
            start = missing / max(c.fetch_bytes_per_s, 1.0) + c.running_jobs * self.job_s
            key = (start, -k, c.worker)
            if best is None or key < best[0]:
                best = (key, c, k, missing, start)
        _, c, k, missing, start = best
        why = (f"{c.worker} holds {k} of {len(sizes)} layers ({missing} bytes to fetch), "
               f"{c.running_jobs} jobs running: est. start {start:.3f} s, the lowest of "
               f"{len(candidates)}")
        return Choice(c.worker, k, missing, start, why)
