"""One table across the runs of a sweep (``nas-search -m ...``), or of any folder of runs.

    nas-report multirun/search/<run_name>      # the sweep's table, again, any time later
    nas-report outputs/search                  # every search run under a folder

After ``nas-search -m`` (and ``nas-retrain -m``) the table is printed by :class:`SweepSummary`, a
Hydra callback (``hydra.callbacks`` in ``conf/search.yaml``), and written to
``<sweep folder>/sweep_summary.txt``.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from rich.console import Console
from rich.table import Table

from nas.io import atomic_write_text

SUMMARY_FILE = "sweep_summary.txt"
#: An export whose measured cost is more than this fraction above its target is flagged.
OVER_TARGET = 0.10


def _run_of(path: Path, root: Path) -> Path:
    """The run folder of a report file: the nearest parent (up to ``root``) with a ``.hydra`` folder."""
    for parent in path.parents:
        if (parent / ".hydra").is_dir() or parent == root:
            return parent
    return path.parent


def _overrides(run: Path) -> str:
    """The job's own command-line overrides (``seed=1 strategy.targets=[0.5]``)."""
    f = run / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(f.read_text()) or []
    except (OSError, yaml.YAMLError):
        return ""
    return " ".join(str(o) for o in items if not str(o).startswith(("hydra.", "run_name=")))


def _varying(rows: list[dict[str, Any]]) -> str:
    """Drop from every row's ``overrides`` those all rows share; return the shared ones."""
    sets = [r["overrides"].split() for r in rows]
    common = [o for o in sets[0] if all(o in other for other in sets[1:])] if len(rows) > 1 else []
    for r, items in zip(rows, sets):
        r["overrides"] = " ".join(o for o in items if o not in common)
    return " ".join(common)


def _job_name(run: Path, root: Path) -> str:
    try:
        rel = run.relative_to(root)
    except ValueError:
        return run.name
    return str(rel) if str(rel) != "." else run.name


def _load(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def search_rows(root: Path) -> list[dict[str, Any]]:
    """One row per export folder (``report.json``) under ``root``, in job order."""
    rows = []
    for path in sorted(root.rglob("report.json"), key=lambda p: _sort_key(p, root)):
        if any(part.startswith(".") or part.endswith(".prev") for part in path.relative_to(root).parts[:-1]):
            continue  # an export being written, or the one it replaced
        r = _load(path)
        if r is None or "latency_ms" not in r:
            continue
        run = _run_of(path, root)
        lat = r.get("latency_ms") or {}
        pred, meas, target = lat.get("predicted"), lat.get("measured"), lat.get("target")
        over = (meas is not None and target and meas > (1 + OVER_TARGET) * target)
        rows.append({"job": _job_name(run, root), "overrides": _overrides(run), "export": r.get("label") or "-",
                     "strategy": r.get("strategy") or "-", "device": lat.get("device") or "-",
                     "pred": pred, "meas": meas, "target": target, "over": bool(over),
                     "params": r.get("params"), "val_acc": r.get("val_acc"), "dir": str(path.parent)})
    return rows


def retrain_rows(root: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(root.rglob("retrain_report.json"), key=lambda p: _sort_key(p, root)):
        r = _load(path)
        if r is None:
            continue
        run = path.parent
        rows.append({"job": _job_name(run, root), "overrides": _overrides(run), "init": r.get("init", "-"),
                     "epochs": r.get("epochs"), "val_acc": r.get("val_acc"), "test_acc": r.get("test_acc"),
                     "dir": str(run)})
    return rows


def _sort_key(path: Path, root: Path) -> tuple:
    """Job folders ``0, 1, ..., 10`` in numeric order."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.relative_to(root).parts)


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def sweep_table(root: str | Path) -> tuple[Table | None, list[str]]:
    """The rich table of every run under ``root`` and the lines to print under it."""
    root = Path(root)
    rows = search_rows(root)
    if rows:
        common = _varying(rows)
        table = Table(title=f"hwnas: {len(rows)} export{'s' if len(rows) != 1 else ''} under {root}")
        for col in ("job", "overrides", "export", "strategy", "pred / meas", "target", "params", "val acc"):
            table.add_column(col)
        for r in rows:
            target = _num(r["target"], ".3f") + (" OVER" if r["over"] else "")
            table.add_row(r["job"], r["overrides"] or "-", r["export"], r["strategy"],
                          f"{_num(r['pred'], '.3f')} / {_num(r['meas'], '.3f')}", target,
                          "-" if r["params"] is None else f"{r['params'] / 1e6:.3f}M",
                          "-" if r["val_acc"] is None else f"{100 * r['val_acc']:.2f}%")
        best = max((r for r in rows if r["val_acc"] is not None and not r["over"]), key=lambda r: r["val_acc"],
                   default=None)
        notes = [f"every job: {common}"] if common else []
        notes += [f"cost columns in the unit of each run's device ({', '.join(sorted({r['device'] for r in rows}))});"
                 f" OVER: measured more than {100 * OVER_TARGET:.0f}% above the target"]
        if best is not None:
            notes.append(f"best val acc within its target: job {best['job']} {best['export']}  {best['dir']}")
        return table, notes
    rrows = retrain_rows(root)
    if rrows:
        common = _varying(rrows)
        table = Table(title=f"hwnas: {len(rrows)} retrain run{'s' if len(rrows) != 1 else ''} under {root}")
        for col in ("job", "overrides", "init", "epochs", "val acc", "test acc"):
            table.add_column(col)
        for r in rrows:
            table.add_row(r["job"], r["overrides"] or "-", str(r["init"]), _num(r["epochs"], "d"),
                          "-" if r["val_acc"] is None else f"{100 * r['val_acc']:.2f}%",
                          "-" if r["test_acc"] is None else f"{100 * r['test_acc']:.2f}%")
        return table, [f"every job: {common}"] if common else []
    return None, [f"no finished run under {root} (looked for report.json and retrain_report.json)"]


def render(root: str | Path, width: int = 160) -> str:
    """The table and its notes as plain text (what ``nas-report`` prints off a terminal)."""
    table, notes = sweep_table(root)
    buf = io.StringIO()
    if table is not None:
        Console(width=width, file=buf, color_system=None).print(table)
    return buf.getvalue() + "".join(n + "\n" for n in notes)


def print_sweep(root: str | Path) -> None:
    table, notes = sweep_table(root)
    console = Console()
    if not console.is_terminal:  # piped or logged: no terminal width to fit
        console = Console(width=160)
    if table is not None:
        console.print(table)
    for n in notes:
        print(n)


class SweepSummary(Callback):
    """Hydra callback: after a multirun, print one table across its jobs and keep it in the sweep folder."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        root = Path(str(config.hydra.sweep.dir))
        if not root.is_dir():
            return
        print()
        print_sweep(root)
        atomic_write_text(root / SUMMARY_FILE, render(root))
        print(f"this table: {root / SUMMARY_FILE} (print it again with `nas-report {root}`)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nas-report", description="One table across the runs under a folder: "
                                     "a sweep of nas-search -m (multirun/search/<run_name>), or outputs/search.")
    parser.add_argument("folder", help="a sweep folder, a run folder, or a folder of runs")
    args = parser.parse_args(argv)
    root = Path(args.folder).expanduser()
    if not root.is_dir():
        print(f"error: {root} is not a folder; pass a sweep folder such as multirun/search/<run_name>",
              file=sys.stderr)
        return 2
    print_sweep(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
