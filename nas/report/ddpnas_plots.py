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
                       path: Path, title: str = "DDPNAS pruning order", chosen: Mapping[str, str] | None = None,
                       first_prune_after: int | None = None) -> None:
    """Layers (rows) x candidates (columns); colour and number = the epoch after which the candidate
    was pruned; ``left`` (white) for candidates still alive when the search stopped; the exported
    architecture's candidate of each layer (``chosen``) boxed in red; blank where a layer has no such
    candidate. Before the first pruning the figure says so (and after how many epochs it comes)
    instead of showing a colour scale with nothing on it."""
    layers = list(choices)
    if not layers:
        raise ValueError("no layers to plot")
    cands: list[str] = []
    for name in layers:
        for c in choices[name]:
            if c not in cands:
                cands.append(c)
    when = pruning_epochs(history)
    epochs_run = len({int(r["epoch"]) for r in history if "epoch" in r})
    mat = np.full((len(layers), len(cands)), np.nan)
    for (name, c), e in when.items():
        if name in layers and c in cands:
            mat[layers.index(name), cands.index(c)] = e

    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(cands), 1.2 + 0.42 * len(layers)))
    # grey: no such candidate in this layer; white: still alive; colours: pruned after epoch N
    ax.imshow(np.array([[0.93 if c not in choices[n] else 1.0 for c in cands] for n in layers]), aspect="auto",
              cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if when:
        first, last = min(when.values()), max(when.values())
        cmap = plt.get_cmap("viridis", max(1, last - first + 1))
        im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap=cmap, vmin=first - 0.5, vmax=last + 0.5,
                       interpolation="nearest")
        cbar = fig.colorbar(im, ax=ax, shrink=0.85, label="pruned after epoch")
        cbar.set_ticks(sorted(set(when.values())))
    for r, name in enumerate(layers):
        for k, c in enumerate(cands):
            if c not in choices[name]:
                continue
            if (name, c) in when:
                e = when[(name, c)]
                frac = (e - min(when.values())) / max(1, max(when.values()) - min(when.values()))
                ax.text(k, r, str(e), ha="center", va="center", fontsize=7, color="white" if frac < 0.6 else "black")
            else:
                ax.text(k, r, "left", ha="center", va="center", fontsize=7, color="0.35")
            if chosen is not None and chosen.get(name) == c:
                ax.add_patch(plt.Rectangle((k - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=1.8))
    ax.set_xticks(range(len(cands)), cands, fontsize=8, rotation=30)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    sub = "number: pruned after epoch; left: not pruned" + ("; red: exported" if chosen is not None else "")
    if not when:
        sub = (f"no candidate pruned in {epochs_run} epoch{'s' if epochs_run != 1 else ''}"
               + (f"; the first pruning comes after {first_prune_after} epochs" if first_prune_after else "")
               + ("; red: exported" if chosen is not None else ""))
    ax.set_title(f"{title}\n{sub}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
