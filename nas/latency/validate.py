"""Checking a latency table against end-to-end measurements of whole subnets.

``validate_table`` samples ``samples`` random subnets (plus the largest and the smallest) from a
stream independent of the table's calibration nets, measures each static net end to end on the
device in a pass separate from the table's (same reference alternation, same table-ms unit), and
compares with the table's predictions. With ``retest`` the same nets are measured a second time,
so the report shows how repeatable the measurement itself is beside the table's error: no table can
be more accurate than the measurement that checks it.

The summary (``n``, ``within_5pct``, ``within_10pct`` as fractions, ``spearman``, ``rmse_pct``,
``bias_pct``, ``max_abs_pct`` and the retest numbers) goes into the table file (``meta["validation"]``)
and, with every net, into ``lut_validation.json``; ``lut_validation.png`` plots predicted vs measured.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from rich.console import Console
from rich.table import Table

from nas.io import atomic_write_text
from nas.latency.items import validation_archs
from nas.latency.measure import NET_GROUP, STATE_TOL, clean_fraction, measure_archs
from nas.latency.table import LatencyTable

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)

VALIDATION_FILE = "lut_validation.json"
PLOT_FILE = "lut_validation.png"


# ---------------------------------------------------------------------- statistics
def rankdata(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata's default)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the average ranks); nan if undefined."""
    if len(a) != len(b):
        raise ValueError("spearman needs two sequences of the same length")
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def validation_stats(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float | int]:
    """How well ``predicted`` matches ``measured`` (relative error ``(pred - meas) / meas``).

    ``within_5pct`` / ``within_10pct``: fraction of nets with ``|error| <= 5 %`` / ``10 %``;
    ``spearman``: rank correlation; ``rmse_pct``: root mean square relative error in percent;
    ``bias_pct``: median signed error in percent; ``max_abs_pct``: the worst absolute error.
    """
    p = np.asarray(predicted, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    if p.shape != m.shape or p.ndim != 1 or len(p) == 0:
        raise ValueError("predicted and measured must be non-empty sequences of the same length")
    if np.any(m <= 0):
        raise ValueError("measured values must be positive")
    err = (p - m) / m
    tol = 1e-9  # an error of exactly 10 % counts as within 10 %
    return {
        "n": int(len(p)),
        "within_5pct": float(np.mean(np.abs(err) <= 0.05 + tol)),
        "within_10pct": float(np.mean(np.abs(err) <= 0.10 + tol)),
        "spearman": spearman(p, m),
        "rmse_pct": float(100.0 * math.sqrt(float(np.mean(err * err)))),
        "bias_pct": float(100.0 * np.median(err)),
        "max_abs_pct": float(100.0 * np.max(np.abs(err))),
    }


def retest_stats(first: Sequence[float], second: Sequence[float]) -> dict[str, float | int]:
    """Repeatability of the measurement: the second pass compared with the first (as a prediction),
    plus the median and 90th percentile of ``|a - b| / mean(a, b)`` in percent."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    s = validation_stats(b, a)
    rel = np.abs(a - b) / (0.5 * (a + b))
    s.update(median_abs_pct=float(100.0 * np.median(rel)), p90_abs_pct=float(100.0 * np.percentile(rel, 90)))
    return s


#: Group medians of measured / predicted further apart than this (max / min) mean the machine ran the
#: groups of nets in different speed states: the table's conversion to ms holds for some groups only.
STATE_SPLIT_MAX = 1.3


def state_split(reference: Sequence[float], measured: Sequence[float], group: int = NET_GROUP) -> dict[str, Any] | None:
    """How far the groups of a measurement (nets are timed in consecutive groups of ``group``) moved
    apart: the median of ``measured / reference`` in each group of at least 3 nets, and the ratio of
    the largest to the smallest of them (``spread``; 1.0 = every group in the same state).

    On this 2-core machine a torch-eager validation once fell into two clusters 2x apart: within a
    group the ratio to the prediction was constant to +-3 %, between groups it jumped between ~1.0
    and ~2.1 (docs/latency.md). A fit through such a measurement is wrong for every net; this
    detects it. ``reference`` is the table's prediction, or the first pass for a test-retest.
    """
    r = np.asarray(measured, dtype=np.float64) / np.asarray(reference, dtype=np.float64)
    meds = [float(np.median(r[i:i + group])) for i in range(0, len(r), group) if len(r[i:i + group]) >= 3]
    meds = [m for m in meds if np.isfinite(m) and m > 0]
    if len(meds) < 2:
        return None
    return {"group_medians": [round(m, 4) for m in meds], "spread": round(max(meds) / min(meds), 4),
            "split": max(meds) / min(meds) > STATE_SPLIT_MAX}


# ---------------------------------------------------------------------- validation
def validate_table(table: LatencyTable, device, *, samples: int = 100, seed: int = 0, retest: bool = True,
                   progress: bool = False, rel_ci: float | None = None, max_repeats: int | None = None,
                   max_seconds: float | None = None, update_meta: bool = True) -> dict[str, Any]:
    """Measure ``samples`` random subnets + largest + smallest end to end and compare with ``table``.

    The measuring settings default to the table's own (``meta["method"]``). Returns the full report
    (``summary``, ``nets``, settings); with ``update_meta`` the summary is also stored as
    ``table.meta["validation"]`` (save the table to keep it).
    """
    space = table.space
    num_classes = int(table.meta.get("num_classes", 10))
    method = table.meta.get("method") or {}
    rel_ci = method.get("rel_ci") if rel_ci is None else rel_ci
    max_repeats = method.get("max_repeats") if max_repeats is None else max_repeats
    max_seconds = method.get("max_seconds") if max_seconds is None else max_seconds
    warm_calls = int(method.get("warm_calls", 0) or 0)
    labelled = validation_archs(space, num_classes, samples, seed)
    archs = [a for _, a in labelled]
    ref_ms = table.meta.get("reference_ms") if device.timed else None
    t0 = time.perf_counter()
    kw = dict(reference_ms=ref_ms, rel_ci=rel_ci, max_repeats=max_repeats, max_seconds=max_seconds,
              warm_calls=warm_calls)
    details: list[dict[str, Any]] = []
    measured = measure_archs(space, archs, device, progress=progress,
                             desc=f"validating on {len(archs)} subnets", details=details, **kw)
    second = None
    if retest:
        second = measure_archs(space, archs, device, progress=progress, desc="re-measuring (test-retest)",
                               details=details, **kw)
    seconds = time.perf_counter() - t0
    calib = {tuple(sorted(c["choices"].items())) for c in (table.meta.get("overhead") or {}).get("calibration", [])}
    report = validate_measured(
        table, labelled, measured, second, update_meta=False, samples=samples, seed=seed,
        device=table.meta.get("device"), device_fingerprint=device.fingerprint_id(),
        in_calibration=sum(tuple(sorted(a.choices.items())) in calib for a in archs),
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"), seconds=round(seconds, 2))
    summary = report["summary"]
    if device.timed:
        summary["load_avg"] = _load_avg()
        summary["clean_fraction"] = clean_fraction({str(i): d for i, d in enumerate(details)})
        refs = [d for d in details if "attempts" in d]  # one per group of nets (measure_groups)
        if refs:
            summary["groups"] = len(refs)
            summary["groups_measured_again"] = sum(int(d["attempts"]) > 1 for d in refs)
            summary["groups_left_slow"] = sum(float(d.get("state", 1.0)) > 1.0 + STATE_TOL for d in refs)
        table_ref = table.meta.get("reference_ms")
        if details and table_ref:
            # the reference of the first validation group (nets are measured in groups of NET_GROUP)
            now = float(details[min(len(archs), NET_GROUP)]["median_ms"])
            summary["reference_ms"] = now
            summary["reference_drift_pct"] = round(100.0 * (now / float(table_ref) - 1.0), 2)
    if update_meta:
        table.meta["validation"] = summary
    return report


def validate_measured(table: LatencyTable, labelled: Sequence[tuple[str, Any]], measured: Sequence[float],
                      second: Sequence[float] | None = None, *, update_meta: bool = True,
                      **extra: Any) -> dict[str, Any]:
    """A validation report of ``table`` against end-to-end measurements (here, or from a device kit).

    ``extra`` goes into the summary beside the statistics; with ``update_meta`` the summary is
    stored as ``table.meta["validation"]``."""
    archs = [a for _, a in labelled]
    predicted = [table.predict(a) for a in archs]
    summary: dict[str, Any] = {**validation_stats(predicted, measured), **extra}
    random_idx = [i for i, (label, _) in enumerate(labelled) if str(label).startswith("random")]
    if random_idx and len(random_idx) < len(archs):
        summary["random_only"] = validation_stats([predicted[i] for i in random_idx],
                                                  [measured[i] for i in random_idx])
    if second is not None:
        summary["retest"] = retest_stats(measured, second)
        summary["vs_retest"] = validation_stats(predicted, second)
    split = {"vs_table": state_split(predicted, measured),
             "retest": state_split(measured, second) if second is not None else None}
    if any(split.values()):
        summary["state_split"] = split
    nets = [{"label": label, "choices": dict(a.choices), "predicted_ms": p, "measured_ms": m,
             "error_pct": 100.0 * (p - m) / m, **({"remeasured_ms": second[i]} if second is not None else {})}
            for i, ((label, a), p, m) in enumerate(zip(labelled, predicted, measured))]
    if update_meta:
        table.meta["validation"] = summary
    return {"space": table.space.name, "space_fingerprint": table.space.fingerprint, "unit": table.unit,
            "summary": summary, "nets": nets}


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------------- output
def print_report(report: Mapping[str, Any], console=None, max_rows: int = 12) -> None:
    """A table of the worst nets and the summary (rich)."""
    console = console or Console(width=140)
    unit = report.get("unit", "ms")
    nets = sorted(report["nets"], key=lambda r: -abs(r["error_pct"]))
    retest = "remeasured_ms" in (nets[0] if nets else {})
    t = Table(title=f"latency table vs end-to-end measurement ({report['space']}): worst {min(max_rows, len(nets))} "
                    f"of {len(nets)}")
    for col in ("net", f"predicted ({unit})", f"measured ({unit})", "error", *(["re-measured", "retest diff"]
                                                                               if retest else [])):
        t.add_column(col, justify="right")
    for r in nets[:max_rows]:
        row = [r["label"], f"{r['predicted_ms']:.4g}", f"{r['measured_ms']:.4g}", f"{r['error_pct']:+.1f}%"]
        if retest:
            d = 100 * (r["remeasured_ms"] - r["measured_ms"]) / r["measured_ms"]
            row += [f"{r['remeasured_ms']:.4g}", f"{d:+.1f}%"]
        t.add_row(*row)
    console.print(t)
    s = report["summary"]
    console.print(summary_line(s))
    if "retest" in s:
        r = s["retest"]
        console.print(f"measurement test-retest (same {r['n']} nets measured twice): {100 * r['within_5pct']:.0f}% "
                      f"within +-5%, {100 * r['within_10pct']:.0f}% within +-10%, Spearman {r['spearman']:.3f}, "
                      f"RMSE {r['rmse_pct']:.1f}%, median |diff| {r['median_abs_pct']:.1f}%; "
                      f"table vs the second pass: {100 * s['vs_retest']['within_10pct']:.0f}% within +-10%, "
                      f"Spearman {s['vs_retest']['spearman']:.3f}")
    if s.get("load_avg"):
        console.print(f"machine load average after validation (1/5/15 min): {s['load_avg']}"
                      + (f"; {100 * s['clean_fraction']:.0f}% of the timed calls ran uninterrupted"
                         if s.get("clean_fraction") is not None else ""))
    if s.get("groups_measured_again"):
        console.print(f"{s['groups_measured_again']} of {s['groups']} groups of nets ran in a slow state of the "
                      f"machine (their reference block > {100 * STATE_TOL:.0f}% slower than the fastest) and were "
                      f"measured again; {s.get('groups_left_slow', 0)} stayed slow")
    busy_warning(s.get("clean_fraction"), console.print)
    drift_warning(s.get("reference_drift_pct"), console.print)
    for which, sp in (s.get("state_split") or {}).items():
        if sp and sp.get("split"):
            console.print(f"warning: the groups of nets ran in different speed states ({which}: group medians "
                          f"{min(sp['group_medians']):.2f}x to {max(sp['group_medians']):.2f}x): the table is not "
                          f"trusted; measure on a quiet machine or with hardware.threads=1")


def busy_warning(fraction: float | None, emit=print) -> None:
    """Say so when other processes interrupted many of the timed calls."""
    if fraction is not None and fraction < 0.5:
        emit(f"warning: other processes interrupted {100 * (1 - fraction):.0f}% of the timed calls: this "
             f"machine is busy, and the numbers are less trustworthy (those calls are left out while enough "
             f"clean ones remain). Measure on an idle machine, or with fewer threads (hardware.threads=1).")


#: Reference-block drift (percent) beyond which validation warns that the machine's state changed.
DRIFT_WARN_PCT = 15.0


def drift_warning(drift_pct: float | None, emit=print) -> None:
    """Say so when the reference block runs at another speed than when the table was built."""
    if drift_pct is not None and abs(drift_pct) > DRIFT_WARN_PCT:
        emit(f"warning: the reference block now takes {drift_pct:+.0f}% of its time when the table was built: "
             f"the machine is in another state (load, other processes, frequency). Ratios usually survive "
             f"that, absolute ms may not; rebuild the table under the conditions the network will run in.")


def summary_line(s: Mapping[str, Any]) -> str:
    return (f"table error over {s['n']} subnets: {100 * s['within_5pct']:.0f}% within +-5%, "
            f"{100 * s['within_10pct']:.0f}% within +-10%, Spearman {s['spearman']:.3f}, "
            f"RMSE {s['rmse_pct']:.1f}%, bias {s['bias_pct']:+.1f}%, worst {s['max_abs_pct']:.1f}%")


def plot_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Scatter of predicted vs measured with the y = x line and the +-10 % band (PNG)."""
    unit = report.get("unit", "ms")
    pred = np.array([r["predicted_ms"] for r in report["nets"]])
    meas = np.array([r["measured_ms"] for r in report["nets"]])
    lo, hi = float(min(pred.min(), meas.min())) * 0.9, float(max(pred.max(), meas.max())) * 1.1
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    xs = np.linspace(lo, hi, 50)
    ax.fill_between(xs, xs / 1.1, xs / 0.9, color="tab:green", alpha=0.12, label="within +-10%")
    ax.plot(xs, xs, color="black", lw=0.8)
    if "remeasured_ms" in report["nets"][0]:
        re = np.array([r["remeasured_ms"] for r in report["nets"]])
        ax.scatter(pred, re, s=10, marker="x", color="tab:gray", alpha=0.6, label="second measurement")
    ax.scatter(pred, meas, s=12, color="tab:blue", label="measured")
    s = report["summary"]
    ax.set_title(f"{report['space']} on {s.get('device')}: {100 * s['within_10pct']:.0f}% within +-10%, "
                 f"rho {s['spearman']:.3f}", fontsize=9)
    ax.set_xlabel(f"predicted by the table ({unit})")
    ax.set_ylabel(f"measured end to end ({unit})")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path | None]:
    """``lut_validation.json`` (+ ``lut_validation.png``) in ``out_dir``."""
    out_dir = Path(out_dir)
    json_path = atomic_write_text(out_dir / VALIDATION_FILE, json.dumps(report, indent=1))
    png = None
    try:
        png = plot_report(report, out_dir / PLOT_FILE)
    except Exception as e:  # noqa: BLE001 - a plot must never cost the numbers
        print(f"warning: could not draw {PLOT_FILE}: {e}")
    return json_path, png
