"""``nas-retrain``: train an exported architecture as a standalone timm EfficientNet.

    nas-retrain arch=<export dir>                       # from scratch (default)
    nas-retrain arch=<export dir> init=inherited        # from the supernet's weights
    nas-retrain arch=<export dir> teacher=<dir>         # with knowledge distillation

Writes checkpoints, ``model/`` (an export-format folder: arch.yaml, model.safetensors, model.onnx)
and ``retrain_report.json`` with ``test_acc``. Returns the test accuracy.

Everything a user can get wrong (``init``, ``epochs``, the ``arch`` folder and its fit to the search
space, the weights beside it, the teacher) is checked before any training.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from nas.apps.common import (
    CONF_DIR,
    check_channels_last,
    check_epochs,
    check_precision,
    check_progress,
    console_main,
    make_datamodule,
    make_logger,
    trainer_callbacks,
    trainer_kwargs,
    training_record,
)
from nas.apps.progress import progress_callbacks
from nas.errors import UserError
from nas.export import (
    ARCH_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    build_from_arch_file,
    count_model_flops,
    count_params,
    evaluate,
    load_subnet,
    read_arch_file,
    save_weights,
    timm_kwargs,
)
from nas.io import export_onnx, usual_modes, write_json
from nas.training import RetrainModule
from supernets.arch import ArchError
from supernets.space import SearchSpace, SpaceError

INITS = ("scratch", "inherited")


def load_teacher(path: str | Path) -> nn.Module:
    """A teacher from an export or retrain folder (arch.yaml + model.safetensors), or a retrain
    ``model/`` folder; checkpoints are never unpickled."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "model" / "arch.yaml").exists():
        p = p / "model"
    if not p.is_dir() or not (p / "arch.yaml").exists():
        raise UserError(f"teacher={path}: expected a folder with arch.yaml and model.safetensors (an export of "
                        f"nas-search, or the model/ folder of nas-retrain)")
    return load_subnet(p)


def _space_config(export_dir: Path, arch) -> tuple[dict, str]:
    """The description of the space ``arch`` was searched in, and where it came from.

    The search run's own config (``<run>/.hydra/config.yaml`` next to the export) when it describes
    the very space of the export (same fingerprint: e.g. searched with ``space.*`` overrides), else
    ``conf/space/<space>.yaml``.
    """
    for run_cfg in (export_dir.parent / ".hydra" / "config.yaml", export_dir.parent.parent / ".hydra" / "config.yaml"):
        if not arch.fingerprint or not run_cfg.is_file():
            continue
        try:
            d = OmegaConf.to_container(OmegaConf.load(run_cfg).space, resolve=True)
            if SearchSpace.from_dict(d).fingerprint == arch.fingerprint:
                return d, str(run_cfg)
        except Exception:  # noqa: BLE001 - not a search run's config: fall back to conf/space
            continue
    space_dir = Path(CONF_DIR) / "space"
    space_file = space_dir / f"{arch.space}.yaml"
    if not space_file.is_file():
        known = sorted(p.stem for p in space_dir.glob("*.yaml"))
        raise UserError(f"{export_dir / 'arch.yaml'}: space {arch.space!r} is unknown; the spaces are: "
                        f"{', '.join(known)} (conf/space/<name>.yaml)")
    try:
        return OmegaConf.to_container(OmegaConf.load(space_file), resolve=True), str(space_file)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{space_file}: cannot be read ({e})") from None


def check_arch_file(export_dir: Path) -> tuple[Any, dict]:
    """The export's :class:`Arch` and its file's mapping, refused with a clear message unless it fits
    its search space: every decision present with an allowed choice, and ``arch_def`` / ``timm`` (what
    the network is built from) equal to what the space makes of those choices (a hand-edited file may
    disagree)."""
    arch_file = export_dir / ARCH_FILE
    arch, raw = read_arch_file(export_dir)
    space_dict, source = _space_config(export_dir, arch)
    try:
        space = SearchSpace.from_dict(space_dict)
    except SpaceError as e:
        raise UserError(f"{source}: {e}") from None
    try:
        space.validate(arch)
    except ArchError as e:
        raise UserError(f"{arch_file}: {e}") from None
    expected = space.arch_def(arch)
    found = raw.get("arch_def")
    if found != expected:
        where = ""
        if isinstance(found, list):
            bad = [i for i in range(max(len(found), len(expected)))
                   if i >= len(found) or i >= len(expected) or found[i] != expected[i]]
            i = bad[0]
            where = (f" (stage {i}: the file has {found[i] if i < len(found) else 'nothing'}, the choices give "
                     f"{expected[i] if i < len(expected) else 'nothing'})")
        raise UserError(f"{arch_file}: arch_def does not match its choices in space {space.name!r}{where}; the "
                        f"network is built from arch_def, so edit both together, or re-export with nas-search")
    timm = timm_kwargs(space)
    if raw.get("timm") != timm:
        raise UserError(f"{arch_file}: timm {raw.get('timm')} does not match space {space.name!r} "
                        f"({timm}); re-export it with nas-search")
    return arch, raw


def run_retrain(cfg: DictConfig) -> float:
    t0 = time.perf_counter()
    # ---- checks before any training
    if cfg.init not in INITS:
        raise UserError(f"init={cfg.init!r} unknown; choose one of: {', '.join(INITS)}")
    if OmegaConf.is_missing(cfg, "arch") or not str(cfg.arch).strip():
        raise UserError("arch is required: pass the export folder of a search, e.g. "
                        "`nas-retrain arch=outputs/search/<date>/<time>/export`")
    epochs = check_epochs(cfg.epochs, "epochs")
    check_progress(cfg.get("progress", "auto"))
    check_precision(cfg.trainer.get("precision", "32-true"), cfg.trainer.get("accelerator", "auto"))
    check_channels_last(cfg.trainer.get("channels_last", False))
    export_dir = Path(str(cfg.arch)).expanduser()
    if not export_dir.exists():
        raise UserError(f"arch={export_dir} does not exist; pass the export folder of a search, e.g. "
                        f"`nas-retrain arch=outputs/search/<date>/<time>/export`")
    if not export_dir.is_dir():
        raise UserError(f"arch={export_dir} is not a folder; pass the export folder of a search (it holds "
                        f"arch.yaml and model.safetensors)")
    arch, raw = check_arch_file(export_dir)
    in_chans = int(raw["timm"].get("in_chans", 3))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.init == "inherited":
        net = load_subnet(export_dir)
    else:
        net, _ = build_from_arch_file(export_dir)
    OmegaConf.update(cfg, "space.resolution", arch.resolution, force_add=True)
    OmegaConf.update(cfg, "space.in_chans", in_chans, force_add=True)
    datamodule = make_datamodule(cfg)
    if datamodule.num_classes != arch.num_classes:
        raise UserError(f"the architecture has {arch.num_classes} classes, data={datamodule.describe()['name']} has "
                        f"{datamodule.num_classes}; retrain on the dataset it was searched on")
    teacher = load_teacher(cfg.teacher) if cfg.get("teacher") else None
    if teacher is not None:
        with torch.no_grad():
            x = torch.zeros(1, in_chans, arch.resolution, arch.resolution)
            if teacher(x).shape[-1] != arch.num_classes:
                raise UserError(f"teacher={cfg.teacher} predicts {teacher(x).shape[-1]} classes, the student "
                                f"{arch.num_classes}")

    out_dir = Path(cfg.out_dir)
    # RetrainModule puts the student in train() when fit starts (load_subnet returns it in eval)
    module = RetrainModule(net, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                           label_smoothing=cfg.optim.label_smoothing, teacher=teacher, kd_alpha=cfg.kd.alpha,
                           kd_temperature=cfg.kd.temperature)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True,
                                        monitor="val/acc", mode="max", save_top_k=1)
    trainer = pl.Trainer(**trainer_kwargs(cfg), logger=make_logger(cfg.get("logger")),
                         callbacks=[ckpt, *progress_callbacks(cfg.progress), *trainer_callbacks(cfg)],
                         default_root_dir=str(out_dir))
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader(), val_dataloaders=datamodule.val_dataloader())
    if not trainer.is_global_zero:
        return 0.0
    net = module.net.cpu().eval()
    val_acc = evaluate(net, datamodule.val_dataloader())
    test_acc = evaluate(net, datamodule.test_dataloader())
    report = {
        "arch_dir": str(export_dir),
        "arch": dict(arch.choices),
        "init": cfg.init,
        "teacher": str(cfg.teacher) if cfg.get("teacher") else None,
        "epochs": epochs,
        "data": datamodule.describe(),
        "val_acc": val_acc,
        "test_acc": test_acc,
        "params": count_params(net),
        "flops": count_model_flops(net, (in_chans, arch.resolution, arch.resolution)),
        "seconds": time.perf_counter() - t0,
        "training": training_record(cfg),
        "checkpoint": ckpt.best_model_path or ckpt.last_model_path,
    }
    _write_model_folder(out_dir / "model", export_dir, net, arch, in_chans)
    write_json(out_dir / "retrain_report.json", report)
    print(f"retrained {export_dir} ({cfg.init}" + (f", teacher {cfg.teacher}" if cfg.get("teacher") else "")
          + f", {epochs} epoch{'s' if epochs != 1 else ''}) in {report['seconds']:.0f} s: "
          f"test acc {100 * test_acc:.2f}%, val acc {100 * val_acc:.2f}%\n"
          f"model: {out_dir / 'model'}\nreport: {out_dir / 'retrain_report.json'}")
    return float(test_acc)


def _write_model_folder(dst: Path, export_dir: Path, net: nn.Module, arch, in_chans: int = 3) -> None:
    """The retrained net in the export format (loadable by ``load_subnet``, usable as a teacher)."""
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=".model.tmp-"))
    try:
        shutil.copy(export_dir / ARCH_FILE, tmp / ARCH_FILE)
        save_weights(net, tmp / WEIGHTS_FILE, arch)
        export_onnx(net, torch.zeros(1, in_chans, arch.resolution, arch.resolution), str(tmp / ONNX_FILE),
                    dynamic_batch=True)
        usual_modes(tmp)  # mkdtemp's folder is 0700 and safetensors writes 0600
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


main = console_main(run_retrain, "retrain")


if __name__ == "__main__":
    main()
