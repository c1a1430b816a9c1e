"""What a person reads from the apps: plain progress in a pipe, quiet output with the summary last,
the run folder's log, file modes, the progress classes, nas-lut's lines."""
from __future__ import annotations

import os
import pickle
import re
import stat

import pytest

from nas.apps.lut import _loo_text, kit_instructions
from nas.apps.progress import (
    PlainProgressBar,
    QuietRichProgressBar,
    QuietTQDMProgressBar,
    progress_callbacks,
)
from nas.report import sweep
from tests.helpers import run_app

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



@pytest.mark.slow
def test_a_user_error_goes_to_the_log_too(tmp_path):
    run = run_app("nas.apps.search", "hardware=flops", "resume=sometimes", f"hydra.run.dir={tmp_path}")
    assert run.returncode == 2, run.describe()
    assert "resume='sometimes' is unknown" in (tmp_path / "search.log").read_text()



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



def test_kit_line_names_no_path_of_this_machine(tmp_path):
    kit = tmp_path / "kits" / "mykit"
    text = kit_instructions(kit)
    run_line = next(line for line in text.splitlines() if "On the device" in line)
    assert "`python measure.py --out results.json`" in run_line and str(tmp_path) not in run_line
    assert "mykit/" in run_line



def test_overhead_errors_read_as_text_not_a_dict():
    assert _loo_text({"offset": 34.859, "scale_offset": 12.04}) == "offset 34.9%, scale_offset 12.0%"
    assert "{" not in _loo_text(None)



@pytest.mark.slow
def test_multirun_prints_one_table_across_its_jobs(tmp_path):
    run = run_app("nas.apps.search", "-m", *QUICK_SEARCH, "seed=0,1", "run_name=sw",
                  f"hydra.sweep.dir={tmp_path / 'sw'}")
    assert run.returncode == 0, run.describe()
    tail = run.stdout[run.stdout.index("2 exports under"):]
    assert "seed=0" in tail and "seed=1" in tail and (tmp_path / "sw" / sweep.SUMMARY_FILE).is_file()

