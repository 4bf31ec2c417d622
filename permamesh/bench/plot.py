"""PNG plots of benchmark reports (matplotlib, headless). Who calls it: the bench commands."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (imported only when a plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    """Lay out, write ``fig`` as a PNG at ``path`` (parents created) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_routing(report: dict, path: Path) -> None:
    plt = pyplot()

    policies = list(report["policies"])
    stats = report["policies"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    x = range(len(policies))
    for ax, (key, label) in zip(axes[:2], [("ttft", "time to first token (s)"), ("e2e", "end-to-end latency (s)")]):
        ax.bar([i - 0.2 for i in x], [stats[p][f"{key}_mean_s"] for p in policies], 0.4, label="mean")
        ax.bar([i + 0.2 for i in x], [stats[p][f"{key}_p99_s"] for p in policies], 0.4, label="p99")
        ax.set_xticks(list(x), policies, rotation=20)
        ax.set_ylabel(label)
        ax.legend()
    ax = axes[2]
    for p in policies:
        counts = sorted(stats[p]["per_worker"].values(), reverse=True)
        ax.plot(range(len(counts)), counts, label=p)
    ax.set_xlabel("workers, busiest first")
    ax.set_ylabel("requests served")
    ax.legend()
    s = report["summary"]
    fig.suptitle(f"routing, {report['mode']} mode, {report['requests']} requests on {report['workers']} workers "
                 f"({report['trace']}): TTFT {s['ttft_mean_ratio_vs_round_robin']:.2f}x round-robin, "
                 f"p99 e2e {s['p99_e2e_ratio_vs_least_loaded']:.2f}x least-loaded")
    save(fig, path)
