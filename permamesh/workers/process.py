"""``permamesh worker``: load a model, serve it, register locally, stop cleanly on signals.

The process prints one line ``READY <endpoint> <node_id>`` on stdout once it serves (the
embedded mesh waits for that line instead of sleeping); everything else goes to the log on
stderr. SIGINT and SIGTERM stop it: queued requests are answered ``shutting_down``, the
socket closes, and its local registry record is removed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

from permamesh.identity import NodeIdentity
from permamesh.localmesh import WorkerRecord, register, unregister
from permamesh.workers import models
from permamesh.workers.engine import Engine
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


def run_worker(opts: WorkerOptions) -> int:
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    identity = NodeIdentity.load_or_create(opts.data_dir / "keys", opts.name)
    loaded = models.load(opts.model, opts.model_path, opts.data_dir, opts.device, opts.seed)
    if opts.model_path and opts.model == models.DEFAULT_MODEL:
        loaded.name = Path(opts.model_path).stem
    server = WorkerServer(Engine(loaded), identity, ServerConfig(opts.host, opts.port, opts.max_queue))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(endpoint: str) -> None:
            register(opts.data_dir, WorkerRecord(identity.node_id, endpoint, identity.public.sign_key.hex(), loaded.name, os.getpid()))
            print(f"READY {endpoint} {identity.node_id}", flush=True)

        try:
            await server.serve(stop, on_ready=ready)
        finally:
            unregister(opts.data_dir, identity.node_id)

    asyncio.run(main())
    return 0
