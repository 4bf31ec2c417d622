"""PNG plot of an overlay bench report (matplotlib, headless). Who calls it:
:func:`permamesh.bench.overlay.write_outputs`.

Four panels: delivery vs relay failure rate (simulated lines, real-mesh markers, targets);
S-IDA prep and rebuild time vs message size per codec (log-log); what a malicious fraction
f of relays can read, and link to its sender, per scheme.
"""

from __future__ import annotations

from pathlib import Path

from permamesh.bench.overlaysim import TARGETS
from permamesh.bench.overlaysim import scheme_name
from permamesh.bench.plot import pyplot, save


def plot_overlay(report: dict, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    _delivery(axes[0][0], report)
    _codecs(axes[0][1], report)
    for ax, metric, label in ((axes[1][0], "read", "requests read (>= k cloves seen)"),
                              (axes[1][1], "link", "requests linked to their sender")):
        _anonymity(ax, report, metric, label)
    s = report["summary"]
    overhead = s["overhead_ms_p50"]
    fig.suptitle(
        f"overlay bench ({'quick' if report['quick'] else 'full'}, seed {report['seed']}): "
        f"S-IDA(4,3) delivers {s['delivery_rate_at_3pct']:.4f} at 3% and "
        f"{s['delivery_rate_at_10pct']:.4f} at 10% dead relays ({s['delivery_source']}); "
        f"4 KB prep+rebuild {s['prep_rebuild_ms_4kb']:.3f} ms (zfec); overhead p50 "
        + (f"{overhead:.1f} ms" if overhead is not None else "n/a"), fontsize=10)
    save(fig, path)


def _delivery(ax, report: dict) -> None:
    rows = report["delivery"]["sim"]
    lines: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    for row in rows:
        lines.setdefault((row["scheme"], row["rule"], row["resends"]), []).append(
            (row["failure_rate"], row["delivery_rate"]))
    colors: dict[str, str] = {}
    for (scheme, rule, resends), points in sorted(lines.items()):
        color = colors.setdefault(scheme, f"C{len(colors)}")
        style = ":" if rule == "attempt" else ("-" if resends else "--")
        label = f"{scheme} {rule}, R={resends}" if rule == "attempt" else f"{scheme}, R={resends}"
        xs, ys = zip(*sorted(points))
        ax.plot([100 * x for x in xs], ys, style, color=color, label=label)
    for row in report["delivery"]["real_mesh"] or ():
        color = colors.setdefault(scheme_name(row["n"], row["k"]), f"C{len(colors)}")
        ax.plot(100 * row["failure_rate"], row["delivery_rate"], "o", color=color, mfc="none")
    if report["delivery"]["real_mesh"]:
        ax.plot([], [], "ko", mfc="none", label="real mesh")
    ax.plot([100 * p for p in TARGETS], list(TARGETS.values()), "k*", ms=10, label="targets")
    ax.set_xlabel("dead relays (%)")
    ax.set_ylabel("requests delivered (answer back)")
    ax.set_title(f"delivery (simulated, {report['settings']['relays']:,} relays; "
                 "R = resend rounds)", fontsize=10)
    ax.set_ylim(min(0.5, ax.get_ylim()[0]), 1.005)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def _codecs(ax, report: dict) -> None:
    for i, (name, cells) in enumerate(sorted(report["codecs"]["results"].items())):
        sizes = sorted(cells, key=int)
        xs = [int(size) / 1024 for size in sizes]
        ax.plot(xs, [cells[size]["prep_ms"] for size in sizes], "-o", color=f"C{i}",
                label=f"{name} prep")
        ax.plot(xs, [cells[size]["rebuild_ms"] for size in sizes], "--s", color=f"C{i}",
                label=f"{name} rebuild (from parity)")
    ax.set_xscale("log", base=2)
    ticks = sorted({int(size) / 1024 for cells in report["codecs"]["results"].values()
                    for size in cells})
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.set_yscale("log")
    ax.set_xlabel("message size (KB)")
    ax.set_ylabel("median time (ms)")
    n, k = report["codecs"]["n"], report["codecs"]["k"]
    ax.set_title(f"S-IDA cost per message, n={n}, k={k}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def _anonymity(ax, report: dict, metric: str, label: str) -> None:
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in report["anonymity"]:
        lines.setdefault(row["scheme"], []).append((row["fraction"], row[metric]))
    for scheme, points in lines.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, "-o", ms=3, label=scheme)
    ax.set_xscale("log")
    ax.set_xlabel("malicious fraction f of relays (colluding)")
    ax.set_ylabel(f"share of {label}")
    ax.set_title(f"{metric} exposure vs f (N = {report['settings']['relays']:,}, uniform "
                 "adversary, global collusion)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
