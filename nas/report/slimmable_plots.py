"""Plot of the greedy width search: every network evaluated (cost vs accuracy), the chosen path, the targets."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nas.report.plots import save_axes


def plot_width_search(rows: Sequence[Mapping[str, Any]], found: Mapping[str, Mapping[str, Any]], path: Path,
                      unit: str, this: str | None = None) -> None:
    """Every network the width search evaluated (cost vs accuracy), its greedy path, each target (dashed)
    and the network found for it; ``this`` (an export's label) is marked as this export's point."""
    if not rows:
        raise ValueError("no width-search rows to plot")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    greedy = [r for r in rows if r.get("kind", "greedy") == "greedy"]
    uniform = [r for r in rows if r.get("kind") == "uniform"]
    ax.scatter([r["cost"] for r in greedy], [100 * r["acc"] for r in greedy], s=10, c="0.6", label="evaluated")
    if uniform:
        ax.plot([r["cost"] for r in uniform], [100 * r["acc"] for r in uniform], "s:", ms=4, c="C2",
                label="uniform widths")
    path_rows = [r for r in greedy if r["chosen"]]
    ax.plot([r["cost"] for r in path_rows], [100 * r["acc"] for r in path_rows], "-o", ms=3, label="greedy path")
    for label, f in found.items():
        mine = label == this
        ax.axvline(f["target"], color="C3" if mine else "k", ls="--", lw=1.2 if mine else 0.8, alpha=1 if mine else 0.5)
        ax.annotate(label + (" (this export)" if mine else ""), (f["cost"], 100 * f["acc"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points", color="C3" if mine else "k",
                    fontweight="bold" if mine else "normal")
    if this in found:
        f = found[this]
        ax.plot([f["cost"]], [100 * f["acc"]], marker="*", ms=14, color="C3", ls="", zorder=3,
                label=f"this export ({this})")
    save_axes(fig, ax, path, f"predicted cost ({unit})", "arch-split accuracy (%)")


def plot_width_bench(summary: Mapping[str, Any], path: Path, xlabel: str, timed: bool) -> None:
    """``python -m nas.bench.slimmable``: test accuracy against cost (or measured latency) of the uniform
    widths (one slimmable run and each trained alone, mean +- std over seeds) and of the width search."""
    key = "measured_ms" if timed else "cost"
    ws = sorted(summary["widths"], key=lambda w: w[key])
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [w[key] for w in ws]
    for name, style in (("slimmable", "o-"), ("alone", "s--")):
        if ws[0][name] is None:  # alone=skip
            continue
        ax.errorbar(x, [w[name][0] for w in ws], yerr=[w[name][1] for w in ws], fmt=style, capsize=3,
                    label=f"uniform widths ({'one slimmable run' if name == 'slimmable' else 'each trained alone'})")
    for w in ws:
        ax.annotate(f"x{w['multiplier']:g}", (w[key], w["slimmable"][0]), textcoords="offset points", xytext=(4, -10),
                    fontsize=8)
    pts = [(f[key], f["test_acc"]) for f in summary["searched"] if f[key] is not None]
    if pts:
        ax.scatter(*zip(*pts), marker="*", s=90, color="C3", zorder=3, label="width search (one per target and seed)")
    save_axes(fig, ax, path, xlabel, "test accuracy (%)", dpi=120)
