"""``nas-retrain``: train an exported architecture as a standalone timm EfficientNet.

    nas-retrain arch=<export dir>                       # from scratch (default)
    nas-retrain arch=<export dir> init=inherited        # from the supernet's weights
    nas-retrain arch=<export dir> teacher=<dir>         # with knowledge distillation

Writes checkpoints, ``model/`` (an export-format folder: arch.yaml, model.safetensors, model.onnx)
and ``retrain_report.json`` with ``test_acc``. Returns the test accuracy.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from .cli import CONF_DIR, instantiate, make_logger, progress_callbacks, trainer_kwargs, user_errors
from .errors import UserError

INITS = ("scratch", "inherited")


class RetrainModule(pl.LightningModule):
    def __init__(self, net: nn.Module, *, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 4e-5,
                 label_smoothing: float = 0.1, teacher: nn.Module | None = None, kd_alpha: float = 0.5,
                 kd_temperature: float = 4.0):
        super().__init__()
        self.net = net
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.opt_args = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
        self.label_smoothing = label_smoothing
        self.kd_alpha, self.kd_t = kd_alpha, kd_temperature

    def forward(self, x):
        return self.net(x)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher's BatchNorm statistics stay fixed
        return self

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = self.teacher(x)
            t = self.kd_t
            kd = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(t_logits / t, 1), log_target=True,
                          reduction="batchmean") * t * t
            loss = (1 - self.kd_alpha) * loss + self.kd_alpha * kd
            self.log("train/kd", kd, on_epoch=True, on_step=False, batch_size=len(y))
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, batch_size=len(y))
        return loss

    def _eval(self, batch, prefix):
        x, y = batch
        logits = self.net(x)
        self.log(f"{prefix}/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, on_epoch=True,
                 batch_size=len(y), sync_dist=True)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y), sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._eval(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval(batch, "test")

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.net.parameters(), **self.opt_args)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs or 1))
        return [opt], [sched]


def load_teacher(path: str | Path) -> nn.Module:
    """A teacher from an export or retrain folder (arch.yaml + model.safetensors), or a retrain
    ``model/`` folder; checkpoints are never unpickled."""
    from .export import load_subnet

    p = Path(path).expanduser()
    if p.is_dir() and (p / "model" / "arch.yaml").exists():
        p = p / "model"
    if not p.is_dir() or not (p / "arch.yaml").exists():
        raise UserError(f"teacher={path}: expected a folder with arch.yaml and model.safetensors (an export of "
                        f"nas-search, or the model/ folder of nas-retrain)")
    return load_subnet(p)


def run_retrain(cfg: DictConfig) -> float:
    from supernets.bn import calibrate_bn

    from .export import (ARCH_FILE, build_from_arch_file, count_model_flops, count_params, evaluate, load_subnet,
                         write_export)

    t0 = time.perf_counter()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    # ---- checks before any training
    if cfg.init not in INITS:
        raise UserError(f"init={cfg.init!r} unknown; choose one of: {', '.join(INITS)}")
    export_dir = Path(str(cfg.arch)).expanduser()
    if not export_dir.exists():
        raise UserError(f"arch={export_dir} does not exist; pass the export folder of a search, e.g. "
                        f"`nas-retrain arch=outputs/search/<date>/<time>/export`")
    if cfg.init == "inherited":
        net = load_subnet(export_dir)
        _, arch = build_from_arch_file(export_dir)
    else:
        net, arch = build_from_arch_file(export_dir)
    OmegaConf.update(cfg, "space.resolution", arch.resolution, force_add=True)
    datamodule = instantiate(cfg.data)
    if datamodule.num_classes != arch.num_classes:
        raise UserError(f"the architecture has {arch.num_classes} classes, data={datamodule.describe()['name']} has "
                        f"{datamodule.num_classes}; retrain on the dataset it was searched on")
    teacher = load_teacher(cfg.teacher) if cfg.get("teacher") else None
    if teacher is not None:
        with torch.no_grad():
            x = torch.zeros(1, 3, arch.resolution, arch.resolution)
            if teacher(x).shape[-1] != arch.num_classes:
                raise UserError(f"teacher={cfg.teacher} predicts {teacher(x).shape[-1]} classes, the student "
                                f"{arch.num_classes}")

    out_dir = Path(cfg.out_dir)
    module = RetrainModule(net, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                           label_smoothing=cfg.optim.label_smoothing, teacher=teacher, kd_alpha=cfg.kd.alpha,
                           kd_temperature=cfg.kd.temperature)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True,
                                        monitor="val/acc", mode="max", save_top_k=1)
    trainer = pl.Trainer(**trainer_kwargs(cfg), logger=make_logger(cfg.get("logger")),
                         callbacks=[ckpt, *progress_callbacks(cfg.progress)], default_root_dir=str(out_dir))
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader(), val_dataloaders=datamodule.val_dataloader())
    if not trainer.is_global_zero:
        return 0.0
    net = module.net.cpu().eval()
    val_acc = evaluate(net, datamodule.val_dataloader())
    test_acc = evaluate(net, datamodule.test_dataloader())
    from supernets.space import SearchSpace  # noqa: F401  (the export is self-describing)

    report = {
        "arch_dir": str(export_dir),
        "arch": dict(arch.choices),
        "init": cfg.init,
        "teacher": str(cfg.teacher) if cfg.get("teacher") else None,
        "epochs": int(cfg.epochs),
        "data": datamodule.describe(),
        "val_acc": val_acc,
        "test_acc": test_acc,
        "params": count_params(net),
        "flops": count_model_flops(net, (3, arch.resolution, arch.resolution)),
        "seconds": time.perf_counter() - t0,
        "checkpoint": ckpt.best_model_path or ckpt.last_model_path,
    }
    _write_model_folder(out_dir / "model", export_dir, net, arch, report)
    (out_dir / "retrain_report.json").write_text(json.dumps(report, indent=2))
    print(f"retrained {export_dir} ({cfg.init}, {cfg.epochs} epochs) in {report['seconds']:.0f} s: "
          f"test acc {100 * test_acc:.2f}%, val acc {100 * val_acc:.2f}% -> {out_dir}")
    return float(test_acc)


def _write_model_folder(dst: Path, export_dir: Path, net: nn.Module, arch, report: dict) -> None:
    """The retrained net in the export format (loadable by ``load_subnet``, usable as a teacher)."""
    import tempfile

    from safetensors.torch import save_file

    from .export import ARCH_FILE, ONNX_FILE, WEIGHTS_FILE
    from .onnx_utils import export_onnx

    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=".model.tmp-"))
    try:
        shutil.copy(export_dir / ARCH_FILE, tmp / ARCH_FILE)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        export_onnx(net, torch.zeros(1, 3, arch.resolution, arch.resolution), str(tmp / ONNX_FILE), dynamic_batch=True)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="retrain")
@user_errors
def main(cfg: DictConfig) -> float:
    return run_retrain(cfg)


if __name__ == "__main__":
    main()
