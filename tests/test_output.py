"""What a person reads: plain progress in a pipe, the run log, no noise, the sweep table, file modes."""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import stat
import sys
from pathlib import Path

import pytest
import torch

from nas.apps.lut import _loo_text, kit_instructions
from nas.apps.progress import (
    PlainProgressBar,
    QuietRichProgressBar,
    QuietTQDMProgressBar,
    progress_callbacks,
)
from nas.console import PlainProgress, fmt_seconds, run_log
from nas.latency.devices import CpuDevice
from nas.report import sweep
from tests.helpers import run_app

#: A search of a few seconds with an exact cost model (no latency table to build): 2 epochs of 3 batches.
QUICK_SEARCH = ("hardware=flops", "hardware.threads=1", "strategy.epochs=2", "strategy.module.warmup_epochs=1",
                "export.calib_batches=2", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2")

NOISE = ("GPU available", "TPU available", "log_every_n_steps", "wandb:", "💡", "`Trainer.fit` stopped")


@pytest.fixture(scope="module")
def piped_search(tmp_path_factory):
    """One quick search with the default ``progress=auto`` and its standard output to a pipe."""
    run_dir = tmp_path_factory.mktemp("piped") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HWNAS_CACHE", str(run_dir.parent / "cache"))
        mp.setenv("WANDB_MODE", "disabled")
        run = run_app("nas.apps.search", *QUICK_SEARCH, f"hydra.run.dir={run_dir}")
    assert run.returncode == 0, run.describe()
    return run, run_dir


def test_piped_search_prints_one_plain_line_per_epoch(piped_search):
    run, _ = piped_search
    epoch_lines = [line for line in run.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"], run.describe()
    assert "val/acc" in epoch_lines[-1] and epoch_lines[-1].endswith("done"), epoch_lines
    assert "left" in epoch_lines[0], epoch_lines  # an estimate while epochs remain
    # no live bar in a pipe: no cursor movement, no carriage return, no rich "Epoch 0/1 ━━━" rows
    assert "\r" not in run.stdout
    assert "\x1b[" not in run.stdout
    assert not any(line.startswith("Epoch ") for line in run.stdout.splitlines())


def test_piped_search_is_quiet_and_ends_with_the_summary(piped_search):
    run, run_dir = piped_search
    for noise in NOISE:
        assert noise not in run.stdout + run.stderr, (noise, run.describe())
    lines = run.stdout.rstrip().splitlines()
    assert lines[-1].startswith("retrain: nas-retrain arch="), run.describe()
    assert lines[-2].split()[:2] == ["export", "t0.70"] and lines[-2].endswith(str(run_dir / "export"))
    assert any("hwnas search: done in" in line for line in lines), run.describe()


def test_run_folder_log_holds_what_the_user_saw(piped_search):
    run, run_dir = piped_search
    log = (run_dir / "search.log").read_text()
    for line in run.stdout.splitlines():
        if line.strip():
            assert line.strip() in log, (line, log)
    assert "hwnas search: done in" in log and f"export t0.70  {run_dir / 'export'}" in log


def test_every_file_of_a_run_is_readable_by_others(piped_search):
    _, run_dir = piped_search
    umask = os.umask(0)
    os.umask(umask)
    if umask & 0o044:
        pytest.skip(f"umask {umask:o} hides files from others anyway")
    paths = [p for p in run_dir.rglob("*")]
    assert any(p.name == "model.safetensors" for p in paths)
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), f"{p}: {mode:o}"


def test_retrain_log_and_modes(piped_search, tmp_path):
    _, run_dir = piped_search
    out = tmp_path / "retrain"
    run = run_app("nas.apps.retrain", f"arch={run_dir / 'export'}", "epochs=1", "+trainer.limit_train_batches=2",
                  "+trainer.limit_val_batches=1", f"hydra.run.dir={out}")
    assert run.returncode == 0, run.describe()
    assert re.search(r"^epoch 1/1 .*\| .*done$", run.stdout, re.M), run.describe()
    for noise in NOISE:
        assert noise not in run.stdout + run.stderr, (noise, run.describe())
    log = (out / "retrain.log").read_text()
    assert "retrained" in log and f"report: {out / 'retrain_report.json'}" in log
    for p in [out / "retrain_report.json", out / "model", *(out / "model").iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) in (0o644, 0o755), p


def test_a_user_error_goes_to_the_log_too(tmp_path):
    run = run_app("nas.apps.search", "hardware=flops", "resume=sometimes", f"hydra.run.dir={tmp_path}")
    assert run.returncode == 2, run.describe()
    assert "resume='sometimes' is unknown" in (tmp_path / "search.log").read_text()


# ------------------------------------------------------------------------------ latency-table progress
def test_table_measurement_shows_items_done_and_an_estimate_in_a_pipe(capsys):
    device = CpuDevice(threads=1, warmup=1, repeats=3)
    items = {f"conv{i}": (torch.nn.Conv2d(4, 4, 3, padding=1), (4, 8, 8)) for i in range(4)}
    res = device.measure(items, progress=True, desc="latency table test")
    assert set(items) <= set(res)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "latency table test: 0/12 timed calls, started"
    assert re.fullmatch(r"latency table test: 12/12 timed calls, done in \d+ s", lines[-1]), lines
    assert len(lines) == 2, lines  # a pass of a second: no line per call


def test_plain_progress_rate_and_estimate():
    out = io.StringIO()
    with PlainProgress(every=3600, stream=out) as bar:
        task = bar.add_task("build", total=100)
        for _ in range(99):
            bar.advance(task)
        bar.update(task, total=150)  # an adaptive pass adds rounds
        for _ in range(51):
            bar.advance(task)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0] == "build: 0/100 items, started"  # no line per item
    assert re.fullmatch(r"build: 150/150 items, done in \d+ s", lines[1])
    out = io.StringIO()
    with PlainProgress(every=0, stream=out) as bar:
        task = bar.add_task("b", total=4)
        bar.advance(task)
    assert re.fullmatch(r"b: 1/4 items \(25%\), 0 s, about 0 s left", out.getvalue().splitlines()[1])
    out = io.StringIO()
    with PlainProgress(every=0, stream=out, budget=50) as bar:  # a pass that stops at a time limit
        task = bar.add_task("b", total=4)
        bar.advance(task)
    assert "at most 50 s left (time limit 50 s)" in out.getvalue().splitlines()[1]
    assert fmt_seconds(3725) == "1 h 02 min" and fmt_seconds(125) == "2 min 05 s"


# ------------------------------------------------------------------------------------ progress classes
def test_progress_kinds_and_pickling():
    assert isinstance(progress_callbacks("plain")[0], PlainProgressBar)
    assert isinstance(progress_callbacks("rich")[0], QuietRichProgressBar)
    assert isinstance(progress_callbacks("tqdm")[0], QuietTQDMProgressBar)
    assert progress_callbacks("none") == []
    # pytest captures stdout (not a terminal): auto means plain lines
    assert isinstance(progress_callbacks("auto")[0], PlainProgressBar)
    for cb in (PlainProgressBar(), QuietTQDMProgressBar()):  # ddp_spawn pickles the trainer's callbacks
        assert type(pickle.loads(pickle.dumps(cb))) is type(cb)
    assert QuietRichProgressBar.__module__ == "nas.apps.progress"


def test_run_log_keeps_text_and_drops_live_frames(tmp_path):
    log = tmp_path / "app.log"
    with run_log(log):
        print("\x1b[1mhwnas search\x1b[0m: done")
        sys.stdout.write("\x1b[2K\x1b[1A\rEpoch 0 ━━━━ 3/17")  # a live bar's frame
        print("error: something", file=sys.stderr)
    assert log.read_text() == "hwnas search: done\nerror: something\n"


# ------------------------------------------------------------------------------------------- nas-lut
def test_kit_line_names_no_path_of_this_machine(tmp_path):
    kit = tmp_path / "kits" / "mykit"
    text = kit_instructions(kit)
    run_line = next(line for line in text.splitlines() if "On the device" in line)
    assert "`python measure.py --out results.json`" in run_line and str(tmp_path) not in run_line
    assert "mykit/" in run_line


def test_overhead_errors_read_as_text_not_a_dict():
    assert _loo_text({"offset": 34.859, "scale_offset": 12.04}) == "offset 34.9%, scale_offset 12.0%"
    assert "{" not in _loo_text(None)


# ------------------------------------------------------------------------------------------ sweeps
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


@pytest.mark.slow
def test_multirun_prints_one_table_across_its_jobs(tmp_path):
    run = run_app("nas.apps.search", "-m", *QUICK_SEARCH, "seed=0,1", "run_name=sw",
                  f"hydra.sweep.dir={tmp_path / 'sw'}")
    assert run.returncode == 0, run.describe()
    tail = run.stdout[run.stdout.index("2 exports under"):]
    assert "seed=0" in tail and "seed=1" in tail and (tmp_path / "sw" / sweep.SUMMARY_FILE).is_file()


# ------------------------------------------------------------------------------------------- plots
def _texts(monkeypatch):
    """Collect every text a figure holds when it is saved (titles, labels, legends, annotations)."""
    import matplotlib.figure

    seen: list[str] = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **kw):
        seen.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        return save(fig, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return seen


def test_width_search_plot_marks_its_own_export(tmp_path, monkeypatch):
    from nas.report.slimmable_plots import plot_width_search

    rows = [{"kind": "greedy", "cost": c, "acc": a, "chosen": True} for c, a in ((1.0, 0.5), (2.0, 0.7), (3.0, 0.8))]
    found = {"t0.40": {"target": 1.2, "cost": 1.0, "acc": 0.5}, "t0.70": {"target": 2.1, "cost": 2.0, "acc": 0.7}}
    texts = _texts(monkeypatch)
    plot_width_search(rows, found, tmp_path / "a.png", "ms", this="t0.40")
    assert "t0.40 (this export)" in texts and "t0.70" in texts and "t0.70 (this export)" not in texts
    texts.clear()
    plot_width_search(rows, found, tmp_path / "b.png", "ms", this="t0.70")
    assert "t0.70 (this export)" in texts
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()


def test_pruning_order_before_any_pruning_says_so(tmp_path, monkeypatch):
    from nas.report.ddpnas_plots import plot_pruning_order

    choices = {"l0": ["a", "b", "c"], "l1": ["a", "b"]}
    texts = _texts(monkeypatch)
    history = [{"epoch": e, "pruned": []} for e in range(3)]
    plot_pruning_order(history, choices, tmp_path / "p.png", chosen={"l0": "b", "l1": "a"}, first_prune_after=9)
    title = next(t for t in texts if "DDPNAS" in t)
    assert "no candidate pruned in 3 epochs" in title and "after 9 epochs" in title
    assert "pruned after epoch" not in texts and "kept" not in texts  # no colour bar with nothing on it
    texts.clear()
    history[2]["pruned"] = [("l0", "c")]
    plot_pruning_order(history, choices, tmp_path / "q.png")
    assert "pruned after epoch" in texts and "2" in texts and texts.count("left") == 4


def test_cost_curve_names_the_derive_rule_and_whole_epochs(tmp_path, monkeypatch):
    from nas.report.plots import plot_cost_curve

    texts = _texts(monkeypatch)
    history = [{"epoch": e, "expected": 3.0 + e / 10, "derived_cost": 3.5} for e in range(3)]
    plot_cost_curve(history, tmp_path / "c.png", 3.8, "ms", derived_label="derived each epoch (budget rule)",
                    exported=3.6)
    assert "derived each epoch (budget rule)" in texts and "this export" in texts
    assert "derived (argmax)" not in texts
    ticks = [t for t in texts if re.fullmatch(r"[\d.−-]+", t or "")]
    assert "1" in ticks and "0.5" not in ticks and "1.5" not in ticks  # whole epochs only


@pytest.mark.slow
def test_wandb_prints_nothing_and_the_summary_stays_last(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_SILENT", raising=False)  # as on a user's machine
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    run = run_app("nas.apps.search", *QUICK_SEARCH, "export.onnx=false", "logger=wandb", f"hydra.run.dir={run_dir}")
    assert run.returncode == 0, run.describe()
    assert list(run_dir.rglob("run-*.wandb")), "W&B wrote no run"
    assert "wandb:" not in run.stdout + run.stderr, run.describe()
    assert run.stdout.rstrip().splitlines()[-1].startswith("retrain: nas-retrain arch="), run.describe()


def test_lut_log_holds_the_report_and_no_raw_dict(tmp_path):
    run = run_app("nas.apps.lut", "hardware=flops", "samples=3", f"hydra.run.dir={tmp_path}")
    assert run.returncode == 0, run.describe()
    log = (tmp_path / "lut.log").read_text()
    assert f"validation report: {tmp_path / 'lut_validation.json'}" in log and "nas-lut build: done in" in log
    assert run.stdout.rstrip().splitlines()[-1].startswith("nas-lut build: done in")
    assert not re.search(r"\{'\w+': ", run.stdout), run.stdout
