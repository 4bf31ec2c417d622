"""``permamesh worker``: load a model, serve it, register locally, stop cleanly on signals.

The process prints one line ``READY <endpoint> <node_id>`` on stdout once it serves (the
embedded mesh waits for that line instead of sleeping); everything else goes to the log on
stderr. SIGINT and SIGTERM stop it: queued requests are answered ``shutting_down``, the
socket closes, and its local registry record is removed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

from permamesh.committee.client import CommitteeClient
from permamesh.directory.announce import advertised, announce
from permamesh.directory.committee import CommitteeDirectory
from permamesh.identity import NodeIdentity
from permamesh.directory.relays import CachedLookup, relay_endpoints
from permamesh.transport import serve_until_signalled, split_endpoint
from permamesh.directory.workers import WorkerRecord, discover, register, unregister
from permamesh.routing.blocks import BlockHasher
from permamesh.workers import models
from permamesh.workers.engine import Engine
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
    threads: int = 0  # torch intra-op threads, 0 = torch's default
    group: str | None = None  # worker group to route within; None = one per model, "" = none
    policy: str = "permamesh"  # routing policy inside the group
    block_size: int = 16  # tokens per block (prefix cache and routing tree)
    prefix_cache_mb: int = 1024  # KV cache budget in MiB, 0 = no prefix cache
    measure_sync: bool = False  # count full-tree broadcast bytes too (benchmarks)
    max_active: int = 4  # requests decoding at once, steps interleaved (1 = one at a time)
    claim: str | None = None  # announce this model name instead (verification drills: an impostor)
    committee: tuple[str, ...] = ()  # committee validator endpoints: routing reads reputation there
    containers: bool = False  # also run container jobs (a layer server, routing by layers)
    layer_budget_mb: int = 2048
    container_jobs: int = 2  # containers running at once
    container_uid: int = 0
    metrics_port: int | None = 0  # Prometheus /metrics on this port (0 = any free); None = no metrics
    join: tuple[str, ...] = ()  # committee validators: peers, relays and the group salt come from its directory
    advertise: str | None = None  # HOST:PORT peers reach this worker at (default: the bound address)


def group_salt(data_dir: Path, group: str) -> bytes:
    """The group's block-hash salt: 32 random bytes in ``<data_dir>/keys/group-<name>.salt``,
    made once (0600) and shared by every worker using this data directory. Created with a
    hard link, so concurrent starters agree on one value."""
    keys = Path(data_dir) / "keys"
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in group)
    path = keys / f"group-{safe}.salt"
    if not path.exists():
        tmp = keys / f".{safe}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    salt = path.read_bytes()
    if len(salt) != 32:
        raise WorkerError(f"{path} is corrupt (expected 32 bytes); delete it to make a new salt")
    return salt


def run_worker(opts: WorkerOptions) -> int:
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    identity = NodeIdentity.load_or_create(opts.data_dir / "keys", opts.name)
    directory = _join(opts) if opts.join else None  # fails fast on a wrong committee address
    loaded = models.load(opts.model, opts.model_path, opts.data_dir, opts.device, opts.seed)
    if opts.model_path and opts.model == models.DEFAULT_MODEL:
        loaded.name = Path(opts.model_path).stem
    if opts.claim:  # lets any local model pose as another: what the committee must catch
        log.warning("serving %s but announcing %r (--claim)", loaded.name, opts.claim)
        loaded.name = opts.claim
    group_name = loaded.name if opts.group is None else opts.group
    if not group_name:
        salt = b""
    elif directory is not None:
        salt = committee_group_salt(directory, group_name)
    else:
        salt = group_salt(opts.data_dir, group_name)
    hasher = BlockHasher(opts.block_size, salt)
    cache = PrefixKVCache(hasher, opts.prefix_cache_mb * 2**20) if opts.prefix_cache_mb > 0 else None
    server = WorkerServer(Engine(loaded, prefix_cache=cache), identity, ServerConfig(opts.host, opts.port, opts.max_queue,
                                                                                     max_active=opts.max_active))
    records = (lambda: directory.workers()) if directory is not None else (lambda: discover(opts.data_dir))
    relays = directory.relay_endpoints if directory is not None else (lambda: relay_endpoints(opts.data_dir))
    server.inbox = Inbox(server, CachedLookup(relays))  # overlay traffic
    if group_name:
        def peers() -> list[Peer]:
            return [Peer(r.node_id, r.endpoint, bytes.fromhex(r.sign_key))
                    for r in records() if r.group == group_name and r.model == loaded.name
                    and r.node_id != identity.node_id]

        reputation = lambda worker: 1.0  # noqa: E731 - no committee: every member counts as trusted
        committee = opts.committee or opts.join
        if committee:
            from permamesh.committee.trust import TrustView

            trust = TrustView(list(committee)).start()
            reputation = trust.reputation
            log.info("routing reads reputation from the committee at %s", ", ".join(committee))
        server.group = GroupLink(server, GroupConfig(group_name, salt, opts.block_size, opts.policy,
                                                                 measure_full_tree=opts.measure_sync), peers,
                                 reputation)

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
        _serve(server, identity, opts, loaded.name, group_name, layers)
    finally:
        if exporter is not None:
            exporter.close()
    return 0


def _join(opts: WorkerOptions) -> CommitteeDirectory:
    """The committee's directory, read once now so a wrong address fails before the model loads."""
    return CommitteeDirectory(list(opts.join), opts.data_dir / "directory" / f"{opts.name}.json").start()


def committee_group_salt(directory: CommitteeDirectory, group: str) -> bytes:
    """The group's block-hash salt, the same on every host: derived from the committee's chain
    id and the group name (members on different machines must hash prompts identically)."""
    import hashlib

    with CommitteeClient(directory.endpoints, directory.timeout_s) as client:
        chain_id = client.query("/status")["chain_id"]
    return hashlib.sha256(b"permamesh group salt v1\0" + chain_id.encode() + b"\0" + group.encode()).digest()


def _serve(server: WorkerServer, identity: NodeIdentity, opts: WorkerOptions, model: str, group_name: str,
           layers: str) -> None:
    if opts.join:
        def publish(endpoint: str) -> None:
            layer_address = ""
            if layers:  # the layer server has its own port, reached at the advertised host
                host = opts.advertise.rpartition(":")[0] if opts.advertise else None
                port = split_endpoint(layers)[0].rpartition(":")[2]
                layer_address = advertised(layers, f"{host}:{port}" if host else None)
            announce(identity, opts.join, advertised(endpoint, opts.advertise), model=model, group=group_name,
                     layers=layer_address)

        serve_until_signalled(server, identity.node_id, publish, lambda: None)
        return
    serve_until_signalled(
        server, identity.node_id,
        lambda endpoint: register(opts.data_dir, WorkerRecord(identity.node_id, endpoint, identity.public.sign_key.hex(),
                                                              model, os.getpid(), group_name, layers)),
        lambda: unregister(opts.data_dir, identity.node_id))


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
