"""Run a command in a prepared root filesystem, isolated, bounded in time and output.

Who calls it: the worker process, after :mod:`permamesh.containers.rootfs` has unpacked a
job's image, calls :func:`run` with the rootfs directory, the argv and :class:`Limits`, and
gets back a :class:`RunResult`; with ``on_output`` it also gets each piece of stdout and
stderr as it is read (the bytes the result keeps, in order, within the same cap), so a job's
output can stream to its client while it runs. Nothing here touches the rootfs: it is mounted read-only,
``/tmp`` is a size-limited tmpfs that vanishes with the container, and there are no bind
mounts from the host. Without ``limits.network`` the job gets a new network namespace that
holds only loopback.

Two runtimes:

- runc (preferred, needs root): we write the OCI bundle's ``config.json`` ourselves, run
  ``runc run --bundle DIR ID`` with stdout/stderr on pipes, and on timeout ``runc kill ID
  KILL``; the container is always ``runc delete -f``'d and the bundle removed.
  ``linux.resources`` (memory, cpu, pids) is written only when
  :func:`~permamesh.containers.limits.probe_host` saw runc enforce limits; otherwise the
  result's ``notes`` say they were not enforced and why.
- bubblewrap (``runtime="bwrap"``, or ``"auto"`` when runc is missing or fails to start):
  the same mounts and namespaces; limits only through rlimits (``prlimit``), and the notes
  say which limits were not enforced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Literal, Sequence

from permamesh.containers.errors import ContainerError, RunError  # noqa: F401 (RunError is re-exported)
from permamesh.containers.limits import MiB, Limits, probe_host

log = logging.getLogger(__name__)

Runtime = Literal["runc", "bwrap"]
OnOutput = Callable[[bytes, bytes], None]  # (stdout piece, stderr piece): one is empty
DEFAULT_PATH = "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
CAPS = ["CAP_KILL", "CAP_NET_BIND_SERVICE"]  # all a job keeps; everything else is dropped
KILL_GRACE_S = 5.0  # after a kill, how long we wait for the runtime and the pipes


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one run did. ``exit_code`` follows the shell: 128+N when killed by signal N."""

    exit_code: int
    stdout: bytes  # at most limits.max_output_bytes
    stderr: bytes  # at most limits.max_output_bytes
    timed_out: bool  # killed at limits.timeout_s
    truncated: bool  # some stdout or stderr past max_output_bytes was discarded
    duration_s: float
    runtime: Runtime
    limits_enforced: bool  # memory, cpu and pids limits really applied (cgroups)
    notes: tuple[str, ...] = ()


def _validate(rootfs: Path, argv: Sequence[str], env: Sequence[str], workdir: str) -> None:
    if isinstance(argv, (str, bytes)) or not argv:
        raise RunError(f"argv must be a non-empty list of strings, not {argv!r}")
    for arg in argv:
        if not isinstance(arg, str) or "\0" in arg:
            raise RunError(f"argv items must be str without NUL: {arg!r}")
    if isinstance(env, (str, bytes)):
        raise RunError(f"env must be a list of 'KEY=VALUE' strings, not {env!r}")
    for item in env:
        key, sep, _ = item.partition("=") if isinstance(item, str) else ("", "", "")
        if not sep or not key or "\0" in item:
            raise RunError(f"env items must be 'KEY=VALUE' without NUL: {item!r}")
    if not isinstance(workdir, str) or not workdir.startswith("/") or "\0" in workdir:
        raise RunError(f"workdir must be an absolute path: {workdir!r}")
    if not rootfs.is_dir():
        raise RunError(f"rootfs {rootfs} is not a directory")
    # Mount points and the workdir must exist already: runc would otherwise mkdir them in
    # the rootfs (on the host) before making it read-only, and bwrap cannot.
    missing = [d for d in ("/proc", "/dev", "/tmp", workdir)
               if not (rootfs / d.lstrip("/")).is_dir()]
    if missing:
        raise RunError(f"rootfs {rootfs} lacks directories {missing}")


class _Tee:
    """Passes output pieces to ``on_output`` within ``max_bytes`` a stream, and keeps them: when
    runc fails to start and bubblewrap runs the job, what was already passed on stays part of
    the result (so the pieces always join to the result's output)."""

    def __init__(self, on_output: OnOutput, max_bytes: int) -> None:
        self.on_output, self.max_bytes = on_output, max_bytes
        self.out, self.err, self.truncated = bytearray(), bytearray(), False

    def __call__(self, out: bytes, err: bytes) -> None:
        out, err = out[:self.max_bytes - len(self.out)], err[:self.max_bytes - len(self.err)]
        if not (out or err):
            self.truncated = True
            return
        self.out += out
        self.err += err
        self.on_output(out, err)


class _Output:
    """Reads a process's stdout and stderr into bounded buffers; discards the excess; hands
    each piece kept to ``on_output`` as it is read."""

    def __init__(self, proc: subprocess.Popen, max_bytes: int, on_output: OnOutput | None = None) -> None:
        self.max_bytes, self.truncated, self.on_output = max_bytes, False, on_output
        self.stdout_fd = proc.stdout.fileno()
        self.bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        self.sel = selectors.DefaultSelector()
        for fd in self.bufs:
            self.sel.register(fd, selectors.EVENT_READ)

    def read_until(self, deadline: float) -> bool:
        """Read until both streams reach EOF (True) or the deadline passes (False)."""
        while self.sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in self.sel.select(timeout=remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    self.sel.unregister(key.fd)
                    continue
                buf = self.bufs[key.fd]
                room = self.max_bytes - len(buf)
                if len(chunk) > room:
                    self.truncated = True
                kept = chunk[: max(room, 0)]
                buf += kept
                if kept and self.on_output is not None:
                    self.on_output(*((kept, b"") if key.fd == self.stdout_fd else (b"", kept)))
        return True

    def streams(self) -> tuple[bytes, bytes]:
        out, err = self.bufs.values()
        return bytes(out), bytes(err)


def _supervise(cmd: list[str], limits: Limits, kill,
               on_output: OnOutput | None = None) -> tuple[int, bytes, bytes, bool, bool]:
    """Run ``cmd``, bounded; on timeout call ``kill(proc)``. Returns code, out, err, flags."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        output = _Output(proc, limits.max_output_bytes, on_output)
        deadline = time.monotonic() + limits.timeout_s
        timed_out = not output.read_until(deadline)
        if not timed_out:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                timed_out = True
        if timed_out:
            log.info("container exceeded %.1fs, killing: %s", limits.timeout_s, cmd[:4])
            kill(proc)
            output.read_until(time.monotonic() + KILL_GRACE_S)
        try:
            code = proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        out, err = output.streams()
        return (128 - code if code < 0 else code), out, err, timed_out, output.truncated
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def oci_config(rootfs: Path, argv: Sequence[str], env: Sequence[str], workdir: str,
               limits: Limits, with_resources: bool) -> dict:
    """The bundle's config.json (OCI runtime spec 1.0): read-only root, fresh namespaces."""
    tmpfs = ["nosuid", "nodev"]
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": [*tmpfs, "noexec", "mode=1777", "size=65536k"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": [*tmpfs, "mode=1777", f"size={limits.writable_tmp_mb}m"]},
    ]
    namespaces = ["pid", "mount", "ipc", "uts"] + ([] if limits.network else ["network"])
    linux: dict = {
        "namespaces": [{"type": t} for t in namespaces],
        "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                        "/proc/timer_list", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                          "/proc/sysrq-trigger"],
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
    }
    if with_resources:
        linux["resources"].update({
            "memory": {"limit": limits.memory_mb * MiB},
            "cpu": {"quota": int(limits.cpus * 100_000), "period": 100_000},
            "pids": {"limit": limits.pids},
        })
    caps = {k: CAPS for k in ("bounding", "effective", "permitted")}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False, "user": {"uid": limits.uid, "gid": limits.gid}, "args": list(argv),
            "env": list(env), "cwd": workdir, "capabilities": caps, "noNewPrivileges": True,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": limits.nofile, "soft": limits.nofile},
                        {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}],
        },
        "root": {"path": str(rootfs.resolve()), "readonly": True},
        "hostname": "permamesh",
        "mounts": mounts,
        "linux": linux,
    }


class _RuncStartFailed(Exception):  # runc itself failed, not the job: "auto" tries bwrap
    pass


def _run_runc(runc: str, rootfs: Path, argv, env, workdir, limits: Limits,
              on_output: OnOutput | None = None) -> RunResult:
    host = probe_host()
    notes: list[str] = []
    if not host.limits_enforced:
        notes.append(f"memory/cpu/pids limits not enforced on this host ({host.cgroup} "
                     f"cgroups): {host.why}")
    cid = f"permamesh-{uuid.uuid4().hex[:16]}"
    bundle = Path(tempfile.mkdtemp(prefix="permamesh-bundle-"))
    logfile = bundle / "runc.log"
    config = oci_config(rootfs, argv, env, workdir, limits, host.limits_enforced)
    (bundle / "config.json").write_text(json.dumps(config, indent=1))

    def kill(proc: subprocess.Popen) -> None:
        subprocess.run([runc, "kill", cid, "KILL"], capture_output=True, timeout=10)

    started = time.monotonic()
    try:
        cmd = [runc, "--log", str(logfile), "--log-format", "json",
               "run", "--bundle", str(bundle), cid]
        code, out, err, timed_out, truncated = _supervise(cmd, limits, kill, on_output)
        if code != 0 and not timed_out:
            lines = logfile.read_text(errors="replace").splitlines() if logfile.exists() else []
            errors = [json.loads(x).get("msg", "") for x in lines if '"level":"error"' in x]
            if any("executable file not found" in e for e in errors):  # the job's fault
                code, err = 127, (err + "\n".join(errors).encode() + b"\n")
            elif errors:
                raise _RuncStartFailed("; ".join(errors))
        return RunResult(code, out, err, timed_out, truncated, time.monotonic() - started,
                         "runc", host.limits_enforced, tuple(notes))
    finally:
        gone = subprocess.run([runc, "delete", "-f", cid], capture_output=True, timeout=20)
        if gone.returncode != 0 and b"does not exist" not in gone.stderr:
            log.warning("runc delete %s: %s", cid, gone.stderr.decode(errors="replace"))
        shutil.rmtree(bundle, ignore_errors=True)


def _run_bwrap(bwrap: str, rootfs: Path, argv, env, workdir, limits: Limits,
               on_output: OnOutput | None = None) -> RunResult:
    notes = ["cpu share and pids limits not enforced under bubblewrap (no cgroups)"]
    cmd: list[str] = []
    prlimit = shutil.which("prlimit")
    if prlimit:
        cmd += [prlimit, f"--as={limits.memory_mb * MiB}", f"--nofile={limits.nofile}",
                "--core=0", "--"]
        notes.append("memory limited only as address space (RLIMIT_AS), not by a cgroup")
    else:
        notes.append("memory limit not enforced under bubblewrap (prlimit missing)")
    cmd += [bwrap, "--ro-bind", str(rootfs.resolve()), "/", "--proc", "/proc", "--dev", "/dev",
            "--size", str(limits.writable_tmp_mb * MiB), "--tmpfs", "/tmp",
            "--unshare-all", *(["--share-net"] if limits.network else []),
            "--hostname", "permamesh", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", *[a for c in CAPS for a in ("--cap-add", c)],
            "--uid", str(limits.uid), "--gid", str(limits.gid),
            "--chdir", workdir, "--clearenv"]
    for item in env:
        key, _, value = item.partition("=")
        cmd += ["--setenv", key, value]
    cmd += ["--", *argv]

    def kill(proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGKILL)  # --die-with-parent takes the sandbox with it

    started = time.monotonic()
    code, out, err, timed_out, truncated = _supervise(cmd, limits, kill, on_output)
    return RunResult(code, out, err, timed_out, truncated, time.monotonic() - started,
                     "bwrap", False, tuple(notes))


def run(rootfs: Path, argv: Sequence[str], env: Sequence[str] = (), workdir: str = "/",
        limits: Limits = Limits(), runtime: str = "auto", on_output: OnOutput | None = None) -> RunResult:
    """Run ``argv`` inside ``rootfs`` with ``runtime`` ("runc", "bwrap" or "auto");
    ``on_output(stdout, stderr)`` gets the output as it is read (this thread), the pieces
    joining to the result's stdout and stderr."""
    tee = _Tee(on_output, limits.max_output_bytes) if on_output is not None else None
    rootfs = Path(rootfs)
    _validate(rootfs, argv, env, workdir)
    env = list(env) if any(e.startswith("PATH=") for e in env) else [DEFAULT_PATH, *env]
    argv = list(argv)
    host = probe_host()
    if runtime not in ("auto", "runc", "bwrap"):
        raise RunError(f"unknown runtime {runtime!r}")
    use_runc = runtime == "runc" or (runtime == "auto" and host.runc and os.geteuid() == 0)
    if use_runc:
        if host.runc is None:
            raise RunError("runtime 'runc' requested but runc is not installed")
        try:
            return _run_runc(host.runc, rootfs, argv, env, workdir, limits, tee)
        except _RuncStartFailed as exc:
            if runtime == "runc" or host.bwrap is None:
                raise RunError(f"runc could not start the container: {exc}") from None
            log.warning("runc failed to start (%s); falling back to bubblewrap", exc)
            result = _run_bwrap(host.bwrap, rootfs, argv, env, workdir, limits, tee)
            if tee is not None:  # what runc's attempt already passed on comes first
                result = dataclasses.replace(result, stdout=bytes(tee.out), stderr=bytes(tee.err),
                                             truncated=result.truncated or tee.truncated)
            return dataclasses.replace(
                result, notes=(f"runc failed to start ({exc}); ran under bubblewrap",
                               *result.notes))
    if host.bwrap is None:
        raise RunError("no container runtime: install runc or bubblewrap")
    return _run_bwrap(host.bwrap, rootfs, argv, env, workdir, limits, tee)
