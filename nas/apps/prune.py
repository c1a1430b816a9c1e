"""``nas-prune``: prune a trained model of your own to measured latency targets.

    nas-prune model.name=resnet18 model.weights=my.safetensors data=fashion_mnist hardware=onnxruntime \\
              'strategy.targets=[0.7,0.5]' strategy.criterion=taylor strategy.search=greedy

One pruned model per target in ``<run>/export/<label>/`` (see :mod:`nas.prune.export`); every mistake a
user can make stops with one line before any training or search: the model (an unknown timm name, a
weights file that does not fit), the options, a target the model cannot reach, a layer the dependency
graph cannot handle.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from nas.apps.common import (
    check_channels_last,
    check_epochs,
    check_progress,
    console_main,
    instantiate,
    make_device,
    make_logger,
    trainer_callbacks,
    trainer_kwargs,
)
from nas.apps.progress import progress_callbacks
from nas.errors import UserError, check_choice
from nas.export import evaluate
from nas.io import atomic_write, json_default, write_json
from nas.latency.analytic import count_flops, count_params
from nas.latency.cost import target_label
from nas.prune.criteria import CRITERIA, channel_order, normalised, score_channels
from nas.prune.export import kept_indices, write_pruned
from nas.prune.graph import check_prunable, find_groups
from nas.prune.lut import search_evolution
from nas.prune.sparsity import SparsityModule, zero_fraction
from nas.prune.search import (
    COSTS,
    SEARCHES,
    Candidates,
    search_global,
    search_greedy,
    search_uniform,
)
from nas.prune.source import export_meta, load_original, source_spec
from nas.training import RetrainModule
from supernets.bn import calibrate_bn

RECOVERY = ("distill", "finetune", "scratch", "none")


def resolve_targets(targets: Any, full: float, smallest: float, unit: str, *, fractions_only: bool = False
                    ) -> dict[str, float]:
    """``{label: cost}`` for ``strategy.targets``, largest first: a fraction ``0 < x <= 1`` of the unpruned
    model's cost ``full``, or an absolute cost (``"2.5ms"``, a bare number > 1 in ``unit``). A target
    below ``smallest`` (every group at its fewest channels) is refused with the smallest reachable."""
    items = [targets] if isinstance(targets, (str, int, float)) else list(targets or [])
    if not items:
        raise UserError("strategy.targets is empty; give at least one, e.g. 'strategy.targets=[0.7,0.5]' "
                        "(fractions of the unpruned model's measured cost) or 'strategy.targets=[2.5ms]'")
    allowed = (f"a target is a fraction of the unpruned model's {unit} (0 < x <= 1) or an absolute value such as "
               f"'{full / 2:.3g}{unit}'; this model reaches {smallest:.4g}-{full:.4g} {unit}")
    out: dict[str, float] = {}
    for t in items:
        label = target_label(t)
        if label in out:
            raise UserError(f"strategy.targets lists {t!r} twice; give each target once")
        text = str(t).strip().lower()
        if fractions_only:
            try:
                plain = 0 < float(text) <= 1
            except ValueError:
                plain = False
            if not plain:
                raise UserError(f"strategy.targets: {t!r} is not a fraction, but strategy.cost=flops searches FLOPs: "
                                f"give the targets as fractions of the unpruned model (e.g. 0.5), the same for FLOPs "
                                f"and latency")
        absolute = False
        try:
            if text.endswith(unit.lower()):
                value, absolute = float(text[: -len(unit)]), True
            else:
                value = float(text)
                absolute = value > 1
        except ValueError:
            raise UserError(f"strategy.targets: {t!r} is not a number; {allowed}") from None
        value = value if absolute else value * full
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"strategy.targets: {t!r} is not allowed: {allowed}")
        if value > full * (1 + 1e-9):
            raise UserError(f"strategy.targets: {t!r} = {value:.4g} {unit} is above the unpruned model's "
                            f"{full:.4g} {unit}: nothing to prune; {allowed}")
        if value < smallest:
            raise UserError(f"target {t!r} = {value:.4g} {unit} is unreachable: the smallest pruned model (every "
                            f"group at its fewest channels) measures {smallest:.4g} {unit}, fraction "
                            f"{smallest / full:.3f} of the unpruned; choose a target >= {smallest / full:.3f}")
        out[label] = value
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _check_options(cfg: DictConfig) -> dict[str, Any]:
    s, r = cfg.strategy, cfg.recovery
    check_progress(cfg.get("progress", "auto"))
    check_channels_last(cfg.trainer.get("channels_last", False))
    check_choice("resume", cfg.get("resume"), ("auto", "never"),
                 "auto: a restarted run continues from what its folder holds")
    check_choice("strategy.criterion", s.criterion, CRITERIA)
    check_choice("strategy.search", s.search, SEARCHES)
    check_choice("strategy.cost", s.cost, COSTS, "latency: measured on hardware=; flops: pruned by FLOPs")
    modes = [str(m) for m in (r.mode if OmegaConf.is_list(r.mode) else [r.mode])]
    if not modes or len(set(modes)) != len(modes):
        raise UserError(f"recovery.mode={modes}: give one mode, or a list of different ones (the same pruned shape "
                        f"recovered each way, e.g. 'recovery.mode=[distill,scratch]')")
    for m in modes:
        check_choice("recovery.mode", m, RECOVERY, "distill: KD from the unpruned model; a list runs each")
    rt = s.round_to
    if isinstance(rt, bool) or not isinstance(rt, int) or rt < 1:
        raise UserError(f"strategy.round_to={rt!r}: channel counts are kept on a multiple of a whole number >= 1, "
                        f"e.g. strategy.round_to=8")
    if not 0 < float(s.greedy_step) < 1:
        raise UserError(f"strategy.greedy_step={s.greedy_step!r}: the fraction of a group's channels one greedy "
                        f"step removes, between 0 and 1 (e.g. 0.125)")
    for key in ("score_batches", "calib_batches", "eval_batches", "evolution.queries", "evolution.levels",
                "evolution.validate_nets"):
        v = OmegaConf.select(s, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"strategy.{key}={v!r}: a whole number >= 1")
    if any(m != "none" for m in modes):
        check_epochs(r.epochs, "recovery.epochs")
    if cfg.model.train_epochs not in (0, None):
        check_epochs(cfg.model.train_epochs, "model.train_epochs")
    sp = cfg.sparsity
    if sp.epochs not in (0, None):
        check_epochs(sp.epochs, "sparsity.epochs")
        if not float(sp.l1) > 0:
            raise UserError(f"sparsity.l1={sp.l1!r}: the L1 strength on the BatchNorm scales is a positive number, "
                            f"e.g. 1e-4")
    if cfg.model.train_epochs and cfg.model.weights:
        raise UserError("model.train_epochs trains the model from scratch, and model.weights gives trained "
                        "weights: give one of them")
    return {"round_to": int(rt), "modes": modes}


def _fit(net: nn.Module, datamodule, cfg: DictConfig, *, epochs: int, lr: float, teacher: nn.Module | None,
         root: Path, l1: float | None = None) -> tuple[nn.Module, float | None]:
    """Train ``net`` with Lightning (SGD, cosine, optional KD; with ``l1`` the proximal L1 step on the
    BatchNorm scales); returns it in eval mode and the last validation accuracy (arch split)."""
    r = cfg.recovery
    kw = dict(lr=lr, momentum=r.momentum, weight_decay=r.weight_decay, label_smoothing=r.label_smoothing,
              teacher=teacher, kd_alpha=r.kd_alpha, kd_temperature=r.kd_temperature)
    module = SparsityModule(net, l1=l1, **kw) if l1 else RetrainModule(net, **kw)
    kw = trainer_kwargs(cfg)
    kw["max_epochs"] = int(epochs)
    ckpt_dir = root / "checkpoints"
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0, every_n_epochs=1)
    last = ckpt_dir / "last.ckpt"
    resume_from = str(last) if cfg.resume == "auto" and last.is_file() else None
    if resume_from:
        print(f"resuming from {last}")
    trainer = pl.Trainer(**kw, logger=make_logger(cfg.get("logger")),
                         callbacks=[ckpt, *progress_callbacks(cfg.progress), *trainer_callbacks(cfg)],
                         default_root_dir=str(root))
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader(), val_dataloaders=datamodule.val_dataloader(),
                ckpt_path=resume_from)
    val = trainer.callback_metrics.get("val/acc")
    return module.net.cpu().eval(), (float(val) if val is not None else None)


def _save_weights(net: nn.Module, path: Path) -> None:
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def _trained(cfg: DictConfig, net: nn.Module, folder: Path, what: str, train) -> nn.Module:
    """``folder/model.safetensors`` loaded into ``net`` when a run resumes and it exists (``what`` was
    done before the restart); else ``train(net)`` (itself resumable from ``folder/checkpoints``), its
    weights saved there and its checkpoints removed."""
    done = folder / "model.safetensors"
    if cfg.resume == "auto" and done.is_file():
        print(f"resuming: {what} from {done}")
        net.load_state_dict(load_file(str(done)))
        return net.eval()
    net = train(net)
    _save_weights(net, done)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return net


def _reinit(net: nn.Module) -> nn.Module:
    """The same shape with fresh weights (the "rethinking the value of pruning" control)."""
    for m in net.modules():
        if m is not net and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return net


def _search(s: DictConfig, cands: Candidates, targets: dict[str, float], scores, groups, seed: int, log
            ) -> dict[str, dict[str, Any]]:
    if s.search == "uniform":
        return search_uniform(cands, targets, log=log)
    if s.search == "global":
        return search_global(cands, targets, normalised(scores, groups, bool(s.memory_normalise)), log=log)
    if s.search == "greedy":
        return search_greedy(cands, targets, step=float(s.greedy_step), log=log)
    ev = s.evolution
    return search_evolution(cands, targets, queries=int(ev.queries), n_levels=int(ev.levels),
                            validate_nets=int(ev.validate_nets), seed=seed, log=log)


def _finished(cfg: DictConfig, folder: Path, plan: dict[str, int], mode: str) -> dict[str, Any] | None:
    """The report of an export a resumed run already wrote for this plan and recovery (None otherwise)."""
    if cfg.resume != "auto":
        return None
    report = _load_search(folder / "report.json", key="channels_kept")
    if report is None or report["channels_kept"] != plan or (report.get("recovery") or {}).get("mode") != mode:
        return None
    return report


def _load_search(path: Path, key: str = "found") -> dict[str, Any] | None:
    """A JSON file written by an earlier run (a search's plans, ``search.json``; an export's report) when it
    holds ``key``; None when there is none (or it is unreadable)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and key in d else None


def run_prune(cfg: DictConfig) -> float:
    t0 = time.perf_counter()
    opts = _check_options(cfg)
    round_to, modes = opts["round_to"], opts["modes"]
    s, mcfg = cfg.strategy, cfg.model
    seed = int(cfg.seed)
    pl.seed_everything(seed, workers=True, verbose=False)
    torch.set_num_threads(int(cfg.hardware.get("threads", torch.get_num_threads())))
    hardware = make_device(cfg.hardware)

    # ---- the model and the data
    module_cfg = OmegaConf.to_container(mcfg.module, resolve=True) if mcfg.get("module") else None
    pre = source_spec(name=mcfg.name, export=mcfg.export, module=module_cfg, num_classes=1, in_chans=1)
    _, resolution, in_chans = export_meta(pre)  # an export's classes: checked on the model's output
    if resolution is not None:
        OmegaConf.update(cfg, "space.resolution", resolution, force_add=True)
        OmegaConf.update(cfg, "space.in_chans", in_chans, force_add=True)
    datamodule = instantiate(cfg.data)
    num_classes = datamodule.num_classes
    in_chans = int(cfg.space.in_chans)
    spec = source_spec(name=mcfg.name, export=mcfg.export, module=module_cfg, num_classes=num_classes,
                       in_chans=in_chans, kwargs=OmegaConf.to_container(mcfg.kwargs, resolve=True))
    model = load_original(spec, mcfg.weights).eval()
    input_shape = (in_chans, int(cfg.space.resolution), int(cfg.space.resolution))
    example = torch.zeros(1, *input_shape)
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as e:  # noqa: BLE001 - the user's model at the user's input size
        raise UserError(f"the model does not run on input {tuple(example.shape)} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}); set space.resolution / space.in_chans "
                        f"to what it takes") from None
    if out.dim() != 2 or out.shape[-1] != num_classes:
        raise UserError(f"the model predicts output {tuple(out.shape)}, data={datamodule.name} has {num_classes} "
                        f"classes; build it for those classes (model.kwargs / model.module) or prune on its own data")
    ignore = [str(n) for n in mcfg.ignore]
    groups = find_groups(model, example, ignore)
    if not groups:
        raise UserError("the model has no prunable channel groups (every group touches the classifier or an "
                        "ignored layer); drop names from model.ignore")
    check_prunable(model, example, groups, round_to, ignore)

    # ---- costs of the unpruned and the smallest model, the targets
    identity = {g.name: list(range(g.channels)) for g in groups}
    cost = str(s.cost) if hardware.timed else "latency"
    mkw = {"rel_ci": s.measure.rel_ci, "max_repeats": s.measure.max_repeats} if s.measure.rel_ci else {}
    search_c = Candidates(model, example, groups, identity, hardware=hardware, cost=cost, round_to=round_to,
                          ignore=ignore, measure_kw=mkw)
    device_c = search_c if cost == "latency" else Candidates(model, example, groups, identity, hardware=hardware,
                                                             cost="latency", round_to=round_to, ignore=ignore,
                                                             measure_kw=mkw)
    full_plan, small_plan = search_c.full(), search_c.smallest()
    print(f"model {spec.get('name') or spec['kind']}: {len(groups)} channel groups, "
          f"{count_params(model) / 1e6:.3f} M params; measuring it on {hardware.name}")
    full, smallest = search_c.measure([full_plan, small_plan])
    targets = resolve_targets(s.targets, full, smallest, search_c.unit, fractions_only=cost == "flops")
    dev_full = full
    if device_c is not search_c:
        dev_full, _ = device_c.measure([full_plan, small_plan])
    dev_targets = {label: v / full * dev_full for label, v in targets.items()}
    print(f"unpruned {full:.4g} {search_c.unit}, smallest reachable {smallest:.4g} ({smallest / full:.3f}); "
          + ", ".join(f"{label} = {v:.4g} {search_c.unit}" for label, v in targets.items()))

    run_dir = Path(cfg.export.dir).parent
    calib = list(itertools.islice(datamodule.calib_dataloader(int(s.calib_batches)), int(s.calib_batches)))
    evalb = list(itertools.islice(datamodule.val_dataloader(), int(s.eval_batches)))
    test_loader = datamodule.test_dataloader()

    # ---- (no weights of one's own) train the unpruned model first
    if mcfg.train_epochs:
        print(f"training the unpruned model for {mcfg.train_epochs} epochs")
        model = _trained(cfg, model, run_dir / "original", "the trained original", lambda net: _fit(
            net, datamodule, cfg, epochs=int(mcfg.train_epochs), lr=float(cfg.recovery.train_lr), teacher=None,
            root=run_dir / "original")[0])
        print(f"trained weights: {run_dir / 'original' / 'model.safetensors'} (prune them again with "
              f"model.weights=<that file>)")
    sparsity = None
    if cfg.sparsity.epochs:
        print(f"sparsity training: {cfg.sparsity.epochs} epochs, L1 {cfg.sparsity.l1:g} on the BatchNorm scales "
              f"(proximal step)")
        before = evaluate(model, test_loader)
        model = _trained(cfg, model, run_dir / "sparsity", "the sparsity-trained model", lambda net: _fit(
            net, datamodule, cfg, epochs=int(cfg.sparsity.epochs), lr=float(cfg.sparsity.lr), teacher=None,
            root=run_dir / "sparsity", l1=float(cfg.sparsity.l1))[0])
        sparsity = {"epochs": int(cfg.sparsity.epochs), "l1": float(cfg.sparsity.l1), "test_acc_before": before,
                    "bn_scales_zero": zero_fraction(model)}
        print(f"sparsity training: {100 * sparsity['bn_scales_zero']:.1f}% of the BatchNorm scales are zero")
    acc_before = evaluate(model, test_loader)
    recal = copy.deepcopy(model)
    calibrate_bn(recal, calib)  # as every pruned model is before its accuracy is taken
    acc_before_recal = evaluate(recal, test_loader)
    del recal
    print(f"unpruned test acc {100 * acc_before:.2f}% ({100 * acc_before_recal:.2f}% with BatchNorm recalibrated on "
          f"{len(calib)} batches, as the pruned models are)")

    # ---- importance, then the search
    search_file = run_dir / "search.json"
    identity_key = json.loads(json.dumps({
        "model": spec, "weights": str(mcfg.weights), "train_epochs": mcfg.train_epochs,
        "sparsity": OmegaConf.to_container(cfg.sparsity, resolve=True), "ignore": ignore,
        "strategy": OmegaConf.to_container(s, resolve=True), "seed": seed}, default=json_default))
    ts = time.perf_counter()
    scores = score_channels(model, example, groups, str(s.criterion),
                            batches=itertools.islice(datamodule.train_dataloader(), int(s.score_batches)),
                            ignore=ignore, seed=seed)
    order = channel_order(scores)
    for c in {id(search_c): search_c, id(device_c): device_c}.values():
        c.set_model(model, order, calib, evalb)
    saved = _load_search(search_file) if cfg.resume == "auto" else None
    if saved is not None and saved.get("key") == identity_key:
        print(f"resuming: the search's plans from {search_file}")
        found, search_seconds = saved["found"], float(saved["seconds"])
    else:
        found = _search(s, search_c, targets, scores, groups, seed, print)
        search_seconds = time.perf_counter() - ts
        write_json(search_file, {"key": identity_key, "found": found, "seconds": search_seconds})

    # ---- measure the chosen plans again, together (the exports' measured cost)
    plans = [found[label]["plan"] for label in targets]
    measured = device_c.remeasure(plans) if s.measure_export else [None] * len(plans)
    flops_full = count_flops(model, input_shape)

    reports = []
    channels = {g.name: g.channels for g in groups}
    for (label, target), m in zip(targets.items(), measured):
        plan = found[label]["plan"]
        pruned, history = search_c.net(plan)
        calibrate_bn(pruned, calib)  # the removed channels changed the statistics of the layers after them
        acc_pruned = evaluate(pruned, test_loader)
        for j, mode in enumerate(modes):
            name = label if j == 0 else f"{label}-{mode}"
            previous = _finished(cfg, Path(cfg.export.dir) / name, plan, mode)
            if previous is not None:
                print(f"resuming: {name} was exported before the restart ({Path(cfg.export.dir) / name})")
                reports.append(previous)
                continue
            net = copy.deepcopy(pruned)
            val_acc = None
            tr = time.perf_counter()
            if mode != "none":
                pl.seed_everything(seed, workers=True, verbose=False)  # every mode sees the same batches
                lr = float(cfg.recovery.lr)
                if mode == "scratch":
                    _reinit(net)
                    lr = float(cfg.recovery.scratch_lr)
                teacher = model if mode == "distill" else None
                print(f"{label}: recovery ({mode}, {cfg.recovery.epochs} epochs)")
                net, val_acc = _fit(net, datamodule, cfg, epochs=int(cfg.recovery.epochs), lr=lr, teacher=teacher,
                                    root=run_dir / "recovery" / f"{label}-{mode}")
            recovery_seconds = time.perf_counter() - tr
            acc_after = evaluate(net, test_loader)
            report = {
                "label": name,
                "strategy": f"prune/{s.search}/{s.criterion}/{mode}",
                "model": spec,
                "criterion": str(s.criterion), "search": str(s.search),
                "cost": cost if hardware.timed else hardware.name,
                "memory_normalise": bool(s.memory_normalise), "round_to": round_to,
                "target": {"label": label, "value": target, "unit": search_c.unit, "fraction": target / full},
                "latency_ms": {"device": hardware.name, "unit": device_c.unit, "target": dev_targets[label],
                               "predicted": found[label]["cost"] if cost == "latency" else None,
                               "measured": m, "unpruned": dev_full,
                               "within_10pct": None if m is None else bool(m <= 1.1 * dev_targets[label]),
                               "miss_pct": None if m is None else round(100 * (m / dev_targets[label] - 1), 2)},
                "search_cost": {"unit": search_c.unit, "found": found[label]["cost"], "target": target,
                                "unpruned": full, "nets_measured": search_c.measured_nets,
                                "seconds": round(search_seconds, 2)},
                "params": count_params(net), "params_unpruned": count_params(model),
                "flops": count_flops(net, input_shape), "flops_unpruned": flops_full,
                "test_acc_unpruned": acc_before, "test_acc_unpruned_recalibrated": acc_before_recal,
                "test_acc_pruned": acc_pruned, "test_acc": acc_after,
                "val_acc": val_acc,
                "recovery": {"mode": mode, "epochs": int(cfg.recovery.epochs) if mode != "none" else 0,
                             "seconds": round(recovery_seconds, 2)},
                "channels_kept": {k: int(v) for k, v in plan.items()},
                "channels_unpruned": channels,
                "kept_indices": kept_indices(history, channels),
                "search_detail": {k: v for k, v in found[label].items() if k not in ("plan",)},
                "sparsity": sparsity,
                "data": datamodule.describe(),
            }
            folder = write_pruned(Path(cfg.export.dir) / name, net=net, spec=spec, input_shape=input_shape,
                                  ignore=ignore, plan=plan, channels=channels, history=history,
                                  report=report, onnx=bool(cfg.export.onnx))
            reports.append(report)
            shutil.rmtree(run_dir / "recovery" / f"{label}-{mode}" / "checkpoints", ignore_errors=True)
            meas = "-" if m is None else f"{m:.4g}"
            print(f"{name}: {meas} {device_c.unit} measured (target {dev_targets[label]:.4g}), "
                  f"{report['params'] / 1e6:.3f} M params, test acc {100 * acc_before:.2f}% -> pruned "
                  f"{100 * acc_pruned:.2f}% -> {mode} {100 * acc_after:.2f}%  {folder}")
    print(f"pruned {len(reports)} model{'s' if len(reports) != 1 else ''} in {time.perf_counter() - t0:.0f} s: "
          f"{cfg.export.dir}")
    return float(reports[-1]["test_acc"])


main = console_main(run_prune, "prune")


if __name__ == "__main__":
    main()
