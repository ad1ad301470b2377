"""The experiment's frontier.png: learning against forgetting, one panel per (task, adapter)."""
from __future__ import annotations

from typing import Dict

from fastmtt.apps.experiment_statistics import curves_of, grouped


def plot_frontier(rows, path: str):
    """Learning (task CE) against forgetting (retention KL, log scale), one panel per (task, adapter): seed
    means with min-max bars across seeds, one line per method over lam (every line starts at CE only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = {key: points for key, points in grouped(rows).items() if key[1] != ""}
    base = {r["task"]: r for r in rows if r["method"] == "base"}
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.4), squeeze=False)
    colors: Dict[str, str] = {}  # one color per method across panels
    for ax, ((task, adapter), points) in zip(axes[0], sorted(groups.items())):
        for name, curve in curves_of(points).items():
            color = colors.setdefault(name, f"C{len(colors)}")
            xs = [s["retention_kl"] for _, s in curve]
            ys = [s["task_ce"] for _, s in curve]
            ax.errorbar([x[0] for x in xs], [y[0] for y in ys], marker="o", ms=4, capsize=2, label=name, color=color,
                        xerr=[[x[0] - x[2] for x in xs], [x[3] - x[0] for x in xs]],
                        yerr=[[y[0] - y[2] for y in ys], [y[3] - y[0] for y in ys]])
            for (lam, s) in curve[1:]:
                ax.annotate(f"{lam:g}", (s["retention_kl"][0], s["task_ce"][0]), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
        if ("CE only", 0.0) in points:
            s = points[("CE only", 0.0)]
            ax.scatter([s["retention_kl"][0]], [s["task_ce"][0]], s=90, marker="*", color="black", zorder=5,
                       label="CE only")
        if task in base:
            ax.axhline(base[task]["task_ce"], color="gray", lw=0.8, ls=":", label="base model")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{task}, {adapter} (labels: lam)", fontsize=9)
        ax.set_xlabel("forgetting: KL(base ‖ adapted) on Python prose (nats/token)", fontsize=8)
        ax.set_ylabel("held-out task CE (nats/token, lower = learned)", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
