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


def plot_size_fronts(candidates: Sequence[Mapping[str, Any]], path: Path, this: str | None = None) -> None:
    """Arch-split accuracy of every candidate against its parameters and its peak activation memory
    (batch 1, the largest input + output of any layer), each with its own Pareto front and the picks."""
    if not candidates:
        raise ValueError("no candidates to plot")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, flag, xlabel, scale in ((axes[0], "params", "pareto_params", "parameters (thousands)", 1e-3),
                                         (axes[1], "peak_activation_kb", "pareto_memory",
                                          "peak activation memory, batch 1 (KiB)", 1.0)):
        ax.scatter([scale * c[key] for c in candidates], [100 * c["score"] for c in candidates], s=9, c="0.65",
                   label=f"candidates ({len(candidates)})")
        front = sorted((c for c in candidates if c[flag]), key=lambda c: c[key])
        ax.plot([scale * c[key] for c in front], [100 * c["score"] for c in front], "-o", ms=4, c="C3",
                drawstyle="steps-post", label="Pareto front")
        for c in candidates:
            for label in c["picked_for"]:
                mine = label == this
                ax.plot([scale * c[key]], [100 * c["score"]], "*", ms=15 if mine else 11, c="C1" if mine else "C0",
                        zorder=3)
                ax.annotate(label, (scale * c[key], 100 * c["score"]), fontsize=7, xytext=(3, -10),
                            textcoords="offset points", color="C1" if mine else "k")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("arch-split accuracy (%)")
    fig.suptitle("evolution candidates: accuracy vs size (stars: each target's pick)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
