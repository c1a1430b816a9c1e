"""Weights & Biases extras: choice probabilities, latency-table trust, exports as artifacts.

Everything here is a no-op unless the run's logger is Lightning's ``WandbLogger``; W&B stays offline
unless the user set ``logger.offline=false``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def wandb_run(logger) -> Any | None:
    """The wandb Run behind a Lightning logger, or None."""
    if logger is None or logger is False or type(logger).__name__ != "WandbLogger":
        return None
    return logger.experiment


def log_choice_probs(run, history: Sequence[Mapping[str, Any]], choices: Mapping[str, Sequence[str]],
                     plot_path: Path | None = None) -> None:
    """Per-layer choice probabilities of every epoch as a table, plus the heatmap image."""
    import wandb

    rows = [[h["epoch"], layer, choices[layer][k], float(p)]
            for h in history if "probs" in h for layer, ps in h["probs"].items() for k, p in enumerate(ps)]
    if rows:
        run.log({"arch/choice_probs": wandb.Table(columns=["epoch", "layer", "choice", "p"], data=rows)})
    if plot_path is not None and Path(plot_path).exists():
        run.log({"arch/choice_probs_heatmap": wandb.Image(str(plot_path))})


def log_lut_summary(run, meta: Mapping[str, Any]) -> None:
    """How far the latency model can be trusted: its validation summary and calibration."""
    summary = {f"lut/{k}": meta[k] for k in ("scale", "overhead_ms", "reference_ms", "build_seconds") if k in meta}
    for k, v in (meta.get("validation") or {}).items():
        if isinstance(v, (int, float)):
            summary[f"lut/validation/{k}"] = v
    run.summary.update(summary)


def log_export_artifact(run, export_dir: Path, report: Mapping[str, Any]) -> None:
    """The export folder as an artifact of type ``architecture`` with its key numbers as metadata."""
    import wandb

    lat = report.get("latency_ms", {})
    meta = {
        "space": report.get("space"),
        "strategy": report.get("strategy"),
        "label": report.get("label"),
        "latency_ms_predicted": lat.get("predicted"),
        "latency_ms_measured": lat.get("measured"),
        "latency_ms_target": lat.get("target"),
        "device": lat.get("device"),
        "params": report.get("params"),
        "flops": report.get("flops"),
        "val_acc": report.get("val_acc"),
        "arch": report.get("arch"),
    }
    name = f"arch-{report.get('space')}-{run.id}-{report.get('label', 'best')}"
    art = wandb.Artifact(name=name.replace("/", "-"), type="architecture", metadata=meta)
    art.add_dir(str(export_dir))
    run.log_artifact(art)
