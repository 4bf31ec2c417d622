"""Container workers on one machine, and the router that sends each job to one of them.

- :class:`ContainerWorker`: one worker's container side: its :class:`LayerStore` (byte budget,
  LRU), its :class:`RootfsCache` and the runner. For a job it fetches each missing layer from a
  peer that holds it (found through the router's tree; the copy is verified against the digest
  as it is written, so a peer cannot hand over a wrong layer), else from the job's source,
  prepares the rootfs (cached by chain id) and runs the command isolated.
- :class:`ContainerMesh`: N workers under one directory plus a :class:`LayerRouter`, rebuilt
  from the stores on disk at start, updated after every job (eviction included).

A worker that serves (``ContainerMesh(serve=True)``, what the CLI and the benchmark use)
answers layer requests on a zmq socket (:mod:`permamesh.containers.transfer`), and its peers
fetch from it over the network; the router's tree says which peer holds which layers.

Who calls it: ``permamesh run``, ``permamesh bench containers`` and tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from permamesh.containers.errors import ContainerError
from permamesh.containers.images import Image, LayoutBlobs
from permamesh.containers.limits import Limits
from permamesh.containers.placement import Candidate, Choice, LayerRouter, layer_chain
from permamesh.containers.rootfs import RootfsCache
from permamesh.containers.runner import OnOutput, RunResult, run
from permamesh.containers.store import LayerStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    worker: str
    choice: Choice
    result: RunResult
    from_peers: int  # layers fetched from other workers
    from_source: int  # layers fetched from the job's source
    warm: bool  # the rootfs was already prepared
    prepare_s: float  # fetching and unpacking
    total_s: float


@dataclass(frozen=True)
class RemotePeer:
    """A container worker known only by the endpoint of its layer server."""

    name: str
    endpoint: str
    store: None = None


Source = LayoutBlobs | Sequence[str] | None  # an image layout here, or layer servers elsewhere


def _fetch_from_any(endpoints: Sequence[str], digest: str, size: int, store: LayerStore) -> None:
    from permamesh.containers.transfer import fetch_layer

    errors = []
    for endpoint in endpoints:
        try:
            fetch_layer(endpoint, digest, size, store)  # verified as written
            return
        except ContainerError as exc:
            errors.append(f"{endpoint}: {exc}")
    raise ContainerError(f"layer {digest} could not be fetched from the job's sources ({'; '.join(errors)})")


class ContainerWorker:
    def __init__(self, name: str, root: Path, budget_bytes: int, max_rootfs: int = 16) -> None:
        self.name = name
        self.store = LayerStore(Path(root) / "layers", budget_bytes)
        self.rootfs = RootfsCache(Path(root) / "rootfs", self.store, max_rootfs)
        self.endpoint: str | None = None  # where its LayerServer answers, when serving
        self._server = None

    def serve(self) -> str:
        from permamesh.containers.transfer import LayerServer, LayerServerThread

        self._server = LayerServerThread(LayerServer(self.store), name=f"layers-{self.name}")
        self.endpoint = self._server.start()
        return self.endpoint

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server, self.endpoint = None, None

    def held_prefix(self, image: Image) -> int:
        held = self.store.holdings()
        count = 0
        for desc in image.layers:
            if desc.digest not in held:
                break
            count += 1
        return count

    def fetch(self, image: Image, peers: Sequence[ContainerWorker | RemotePeer], source: Source,
              holders: dict[str, int] | None = None) -> tuple[int, int]:
        """Bring every layer of ``image`` into the store: from peers first, then the source.

        ``holders`` (worker -> leading layers held, from the router's tree) says who to ask;
        without it, peers' stores are asked directly (one machine). ``source`` is the job's
        image layout, or layer-server endpoints (a job that came over the network)."""
        from permamesh.containers.transfer import fetch_layer

        from_peers = from_source = 0
        for index, desc in enumerate(image.layers):
            if self.store.has(desc.digest):
                continue
            candidates = [p for p in peers if p is not self and (
                holders.get(p.name, 0) > index if holders is not None else p.store.has(desc.digest))]
            fetched = False
            for peer in candidates:
                try:
                    if peer.endpoint is not None:
                        fetch_layer(peer.endpoint, desc.digest, desc.size, self.store)  # verified
                    else:
                        with peer.store.pin([desc.digest]), peer.store.open(desc.digest) as stream:
                            self.store.put(desc.digest, stream, desc.size)  # verified while written
                    fetched = True
                    break
                except ContainerError as exc:
                    log.warning("layer %s from %s refused (%s); trying elsewhere", desc.digest, peer.name, exc)
            if fetched:
                from_peers += 1
                continue
            if not source:
                raise ContainerError(f"layer {desc.digest} is on no peer and the job gave no source")
            if isinstance(source, LayoutBlobs):
                with source.open(desc, "layer") as stream:
                    self.store.put(desc.digest, stream, desc.size)
            else:
                _fetch_from_any(source, desc.digest, desc.size, self.store)
            from_source += 1
        return from_peers, from_source

    def run_job(self, image: Image, argv: Sequence[str], peers: Sequence[ContainerWorker],
                source: Source, limits: Limits, runtime: str = "auto",
                holders: dict[str, int] | None = None, on_output: OnOutput | None = None) -> tuple:
        """Fetch, prepare and run one job; ``on_output`` gets its output as it is read."""
        t0 = time.perf_counter()
        warm = self.rootfs.path_for(image).is_dir()
        from_peers = from_source = 0
        with self.rootfs.hold(image):
            with self.store.pin([d.digest for d in image.layers]):
                if not warm:
                    from_peers, from_source = self.fetch(image, peers, source, holders)
                rootfs = self.rootfs.prepare(image)
            prepare_s = time.perf_counter() - t0
            result = run(rootfs, list(argv) or list(image.cmd), image.env, image.workdir or "/", limits, runtime,
                         on_output)
        return result, from_peers, from_source, warm, prepare_s, time.perf_counter() - t0


class ContainerMesh:
    """``workers`` container workers under ``root`` (state persists across runs)."""

    def __init__(self, root: Path, workers: int = 3, budget_bytes: int = 512 * 2**20, job_s: float = 1.0,
                 serve: bool = False) -> None:
        if workers < 1:
            raise ContainerError("a container mesh needs at least one worker")
        self.root = Path(root)
        self.workers = [ContainerWorker(f"cw-{i}", self.root / f"cw-{i}", budget_bytes) for i in range(workers)]
        if serve:  # each worker answers layer requests on loopback; peers fetch over zmq
            try:
                for w in self.workers:
                    w.serve()
            except BaseException:
                self.close()
                raise
        self.router = LayerRouter(job_s)
        self._images: dict[str, Image] = {}
        self._clock = 0.0

    def _sync(self, image: Image) -> None:
        """Tell the tree what each worker holds of ``image`` now (after fetches or evictions)."""
        self._images[image.manifest_digest] = image
        for img in self._images.values():
            for w in self.workers:
                held = w.held_prefix(img)
                self.router.forget(w.name, img, held)
                self._clock += 1.0
                self.router.holds(w.name, img, held, self._clock)

    def choose(self, image: Image, busy: dict[str, int] | None = None) -> Choice:
        self._sync(image)
        busy = busy or {}
        return self.router.choose(image, [Candidate(w.name, busy.get(w.name, 0)) for w in self.workers])

    def run(self, image: Image, argv: Sequence[str] = (), source: LayoutBlobs | None = None,
            limits: Limits = Limits(), runtime: str = "auto", worker: str | None = None,
            on_output: OnOutput | None = None) -> JobOutcome:
        """Route (or use ``worker``), fetch, prepare and run one job; ``on_output(stdout,
        stderr)`` gets its output as the job writes it."""
        choice = self.choose(image)
        if worker is not None:
            choice = Choice(worker, 0, 0, 0.0, f"{worker} chosen by the caller")
        target = next((w for w in self.workers if w.name == choice.worker), None)
        if target is None:
            raise ContainerError(f"no container worker named {choice.worker!r}")
        holders = self.router.tree.match(layer_chain(image))  # who holds which leading layers
        result, peers, src, warm, prep, total = target.run_job(image, argv, self.workers, source, limits, runtime,
                                                               holders, on_output)
        self._sync(image)
        return JobOutcome(target.name, choice, result, peers, src, warm, prep, total)

    def close(self) -> None:
        for w in self.workers:
            w.close()

    def __enter__(self) -> ContainerMesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
