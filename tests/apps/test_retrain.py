"""Retraining an export: the student trains in train mode (the teacher stays in eval), and on digits a
retrain from the inherited weights starts above chance and ends at least as high as one from scratch.

Everything runs in-process. The export is made as a search makes it (a static subnet extracted from a
supernet, written by ``write_export``), its weights trained for two epochs on digits beforehand so that
"inherited" means something; the apps' own ``run_retrain`` then retrains it.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

from nas.apps.common import CONF_DIR
from nas.apps.retrain import run_retrain
from nas.data import DigitsDataModule
from nas.export import evaluate, load_subnet, write_export
from nas.training import RetrainModule
from supernets.space import SearchSpace
from supernets.supernet import Supernet


def composed(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides)


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory) -> Path:
    """An export of the smallest mbv2_tiny net whose weights learnt digits for two epochs."""
    torch.manual_seed(0)
    space = SearchSpace.from_yaml(Path(CONF_DIR) / "space" / "mbv2_tiny.yaml")
    arch = space.smallest(10)
    net = Supernet(space, 10).extract(arch).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for _ in range(2):  # about 75 % on the test split
        for x, y in DigitsDataModule(resolution=32, seed=0).train_dataloader():
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    out = tmp_path_factory.mktemp("search") / "export"
    write_export(out, space=space, arch=arch, model=net, report={}, onnx=False)
    return out


def retrain(export: Path, out: Path, init: str, epochs: int, *extra: str) -> dict:
    cfg = composed("retrain", [f"arch={export}", f"init={init}", f"epochs={epochs}", "progress=none", "logger=none",
                               f"out_dir={out}", *extra])
    run_retrain(cfg)
    return json.loads((out / "retrain_report.json").read_text())


class ModeRecorder(pl.Callback):
    """Every training batch: are all of the student's modules in train mode, all of the teacher's in eval?"""

    def __init__(self):
        self.student: list[bool] = []
        self.teacher: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.student.append(all(m.training for m in pl_module.net.modules()))
        self.teacher.append(not any(m.training for m in pl_module.teacher.modules()))


def test_student_trains_in_train_mode_and_teacher_stays_in_eval(digits_export):
    student, teacher = load_subnet(digits_export), load_subnet(digits_export)
    assert not student.training  # load_subnet hands the net over in eval mode: the case that broke
    module = RetrainModule(student, teacher=teacher, lr=0.01)
    module.eval()  # whatever mode the module is in before fit
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    rec = ModeRecorder()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
                         limit_train_batches=2, limit_val_batches=1, callbacks=[rec])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)  # validation in between
    assert rec.student == [True] * 4, rec.student
    assert rec.teacher == [True] * 4, rec.teacher
    assert not [w for w in caught if "eval mode" in str(w.message)]
    # the teacher is not part of the checkpointed state, and frozen
    assert all(k.startswith("net.") for k in module.state_dict())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_inherited_retrain_starts_above_chance_and_ends_at_least_as_high_as_scratch(digits_export, tmp_path):
    dm = DigitsDataModule(resolution=32, seed=0)
    start = evaluate(load_subnet(digits_export), dm.test_dataloader())
    assert start > 0.5, f"the export itself is at {start:.2%} on digits (chance: 10 %)"
    inherited = retrain(digits_export, tmp_path / "inherited", "inherited", 1)
    scratch = retrain(digits_export, tmp_path / "scratch", "scratch", 1)
    # the bug trained an inherited net to 10 %, below the 88 % of scratch
    assert inherited["test_acc"] >= scratch["test_acc"], (start, inherited["test_acc"], scratch["test_acc"])
    assert inherited["test_acc"] >= start - 0.02, (start, inherited["test_acc"])
    assert inherited["test_acc"] > 0.5


@pytest.mark.slow
def test_inherited_retrain_with_teacher_learns(digits_export, tmp_path):
    report = retrain(digits_export, tmp_path / "kd", "inherited", 1, f"teacher={digits_export}")
    assert report["teacher"] == str(digits_export)
    assert report["test_acc"] > 0.5, report["test_acc"]
