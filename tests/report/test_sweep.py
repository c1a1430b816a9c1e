"""One table across a sweep's jobs: nas-report and the Hydra callback."""
from __future__ import annotations

import json
import re
import stat
from pathlib import Path

from nas.report import sweep


def _fake_job(root: Path, num: int, overrides: list[str], label: str | None, measured: float, acc: float):
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    export = job / "export" / label if label else job / "export"
    export.mkdir(parents=True)
    report = {"label": label or "t0.70", "strategy": "proxyless", "params": 123456, "val_acc": acc,
              "latency_ms": {"predicted": 2.0, "measured": measured, "target": 2.0, "device": "cpu"}}
    (export / "report.json").write_text(json.dumps(report))



def test_sweep_table_across_jobs(tmp_path, capsys):
    root = tmp_path / "multirun" / "search" / "sw"
    _fake_job(root, 0, ["seed=0", "run_name=sw"], None, 2.05, 0.81)
    _fake_job(root, 1, ["seed=1"], None, 2.6, 0.93)  # 30 % over its target
    for num, acc in ((10, 0.88), (2, 0.85)):  # numeric job order, 2 before 10
        _fake_job(root, num, [f"seed={num}"], "t0.50", 1.9, acc)
    (root / "2" / "export" / "t0.50.prev").mkdir()  # a replaced export is not listed
    (root / "2" / "export" / "t0.50.prev" / "report.json").write_text((root / "2" / "export" / "t0.50" /
                                                                       "report.json").read_text())
    assert sweep.main([str(root)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"^│ \d+ ", line)]
    assert [r.split()[1] for r in rows] == ["0", "1", "2", "10"], out
    assert "seed=1" in rows[1] and "OVER" in rows[1] and "OVER" not in rows[0]
    assert "run_name" not in out
    _fake_job(root, 3, ["seed=0", "strategy=ddpnas"], None, 2.0, 0.5)  # overrides all jobs share: said once
    for num in (0, 1, 2, 10):
        (root / str(num) / ".hydra" / "overrides.yaml").write_text(f"- strategy=ddpnas\n- seed={num}\n")
    assert sweep.main([str(root)]) == 0
    out2 = capsys.readouterr().out
    assert "every job: strategy=ddpnas" in out2 and out2.count("strategy=ddpnas") == 1, out2
    assert f"best val acc within its target: job 10 t0.50  {root / '10' / 'export' / 't0.50'}" in out



def test_sweep_callback_prints_and_keeps_the_table(tmp_path, capsys):
    from omegaconf import OmegaConf

    root = tmp_path / "sw"
    _fake_job(root, 0, ["seed=0"], None, 2.0, 0.8)
    _fake_job(root, 1, ["seed=1"], None, 2.0, 0.9)
    sweep.SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}}}))
    out = capsys.readouterr().out
    assert "2 exports under" in out and f"nas-report {root}" in out
    kept = (root / sweep.SUMMARY_FILE).read_text()
    assert "seed=1" in kept and "90.00%" in kept
    assert stat.S_IMODE((root / sweep.SUMMARY_FILE).stat().st_mode) & 0o044 == 0o044



def test_nas_report_on_a_folder_without_runs(tmp_path, capsys):
    assert sweep.main([str(tmp_path)]) == 0
    assert "no finished run under" in capsys.readouterr().out
    assert sweep.main([str(tmp_path / "nope")]) == 2

