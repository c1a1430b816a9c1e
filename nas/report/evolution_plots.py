"""Plot of an evolutionary search: every candidate scored (predicted cost vs arch-split accuracy),
the Pareto front, the targets and their picks."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nas.report.plots import save_axes  # noqa: E402


def plot_front(candidates: Sequence[Mapping[str, Any]], found: Mapping[str, Mapping[str, Any]], path: Path,
               unit: str, kind: str = "latency") -> None:
    if not candidates:
        raise ValueError("no candidates to plot")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.scatter([c["cost"] for c in candidates], [100 * c["score"] for c in candidates], s=9, c="0.65",
               label=f"candidates ({len(candidates)})")
    front = sorted((c for c in candidates if c["pareto"]), key=lambda c: c["cost"])
    ax.plot([c["cost"] for c in front], [100 * c["score"] for c in front], "-o", ms=4, c="C3", drawstyle="steps-post",
            label="Pareto front")
    for label, f in found.items():
        ax.axvline(f["target"], color="k", ls="--", lw=0.8)
        ax.plot([f["cost"]], [100 * f["score"]], "*", ms=11, c="C0")
        ax.annotate(label, (f["cost"], 100 * f["score"]), fontsize=7, xytext=(3, -10), textcoords="offset points")
    save_axes(fig, ax, path, f"predicted {kind} ({unit})" if unit else f"predicted {kind}", "arch-split accuracy (%)")
