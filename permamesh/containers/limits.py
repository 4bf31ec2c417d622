"""Resource limits for one container run, and what this host can actually enforce.

:class:`Limits` is the caller's request (a worker running a job passes one to
:func:`permamesh.containers.runner.run`). :func:`probe_host` answers, once per process, which
runtimes are installed (runc, bubblewrap), how /sys/fs/cgroup is laid out, and whether a
runc container with memory and pids limits really starts *and* ends up in a cgroup with
those limits set. The runner asks the probe before writing ``linux.resources`` into a
bundle; when limits cannot be enforced it says so in ``RunResult.notes`` instead of failing.

The probe is real: it builds a throwaway busybox bundle (from ``/bin/busybox`` of the
``busybox-static`` package), ``runc create``s it, reads the limit files of the container's
cgroup from the host side, then ``runc delete -f``s it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

MiB = 1024 * 1024
CGROUP_ROOT = Path("/sys/fs/cgroup")
BUSYBOX = Path("/bin/busybox")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one run may use. Units are in the field names or comments."""

    memory_mb: int = 256  # RAM + swap ceiling, MiB
    cpus: float = 1.0  # CPU share in cores (cgroup quota / period)
    pids: int = 64  # most processes/threads alive at once
    timeout_s: float = 30.0  # wall-clock; then the container is killed
    max_output_bytes: int = 1 * MiB  # per stream (stdout, stderr); the rest is discarded
    network: bool = False  # False: a fresh network namespace with only loopback
    writable_tmp_mb: int = 16  # size of the /tmp tmpfs, the only writable place
    nofile: int = 256  # RLIMIT_NOFILE, soft = hard
    uid: int = 0  # the job's user inside the container (65534 = nobody); 0 = root of its own namespaces
    gid: int = 0

    def __post_init__(self) -> None:
        if self.memory_mb < 4 or self.pids < 1 or self.cpus <= 0 or self.nofile < 16:
            raise ValueError(f"limits too small to run anything: {self}")
        if self.timeout_s <= 0 or self.max_output_bytes < 0 or self.writable_tmp_mb < 1:
            raise ValueError(f"bad limits: {self}")
        if not (0 <= self.uid < 2**31 and 0 <= self.gid < 2**31):
            raise ValueError(f"uid and gid must be in 0..2**31-1: {self}")


CgroupLayout = Literal["v2", "v1", "hybrid", "none"]


@dataclasses.dataclass(frozen=True)
class HostSupport:
    """What :func:`probe_host` found. ``why`` explains ``limits_enforced`` in one line."""

    runc: str | None  # path of the runc binary, or None
    bwrap: str | None  # path of the bwrap binary, or None
    cgroup: CgroupLayout
    limits_enforced: bool  # runc can start a container with memory+pids limits in place
    why: str


def cgroup_layout(root: Path = CGROUP_ROOT) -> CgroupLayout:
    """v2: unified at the root; hybrid: v1 controllers plus a ``unified`` v2 mount; v1; none."""
    if (root / "cgroup.controllers").exists():
        return "v2"
    has_v1 = any((root / c).is_dir() for c in ("memory", "pids", "cpu"))
    if has_v1 and (root / "unified" / "cgroup.procs").exists():
        return "hybrid"
    if has_v1:
        return "v1"
    return "none"


def _limit_files(pid: int, layout: CgroupLayout) -> dict[str, Path]:
    """Host paths of the memory and pids limit files of the cgroup that ``pid`` is in."""
    files: dict[str, Path] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if layout == "v2" and controllers == "":
            files["memory"] = CGROUP_ROOT / rel / "memory.max"
            files["pids"] = CGROUP_ROOT / rel / "pids.max"
        elif "memory" in controllers.split(","):
            files["memory"] = CGROUP_ROOT / "memory" / rel / "memory.limit_in_bytes"
        elif "pids" in controllers.split(","):
            files["pids"] = CGROUP_ROOT / "pids" / rel / "pids.max"
    return files


def probe_bundle(bundle: Path, args: list[str], resources: dict | None) -> None:
    """Write a minimal busybox bundle under ``bundle`` (used only by the probe)."""
    bindir = bundle / "rootfs" / "bin"
    bindir.mkdir(parents=True)
    shutil.copy2(BUSYBOX, bindir / "busybox")
    (bindir / "sh").symlink_to("busybox")
    config = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/bin"], "cwd": "/", "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": True},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts", "network")]},
    }
    if resources:
        config["linux"]["resources"] = resources
    (bundle / "config.json").write_text(json.dumps(config))


def _probe_runc_limits(runc: str, layout: CgroupLayout) -> tuple[bool, str]:
    if layout == "none":
        return False, "no cgroup hierarchy mounted at /sys/fs/cgroup"
    if not BUSYBOX.exists():
        return False, f"cannot probe: {BUSYBOX} missing (apt-get install busybox-static)"
    memory, pids = 64 * MiB, 17
    cid = f"permamesh-probe-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="permamesh-probe-") as tmp:
        bundle = Path(tmp)
        probe_bundle(bundle, ["sh", "-c", "true"],
                     {"memory": {"limit": memory}, "pids": {"limit": pids}})
        try:
            # stderr goes to a file: the container's init inherits it and a pipe would
            # stay open until the container is deleted.
            errfile = bundle / "create.err"
            with errfile.open("wb") as err_out:
                made = subprocess.run([runc, "create", "--bundle", str(bundle), cid],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=err_out, timeout=20)
            if made.returncode != 0:
                err = errfile.read_text(errors="replace").strip().splitlines()
                return False, f"runc refused a container with limits: {err[-1:] or '?'}"
            state = subprocess.run([runc, "state", cid], capture_output=True, timeout=10)
            pid = int(json.loads(state.stdout)["pid"])
            files = _limit_files(pid, layout)
            seen = {k: p.read_text().strip() if p.exists() else None for k, p in files.items()}
            if seen.get("memory") == str(memory) and seen.get("pids") == str(pids):
                return True, f"runc set memory and pids limits in a {layout} cgroup"
            return False, f"runc started but the limits were not applied (found {seen})"
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            return False, f"probe failed: {exc!r}"
        finally:
            subprocess.run([runc, "delete", "-f", cid], capture_output=True, timeout=20)


@functools.cache
def probe_host() -> HostSupport:
    """Find runc and bwrap, the cgroup layout, and whether runc limits work (cached)."""
    runc, bwrap = shutil.which("runc"), shutil.which("bwrap")
    layout = cgroup_layout()
    if runc is None:
        enforced, why = False, "runc not installed (bubblewrap cannot set memory/pids cgroups)"
    elif os.geteuid() != 0:
        enforced, why = False, "not root: rootless runc cannot set cgroup limits here"
    else:
        enforced, why = _probe_runc_limits(runc, layout)
    support = HostSupport(runc=runc, bwrap=bwrap, cgroup=layout, limits_enforced=enforced, why=why)
    log.info("container host support: %s", support)
    return support
