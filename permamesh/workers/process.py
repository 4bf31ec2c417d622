"""``permamesh worker``: load a model, serve it, join the mesh, stop cleanly on signals.

The process prints one line ``READY <endpoint> <node_id>`` on stdout once it serves (the
embedded mesh waits for that line instead of sleeping); everything else goes to the log on
stderr. With ``--join`` it reads the committee's directory (group peers, relays for overlay
replies, layer holders) and publishes its signed descriptor there once it serves; without it
the worker serves direct clients only (no group, no overlay). SIGINT and SIGTERM stop it:
queued requests are answered ``shutting_down`` and the socket closes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from permamesh.directory.announce import advertised, announce
from permamesh.directory.committee import CommitteeDirectory
from permamesh.directory.groupsalt import SaltDuty, group_salt
from permamesh.identity import NodeIdentity
from permamesh.directory.relays import CachedLookup
from permamesh.transport import serve_until_signalled, split_endpoint
from permamesh.routing.blocks import BlockHasher
from permamesh.workers import backends, models
from permamesh.workers.inbox import Inbox
from permamesh.workers.group import GroupConfig, GroupLink, Peer
from permamesh.workers.prefix_cache import PrefixKVCache
from permamesh.workers.errors import WorkerError
from permamesh.workers.server import ServerConfig, WorkerServer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    data_dir: Path
    name: str = "worker"  # key file name under <data_dir>/keys
    model: str = models.DEFAULT_MODEL
    model_path: str | None = None
    device: str = "auto"  # auto, cpu or cuda
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    max_queue: int = 256  # waiting requests at most
    seed: int = 0  # weights seed for tiny-random
    threads: int = 0  # the engine's CPU threads, 0 = its default (backends.load_engine)
    group: str | None = None  # worker group to route within; None = one per model, "" = none
    policy: str = "permamesh"  # routing policy inside the group
    block_size: int = 16  # tokens per block (prefix cache and routing tree)
    prefix_cache_mb: int = 1024  # KV cache budget in MiB, 0 = no prefix cache
    measure_sync: bool = False  # count full-tree broadcast bytes too (benchmarks)
    max_active: int = 8  # requests decoded together, one batched forward per step (1 = one at a time)
    claim: str | None = None  # announce this model name instead (verification drills: an impostor)
    committee: tuple[str, ...] = ()  # committee validator endpoints: routing reads reputation there
    containers: bool = False  # also run container jobs (a layer server, routing by layers)
    layer_budget_mb: int = 2048
    container_jobs: int = 2  # containers running at once
    container_uid: int = 0
    metrics_port: int | None = 0  # Prometheus /metrics on this port (0 = any free); None = no metrics
    join: tuple[str, ...] = ()  # committee validators: peers, relays and the group salt come from its directory
    advertise: str | None = None  # HOST:PORT peers reach this worker at (default: the bound address)
    backend: str = "auto"  # torch, llamacpp, or auto (llama.cpp for a GGUF on CPU where it is installed)
    gguf_weights: str = "fast"  # llama.cpp: compute with the file or a copy (workers/ggufweights.py MODES)


def run_worker(opts: WorkerOptions) -> int:
    identity = NodeIdentity.load_or_create(opts.data_dir / "keys", opts.name)
    directory = _join(opts) if opts.join else None  # fails fast on a wrong committee address
    engine = backends.load_engine(opts.backend, opts.model, opts.model_path, opts.data_dir, opts.device, opts.seed,
                                  max_active=opts.max_active, threads=opts.threads, gguf_weights=opts.gguf_weights)
    loaded = engine.loaded
    if opts.model_path and opts.model == models.DEFAULT_MODEL:
        loaded.name = Path(opts.model_path).stem
    if opts.claim:  # lets any local model pose as another: what the committee must catch
        log.warning("serving %s but announcing %r (--claim)", loaded.name, opts.claim)
        loaded.name = opts.claim
    group_name = loaded.name if opts.group is None else opts.group
    if group_name and directory is None:
        if opts.group:
            raise WorkerError(f"--group {opts.group!r} needs --join: group peers come from the committee's directory")
        log.info("no --join: serving direct clients only (no group, no overlay)")
        group_name = ""
    server = WorkerServer(engine, identity, ServerConfig(opts.host, opts.port, opts.max_queue,
                                                                 max_active=opts.max_active))
    records = (lambda: directory.workers()) if directory is not None else list
    relays = directory.relay_endpoints if directory is not None else dict
    server.inbox = Inbox(server, CachedLookup(relays))  # overlay traffic
    reputation = lambda worker: 1.0  # noqa: E731 - no committee: every member counts as trusted
    if group_name:
        def peers() -> list[Peer]:
            return [Peer(r.node_id, r.endpoint, bytes.fromhex(r.sign_key))
                    for r in records() if r.group == group_name and r.model == loaded.name
                    and r.node_id != identity.node_id]

        committee = opts.committee or opts.join
        if committee:
            from permamesh.committee.trust import TrustView

            trust = TrustView(list(committee)).start()
            reputation = trust.reputation
            log.info("routing reads reputation from the committee at %s", ", ".join(committee))

    def install_group(salt: bytes) -> None:
        """The salt-keyed parts: the prefix cache and the group link. Called on the server's
        loop: before it serves without a group, or once the group's salt is known (requests
        served before that ran alone, without a prefix cache)."""
        if opts.prefix_cache_mb > 0:
            server.engine.prefix_cache = PrefixKVCache(BlockHasher(opts.block_size, salt), opts.prefix_cache_mb * 2**20)
        if group_name:
            server.group = GroupLink(server, GroupConfig(group_name, salt, opts.block_size, opts.policy,
                                                         measure_full_tree=opts.measure_sync), peers, reputation)
            server.group.start()  # serve() started before the salt was known; it still closes the link

    if not group_name:
        install_group(b"")

    layers = ""
    if opts.containers:
        layers = _start_containers(server, opts, records)
    exporter = None
    if opts.metrics_port is not None:
        from permamesh.ops.metrics import Exporter
        from permamesh.workers.telemetry import WorkerTelemetry

        server.telemetry = WorkerTelemetry(server)
        exporter = Exporter(server.telemetry.registry, opts.data_dir, identity.node_id, "worker", opts.host,
                            opts.metrics_port)
    try:
        _serve(server, identity, opts, loaded.name, group_name, layers, directory, install_group)
    finally:
        if exporter is not None:
            exporter.close()
    return 0


def _join(opts: WorkerOptions) -> CommitteeDirectory:
    """The committee's directory, read once now so a wrong address fails before the model loads."""
    return CommitteeDirectory(list(opts.join), opts.data_dir / "directory" / f"{opts.name}.json").start()


def _serve(server: WorkerServer, identity: NodeIdentity, opts: WorkerOptions, model: str, group_name: str,
           layers: str, directory: CommitteeDirectory | None, install_group) -> None:
    if opts.join:
        duties: list[SaltDuty] = []

        def publish(endpoint: str) -> None:
            """Announce, then learn the group's salt (sealed to this worker on the committee's
            ledger: the ledger seals only to announced members), then build what it keys (on
            the serving loop). Runs on a thread of its own while the worker already serves."""
            layer_address = ""
            if layers:  # the layer server has its own port, reached at the advertised host
                host = opts.advertise.rpartition(":")[0] if opts.advertise else None
                port = split_endpoint(layers)[0].rpartition(":")[2]
                layer_address = advertised(layers, f"{host}:{port}" if host else None)
            announce(identity, opts.join, advertised(endpoint, opts.advertise), model=model, group=group_name,
                     layers=layer_address, engine=server.engine.backend)
            if group_name:  # meanwhile the worker serves alone (no prefix cache, no group)
                salt = group_salt(directory, identity, group_name, timeout_s=60.0)
                server.call_soon(lambda: install_group(salt))
                duties.append(SaltDuty(directory, identity, group_name, salt).start())

        def stop_duties() -> None:
            for duty in duties:
                duty.stop()

        serve_until_signalled(server, identity.node_id, publish, stop_duties)
        return
    serve_until_signalled(server, identity.node_id, lambda endpoint: None, lambda: None)


def _start_containers(server: WorkerServer, opts: WorkerOptions, records) -> str:
    """Give ``server`` a container service (its state under DATA_DIR/containers/<node id>);
    returns the layer server's endpoint for the registry record."""
    from permamesh.containers.service import ContainerPeer, ContainerService, ServiceConfig

    def peers() -> list[ContainerPeer]:
        return [ContainerPeer(r.node_id, r.endpoint, r.layers, bytes.fromhex(r.sign_key))
                for r in records() if r.layers]

    config = ServiceConfig(opts.data_dir / "containers" / server.worker_id, opts.layer_budget_mb,
                           opts.container_jobs, uid=opts.container_uid)
    server.containers = ContainerService(server, config, peers)
    endpoint = server.containers.start()
    log.info("running container jobs; layer server on %s", endpoint)
    return endpoint
