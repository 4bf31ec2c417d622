"""What a client or node knows of a worker: :class:`WorkerRecord`, built from the directory.

Workers are found only through the committee's directory
(:class:`~permamesh.directory.committee.CommitteeDirectory`): each record comes from a
running worker's signed descriptor (its advertised endpoint with the transport key that
authenticates it, its signing key, model, group and layer server). Nothing here reads a
shared file or a PID.

Who calls it: the overlay client and the clients (records to pick entry workers from), the
worker's group link (its peers), the gateway and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


def default_data_dir() -> Path:
    """``$PERMAMESH_HOME``, else ``~/.local/share/permamesh``."""
    env = os.environ.get("PERMAMESH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "permamesh"


@dataclasses.dataclass(frozen=True)
class WorkerRecord:
    node_id: str
    endpoint: str  # tcp://host:port?key=HEX, the link that authenticates the worker
    sign_key: str  # hex Ed25519 public key
    model: str
    group: str = ""  # the worker group it routes within ("" = none)
    layers: str = ""  # its layer server when it runs containers ("" = it runs none)
    engine: str = "torch"  # what computes its answers (torch, llamacpp): verification's tolerance follows it
