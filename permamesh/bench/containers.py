"""``permamesh bench containers``: cold vs warm starts, and how often routing finds a warm worker.

- **cold vs warm**: one image (busybox layer + a ``data_mb`` data layer + an app layer) runs on
  fresh workers (every layer fetched from the source, verified, unpacked: cold) and again on
  the same worker (rootfs cached: warm). ``warm_speedup`` = median cold / median warm, the
  whole job (fetch, prepare, run) timed.
- **routing**: ``images`` images sharing the busybox layer, each with its own data layer, on
  ``workers`` workers whose layer stores hold only about two images each (LRU eviction), and
  a Zipf-like stream of ``jobs`` jobs arriving every ``gap_s`` (virtual time; each job occupies
  its worker for its real duration). For each job where some worker already held every layer,
  did the router pick one? ``warm_pick_rate``; the same stream under a random pick gives
  ``random_warm_pick_rate`` (the baseline).

``--json PATH`` writes a ``summary`` with ``warm_speedup`` (target >= 5) and
``warm_pick_rate`` (target >= 0.9). Who calls it: :mod:`permamesh.cli`, tests.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from permamesh.bench.plot import pyplot, save
from permamesh.containers.host import ContainerMesh
from permamesh.containers.build import build_image
from permamesh.containers.images import load_layout

TARGETS = {"warm_speedup": 5.0, "warm_pick_rate": 0.9}
BUSYBOX = Path("/bin/busybox")


@dataclass(frozen=True)
class ContainerBench:
    data_mb: int = 48  # the cold/warm image's data layer
    repeats: int = 3
    images: int = 4
    image_mb: int = 4  # each routing image's data layer
    workers: int = 4
    jobs: int = 40
    gap_s: float = 0.15
    runtime: str = "auto"
    seed: int = 0


def _layers(tmp: Path, name: str, data_mb: int, seed: int) -> list[Path]:
    base, data, app = tmp / "base", tmp / f"data-{name}", tmp / f"app-{name}"
    if not base.exists():
        (base / "bin").mkdir(parents=True)
        shutil.copy2(BUSYBOX, base / "bin" / "busybox")
        for applet in ("sh", "echo", "cat", "ls", "wc"):
            (base / "bin" / applet).symlink_to("busybox")
    (data / "data").mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(max(1, data_mb // 8)):
        (data / "data" / f"part{i}").write_bytes(rng.randbytes(min(8, data_mb) * 2**20))
    (app / "app").mkdir(parents=True)
    (app / "app" / "run.sh").write_text(f"echo {name}: $(ls /data | wc -l) data files\n")
    return [base, data, app]


def _build(tmp: Path, layout: Path, name: str, data_mb: int, seed: int):
    build_image(None, layout, name, ["/bin/sh", "/app/run.sh"], layers=_layers(tmp, name, data_mb, seed))
    return load_layout(layout, name)


def cold_warm(bench: ContainerBench, tmp: Path, say) -> dict:
    image, blobs = _build(tmp, tmp / "layout", "coldwarm", bench.data_mb, bench.seed)
    mesh = ContainerMesh(tmp / "cw-mesh", workers=bench.repeats + 1, budget_bytes=4 * bench.data_mb * 2**20)
    try:
        cold = [mesh.run(image, source=blobs, runtime=bench.runtime, worker=w.name)
                for w in mesh.workers[:bench.repeats]]
        warm = [mesh.run(image, source=blobs, runtime=bench.runtime, worker=mesh.workers[0].name)
                for _ in range(bench.repeats)]
    finally:
        blobs.close()
    if any(o.result.exit_code for o in cold + warm) or any(o.warm for o in cold) or not all(o.warm for o in warm):
        raise RuntimeError("cold/warm runs did not behave: " + repr([o.result.stderr[:200] for o in cold + warm]))
    cold_s, warm_s = [o.total_s for o in cold], [o.total_s for o in warm]
    out = {"cold_s": cold_s, "warm_s": warm_s, "warm_speedup": statistics.median(cold_s) / statistics.median(warm_s),
           "image_bytes": sum(d.size for d in image.layers), "runtime": cold[0].result.runtime}
    say(f"cold start {statistics.median(cold_s):.3f} s, warm {statistics.median(warm_s):.3f} s: "
        f"{out['warm_speedup']:.1f}x ({out['image_bytes'] / 2**20:.0f} MiB image, {out['runtime']})")
    return out


def routing(bench: ContainerBench, tmp: Path, say) -> dict:
    layout = tmp / "layout"
    images = []
    for i in range(bench.images):
        image, blobs = _build(tmp, layout, f"img{i}", bench.image_mb, bench.seed + 1 + i)
        blobs.close()
        images.append(image)
    _, blobs = load_layout(layout, "img0")
    budget = int(2.2 * (bench.image_mb + 2) * 2**20)  # about two images per worker
    mesh = ContainerMesh(tmp / "rt-mesh", workers=bench.workers, budget_bytes=budget, job_s=1.0, serve=True)
    rng = random.Random(bench.seed)
    weights = [1 / (k + 1) for k in range(bench.images)]
    busy_until = {w.name: 0.0 for w in mesh.workers}
    now, rows = 0.0, []
    try:
        for j in range(bench.jobs):
            image = rng.choices(images, weights)[0]
            busy = {w: 1 for w, t in busy_until.items() if t > now}
            choice = mesh.choose(image, busy)
            warm_workers = [w.name for w in mesh.workers if w.held_prefix(image) == len(image.layers)]
            out = mesh.run(image, source=blobs, runtime=bench.runtime, worker=choice.worker)
            busy_until[choice.worker] = max(now, busy_until[choice.worker]) + out.total_s
            rows.append({"job": j, "image": image.name, "worker": choice.worker, "warm_available": warm_workers,
                         "picked_warm": choice.worker in warm_workers, "exit": out.result.exit_code,
                         "total_s": out.total_s, "why": choice.why})
            now += bench.gap_s
    finally:
        blobs.close()
        mesh.close()
    eligible = [r for r in rows if r["warm_available"]]
    rate = sum(r["picked_warm"] for r in eligible) / max(1, len(eligible))
    random_rate = statistics.fmean(len(r["warm_available"]) / bench.workers for r in eligible) if eligible else 0.0
    say(f"routing: a warm worker picked for {rate:.0%} of {len(eligible)} jobs that had one "
        f"(random pick: {random_rate:.0%}); {sum(r['exit'] != 0 for r in rows)} jobs failed")
    return {"jobs": rows, "eligible": len(eligible), "warm_pick_rate": rate, "random_warm_pick_rate": random_rate}


def run(bench: ContainerBench, say=print) -> dict:
    if not BUSYBOX.exists():
        raise SystemExit("permamesh bench containers needs busybox-static (apt-get install -y busybox-static)")
    with tempfile.TemporaryDirectory(prefix="permamesh-containers-") as tmp:
        cw = cold_warm(bench, Path(tmp), say)
        rt = routing(bench, Path(tmp), say)
    summary = {"warm_speedup": cw["warm_speedup"], "warm_pick_rate": rt["warm_pick_rate"],
               "random_warm_pick_rate": rt["random_warm_pick_rate"], "cold_s_median": statistics.median(cw["cold_s"]),
               "warm_s_median": statistics.median(cw["warm_s"]), "runtime": cw["runtime"], "targets": TARGETS,
               "cpus": len(os.sched_getaffinity(0))}
    summary["targets_met"] = (summary["warm_speedup"] >= TARGETS["warm_speedup"]
                              and summary["warm_pick_rate"] >= TARGETS["warm_pick_rate"])
    return {"summary": summary, "cold_warm": cw, "routing": rt, "bench": asdict(bench)}


def plot_containers(report: dict, path: Path) -> None:
    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    cw = report["cold_warm"]
    a.bar(["cold", "warm"], [statistics.median(cw["cold_s"]), statistics.median(cw["warm_s"])])
    a.set(ylabel="job time (s)", title=f"cold vs warm start ({cw['warm_speedup']:.1f}x)")
    rt = report["routing"]
    b.bar(["permamesh", "random"], [rt["warm_pick_rate"], rt["random_warm_pick_rate"]])
    b.axhline(TARGETS["warm_pick_rate"], color="grey", linestyle="--", label="target")
    b.set(ylabel="warm worker picked", title="routing by layers held", ylim=(0, 1.05))
    b.legend()
    save(fig, path)


def add_containers_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a smaller image and fewer jobs (under a minute)")
    p.add_argument("--runtime", default="auto", choices=["auto", "runc", "bwrap"], help="container runtime")
    p.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")


def run_from_args(args: argparse.Namespace) -> int:
    from permamesh.bench.stats import write_report

    bench = ContainerBench(runtime=args.runtime)
    if args.quick:
        bench = ContainerBench(data_mb=24, repeats=2, images=3, image_mb=2, jobs=20, runtime=args.runtime)
    report = run(bench)
    write_report(report, args.json, args.plot, plot_containers)
    s = report["summary"]
    print(f"warm speedup {s['warm_speedup']:.1f}x, warm pick rate {s['warm_pick_rate']:.0%} "
          f"(random {s['random_warm_pick_rate']:.0%})")
    return 0
