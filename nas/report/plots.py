"""PNG plots saved beside reports (matplotlib, no display needed)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_choice_probs(history: Sequence[Mapping[str, Any]], choices: Mapping[str, Sequence[str]], path: Path,
                      title: str = "architecture choice probabilities",
                      chosen: Mapping[str, str] | None = None) -> None:
    """One heatmap per layer: candidate (rows) x epoch (columns), colour = probability.

    The colour scale runs from 0 to the largest probability reached (not to 1, where a search that
    is still spread over 7 candidates would look flat), the last epoch's probabilities are written
    in its cells, and the candidate of ``chosen`` (the exported architecture) is boxed in red.
    """
    rows = [h for h in history if "probs" in h]
    if not rows:
        raise ValueError("no probability history to plot")
    layers = list(choices)
    n = len(layers)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    vmax = max(float(p) for r in rows for ps in r["probs"].values() for p in ps)
    vmax = min(1.0, math.ceil(vmax * 20) / 20) or 1.0
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 0.35 + 0.3 * max(len(c) for c in choices.values())
                                                  * nrows + 0.6 * nrows), squeeze=False, layout="constrained")
    epochs = [r["epoch"] for r in rows]
    im = None
    for i, name in enumerate(layers):
        ax = axes[i // cols][i % cols]
        cands = list(choices[name])
        mat = [[r["probs"][name][k] for r in rows] for k in range(len(cands))]
        im = ax.imshow(mat, aspect="auto", vmin=0, vmax=vmax, cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(cands)), cands, fontsize=7)
        step = max(1, math.ceil(len(epochs) / 6))
        ax.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs[::step]], fontsize=7)
        last = len(epochs) - 1
        for k in range(len(cands)):
            p = mat[k][last]
            ax.text(last, k, f"{p:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if p > 0.6 * vmax else "white")
        pick = (chosen or {}).get(name)
        if pick in cands:
            k = cands.index(pick)
            ax.add_patch(plt.Rectangle((-0.5, k - 0.5), len(epochs), 1, fill=False, ec="red", lw=1.5))
            ax.get_yticklabels()[k].set_color("red")
            ax.get_yticklabels()[k].set_fontweight("bold")
        ax.set_title(name, fontsize=9, pad=3)
    for j in range(n, nrows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=f"p (scale 0-{vmax:g})")
    fig.suptitle(title + " (x: epoch; numbers: last epoch" + ("; red: exported" if chosen else "") + ")",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost_curve(history: Sequence[Mapping[str, Any]], path: Path, target: float | None, unit: str,
                    derived_label: str = "derived (argmax)", exported: float | None = None) -> None:
    """Expected and derived-architecture cost per epoch against the target; ``exported``: the
    predicted cost of the exported architecture, marked after the last epoch."""
    rows = [h for h in history if "expected" in h]
    if not rows:
        raise ValueError("no cost history to plot")
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ep = [r["epoch"] for r in rows]
    ax.plot(ep, [r["expected"] for r in rows], label="expected (over the choice probabilities)")
    ax.plot(ep, [r["derived_cost"] for r in rows], label=derived_label, marker="o", ms=3)
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=1, label="target")
    if exported is not None:
        ax.plot([ep[-1]], [exported], marker="*", ms=12, color="C3", ls="", label="this export", zorder=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
