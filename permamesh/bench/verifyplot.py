"""The plot of ``permamesh bench verify``: reputation over epochs, one line per node kind,
the trust floor, and the run's headline figures in the title.

Who calls it: :mod:`permamesh.bench.verify` (``--plot``) and tests.
"""

from __future__ import annotations

import logging
from pathlib import Path

from permamesh.bench.plot import pyplot, save

log = logging.getLogger(__name__)


def plot_verify(report: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(12, 6))
    floor = report["reputation_config"]["floor_ppm"] / 1e6
    start = report["reputation_config"]["initial_ppm"] / 1e6
    for name, rows in sorted(report["nodes"].items()):
        honest = name.startswith("honest-")
        if (honest or "part-time" in name or "dodger" in name) and not name.endswith("-0"):
            continue  # one line per kind keeps the plot readable (the JSON has every node)
        ax.plot([0] + [r["epoch"] for r in rows], [start] + [r["reputation_ppm"] / 1e6 for r in rows],
                marker="" if honest else "o", linewidth=2.5 if honest else 1.2, label=name.removesuffix("-0"))
    ax.axhline(floor, color="red", linestyle="--", label=f"trust floor {floor:g}")
    ax.set_xlabel("epoch (a cheater's line ends when it is excluded)")
    ax.set_ylabel("reputation R(T)")
    ax.set_ylim(0, 1.02)
    s = report["summary"]
    caught = (f"full-time cheaters out by epoch {s['max_epochs_to_exclude_fulltime']}, 20% part-time by "
              f"{s['epochs_to_exclude_parttime20']},\n" if "max_epochs_to_exclude_fulltime" in s else "honest only: ")
    ax.set_title(f"verification bench, {report['model']} ({'quick' if report['quick'] else 'full'}): {caught}"
                 f"{s['false_exclusions']} false exclusions in {s['honest_node_epochs']} honest node-epochs, "
                 f"{s['verifications_per_minute']} verifications/min", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, path)
