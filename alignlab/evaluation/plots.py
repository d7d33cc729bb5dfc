"""Plots written next to the data they show (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

from alignlab.rl.selection import BestOfN


def _save(fig, path: Path) -> Path:
    """Write atomically (a temp file, then rename), so an interrupted run never leaves half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    os.replace(tmp, path)
    return path


def plot_best_of_n(curves: dict[str, BestOfN], path: str | Path, ylabel: str = "reward-model score") -> Path:
    """Mean (solid) and median (dashed) of max_{i<=N} r against N, one colour per pool (e.g. per iteration)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, c) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(c.n, c.mean, "-o", color=color, markersize=3, label=f"{label}: mean")
        ax.plot(c.n, c.median, "--", color=color, label=f"{label}: median")
    ax.set_xlabel("N (samples per prompt)")
    ax.set_ylabel(f"max {ylabel} of the first N")
    ax.set_title("Best-of-N")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
