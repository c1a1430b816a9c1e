"""Training options of the apps: ``trainer.precision`` (checked before any work, used by retraining)
and data loaders that pin memory only for a GPU."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from torch.utils.data import DataLoader, TensorDataset

from nas.apps import search as search_app
from nas.apps.common import (
    CONF_DIR,
    check_precision,
    make_datamodule,
    trainer_kwargs,
    user_errors,
)
from nas.apps.retrain import run_retrain
from nas.errors import UserError
from nas.export import load_subnet, write_export
from nas.training import RetrainModule
from supernets.blocks import space_timm_net
from supernets.space import SearchSpace
from tests.helpers import TINY


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("search", overrides=["progress=none", *overrides])


def test_precision_defaults_to_fp32_and_takes_bf16_on_cpu():
    assert trainer_kwargs(_compose())["precision"] == "32-true"
    assert trainer_kwargs(_compose("trainer.precision=bf16-mixed"))["precision"] == "bf16-mixed"
    assert trainer_kwargs(_compose("trainer.precision=32"))["precision"] == "32-true"


@pytest.mark.parametrize("value, accelerator, message", [
    ("fp16", "cpu", "trainer.precision='fp16' is unknown; choose one of: 32-true, bf16-mixed, 16-mixed"),
    ("16-mixed", "cpu", "trainer.precision=16-mixed needs a CUDA GPU"),
])
def test_precision_a_run_cannot_use_is_refused_in_one_line(value, accelerator, message):
    with pytest.raises(UserError) as e:
        check_precision(value, accelerator)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_loaders_pin_memory_only_for_a_gpu_trainer():
    cfg = _compose("data=texshapes", "data.n_train=40", "data.n_test=10", "data.num_workers=1")
    dm = make_datamodule(cfg)
    loader = dm.train_dataloader()
    assert not loader.pin_memory and loader.persistent_workers  # CPU trainer: workers persist, no pinning
    cfg.trainer.accelerator = "gpu"
    gpu = make_datamodule(cfg)
    assert gpu.pin_memory and gpu.train_dataloader().pin_memory
    assert not make_datamodule(_compose("data=texshapes", "data.n_train=40", "data.n_test=10")
                               ).train_dataloader().persistent_workers  # no workers: nothing to persist


def test_retrain_in_bf16_learns_and_exports_fp32_weights_that_load_back(tmp_path):
    torch.set_num_threads(1)
    space = SearchSpace.from_dict(TINY)
    arch = space.largest(4)
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, 16, generator=g)
    y = torch.randint(4, (64,), generator=g)
    x[torch.arange(64), y % 3, :6, :6] += 3.0  # a learnable signal
    x[y == 3, :, 10:, 10:] += 3.0
    module = RetrainModule(space_timm_net(space, arch, 4), lr=0.05, label_smoothing=0.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    trainer = pl.Trainer(max_epochs=8, accelerator="cpu", precision="bf16-mixed", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=DataLoader(TensorDataset(x, y), batch_size=32))
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert float(trainer.callback_metrics["val/acc"]) >= 0.6  # chance is 0.25
    net = module.net.cpu().eval()
    assert all(p.dtype == torch.float32 for p in net.parameters())
    out = write_export(tmp_path / "model", space=space, arch=arch, model=net, report={}, onnx=False)
    with torch.no_grad():
        assert torch.allclose(load_subnet(out)(x[:8]), net(x[:8]), atol=1e-5)


@pytest.mark.parametrize("app, option, message", [
    ("search", "trainer.precision=16-mixed", "error: trainer.precision=16-mixed needs a CUDA GPU"),
    ("retrain", "trainer.precision=16-mixed", "error: trainer.precision=16-mixed needs a CUDA GPU"),
    ("search", "trainer.channels_last=yes", "error: trainer.channels_last='yes': true"),
    ("retrain", "trainer.channels_last=yes", "error: trainer.channels_last='yes': true"),
])
def test_training_options_are_checked_before_any_work(app, option, message, tmp_path, monkeypatch, capsys):
    """``nas-search`` refuses ``16-mixed`` on a CPU (or a channels_last that is not a boolean) before it
    builds a latency table or loads data, ``nas-retrain`` before it reads the export."""
    def no_work(*args, **kw):
        raise AssertionError("work started before the precision was checked")

    monkeypatch.setattr(search_app, "make_cost_model", no_work)
    monkeypatch.setattr(search_app, "make_datamodule", no_work)
    overrides = [option, "progress=none"]
    if app == "retrain":
        overrides.append(f"arch={tmp_path / 'not-read'}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(app, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(SystemExit) as e:
        user_errors(search_app.run_search if app == "search" else run_retrain)(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_channels_last_is_on_by_default_and_trains_the_same_net_in_nhwc_then_hands_it_back_contiguous():
    """``trainer.channels_last`` (default true) converts the weights to NHWC for fit only: during training
    every 4-D weight is channels-last, afterwards contiguous again (safetensors needs that), and the
    weights trained are those of the same training in NCHW (same seed, same batches) up to float
    rounding."""
    from nas.apps.common import trainer_callbacks
    from nas.training import ChannelsLast

    cfg = _compose()
    assert "channels_last" not in trainer_kwargs(cfg)
    assert [type(c) for c in trainer_callbacks(cfg)] == [ChannelsLast]
    assert trainer_callbacks(_compose("trainer.channels_last=false")) == []
    with pytest.raises(UserError, match="trainer.channels_last='yes'"):
        trainer_callbacks(_compose("trainer.channels_last=yes"))

    space = SearchSpace.from_dict(TINY)
    arch = space.largest(4)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, space.resolution, space.resolution, generator=g),
                         torch.randint(0, 4, (32,), generator=g))
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(all(p.is_contiguous(memory_format=torch.channels_last)
                            for p in pl_module.parameters() if p.dim() == 4))

    def train(callbacks):
        torch.manual_seed(0)
        module = RetrainModule(space_timm_net(space, arch, 4), lr=0.05)
        pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=callbacks).fit(module, DataLoader(data, batch_size=8))
        return module

    nhwc = train([ChannelsLast(), Watch()])
    assert seen and all(seen)
    convs = [p for p in nhwc.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous() for p in convs)
    nchw = train([])
    for (name, a), b in zip(nhwc.state_dict().items(), nchw.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-3), name
    torch.manual_seed(0)
    init = space_timm_net(space, arch, 4).state_dict()
    assert any(not torch.allclose(a, init[k.removeprefix("net.")]) for k, a in nhwc.state_dict().items()
               if a.dim() == 4)  # it trained
