"""Where a node or client finds the committee when ``--join`` is not given.

Every role reaches the mesh through the committee's directory; ``--join VALIDATOR[,...]`` is
the one thing a new host needs. :func:`resolve_join` takes, in order: the ``--join`` values,
``$PERMAMESH_JOIN``, then ``<data_dir>/join``: a one-line file of validator addresses that a
launcher on this machine (``permamesh demo --serve``) writes with :func:`remember_join` while
its committee runs and removes with :func:`forget_join` when it stops. The file is a
default for local tools (``permamesh submit`` after ``permamesh demo --serve``), not a way
for nodes to find each other: what it names is checked like any ``--join``, and the nodes
and their liveness still come from the committee.

Who calls it: the CLI of every role and tool, :class:`permamesh.Client`, the demo.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from permamesh.directory.committee import parse_join
from permamesh.directory.errors import DirectoryError

log = logging.getLogger(__name__)

ENV = "PERMAMESH_JOIN"
HINT = ("pass --join VALIDATOR (a committee member's address; comma-separated for several), set "
        f"${ENV}, or start a local mesh with `permamesh demo --serve`")


def _file(data_dir: Path) -> Path:
    return Path(data_dir) / "join"


def resolve_join(values: str | Sequence[str] | None, data_dir: Path | None, *, required: str = "") -> tuple[str, ...]:
    """The committee to join: ``values``, else ``$PERMAMESH_JOIN``, else ``<data_dir>/join``.

    Returns () when none is found, unless ``required`` names what needs it: then a
    :class:`DirectoryError` says how to give one."""
    if values:
        return tuple(parse_join(values))
    if os.environ.get(ENV, "").strip():
        return tuple(parse_join(os.environ[ENV]))
    if data_dir is not None:
        try:
            text = _file(data_dir).read_text().strip()
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise DirectoryError(f"cannot read {_file(data_dir)}: {exc}") from None
        if text:
            log.info("joining the committee named in %s", _file(data_dir))
            return tuple(parse_join(text))
    if required:
        raise DirectoryError(f"{required} needs the committee's directory: {HINT}")
    return ()


def remember_join(data_dir: Path, endpoints: Sequence[str]) -> Path:
    """Write ``<data_dir>/join`` (atomically) for local tools to find this committee."""
    path = _file(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".join.{os.getpid()}.tmp")
    tmp.write_text(",".join(endpoints) + "\n")
    os.replace(tmp, path)
    return path


def forget_join(data_dir: Path, endpoints: Sequence[str]) -> None:
    """Remove ``<data_dir>/join`` if it still names ``endpoints`` (another launcher may have
    replaced it since)."""
    path = _file(data_dir)
    try:
        if path.read_text().strip() == ",".join(endpoints):
            path.unlink()
    except FileNotFoundError:
        pass
