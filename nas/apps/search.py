"""``nas-search``: search a supernet for a device and dataset, then export the derived network(s).

    nas-search                                        # mbv2_tiny on digits for this CPU, ProxylessNAS
    nas-search space=mbv2_tiny hardware=onnxruntime 'strategy.targets=[0.4]'
    nas-search 'strategy.targets=[0.5,0.7]'          # ProxylessNAS: one search per target
    nas-search -m 'strategy.targets=[0.5],[0.7]' seed=0,1

Returns the derived network's validation accuracy (for Hydra sweepers).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from nas.apps.common import (
    check_channels_last,
    check_epochs,
    check_precision,
    check_progress,
    console_main,
    instantiate,
    make_cost_model,
    make_device,
    make_datamodule,
    make_logger,
    make_space,
    trainer_callbacks,
    trainer_kwargs,
    training_record,
)
from nas.apps.progress import progress_callbacks
from nas.errors import UserError
from nas.export import count_model_flops, count_params, evaluate, write_export
from nas.latency.measure import STATE_TOL, measure_archs
from nas.report.plots import plot_choice_probs, plot_cost_curve
from nas.report.tracking import (
    log_choice_probs,
    log_export_artifact,
    log_lut_summary,
    wandb_run,
)
from supernets.bn import calibrate_bn
from supernets.supernet import WEIGHT_SHARING, Supernet


def export_arch(label: str, arch, *, module, space, datamodule, device, cost_model, out_dir: Path,
                cfg, search_seconds: float, target) -> dict[str, Any]:
    """Extract ``arch`` from the trained supernet, recalibrate BN, evaluate, measure and export it."""
    sub = module.supernet.extract(arch).cpu()
    calibrate_bn(sub, datamodule.calib_dataloader(int(cfg.export.calib_batches)))
    val_acc = evaluate(sub, datamodule.val_dataloader())
    predicted = cost_model.predict(arch)
    measured = None
    details: list[dict[str, Any]] = []
    if cfg.export.measure:
        (measured,) = measure_archs(space, [arch], device, reference_ms=cost_model.meta.get("reference_ms"),
                                    details=details)
    # the machine's state during the measurement: the reference block's time over the table's (> 1.1: a
    # slow state that every re-measurement met too, so the measured ms reads high)
    state = {k: details[-1][k] for k in ("state", "attempts") if details and k in details[-1]}
    miss_pct, within = target_miss(measured, target)
    shape = (space.in_chans, space.resolution, space.resolution)
    report = {
        "label": label,
        "space": space.name,
        "space_fingerprint": space.fingerprint,
        "strategy": module.name,
        "arch": dict(arch.choices),
        "data": datamodule.describe(),
        "latency_ms": {
            "predicted": predicted,
            "measured": measured,
            "target": target,
            "miss_pct": miss_pct,
            **({"measurement_state": state} if state else {}),
            "within_target": within,
            "device": device.name,
            "device_fingerprint": device.fingerprint_id(),
            "batch_size": device.batch_size,
        },
        "lut": {k: cost_model.meta.get(k) for k in ("overhead_ms", "reference_ms", "build_seconds", "validation")
                if k in cost_model.meta},
        "params": count_params(sub),
        "flops": count_model_flops(sub, shape),
        "val_acc": val_acc,
        "search_seconds": search_seconds,
        "search_cost": dict(module.search_cost),
        "training": training_record(cfg),
        "distributed": dict(module.dist_check),
        "seed": int(cfg.seed),
    }
    choices = space.decisions()
    plots = {}
    if any("probs" in h for h in module.history):
        plots["arch_probs.png"] = lambda p: plot_choice_probs(module.history, choices, p, chosen=dict(arch.choices))
    if any("expected" in h for h in module.history):
        plots["latency_curve.png"] = lambda p: plot_cost_curve(
            module.history, p, target, cost_model.unit, exported=predicted,
            derived_label=f"derived each epoch ({getattr(module, 'derive_rule', 'argmax')} rule)")
    plots.update(module.extra_plots(label, arch))
    write_export(out_dir, space=space, arch=arch, model=sub, report=report, plots=plots, onnx=bool(cfg.export.onnx))
    report["dir"] = str(out_dir)
    return report


#: An export measured more than this fraction above its target is flagged (summary and report.json).
TARGET_TOLERANCE = 0.10


def target_miss(measured: float | None, target: float | None) -> tuple[float | None, bool | None]:
    """``(miss_pct, within_target)`` of a measured export: how far above (+) or below (-) its target it
    was measured, in %, and whether it stays within :data:`TARGET_TOLERANCE` above it (a target is a
    budget: below it is within). ``(None, None)`` without a measurement or a target."""
    if measured is None or target is None or not target > 0:
        return None, None
    miss = round(100.0 * (float(measured) / float(target) - 1.0), 2)
    return miss, bool(miss <= 100 * TARGET_TOLERANCE)


def print_summary(reports: list[dict[str, Any]], total_seconds: float, unit: str = "ms",
                  kind: str = "latency") -> None:
    """One row per export, then each export's folder on a line of its own (copyable, never wrapped
    inside a table cell) and the command that retrains it. An export measured more than
    :data:`TARGET_TOLERANCE` above its target is marked in its row and named in a warning below."""
    console = Console()
    if not console.is_terminal:  # piped or logged: no terminal width to fit, do not squeeze to 80
        console = Console(width=160)
    table = Table(title=f"hwnas search: done in {total_seconds:.0f} s")
    for col in ("export", "architecture", f"{kind} pred / meas ({unit})", "target", "meas vs target", "params",
                "MFLOPs", "val acc"):
        table.add_column(col)
    missed = []
    for r in reports:
        lat = r["latency_ms"]
        meas = f"{lat['measured']:.3f}" if lat["measured"] is not None else "-"
        tgt = f"{lat['target']:.3f}" if lat["target"] is not None else "-"
        miss, within = lat.get("miss_pct"), lat.get("within_target")
        vs = "-" if miss is None else f"{miss:+.1f}%" + ("" if within else " OVER")
        if within is False:
            missed.append(r)
        table.add_row(r["label"], " ".join(r["arch"].values()), f"{lat['predicted']:.3f} / {meas}", tgt, vs,
                      f"{r['params'] / 1e6:.3f}M", f"{r['flops'] / 1e6:.1f}", f"{100 * r['val_acc']:.2f}%")
    console.print(table)
    for r in missed:
        lat = r["latency_ms"]
        state = (lat.get("measurement_state") or {}).get("state", 1.0)
        why = (f"the machine ran in a slow state through all {lat['measurement_state'].get('attempts')} attempts "
               f"(the reference block {state:.2f}x its fastest), so this reads high: measure the export again "
               f"later" if state > 1.0 + STATE_TOL else
               "the latency table does not match this device now (rebuild it on a quiet machine with "
               "lut.rebuild=true), or the machine was busy while measuring")
        print(f"warning: export {r['label']} was measured at {lat['measured']:.3f} {unit}, {lat['miss_pct']:.0f}% over "
              f"its target {lat['target']:.3f} {unit} (predicted {lat['predicted']:.3f}): {why}")
    width = max(len(r["label"]) for r in reports)
    for r in reports:
        print(f"export {r['label']:<{width}}  {r['dir']}")
    print(f"retrain: nas-retrain arch={reports[0]['dir']}")


def run_search(cfg: DictConfig) -> float:
    t_start = time.perf_counter()
    # ---- everything a user can get wrong is checked here, before any training
    check_progress(cfg.get("progress", "auto"))
    check_precision(cfg.trainer.get("precision", "32-true"), cfg.trainer.get("accelerator", "auto"))
    check_channels_last(cfg.trainer.get("channels_last", False))
    if "epochs" in cfg.strategy:
        check_epochs(cfg.strategy.epochs, "strategy.epochs")
    calib = cfg.export.get("calib_batches")
    if isinstance(calib, bool) or not isinstance(calib, int) or calib < 1:
        raise UserError(f"export.calib_batches={calib!r}: the BatchNorm recalibration batches before each "
                        f"validation and the export, a whole number >= 1 (default 20)")
    run_dir = Path(cfg.export.dir).parent
    resume_checkpoint(cfg, run_dir / "checkpoints", announce=False)  # checks resume= before any work
    seed = int(cfg.seed)
    pl.seed_everything(seed, workers=True, verbose=False)
    torch.set_num_threads(int(cfg.hardware.get("threads", torch.get_num_threads())))
    space = make_space(cfg.space)
    datamodule = make_datamodule(cfg)
    device = make_device(cfg.hardware)
    num_classes = datamodule.num_classes
    cost_model = make_cost_model(cfg, space, device, num_classes)
    targets = cost_model.resolve_targets(cfg.strategy.get("targets"))
    sharing = str(cfg.supernet.weight_sharing)
    if sharing not in WEIGHT_SHARING:
        raise UserError(f"supernet.weight_sharing={sharing!r} is unknown; choose one of {', '.join(WEIGHT_SHARING)}")
    if space.has_widths and sharing != "elastic":
        raise UserError(f"space={space.name} has width decisions, which slice one set of shared weights: "
                        f"supernet.weight_sharing must be elastic (drop supernet.weight_sharing={sharing})")
    factory = instantiate(cfg.strategy.module)
    # one search per target where the strategy serves one target at a time (ProxylessNAS), else one for all
    groups = ([{label: value} for label, value in targets.items()]
              if factory.func.one_target_per_search and len(targets) > 1 else [targets])
    logger = make_logger(cfg.get("logger"))
    lo, hi = cost_model.bounds()
    kind, unit = cost_model.kind, cost_model.unit
    print(f"space {space.name}: {len(space.layers)} searchable layers, {space.size():.3g} architectures; "
          f"{kind} {lo:.3f}-{hi:.3f} {unit} on {device.name}"
          + ("; targets " + ", ".join(f"{label} = {v:.3f} {unit} ({v / hi:.2f} of largest)"
                                      for label, v in targets.items()) if targets else ""))
    epochs = cfg.trainer.get("max_epochs")
    if len(groups) > 1:
        print(f"{cfg.strategy.name} searches for one target at a time: {len(groups)} searches, one per target")
    reports: list[dict[str, Any]] = []
    n_exports = None
    try:
        for i, group in enumerate(groups):
            sub = next(iter(group)) if len(groups) > 1 else ""
            ckpt_dir = run_dir / "checkpoints" / sub
            resume_from = resume_checkpoint(cfg, ckpt_dir)
            if i > 0:  # every search starts from the same seed, as if it ran alone
                pl.seed_everything(seed, workers=True, verbose=False)
            supernet = Supernet(space, num_classes, weight_sharing=sharing)
            module = factory(supernet=supernet, cost_model=cost_model, targets=group)
            print(f"searching with {module.name}" + (f" for {sub}" if sub else "")
                  + (f" for {epochs} epochs" if epochs and not getattr(module, "pretrained", None) else "")
                  + f"; run folder {run_dir}")
            ckpt = checkpoint_callback(ckpt_dir, cfg.checkpoint)
            trainer = pl.Trainer(**trainer_kwargs(cfg), logger=logger,
                                 callbacks=[ckpt, *progress_callbacks(cfg.progress), *trainer_callbacks(cfg)],
                                 default_root_dir=str(run_dir))
            if getattr(module, "pretrained", None):  # a supernet trained by an earlier run: search only
                module.train_loaders(datamodule)
                print(f"supernet from {module.pretrained['checkpoint']}: no training")
            else:
                # the epoch lines' val/acc is the derived net's as exported (BatchNorm recalibrated)
                module.recalibrate_validation(datamodule, int(cfg.export.calib_batches))
                trainer.fit(module, train_dataloaders=module.train_loaders(datamodule),
                            val_dataloaders=datamodule.val_dataloader(), ckpt_path=resume_from)
            if not trainer.is_global_zero:
                continue
            archs = module.derive_all()
            if n_exports is None:
                n_exports = len(archs) * len(groups)
            reports += _export_all(cfg, module, archs, logger, single=n_exports == 1, space=space,
                                   datamodule=datamodule, device=device, cost_model=cost_model)
    finally:
        if wandb_run(logger) is not None:
            import wandb

            wandb.finish()  # quiet: make_logger set WANDB_SILENT
    if reports:  # the summary last, after W&B has closed its run
        print_summary(reports, time.perf_counter() - t_start, unit, kind)
    return float(reports[0]["val_acc"]) if reports else 0.0


def checkpoint_callback(ckpt_dir: Path, checkpoint_cfg) -> pl.callbacks.ModelCheckpoint:
    """Writes ``ckpt_dir/last.ckpt`` after every ``every_n_epochs`` epochs (and ``every_n_train_steps``
    steps), overwriting it: "top 1 without a monitor" keeps the latest save. It is written after the
    strategy's own epoch-end hook (history, LR schedule), so a resume starts the next epoch.
    (``save_last=True`` with ``save_top_k=0`` writes nothing before the end of fit in Lightning 2.6.)"""
    return pl.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), filename="last", save_top_k=1, monitor=None,
                                        enable_version_counter=False, save_on_train_epoch_end=True,
                                        every_n_epochs=checkpoint_cfg.get("every_n_epochs") or None,
                                        every_n_train_steps=checkpoint_cfg.get("every_n_train_steps") or None)


def resume_checkpoint(cfg: DictConfig, ckpt_dir: Path, announce: bool = True) -> str | None:
    """``last.ckpt`` of this run folder when ``resume=auto`` and it exists (a requeued or restarted job)."""
    mode = str(cfg.get("resume", "auto"))
    if mode not in ("auto", "never"):
        raise UserError(f"resume={mode!r} is unknown; choose auto (continue from {ckpt_dir}/last.ckpt when it "
                        f"exists) or never")
    last = ckpt_dir / "last.ckpt"
    if mode == "auto" and last.exists():
        if announce:
            print(f"resuming from {last}")
        return str(last)
    return None


def _export_all(cfg, module, archs: dict[str, Any], logger, *, single: bool, space, datamodule, device,
                cost_model) -> list[dict[str, Any]]:
    """Export every derived architecture of one search (rank 0 only) and log them to W&B."""
    base = Path(cfg.export.dir)
    reports = [export_arch(label, arch, module=module, space=space, datamodule=datamodule, device=device,
                           cost_model=cost_model, out_dir=base if single else base / label, cfg=cfg,
                           search_seconds=module.search_cost["seconds"], target=module.export_target(label))
               for label, arch in archs.items()]
    if logger:
        logger.log_metrics({"export/val_acc": reports[0]["val_acc"],
                            "export/latency_pred_ms": reports[0]["latency_ms"]["predicted"]})
    run = wandb_run(logger)
    if run is not None:
        log_choice_probs(run, module.history, space.decisions(), Path(reports[0]["dir"]) / "arch_probs.png")
        log_lut_summary(run, cost_model.meta)
        for r in reports:
            log_export_artifact(run, Path(r["dir"]), r)
    return reports


main = console_main(run_search, "search")


if __name__ == "__main__":
    main()
