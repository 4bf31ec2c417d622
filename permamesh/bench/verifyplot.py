"""The plot of ``permamesh bench verify``: reputation over epochs, one line per node kind (for
honest kinds, the lowest of their nodes),
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
    for kind, (epochs, lowest, count) in sorted(_honest_lowest(report["nodes"]).items()):
        ax.plot([0] + epochs, [start] + lowest, linewidth=2.5,
                label=f"{kind} (lowest of {count})" if count > 1 else kind)
    for name, rows in sorted(report["nodes"].items()):
        if name.startswith("honest-") or (("part-time" in name or "dodger" in name) and not name.endswith("-0")):
            continue  # one line per kind keeps the plot readable (the JSON has every node)
        ax.plot([0] + [r["epoch"] for r in rows], [start] + [r["reputation_ppm"] / 1e6 for r in rows],
                marker="o", linewidth=1.2, label=name.removesuffix("-0"))
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


def _honest_lowest(nodes: dict[str, list[dict]]) -> dict[str, tuple[list[int], list[float], int]]:
    """Per honest kind (``honest-bf16``, ...): its epochs, the lowest reputation of its nodes at
    each, and how many nodes it has (a false exclusion shows whichever node it hits)."""
    kinds: dict[str, dict[int, float]] = {}
    counts: dict[str, int] = {}
    for name, rows in nodes.items():
        if not name.startswith("honest-"):
            continue
        kind = name.rsplit("-", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
        lowest = kinds.setdefault(kind, {})
        for r in rows:
            lowest[r["epoch"]] = min(lowest.get(r["epoch"], 1.0), r["reputation_ppm"] / 1e6)
    return {kind: (sorted(by), [by[e] for e in sorted(by)], counts[kind]) for kind, by in kinds.items()}
