"""The local mesh registry: which workers run on this machine, and how to reach them.

A worker started with a data directory writes ``<data_dir>/run/workers/<node_id>.json`` once
it is serving and removes it when it stops; ``permamesh submit`` and :class:`permamesh.Client`
read these records to find workers (and pin each worker's signing key, so replies are
authenticated). Records whose process is gone are ignored and cleaned up. This is discovery
for one machine only; the committee's registry replaces it across machines.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    """``$PERMAMESH_HOME``, else ``~/.local/share/permamesh``."""
    env = os.environ.get("PERMAMESH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "permamesh"


@dataclasses.dataclass(frozen=True)
class WorkerRecord:
    node_id: str
    endpoint: str  # tcp://host:port
    sign_key: str  # hex Ed25519 public key
    model: str
    pid: int
    group: str = ""  # the worker group it routes within ("" = none)
    layers: str = ""  # its layer server when it runs containers ("" = it runs none)


def _dir(data_dir: Path) -> Path:
    return Path(data_dir) / "run" / "workers"


def write_record(directory: Path, record) -> Path:
    """Write a registry ``record`` (a dataclass with ``node_id``) as ``<node_id>.json``
    atomically: a temporary file of this process renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record.node_id}.json"
    tmp = directory / f".{record.node_id}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(record)))
    os.replace(tmp, path)
    return path


def read_records(directory: Path, cls, errors: tuple[type[Exception], ...] = (), what: str = "record") -> list:
    """The records of live processes in ``directory``, sorted by node id, built as ``cls``
    (unknown fields ignored). Unreadable files are skipped with a warning (``errors`` are the
    extra exceptions ``cls`` may raise); records of dead processes are deleted."""
    found = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            fields = json.loads(path.read_text())
            if not isinstance(fields, dict):
                raise ValueError("not a JSON object")
            record = cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})
            if path.stem != record.node_id:
                raise ValueError(f"file name does not match node id {record.node_id}")
        except (OSError, ValueError, TypeError, *errors) as exc:
            log.warning("ignoring unreadable %s %s: %s", what, path, exc)
            continue
        if record.pid and process_alive(record.pid):
            found.append(record)
        else:
            path.unlink(missing_ok=True)
    return found


def register(data_dir: Path, record: WorkerRecord) -> Path:
    return write_record(_dir(data_dir), record)


def unregister(data_dir: Path, node_id: str) -> None:
    (_dir(data_dir) / f"{node_id}.json").unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def discover(data_dir: Path) -> list[WorkerRecord]:
    """Live workers registered under ``data_dir``, sorted by node id."""
    return read_records(_dir(data_dir), WorkerRecord, what="worker record")
