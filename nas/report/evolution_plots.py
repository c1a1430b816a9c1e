"""Plot of an evolutionary search: every candidate scored (predicted cost vs arch-split accuracy),
the Pareto front, the targets and their picks."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from nas.report.plots import save_axes


def plot_front(candidates: Sequence[Mapping[str, Any]], found: Mapping[str, Mapping[str, Any]], path: Path,
               unit: str, kind: str = "latency", this: str | None = None) -> None:
    """Every candidate scored, the Pareto front, each target (dashed) and its pick (blue star);
    ``this`` (an export's label) is marked as this export's pick."""
    if not candidates:
        raise ValueError("no candidates to plot")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.scatter([c["cost"] for c in candidates], [100 * c["score"] for c in candidates], s=9, c="0.65",
               label=f"candidates ({len(candidates)})")
    front = sorted((c for c in candidates if c["pareto"]), key=lambda c: c["cost"])
    ax.plot([c["cost"] for c in front], [100 * c["score"] for c in front], "-o", ms=4, c="C3", drawstyle="steps-post",
            label="Pareto front")
    for label, f in found.items():
        mine = label == this
        ax.axvline(f["target"], color="C1" if mine else "k", ls="--", lw=1.2 if mine else 0.8)
        ax.plot([f["cost"]], [100 * f["score"]], "*", ms=15 if mine else 11, c="C1" if mine else "C0",
                label=f"this export ({label})" if mine else None, zorder=3)
        ax.annotate(label + (" (this export)" if mine else ""), (f["cost"], 100 * f["score"]), fontsize=7,
                    xytext=(3, -10), textcoords="offset points", color="C1" if mine else "k",
                    fontweight="bold" if mine else "normal")
    save_axes(fig, ax, path, f"predicted {kind} ({unit})" if unit else f"predicted {kind}", "arch-split accuracy (%)")
