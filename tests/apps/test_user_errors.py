"""Mistakes a user can make stop with one line (no traceback), and values that make no sense are
refused saying what is allowed. In-process: the apps' ``run_*`` functions under ``user_errors``, and
``hydra_entry`` with a patched ``sys.argv``."""
from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from nas.apps import common
from nas.apps.common import CONF_DIR, command_line_error, hydra_entry, user_errors
from nas.apps.retrain import run_retrain
from nas.apps.search import print_summary, target_miss
from nas.data import ImageFolderDataModule
from nas.errors import UserError
from nas.export import WEIGHTS_FILE, load_subnet, write_export
from nas.latency.items import table_items
from nas.latency.table import LatencyTable
from supernets.space import SearchSpace
from supernets.supernet import Supernet


def one_line_error(capsys, fn, *args, code: int = 2) -> str:
    """Run ``fn(*args)`` under ``user_errors``; it must exit ``code`` with one line on stderr."""
    with pytest.raises(SystemExit) as exit_:
        user_errors(fn)(*args)
    out, err = capsys.readouterr()
    assert exit_.value.code == code, out + err
    assert err.count("\n") == 1 and "Traceback" not in out + err, err
    return err


# ------------------------------------------------------------------------------------------ image folders
def write_images(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls, n in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(d / f"{i}.jpg")


def test_unreadable_images_are_skipped_with_one_warning_naming_them(tmp_path, capsys):
    write_images(tmp_path, {"cat": 3, "dog": 3})
    good = (tmp_path / "train" / "cat" / "0.jpg").read_bytes()
    truncated = tmp_path / "train" / "cat" / "cut.jpg"
    truncated.write_bytes(good[:-200])  # the header is intact, the end is missing
    fake = tmp_path / "train" / "dog" / "notes.jpg"
    fake.write_text("this is not an image")
    dm = ImageFolderDataModule(root=str(tmp_path), resolution=16, batch_size=4, arch_fraction=0.2)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "2 unreadable image file(s)" in warnings[0]
    assert f"{truncated} (truncated JPEG" in warnings[0] and f"{fake} (not an image)" in warnings[0]
    # training and evaluation see the readable images only, and every one of them loads
    dm.setup()
    for ds in (dm.train_set, dm.arch_set, dm.test_set):
        assert all(ds[i][0].shape == (3, 16, 16) for i in range(len(ds)))
    assert len(dm.train_set) + len(dm.arch_set) == 6 and len(dm.test_set) == 6


def test_an_image_folder_with_one_class_is_refused(tmp_path):
    write_images(tmp_path, {"cat": 3})
    with pytest.raises(UserError, match="at least 2 classes"):
        ImageFolderDataModule(root=str(tmp_path), resolution=16)


def test_a_class_without_a_readable_image_is_refused(tmp_path):
    write_images(tmp_path, {"cat": 2, "dog": 2})
    for f in (tmp_path / "train" / "dog").iterdir():
        f.write_text("not an image")
    with pytest.raises(UserError, match="none of the 2 image file"):
        ImageFolderDataModule(root=str(tmp_path), resolution=16)


# ------------------------------------------------------------------------------------------ exports
def make_export(dst: Path, space_name: str) -> Path:
    space = SearchSpace.from_yaml(Path(CONF_DIR) / "space" / f"{space_name}.yaml")
    arch = space.smallest(10)
    return write_export(dst, space=space, arch=arch, model=Supernet(space, 10).extract(arch), report={}, onnx=False)


def retrain_cfg(export: Path, out: Path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("retrain", overrides=[f"arch={export}", "init=inherited", "epochs=1", "progress=none",
                                             "logger=none", f"out_dir={out}"])


def test_inherited_retrain_with_a_truncated_weights_file(tmp_path, capsys):
    export = make_export(tmp_path / "export", "mbv2_tiny")
    w = export / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:100])
    err = one_line_error(capsys, run_retrain, retrain_cfg(export, tmp_path / "out"))
    assert f"error: {w} is damaged or not a safetensors file" in err and "re-export" in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_arch_file_of_another_space_beside_the_weights(tmp_path, capsys):
    export = make_export(tmp_path / "export", "mbv2_tiny")
    slim = make_export(tmp_path / "slim", "mbv2_tiny_slim")
    shutil.copy(slim / "arch.yaml", export / "arch.yaml")
    err = one_line_error(capsys, run_retrain, retrain_cfg(export, tmp_path / "out"))
    assert "holds weights of space 'mbv2_tiny'" in err and "describes space 'mbv2_tiny_slim'" in err
    assert "keep each export's arch.yaml and model.safetensors together" in err
    with pytest.raises(UserError, match="fingerprint"):
        load_subnet(export)


def test_weights_that_do_not_fit_the_net_are_named(tmp_path):
    export = make_export(tmp_path / "export", "mbv2_tiny")
    from safetensors.torch import save_file

    save_file({"conv_stem.weight": torch.zeros(3, 3, 3, 3)}, str(export / WEIGHTS_FILE))  # no fingerprint
    with pytest.raises(UserError, match=r"shapes differ: conv_stem.weight \(3, 3, 3, 3\)"):
        load_subnet(export)


# ------------------------------------------------------------------------------------------ run folders
def test_a_write_refused_by_the_file_system_is_one_line(capsys, tmp_path):
    def job(cfg):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run" / "export"))

    err = one_line_error(capsys, job, None)
    assert f"cannot use {tmp_path / 'run' / 'export'}: Read-only file system" in err and "HWNAS_OUTPUTS" in err


def test_a_run_folder_on_a_read_only_file_system_is_refused_before_hydra(monkeypatch, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.statvfs

    class ReadOnly:
        def __init__(self, st):
            self.f_flag = st.f_flag | os.ST_RDONLY

    monkeypatch.setattr(common.os, "statvfs", lambda p: ReadOnly(real(p)) if Path(p) == ro else real(p))
    msg = command_line_error("search", [f"hydra.run.dir={ro / 'outputs' / 'search' / 'x'}"])
    assert msg.startswith(f"cannot create the run folder {ro / 'outputs' / 'search' / 'x'}: {ro} is on a "
                          f"read-only file system") and "HWNAS_OUTPUTS=" in msg
    monkeypatch.setenv("HWNAS_OUTPUTS", str(ro))  # the default run folder, under HWNAS_OUTPUTS
    assert "read-only file system" in command_line_error("retrain", ["arch=/some/export"])
    assert command_line_error("search", [f"hydra.run.dir={tmp_path / 'ok'}"]) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_run_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert "is not writable" in command_line_error("search", [f"hydra.run.dir={locked / 'run'}"])


# ------------------------------------------------------------------------------------------ the command line
@pytest.mark.parametrize("config,arg,suggestion", [
    ("search", "strategy.latency_targte=0.5", "did you mean `strategy.targets=[0.5]`?"),
    ("search", "strategy.epoch=3", "did you mean `strategy.epochs`?"),
    ("search", "lut.rebuld=true", "did you mean `lut.rebuild`?"),
    ("search", "strategy.module.gatee=two", "did you mean `strategy.module.gate`?"),
    ("retrain", "epoch=3", "did you mean `epochs`?"),
    ("search", "strategy.xyzzy=1", "the keys under strategy are: epochs, module, name, targets"),
])
def test_a_misspelled_key_names_the_close_ones(config, arg, suggestion):
    msg = command_line_error(config, [arg, "arch=/x"] if config == "retrain" else [arg])
    key = arg.partition("=")[0]
    assert msg.startswith(f"{key} is not a key of the {config} config; {suggestion}"), msg
    assert f"+{arg}" in msg  # how to add a key on purpose


@pytest.mark.parametrize("args", [["strategy.targets=[0.5]", "seed=1"], ["-m", "seed=0,1"], ["space=nope"],
                                  ["+foo=1"], ["strategy=ddpnas", "strategy.epochs=2"], ["--cfg", "job"],
                                  ["--config-dir", "/my/configs", "my.key=1"]])
def test_correct_or_hydra_reported_command_lines_pass(args):
    assert command_line_error("search", args) is None


def test_hydra_entry_stops_a_misspelled_key_with_one_line(monkeypatch, capsys):
    ran = []
    main = hydra_entry(lambda: ran.append(1), config_name="search")
    monkeypatch.setattr(sys, "argv", ["nas-search", "strategy.latency_targte=0.5"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and not ran
    assert err == ("error: strategy.latency_targte is not a key of the search config; did you mean "
                   "`strategy.targets=[0.5]`? (to add a new key on purpose, write +strategy.latency_targte=0.5)\n")


# ------------------------------------------------------------------------------------------ targets
def table(**meta) -> LatencyTable:
    """mbv2_tiny-like numbers: the largest net 10 ms, the smallest about 3.5 ms."""
    space = SearchSpace.from_dict({
        "name": "tiny", "resolution": 16, "in_chans": 3, "act": "relu6",
        "stem": {"channels": 8, "stride": 2}, "first": {"channels": 8, "kernel": 3},
        "stages": [{"channels": 16, "layers": 2, "stride": 2}],
        "ops": ["k3_e3", "k5_e3"], "zero": True, "head": {"channels": 32}})
    items = table_items(space, 10)
    entries = {k: {"median_ms": 1.0 + i, "ratio": 1.0, "spread": 0.01, "count": 5, "role": v["role"],
                   "fields": v["fields"]} for i, (k, v) in enumerate(items.items())}
    fixed = {v["role"]: k for k, v in items.items() if v["role"] != "block"}
    return LatencyTable.from_entries(space, entries, fixed, {"model": "offset", "offset_ms": 0.0},
                                     {"device": "cpu", "num_classes": 10, "reference_ms": 1.0, **meta})


def test_a_target_above_the_largest_net_is_refused_with_the_largest():
    t = table()
    lo, hi = t.bounds()
    with pytest.raises(UserError) as e:
        t.resolve_targets([hi * 1.5])
    msg = str(e.value)
    assert f"is above the largest reachable latency of this space ({hi:.4g} ms)" in msg
    assert "a bare number above 1 is read as ms" in msg
    with pytest.raises(UserError, match="above the largest"):
        t.resolve_targets(["1.2x"])
    assert t.resolve_targets([1.0, f"{hi}ms"]) == {"t1.00": hi, f"t{hi}ms": hi}


@pytest.mark.parametrize("bad", [0, -0.5, "0ms", "nan"])
def test_a_target_that_is_not_positive_says_what_is_allowed(bad):
    with pytest.raises(UserError) as e:
        table().resolve_targets([bad])
    msg = str(e.value)
    assert "0 < x <= 1" in msg and "a bare number above 1 is read as ms" in msg and "this space reaches" in msg


def test_an_unreachable_target_blames_a_suspect_table():
    honest = table()
    lo, hi = honest.bounds()
    with pytest.raises(UserError) as e:
        honest.resolve_targets([0.5 * lo / hi])
    assert "below the smallest reachable" in str(e.value) and "suspect" not in str(e.value)

    accepted = table(untrusted="its validation on 22 subnets gave 14% within +-10%")
    with pytest.raises(UserError) as e:
        accepted.resolve_targets([0.5 * lo / hi])
    assert "the table itself is suspect: it was accepted with lut.accept_untrusted although its validation" \
           in str(e.value) and "`lut.rebuild=true`" in str(e.value)

    flat = table()
    flat.fixed += 20 * hi  # every net within a few % of the largest: what a table measured under load looked like
    lo, hi = flat.bounds()
    with pytest.raises(UserError) as e:
        flat.resolve_targets([0.5])
    assert f"puts the smallest subnet at {lo / hi:.3f} of the largest, which is implausible" in str(e.value)


# ------------------------------------------------------------------------------------------ over target
def test_target_miss():
    assert target_miss(1.73, 1.0) == (73.0, False)
    assert target_miss(1.10, 1.0) == (10.0, True)
    assert target_miss(0.5, 1.0) == (-50.0, True)  # a target is a budget: under it is within
    assert target_miss(None, 1.0) == (None, None) and target_miss(1.0, None) == (None, None)


def test_the_summary_marks_an_export_over_its_target(capsys, tmp_path):
    def report(label, measured, target):
        miss, within = target_miss(measured, target)
        return {"label": label, "arch": {"l1": "k3_e3"}, "params": 1e5, "flops": 2e6, "val_acc": 0.9,
                "dir": str(tmp_path / label),
                "latency_ms": {"predicted": target, "measured": measured, "target": target, "miss_pct": miss,
                               "within_target": within}}

    print_summary([report("t0.70", 5.19, 3.0), report("t0.50", 2.0, 2.1)], 10.0)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "t0.70" in line and "k3_e3" in line)
    assert "+73.0% OVER" in row
    assert "-4.8%" in next(line for line in out.splitlines() if "t0.50" in line and "k3_e3" in line)
    (warning,) = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warning.startswith("warning: export t0.70 was measured at 5.190 ms, 73% over its target 3.000 ms")
