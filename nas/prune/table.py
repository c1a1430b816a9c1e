"""One Markdown table of every pruned model under some folders (their ``report.json``).

    python -m nas.prune.table outputs/prune multirun/prune

Columns: model, criterion, search, cost searched, recovery, target, measured cost (and whether it is
within 10 % of the target), params, test accuracy unpruned / pruned before recovery / after, and the
wall time of the search and of the recovery.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def rows(roots: list[Path]) -> list[dict[str, Any]]:
    out = []
    for root in roots:
        for path in sorted(root.rglob("report.json")):
            if any(p.startswith(".") for p in path.relative_to(root).parts[:-1]):
                continue  # a folder being written
            try:
                r = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(r, dict) or not str(r.get("strategy", "")).startswith("prune/"):
                continue
            out.append({**r, "_dir": str(path.parent)})
    return out


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.2f}"


def markdown(reports: list[dict[str, Any]]) -> str:
    head = ("| model | criterion | search | cost | recovery | target | measured (/ target) | within 10 % | params (M) | "
            "acc unpruned | acc pruned | acc after | search s | recovery s | folder |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in reports:
        lat = r.get("latency_ms") or {}
        model = r.get("model") or {}
        meas = lat.get("measured")
        tgt = lat.get("target")
        lines.append("| " + " | ".join([
            str(model.get("name") or model.get("kind", "-")), str(r.get("criterion")), str(r.get("search")),
            str(r.get("cost")), str((r.get("recovery") or {}).get("mode")),
            f"{(r.get('target') or {}).get('fraction', 0):.2f} = {tgt:.4g} {lat.get('unit', '')}" if tgt else "-",
            "-" if meas is None else f"{meas:.4g} ({meas / tgt:.2f})" if tgt else f"{meas:.4g}",
            "-" if lat.get("within_10pct") is None else ("yes" if lat["within_10pct"] else "NO"),
            f"{r.get('params', 0) / 1e6:.3f}",
            _pct(r.get("test_acc_unpruned")), _pct(r.get("test_acc_pruned")), _pct(r.get("test_acc")),
            f"{(r.get('search_cost') or {}).get('seconds', 0):.0f}",
            f"{(r.get('recovery') or {}).get('seconds', 0):.0f}", r["_dir"]]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    args = ap.parse_args(argv)
    found = rows(args.folders)
    if not found:
        print(f"no nas-prune report.json under {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 1
    print(markdown(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
