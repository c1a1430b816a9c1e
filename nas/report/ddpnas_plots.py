"""DDPNAS plots: the order in which candidates were pruned (PNG, matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def pruning_epochs(history: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], int]:
    """(layer, candidate) -> the epoch at whose end it was pruned, from the history rows."""
    out: dict[tuple[str, str], int] = {}
    for row in history:
        for layer, cand in row.get("pruned", ()):
            out.setdefault((str(layer), str(cand)), int(row["epoch"]))
    return out


def plot_pruning_order(history: Sequence[Mapping[str, Any]], choices: Mapping[str, Sequence[str]],
                       path: Path, title: str = "DDPNAS pruning order") -> None:
    """Layers (rows) x candidates (columns); colour and label = epoch the candidate was pruned at,
    ``kept`` for the survivors (highlighted), blank where a layer has no such candidate."""
    layers = list(choices)
    if not layers:
        raise ValueError("no layers to plot")
    cands: list[str] = []
    for name in layers:
        for c in choices[name]:
            if c not in cands:
                cands.append(c)
    when = pruning_epochs(history)
    last = max(when.values(), default=0)
    mat = np.full((len(layers), len(cands)), np.nan)
    for r, name in enumerate(layers):
        for k, c in enumerate(cands):
            if c in choices[name]:
                mat[r, k] = when.get((name, c), last + 1)

    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(cands), 0.9 + 0.42 * len(layers)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap=cmap, vmin=0, vmax=last + 1,
                   interpolation="nearest")
    for r, name in enumerate(layers):
        for k, c in enumerate(cands):
            if c not in choices[name]:
                continue
            if (name, c) in when:
                ax.text(k, r, str(when[(name, c)]), ha="center", va="center", fontsize=7,
                        color="white" if mat[r, k] < 0.6 * (last + 1) else "black")
            else:
                ax.text(k, r, "kept", ha="center", va="center", fontsize=7, fontweight="bold", color="black")
                ax.add_patch(plt.Rectangle((k - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xticks(range(len(cands)), cands, fontsize=8, rotation=30)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.85, label="pruned after epoch")
    ax.set_title(title + " (number: epoch; red: survivors)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
