"""Where a joining worker's seconds go, from its process start to its first job.

:func:`join_timeline` reads the events of one join from the logs the processes write anyway
(the worker's own: directory read, model loaded, serving, announced; the group member's that
sealed its salt; each committee member's prober: probed at once as a newcomer) and from the
measuring client's clock (READY, counted running by the committee, shown running in the
client's directory copy, first job served), and turns them into phases. Every process runs on
one machine (network namespaces share its kernel clock), so log times and the client's clock
compare directly.

:func:`import_calibration` times what Python alone costs on a host at a given moment: on a
shared 2-core machine most of a join is imports, and their cost moves with the load;
:func:`cpu_use` how many cores the running mesh and the whole machine use meanwhile.

:func:`first_job` and :func:`joined` take the client's side of a join: wait for the committee and
the client's directory copy to show the worker running, then have it serve one job.

Who calls it: :mod:`permamesh.demo.hosts` (``permamesh bench hosts``).
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
import time
from pathlib import Path

from permamesh.errors import PermameshError

# (phase, from event, to event): in the order a join takes them; "start" is the process start
PHASES = (
    ("start_to_directory_read", "start", "directory_start"),  # interpreter, CLI, keys
    ("directory_read", "directory_start", "directory"),  # fetched and checked against a second validator
    ("directory_to_model_start", "directory", "model_start"),  # the worker's own setup before its model
    # excluded from the join figure: the model framework's imports (torch, transformers,
    # llama.cpp), weights and tokenizer (workers.backends.load_engine's "ready ... in S s")
    ("model_load_excluded", "model_start", "model"),
    ("model_to_serving", "model", "serving"),
    ("announce_committed", "serving", "announced"),
    ("announced_to_counted_running", "announced", "counted_running"),  # group salt, members' probes, commit
    ("counted_to_client_copy", "counted_running", "client_copy"),
    ("client_copy_to_first_job", "client_copy", "first_job"),
)
_STAMP = "%Y-%m-%d %H:%M:%S,%f"  # logging's default asctime, local time
_SECONDS = re.compile(r"in ([0-9.]+) s")


def log_times(path: Path, patterns: dict[str, str]) -> dict[str, tuple[float, str]]:
    """name -> (wall time, line) of the first line of a log matching each regex."""
    found: dict[str, tuple[float, str]] = {}
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return found
    for line in lines:
        for name, pattern in patterns.items():
            if name not in found and re.search(pattern, line):
                try:
                    found[name] = (datetime.datetime.strptime(line[:23], _STAMP).timestamp(), line)
                except ValueError:
                    continue
    return found


def join_timeline(node: dict, seen: dict, logs: Path) -> dict:
    """``events_s`` (seconds since the process start, in order) and ``phases_s`` of one join.

    ``node``: its ``node_id``, ``child`` (its log), ``spawned_wall`` and ``spawned_at`` (wall
    and monotonic clocks at the start) and ``ready_at``; ``seen``: the client's monotonic
    ``counted``, ``copy`` and ``served``; ``logs``: the directory with every process's log."""
    nid = re.escape(node["node_id"])
    own = log_times(Path(node["child"].log_path), {
        "directory": r"directory read at height .* in [0-9.]+ s", "model": r"model \S+ ready on \S+ in [0-9.]+ s",
        "serving": r"worker \S+ serving ", "announced": rf"announced {nid} at "})
    at = {name: t for name, (t, _) in own.items()}
    for event, start in (("directory", "directory_start"), ("model", "model_start")):
        if event in own:
            at[start] = at[event] - float(_SECONDS.search(own[event][1]).group(1))
    for path in sorted(Path(logs).glob("worker-*.log")):
        for t, _ in log_times(path, {"sealed": rf"sealed the salt of group .* to {nid}"}).values():
            at["salt_sealed"] = min(t, at.get("salt_sealed", t))
    probes = sorted(t for path in sorted(Path(logs).glob("prober-*.log"))
                    for t, _ in log_times(path, {"probe": rf"newcomer.*{nid}"}).values())
    if probes:
        at["probe_first"], at["probe_last"] = probes[0], probes[-1]

    def wall(monotonic: float) -> float:
        return node["spawned_wall"] + (monotonic - node["spawned_at"])

    at |= {"ready": wall(node["ready_at"]), "counted_running": wall(seen["counted"]),
           "client_copy": wall(seen["copy"]), "first_job": wall(seen["served"])}
    events = {name: round(t - node["spawned_wall"], 3) for name, t in sorted(at.items(), key=lambda kv: kv[1])}
    known = events | {"start": 0.0}
    phases = {name: round(known[b] - known[a], 3) for name, a, b in PHASES if a in known and b in known}
    return {"events_s": events, "phases_s": phases}


def first_job(running, directory, node: dict, client_dir: Path, alive=lambda: True, timeout_s: float = 60.0) -> dict:
    """Wait until the committee counts ``node`` running (``running()``: node id -> running, from
    the committee) and the client's ``directory`` copy shows it, then have it serve one job over
    its own link; when each happened (monotonic). ``alive()`` false stops the wait."""
    from permamesh.client.blocking import Client

    seen: dict = {}
    started = time.monotonic()
    while "copy" not in seen:
        if not alive():
            raise PermameshError(f"{node['name']} stopped before a client found it running")
        if time.monotonic() - started > timeout_s:
            raise PermameshError(f"timed out after {timeout_s:g} s waiting for {node['name']} in the running set")
        if "counted" not in seen and running().get(node["node_id"]):
            seen["counted"] = time.monotonic()
        if any(r.node_id == node["node_id"] for r in directory.snapshot(0.0).running("worker")):
            seen["copy"] = time.monotonic()
            seen.setdefault("counted", seen["copy"])
        else:
            time.sleep(0.05)  # polling the committee and the directory copy; bounded by timeout_s
    link = next(e.link for e in directory.snapshot().running("worker") if e.node_id == node["node_id"])
    with Client([link], data_dir=client_dir, timeout_s=60.0) as client:
        client.generate("hello", max_tokens=2)
    return seen | {"served": time.monotonic()}


def joined(node: dict, running, directory, client_dir: Path, start_timeout_s: float) -> dict:
    """:func:`first_job` for a worker just spawned into a running mesh, as a partner's client
    finds it: through the committee, not its READY line (which comes once it announced and holds
    its group's salt; it serves before that). Its READY is read meanwhile and kept in
    ``node["ready_at"]``; one that exits first or never gets ready fails the measure."""
    import threading

    from permamesh.ops.procs import wait_ready

    box: dict = {}

    def read_ready() -> None:
        try:
            wait_ready([node["child"]], start_timeout_s)
            box["at"] = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - raised again on the caller's thread
            box["error"] = exc

    reader = threading.Thread(target=read_ready, name="ready", daemon=True)
    reader.start()
    seen = first_job(running, directory, node, client_dir, alive=lambda: "error" not in box)
    reader.join(start_timeout_s)
    if "error" in box or "at" not in box:
        raise box.get("error") or PermameshError(f"{node['name']} printed no READY line")
    node["ready_at"] = box["at"]
    return seen


_FRAMEWORK = re.compile(r"model \S+ ready on \S+ in [0-9.]+ s \(\w+: framework imports ([0-9.]+) s")


def framework_imports_s(log_text: str) -> float | None:
    """The part of a worker's model load its log gives to the model framework's imports (torch,
    transformers, llama.cpp), or None where it does not say: the join figure excludes the whole
    model load, and reports this part beside it."""
    found = _FRAMEWORK.findall(log_text)
    return float(found[-1]) if found else None


_IMPORTS = ("import time; t = time.perf_counter(); import torch; from transformers import AutoModelForCausalLM, "
            "AutoTokenizer, LlamaConfig, LlamaForCausalLM; print(time.perf_counter() - t)")


def import_calibration(wrap: tuple[str, ...] = ()) -> dict:
    """Seconds, run one after the other under ``wrap`` (a host's ``ip netns exec``): the whole of
    ``permamesh worker --help`` (interpreter, the CLI's imports and parser), and importing torch
    and transformers as the worker does."""
    started = time.monotonic()
    subprocess.run([*wrap, sys.executable, "-m", "permamesh", "worker", "--help"], capture_output=True, check=True)
    cli = time.monotonic() - started
    done = subprocess.run([*wrap, sys.executable, "-c", _IMPORTS], capture_output=True, text=True, check=True)
    return {"cli_worker_help_s": round(cli, 3), "torch_transformers_s": round(float(done.stdout.split()[-1]), 3)}


def _ticks(pid: int) -> int:
    """utime + stime of one process in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])


def _machine_busy() -> tuple[int, int]:
    """(busy, total) clock ticks of every CPU since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def cpu_use(pids: list[int], seconds: float = 2.0) -> dict:
    """Cores in use over ``seconds``: by the processes ``pids`` (the idle mesh) and by the whole
    machine (the mesh and everything else running on it)."""
    import os

    hz = os.sysconf("SC_CLK_TCK")
    before, machine_before, started = sum(_ticks(p) for p in pids), _machine_busy(), time.monotonic()
    time.sleep(seconds)  # a measuring window, not a wait for an event
    after, machine_after, wall = sum(_ticks(p) for p in pids), _machine_busy(), time.monotonic() - started
    busy, total = (a - b for a, b in zip(machine_after, machine_before))
    cpus = os.cpu_count() or 1
    return {"mesh_cores": round((after - before) / hz / wall, 2),
            "machine_busy_cores": round(cpus * busy / max(1, total), 2), "cpus": cpus}
