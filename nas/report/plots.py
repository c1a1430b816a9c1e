"""PNG plots saved beside reports (matplotlib, no display needed)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_choice_probs(history: Sequence[Mapping[str, Any]], choices: Mapping[str, Sequence[str]], path: Path,
                      title: str = "architecture choice probabilities") -> None:
    """One heatmap per layer: candidate (rows) x epoch (columns), colour = probability."""
    rows = [h for h in history if "probs" in h]
    if not rows:
        raise ValueError("no probability history to plot")
    layers = list(choices)
    n = len(layers)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.4 * nrows), squeeze=False)
    epochs = [r["epoch"] for r in rows]
    for i, name in enumerate(layers):
        ax = axes[i // cols][i % cols]
        mat = [[r["probs"][name][k] for r in rows] for k in range(len(choices[name]))]
        im = ax.imshow(mat, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(choices[name])), choices[name], fontsize=7)
        step = max(1, len(epochs) // 6)
        ax.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs[::step]], fontsize=7)
        ax.set_title(name, fontsize=9)
    for j in range(n, nrows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="p")
    fig.suptitle(title + " (x: epoch)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost_curve(history: Sequence[Mapping[str, Any]], path: Path, target: float | None, unit: str) -> None:
    """Expected and derived-architecture cost per epoch against the target."""
    rows = [h for h in history if "expected" in h]
    if not rows:
        raise ValueError("no cost history to plot")
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ep = [r["epoch"] for r in rows]
    ax.plot(ep, [r["expected"] for r in rows], label="expected (softmax p)")
    ax.plot(ep, [r["derived_cost"] for r in rows], label="derived (argmax)", marker="o", ms=3)
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=1, label="target")
    save_axes(fig, ax, path, "epoch", unit)


def save_axes(fig, ax, path: Path, xlabel: str, ylabel: str, dpi: int = 110) -> None:
    """Label, grid and legend one-axes figure ``fig``, save it as PNG and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
