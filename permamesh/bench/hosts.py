"""``permamesh bench hosts``: the mesh across simulated hosts, and what encryption costs.

- **hosts**: :func:`permamesh.demo.hosts.run_hosts` on ``hosts`` network namespaces (root
  needed): a 4-validator CometBFT committee, 2 workers and 12 relays joined through the
  committee's directory, a client host that knows one validator. Figures: overlay jobs
  delivered (target: all of them); the join time of a new worker started into the running mesh,
  from its process start to the first job a client gets from it, its model load excluded
  (target <= 5 s; the load counts the model framework's imports, also reported apart:
  ``join_with_framework_imports_s``), with the phases it spent (``join_timeline``); the same figure for a worker
  started together with the whole mesh (``cold_start_join_s``: every process competing for the
  cores); how soon a SIGKILLed worker host leaves the running set (target <= 15 s, one probe
  period) and whether any job was sent to it after 5 s; overlay delivery with a relay host
  killed. Right before the new worker starts, ``import_calibration_s`` times ``permamesh worker
  --help`` and importing torch and transformers on its host: what Python alone costs on the
  machine at that moment, and ``idle_mesh_cpu`` the cores the running mesh and the whole machine
  used over 2 s: for reading the join figure on a shared machine.
- **curve**: the cost of CurveZMQ on one link, measured in the same run: a DEALER/ROUTER echo
  on loopback, with and without CurveZMQ, for frames the size of the overlay's cells; the p50
  round trip each way and the difference. An overlay job crosses ``LINKS_PER_JOB`` links (4 hops
  out, 4 back), so the estimated overhead on the overlay p50 is that many single-link
  differences, reported next to the measured overlay p50.

``--json PATH`` and ``--plot PATH`` write the report (``summary`` first). Who calls it:
:mod:`permamesh.cli`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

from permamesh.bench.plot import pyplot, save
from permamesh.bench.stats import percentile, write_report

TARGETS = {"delivery": 1.0, "join_s": 5.0, "detect_s": 15.0}
LINKS_PER_JOB = 8  # client -> 3 relays -> entry worker, and back
FRAME_BYTES = (1024, 8192)  # overlay cells come in size classes around these


class EchoServer:
    """A ROUTER that sends every frame back, plain or under ``secret_key`` (CurveZMQ); run it with
    :class:`~permamesh.transport.ServingThread`. Used here and by the transport's tests."""

    def __init__(self, secret_key: bytes | None) -> None:
        self.secret_key, self.endpoint = secret_key, None

    async def serve(self, stop: asyncio.Event, on_ready=None) -> None:
        from permamesh.transport import RouterServer

        router = RouterServer("127.0.0.1", 0, self.secret_key)
        self.endpoint = router.endpoint

        async def loop() -> None:
            while True:
                peer, frame = await router.recv()
                if frame is not None:
                    await router.send(peer, frame)

        task = asyncio.create_task(loop())
        if on_ready is not None:
            on_ready(self.endpoint)
        try:
            await stop.wait()
        finally:
            task.cancel()
            router.close()


def curve_overhead(rounds: int = 400) -> dict:
    """p50 echo round trips (ms) per frame size, plain TCP vs CurveZMQ, interleaved."""
    from permamesh.identity import NodeIdentity
    from permamesh.transport import DealerClient, ServingThread

    out = {}
    key = NodeIdentity.generate().transport.private_bytes()
    with ServingThread(EchoServer(None), "echo-plain") as plain, ServingThread(EchoServer(key), "echo-curve") as curve, \
            DealerClient(plain.server.endpoint) as a, DealerClient(curve.server.endpoint) as b:
        for size in FRAME_BYTES:
            frame = bytes(size)
            times: dict[str, list[float]] = {"plain": [], "curve": []}
            for k in range(rounds + 20):
                for name, sock in (("plain", a), ("curve", b)):
                    t0 = time.perf_counter()
                    sock.send(frame)
                    if sock.recv(5.0) is None:
                        raise RuntimeError(f"{name} echo did not answer")
                    if k >= 20:  # the first rounds warm up the connection and the handshake
                        times[name].append((time.perf_counter() - t0) * 1e3)
            p_plain, p_curve = percentile(times["plain"], 50), percentile(times["curve"], 50)
            out[str(size)] = {"plain_p50_ms": p_plain, "curve_p50_ms": p_curve, "added_ms": p_curve - p_plain}
    return out


def run(hosts: int = 6, jobs: int = 50, say=print, base: Path | None = None) -> dict:
    from permamesh.demo.hosts import RELAY_KILL_JOBS, HostsPlan, run_hosts

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="permamesh-hosts-") as tmp:
        report = run_hosts(HostsPlan(hosts=hosts, jobs=jobs), Path(base or tmp), say)
    load_after = os.getloadavg()
    curve = curve_overhead()
    biggest = curve[str(max(FRAME_BYTES))]["added_ms"]
    delivery = report["overlay_delivered"] / report["overlay_jobs"]
    summary = {
        "hosts": hosts, "overlay_jobs": report["overlay_jobs"], "overlay_delivery": delivery,
        "overlay_p50_s": report["overlay_p50_s"], "join_s_max": max(report["join_s"]),
        "join_phases_s": report["join_timeline"]["phases_s"],
        # inside the excluded model load: what the same join costs with the framework's imports in
        "join_with_framework_imports_s": max(report["join_s"]) + (report.get("framework_imports_s") or 0.0),
        "cold_start_join_s_max": max(report["cold_start_join_s"]),
        "import_calibration_s": report.get("import_calibration_s"), "idle_mesh_cpu": report.get("idle_mesh_cpu"),
        "kill_detect_s": report["kill_detect_s"], "kill_jobs_to_dead_after_5s": report["kill_jobs_to_dead_after_5s"],
        "relay_kill_delivery": report["relay_kill_delivered"] / RELAY_KILL_JOBS,
        "curve_added_ms_per_link": biggest,
        "curve_overlay_overhead_ms_estimate": LINKS_PER_JOB * biggest,
        "targets": TARGETS,
    }
    summary["targets_met"] = (delivery >= TARGETS["delivery"] and summary["join_s_max"] <= TARGETS["join_s"]
                              and summary["kill_detect_s"] is not None
                              and summary["kill_detect_s"] <= TARGETS["detect_s"]
                              and summary["kill_jobs_to_dead_after_5s"] == 0)
    say(f"CurveZMQ: {biggest:+.3f} ms per link round trip ({max(FRAME_BYTES)} B frames), about "
        f"{LINKS_PER_JOB * biggest:.2f} ms on an overlay job whose p50 is {1e3 * (report['overlay_p50_s'] or 0):.1f} ms")
    return {"summary": summary, "hosts": report, "curve": curve,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
                        "loadavg_1_5_15_after": [round(x, 2) for x in load_after],
                        "load": "namespaces on one machine; load averages include whatever else ran on it"}}


def plot_hosts(report: dict, path: Path) -> None:
    plt = pyplot()
    s = report["summary"]
    fig, (a, c, b) = plt.subplots(1, 3, figsize=(16, 4.5))
    names = ["join (new node)", "join (cold start)", "kill detected", "overlay p50 x10"]
    values = [s["join_s_max"], s.get("cold_start_join_s_max", 0), s["kill_detect_s"] or 0,
              10 * (s["overlay_p50_s"] or 0)]
    a.bar(names, values, color=["tab:blue", "tab:cyan", "tab:red", "tab:green"])
    a.axhline(TARGETS["join_s"], color="tab:blue", linestyle="--", label="join target")
    a.axhline(TARGETS["detect_s"], color="tab:red", linestyle=":", label="detection target")
    a.set(ylabel="seconds", title=f"{s['hosts']} hosts: {s['overlay_delivery']:.0%} of {s['overlay_jobs']} jobs delivered")
    a.legend()
    a.tick_params(axis="x", labelrotation=20)
    phases = s.get("join_phases_s", {})
    c.barh(list(phases), list(phases.values()),
           color=["lightgrey" if name == "model_load_excluded" else "tab:blue" for name in phases])
    c.invert_yaxis()
    c.set(xlabel="seconds", title="a new worker's join, phase by phase (grey: excluded)")
    sizes = list(report["curve"])
    b.bar([f"{n} B plain" for n in sizes], [report["curve"][n]["plain_p50_ms"] for n in sizes], color="grey")
    b.bar([f"{n} B curve" for n in sizes], [report["curve"][n]["curve_p50_ms"] for n in sizes], color="tab:purple")
    b.set(ylabel="echo round trip p50 (ms)", title="one link: plain TCP vs CurveZMQ")
    b.tick_params(axis="x", labelrotation=20)
    save(fig, path)


def add_hosts_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", type=int, default=6, help="network namespaces (count, default: 6; root needed)")
    parser.add_argument("--jobs", type=int, default=50, help="overlay jobs from the client host (count, default: 50)")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")


def run_from_args(args: argparse.Namespace) -> int:
    if args.hosts < 3 or args.jobs < 1:
        raise SystemExit("permamesh bench hosts: --hosts must be >= 3 and --jobs >= 1")
    report = run(args.hosts, args.jobs)
    write_report(report, args.json, args.plot, plot_hosts)
    s = report["summary"]
    print(f"{s['hosts']} hosts: {s['overlay_delivery']:.0%} of {s['overlay_jobs']} overlay jobs delivered "
          f"(p50 {s['overlay_p50_s']:.3f} s), a new worker joined in {s['join_s_max']:.1f} s (cold start of the "
          f"whole mesh: {s['cold_start_join_s_max']:.1f} s), killed worker out after "
          f"{s['kill_detect_s']} s, CurveZMQ ~{s['curve_overlay_overhead_ms_estimate']:.2f} ms per overlay job; "
          f"targets met: {s['targets_met']}")
    return 0

