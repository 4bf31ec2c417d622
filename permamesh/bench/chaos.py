"""``permamesh chaos``: the seed's failure modes, drilled on the embedded mesh and simulated.

**Embedded** (real processes): ``workers`` tiny-model workers on loopback, each given a
profile so the scheduler's placement can spread them (3 grids, 3 ISPs, 3 regions, 3 software
versions, every worker its own location; all opted in to chaos drills, so all earn the chaos
modifier). ``loops`` client threads keep sending jobs (each a :class:`~permamesh.client.Client`
with short timeouts: a job whose worker is gone is resubmitted elsewhere). Each scenario:

| kind | what happens to the processes of the domain |
|---|---|
| power outage (grid) | SIGKILL |
| ISP outage (isp) | SIGSTOP: alive but unreachable, then SIGCONT |
| hardware failure (one host) | SIGKILL |
| network partition (region) | SIGSTOP, then SIGCONT |
| DDoS (one node) | floods of junk frames from several sockets for the window |
| software bug (version) | SIGKILL |

and then restores them (restart or SIGCONT) and waits until they are ready. Per scenario:
capacity lost (share of the model's workers down), jobs lost (``generate`` calls that failed
even after the client's resubmission), and recovery time: for each client loop, the time from
the failure to its first job completed after it; the scenario's recovery is the worst loop.

**Simulated**: :func:`permamesh.scheduler.chaossim.run_chaos_sim` on thousands of nodes.

``--json PATH`` writes a top-level ``summary`` with ``max_capacity_loss_share``,
``jobs_lost``, ``max_recovery_s`` (embedded) and the win conditions; ``--quick`` finishes in
under a minute (3 workers, one scenario of each kind, a smaller simulation).

Who calls it: :mod:`permamesh.cli` (``permamesh chaos``) and tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import threading
import time
from pathlib import Path

from permamesh.bench.plot import pyplot, save
from permamesh.scheduler.placement import Demand, PlacementConfig, place
from permamesh.scheduler.profile import NodeProfile

log = logging.getLogger(__name__)

REGIONS = ((50.1, 8.7), (40.7, -74.0), (35.7, 139.7))  # Europe, North America, Asia
TARGETS = {"max_capacity_loss_share": 0.34, "jobs_lost": 0, "max_recovery_s": 5.0}


@dataclasses.dataclass(frozen=True)
class ChaosDrill:
    data_dir: Path
    workers: int = 6
    model: str = "tiny-random"
    loops: int = 3  # concurrent client threads
    window_s: float = 3.0  # how long each failure lasts
    quick: bool = False  # one scenario of each kind
    sim_nodes: int = 2000
    seed: int = 0


def region_of(i: int, n: int) -> int:
    """Workers in consecutive thirds share a region (continent)."""
    return (i // max(1, n // 3)) % 3


def worker_profile(i: int, n: int, node_id: str, model: str) -> NodeProfile:
    region = region_of(i, n)
    lat, lon = REGIONS[region]
    return NodeProfile(node_id=node_id, partner=f"partner-{i % 3}", lat=lat + 0.5 * i, lon=lon + 0.5 * i,
                       grid=f"grid-{i % 3}", isp=f"isp-{(i // 3 + i) % 3}", asn=64500 + i,
                       datacenter="", rack="", host=f"host-{i}", silicon_year=2012 + i, cpu_mhz=2400,
                       idle_w=10, loaded_w=40, ram_mb=16384, gpu="", backup_power=i % 2 == 0,
                       chaos_opt_in=True, software=f"v{(i // 3 * 2 + i) % 3 + 1}", models=(model,))


def scenarios(profiles: list[NodeProfile], quick: bool) -> list[tuple[str, str, str, list[int]]]:
    """(kind, domain, action, worker indexes) for every drill."""
    def by(attr, value):
        return [i for i, p in enumerate(profiles) if attr(p) == value]

    region = {i: region_of(i, len(profiles)) for i in range(len(profiles))}
    out = []
    for kind, attr, action in (("power outage", lambda p: p.grid, "kill"),
                               ("ISP outage", lambda p: p.isp, "stop"),
                               ("software bug", lambda p: p.software, "kill")):
        values = sorted({attr(p) for p in profiles})
        out += [(kind, v, action, by(attr, v)) for v in (values[:1] if quick else values)]
    regions = sorted(set(region.values()))
    out += [("network partition", f"region-{r}", "stop", [i for i in region if region[i] == r])
            for r in (regions[:1] if quick else regions)]
    out.append(("hardware failure", profiles[0].host, "kill", [0]))
    out.append(("DDoS", profiles[1].node_id, "flood", [1]))
    return out


class _Load:
    """Client threads sending jobs back to back; every outcome recorded."""

    def __init__(self, endpoints: list[str], loops: int) -> None:
        self.endpoints, self.records, self._stop = endpoints, [], threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(loops)]

    def _loop(self, i: int) -> None:
        from permamesh.client.blocking import Client

        order = self.endpoints[i % len(self.endpoints):] + self.endpoints[:i % len(self.endpoints)]
        with Client(order, timeout_s=2.0, accept_timeout_s=1.0) as client:
            n = 0
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    client.generate(f"chaos job {i}-{n}: say hi", max_tokens=6, temperature=0.0)
                    ok, error = True, ""
                except Exception as exc:  # a lost job is what we count, whatever its type
                    ok, error = False, f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.records.append((i, t0, time.monotonic(), ok, error))
                n += 1

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def _flood(endpoint: str, stop: threading.Event) -> None:
    from permamesh.transport import DealerClient

    socks = [DealerClient(endpoint) for _ in range(4)]
    try:
        while not stop.is_set():
            for sock in socks:
                sock.send(os.urandom(512))
            time.sleep(0)  # yield to the client loops
    finally:
        for sock in socks:
            sock.close()


def _drill(mesh, kind, domain, action, victims, drill: ChaosDrill, say) -> dict:
    with _Load(list(mesh.endpoints), drill.loops) as load:
        time.sleep(0.5)  # the loops are running before the failure (a pacing pause)
        t_fail = time.monotonic()
        stop_flood = threading.Event()
        if action == "kill":
            for i in victims:
                mesh.kill(i)
        elif action == "stop":
            for i in victims:
                os.kill(mesh.children[i].proc.pid, signal.SIGSTOP)
        else:
            flooders = [threading.Thread(target=_flood, args=(mesh.children[i].endpoint, stop_flood))
                        for i in victims]
            for t in flooders:
                t.start()
        time.sleep(drill.window_s)
    stop_flood.set()
    records = list(load.records)
    if action == "stop":
        for i in victims:
            os.kill(mesh.children[i].proc.pid, signal.SIGCONT)
    elif action == "kill":
        for i in victims:
            mesh.restart(i)
    else:
        for t in flooders:
            t.join(10)
    recovery = max((min((done for loop, start, done, ok, _ in records if loop == i and ok and done > t_fail),
                        default=float("inf")) - t_fail) for i in range(drill.loops))
    lost = [r for r in records if not r[3]]
    row = {"kind": kind, "domain": domain, "action": action, "workers_down": len(victims) if action != "flood" else 0,
           "capacity_loss_share": (len(victims) if action != "flood" else 0) / drill.workers,
           "jobs": len(records), "jobs_lost": len(lost), "lost_reasons": sorted({r[4] for r in lost})[:3],
           "recovery_s": recovery}
    say(f"  {kind:<17} {domain:<18} {row['workers_down']} of {drill.workers} down "
        f"({row['capacity_loss_share']:.0%}), {len(records)} jobs, {len(lost)} lost, recovered in {recovery:.2f} s")
    return row


def run(drill: ChaosDrill, say=print) -> dict:
    from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
    from permamesh.scheduler.chaossim import run_chaos_sim

    say(f"chaos: {drill.workers} {drill.model} workers on loopback")
    mesh = EmbeddedMesh(MeshConfig(drill.data_dir, drill.workers, drill.model, threads_per_worker=1))
    try:
        mesh.start()
        profiles = [worker_profile(i, len(mesh.children), c.node_id, drill.model)
                    for i, c in enumerate(mesh.children)]
        placement = place(profiles, [Demand(drill.model, drill.workers)], config=PlacementConfig())
        say(f"placement: {len(placement.assignments[drill.model])} replicas, feasible "
            f"{placement.feasible[drill.model]}, largest domain shares "
            + ", ".join(f"{k} {max(v.values()):.0%}" for k, v in placement.shares[drill.model].items()))
        rows = [_drill(mesh, *s, drill, say) for s in scenarios(profiles, drill.quick)]
    finally:
        mesh.stop()
    sim = run_chaos_sim(n_nodes=drill.sim_nodes, seed=drill.seed)
    say(f"simulation of {drill.sim_nodes} nodes: {sim['summary']}")
    summary = {
        "max_capacity_loss_share": max(r["capacity_loss_share"] for r in rows),
        "jobs_lost": sum(r["jobs_lost"] for r in rows),
        "jobs": sum(r["jobs"] for r in rows),
        "max_recovery_s": max(r["recovery_s"] for r in rows),
        "distinct_grids": len({p.grid for p in profiles}),
        "chaos_opt_in_nodes": sum(p.chaos_opt_in for p in profiles),
        "sim": sim["summary"], "targets": TARGETS,
    }
    summary["win_conditions"] = {
        "no_domain_over_share": summary["max_capacity_loss_share"] <= TARGETS["max_capacity_loss_share"],
        "no_job_lost": summary["jobs_lost"] == 0,
        "recovery_under_5s": summary["max_recovery_s"] < TARGETS["max_recovery_s"],
    }
    return {"summary": summary, "scenarios": rows, "placement": {
        "assignments": placement.assignments, "shares": placement.shares, "why": list(placement.why)},
        "sim": sim, "drill": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(drill).items()}}


def plot_chaos(report: dict, path: Path) -> None:
    plt = pyplot()

    rows = report["scenarios"]
    labels = [f"{r['kind']}\n{r['domain'][:10]}" for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(8, len(rows) * 0.9), 7), sharex=True)
    a.bar(labels, [r["capacity_loss_share"] for r in rows])
    a.axhline(TARGETS["max_capacity_loss_share"], color="grey", linestyle="--", label="34% limit")
    a.set(ylabel="capacity lost", title="embedded mesh: one failure domain at a time")
    a.legend()
    b.bar(labels, [r["recovery_s"] for r in rows], color="tab:orange")
    b.axhline(TARGETS["max_recovery_s"], color="grey", linestyle="--", label="5 s limit")
    b.set(ylabel="recovery (s)")
    b.legend()
    plt.setp(b.get_xticklabels(), fontsize=7)
    save(fig, path)


def add_chaos_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="one scenario of each kind, shorter windows (under a minute)")
    p.add_argument("--workers", type=int, default=None, help="embedded workers (count, default: 6; 3 quick)")
    p.add_argument("--window", type=float, default=None, help="seconds each failure lasts (default: 3; 1.5 quick)")
    p.add_argument("--sim-nodes", type=int, default=None, help="simulated mesh size (default: 2000; 500 quick)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed (default: 0)")
    p.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")


def run_from_args(args: argparse.Namespace, data_dir: Path) -> int:
    import tempfile

    from permamesh.bench.stats import write_report

    workers = args.workers or (3 if args.quick else 6)
    if workers < 3:
        raise SystemExit("permamesh chaos: --workers must be at least 3 (three grids)")
    with tempfile.TemporaryDirectory(prefix="permamesh-chaos-") as tmp:
        drill = ChaosDrill(Path(tmp), workers=workers, quick=args.quick, seed=args.seed,
                           loops=2 if args.quick else 3, window_s=args.window or (1.5 if args.quick else 3.0),
                           sim_nodes=args.sim_nodes or (500 if args.quick else 2000))
        report = run(drill)
    write_report(report, args.json, args.plot, plot_chaos)
    s = report["summary"]
    print(f"max capacity loss {s['max_capacity_loss_share']:.0%}, {s['jobs_lost']} of {s['jobs']} jobs lost, "
          f"max recovery {s['max_recovery_s']:.2f} s; win conditions: {s['win_conditions']}")
    return 0
