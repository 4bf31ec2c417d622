"""The overlay benchmark on a real mesh: relay processes on loopback and a real entry worker.

Two measurements, both through the real code path (onion cells over zmq between relay
processes, the entry worker's inbox, acks and answers over reply blocks):

- **overhead vs direct**: first, with every relay up, the same small request alternately sent
  directly to the worker and through the overlay; the p50 and p90 of the difference in
  end-to-end time. Twice: with the client's paths prepared in the idle time between requests
  (the default client; it waits for preparation before each pair, so no preparation overlaps a
  timing) and ``cold``, with every X25519 agreement made inside the request.
- **delivery vs relay failure**: then, for each failure rate p in increasing order, relays are
  SIGKILLed until a fraction p of them is dead (the clients' relay lists still hold them, as
  a stale directory would), and ``requests`` requests are sent per scheme (single-path onion,
  and S-IDA (4,3), (5,3), (6,3) with targeted resends). A request counts as delivered when its
  answer comes back. One mesh serves every p, so relays start once.
- **streaming** (with every relay up, before the failures): time to first token and to the
  whole answer through the overlay vs direct, 1 and 8 clients at once
  (:mod:`~permamesh.bench.overlaystream`).

The entry worker runs in this process (a real :class:`WorkerServer` with tiny-random, on a
real socket, registered in the local registry the relays read), so no model process has to
start; the relays are separate processes, so killing one is a real failure.

Who calls it: :mod:`permamesh.bench.overlay` (``permamesh bench overlay``) as its ``real`` part.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from permamesh.client.blocking import Client
from permamesh.identity import NodeIdentity
from permamesh.demo import enroll
from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
from permamesh.directory.announce import advertised, announce
from permamesh.directory.relays import CachedLookup
from permamesh.bench.overlaystream import StreamBenchConfig, measure_streaming, stream_delivery
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.sender import OverlayClient, OverlayConfig

log = logging.getLogger(__name__)

SCHEMES = ((1, 1), (4, 3), (5, 3), (6, 3))


@dataclasses.dataclass(frozen=True)
class RealOverlayConfig:
    relays: int = 100
    failure_rates: tuple[float, ...] = (0.0, 0.03, 0.10, 0.20)
    schemes: tuple[tuple[int, int], ...] = SCHEMES
    requests: int = 100  # per scheme and failure rate
    overhead_pairs: int = 60
    stream_requests: int = 40  # timed streaming pairs per client thread
    ack_timeout_s: float = 0.3  # loopback: the worker acks within milliseconds
    seed: int = 0
    model: str = "tiny-random"  # the entry worker's model (backend auto: llama.cpp for smollm2-135m)
    stream_tokens: int = 32  # tokens per streamed answer
    data_dir: Path | None = None  # where a real model's conversion is cached (None: the default data dir)

    def __post_init__(self) -> None:
        if self.stream_tokens < 1:
            raise ValueError(f"stream_tokens must be >= 1, not {self.stream_tokens}")


def quick_config(seed: int = 0) -> RealOverlayConfig:
    return RealOverlayConfig(relays=20, failure_rates=(0.03, 0.10), schemes=((1, 1), (4, 3)), requests=15,
                             overhead_pairs=10, stream_requests=8, seed=seed)


class _EntryWorker:
    """A worker in this process (tiny-random unless the config names a model), joined through the mesh's committee (registered
    by its seed partner, descriptor announced) so relays find it in the directory."""

    NAME = "bench-entry"

    def __init__(self, mesh: EmbeddedMesh, model: str = "tiny-random", model_dir: Path | None = None) -> None:
        from permamesh.workers import backends
        from permamesh.workers.inbox import Inbox
        from permamesh.workers.server import ServerThread, WorkerServer

        data_dir = Path(mesh.config.data_dir)
        enroll.register_nodes(mesh.net, mesh.committee, data_dir, [self.NAME], [], model)
        identity = NodeIdentity.load_or_create(data_dir / "keys", self.NAME)
        self.server = WorkerServer(backends.load_engine("auto", model, None, model_dir, "cpu", 0), identity)
        self.server.inbox = Inbox(self.server, CachedLookup(mesh.directory().relay_endpoints))
        self.thread = ServerThread(self.server)
        self.endpoint = self.thread.start()
        announce(identity, mesh.join, advertised(self.endpoint, None), model=self.server.engine.loaded.name)
        mesh.wait_running(60.0, also=(identity.node_id,))

    def stop(self) -> None:
        self.thread.stop()


def _one_request(client: OverlayClient) -> bool:
    try:
        client.generate("ping", max_tokens=2)
        return True
    except OverlayError as exc:
        log.debug("not delivered: %s", exc)
        return False


def measure_delivery(mesh: _Mesh, cfg: RealOverlayConfig, say: Callable[[str], None] = print) -> list[dict]:
    rows, relays = [], mesh.mesh.relays()
    rng = random.Random(cfg.seed)
    order = list(range(len(mesh.mesh.relay_children)))
    rng.shuffle(order)  # relays die in this order as p grows
    dead = 0
    for p in sorted(cfg.failure_rates):
        while dead < round(p * cfg.relays):
            mesh.mesh.kill_relay(order[dead])
            dead += 1
        for n, k in cfg.schemes:
            # a fresh path set per request (keep_paths=False), as the simulation models: a session
            # would learn the dead relays on its first timeout and deliver better than this
            oc = OverlayConfig(n=n, k=k, max_cloves=max(8, n + 3), ack_timeout_s=cfg.ack_timeout_s, answer_grace_s=1.0,
                               answer_timeout_s=30.0, keep_paths=False)
            started, clove_counts, ok = time.monotonic(), [], 0
            with OverlayClient(relays, [mesh.worker_record], oc, random.Random(rng.getrandbits(64))) as client:
                for _ in range(cfg.requests):
                    delivered = _one_request(client)
                    ok += delivered
                    if delivered and client.last is not None:
                        clove_counts.append(client.last.cloves_sent / n)
            rows.append({"scheme": "onion" if n == 1 else "sida", "n": n, "k": k, "failure_rate": p,
                         "dead_relays": dead, "relays": cfg.relays, "requests": cfg.requests,
                         "delivery_rate": ok / cfg.requests,
                         "mean_attempts": statistics.fmean(clove_counts) if clove_counts else None,
                         "wall_s": round(time.monotonic() - started, 2)})
            say(f"  real mesh: {dead}/{cfg.relays} relays dead, ({n},{k}): delivered {ok}/{cfg.requests}")
        streamed = stream_delivery(relays, mesh.worker_record, cfg.stream_requests, cfg.ack_timeout_s, cfg.seed)
        rows.append({"scheme": "stream", "rule": "stream", "n": 4, "k": 3, "failure_rate": p, "dead_relays": dead,
                     "relays": cfg.relays, "requests": streamed["streams"],
                     "delivery_rate": streamed["in_order"] / max(1, streamed["streams"]), **streamed})
        say(f"  real mesh: {dead}/{cfg.relays} relays dead, streamed (4,3): {streamed['in_order']}/{streamed['streams']} "
            f"complete and in order")
    return rows


def measure_overhead(mesh: _Mesh, cfg: RealOverlayConfig, say: Callable[[str], None] = print) -> dict:
    """Overlay minus direct time per pair, for a client that prepared its paths while idle
    (the default) and for one that does all its X25519 work inside the request (``cold``)."""
    result = {"pairs": cfg.overhead_pairs}
    for label, prepare in (("", True), ("cold_", False)):
        direct_s, overlay_s = _overhead_pairs(mesh, cfg, prepare)
        diffs = sorted((o - d) * 1000 for o, d in zip(overlay_s, direct_s))
        result.update({f"{label}direct_ms_p50": statistics.median(direct_s) * 1000,
                       f"{label}overlay_ms_p50": statistics.median(overlay_s) * 1000,
                       f"{label}overhead_ms_p50": statistics.median(diffs),
                       f"{label}overhead_ms_p90": diffs[int(0.9 * (len(diffs) - 1))]})
    say(f"  real mesh: overhead p50 {result['overhead_ms_p50']:.1f} ms with paths prepared "
        f"(direct {result['direct_ms_p50']:.1f} ms, overlay {result['overlay_ms_p50']:.1f} ms), "
        f"{result['cold_overhead_ms_p50']:.1f} ms cold")
    return result


def _overhead_pairs(mesh: _Mesh, cfg: RealOverlayConfig, prepare: bool) -> tuple[list[float], list[float]]:
    relays = mesh.mesh.relays()
    direct_s, overlay_s = [], []
    config = OverlayConfig(ack_timeout_s=1.0, prepare=prepare)
    with OverlayClient(relays, [mesh.worker_record], config, random.Random(cfg.seed)) as client, \
            Client([mesh.worker.endpoint]) as direct:
        for i in range(cfg.overhead_pairs + 3):
            client.wait_prepared()  # idle time: nothing of the overlay runs during either timing
            t0 = time.monotonic()
            direct.generate("ping", max_tokens=2)
            t1 = time.monotonic()
            client.generate("ping", max_tokens=2)
            t2 = time.monotonic()
            if i >= 3:  # the first pairs warm connections up
                direct_s.append(t1 - t0)
                overlay_s.append(t2 - t1)
    return direct_s, overlay_s


def run_real(cfg: RealOverlayConfig, say: Callable[[str], None] = print) -> dict:
    """Both measurements on one mesh: ``{"real_mesh": [rows], "overhead": {...}}``."""
    say(f"  real mesh: starting {cfg.relays} relay processes and an entry worker...")
    with _Mesh(cfg.relays, cfg.model, cfg.data_dir) as mesh:
        overhead = measure_overhead(mesh, cfg, say)
        streaming = measure_streaming(mesh.mesh.relays(), mesh.worker_record, mesh.worker.endpoint,
                                      StreamBenchConfig(requests=cfg.stream_requests, seed=cfg.seed,
                                                        max_tokens=cfg.stream_tokens), say)
        engine = mesh.worker.server.engine
        streaming = [row | {"model": engine.loaded.name, "engine": engine.backend} for row in streaming]
        return {"real_mesh": measure_delivery(mesh, cfg, say), "overhead": overhead, "streaming": streaming}


class _Mesh:
    """Relay processes plus the in-process entry worker, in a throwaway data directory."""

    def __init__(self, relays: int, model: str = "tiny-random", model_dir: Path | None = None) -> None:
        self.relays, self.model, self.model_dir = relays, model, model_dir

    def __enter__(self) -> _Mesh:
        self.dir = Path(tempfile.mkdtemp(prefix="permamesh-overlay-"))
        self.mesh = EmbeddedMesh(MeshConfig(self.dir, workers=0, relays=self.relays, start_timeout_s=120.0))
        try:
            self.mesh.start()
            self.worker = _EntryWorker(self.mesh, self.model, self.model_dir)
            self.worker_record = next(w for w in self.mesh.workers() if w.node_id == self.worker.server.worker_id)
        except BaseException:
            self.mesh.stop()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.worker.stop()
        finally:
            self.mesh.stop()
            shutil.rmtree(self.dir, ignore_errors=True)
