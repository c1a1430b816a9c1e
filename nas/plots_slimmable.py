"""Plot of the greedy width search: every network evaluated (cost vs accuracy), the chosen path, the targets."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_width_search(rows: Sequence[Mapping[str, Any]], found: Mapping[str, Mapping[str, Any]], path: Path,
                      unit: str) -> None:
    if not rows:
        raise ValueError("no width-search rows to plot")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.scatter([r["cost"] for r in rows], [100 * r["acc"] for r in rows], s=10, c="0.6", label="evaluated")
    path_rows = [r for r in rows if r["chosen"]]
    ax.plot([r["cost"] for r in path_rows], [100 * r["acc"] for r in path_rows], "-o", ms=3, label="greedy path")
    for label, f in found.items():
        ax.axvline(f["target"], color="k", ls="--", lw=0.8)
        ax.annotate(label, (f["cost"], 100 * f["acc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"predicted cost ({unit})")
    ax.set_ylabel("arch-split accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
