"""``nas-bench suite=slimmable``: slimmable training vs. each width trained alone, and the width search
vs. uniform widths.

    nas-bench suite=slimmable slimmable.data=digits slimmable.epochs=10 'slimmable.seeds=[0,1,2]'
    nas-bench suite=slimmable slimmable.data=texshapes_width 'slimmable.seeds=[0,1,2]' slimmable.jobs=2
    nas-bench suite=slimmable slimmable.space=mbv2_small_slim slimmable.hardware=onnxruntime \\
        "slimmable.overrides=['hardware.threads=1']" 'slimmable.targets=[0.5,0.7,0.9]' 'slimmable.seeds=[0,1,2]'

Per seed: one slimmable supernet (sandwich rule, in-place distillation, ``bn`` switchable or shared)
is trained for ``epochs`` epochs; every uniform width of the space (each multiplier of its
``widths``) is extracted, BN-calibrated and evaluated on the test split. Each of those widths is
also trained alone, from scratch, for the same epochs with the same optimizer (SGD, cosine, batch
size, gradient clipping) and evaluated on the same test split. Then the greedy width search runs on
the trained supernet for ``targets`` (evaluating on the arch split, as ``nas-search`` does) and its
networks are evaluated on the test split too.

Costs come from ``hardware`` (default ``flops``; a timed device such as ``onnxruntime`` uses its
latency table, cached or built as ``nas-search`` does). On a timed device, after training (so that
the machine is quiet), every uniform-width net and every searched net is measured end to end on the
device, and each searched net is compared with the uniform-width curve at its measured latency
(linear interpolation between the two uniform widths around it): the *uniform-width baseline at the
same latency*. Seeds run ``jobs`` at a time in separate processes (one torch thread each).

``retrain=true`` (AutoSlim's protocol) also trains every export from scratch, like the uniform widths
trained alone (same epochs, optimizer and seed), and compares it with that curve at the same cost
or measured latency; an export that is a uniform width reuses its own baseline. ``uniform_check``, ``fill``, ``min_fraction``
(and the other strategy options: ``bn``, ``n_random``, ``random_widths``, ``distill``,
``distill_weight``) default to conf/strategy/slimmable.yaml; ``uniform_check=false`` exports the
greedy nets.

``alone=skip`` trains no baselines (the uniform widths of the slimmable run remain the baseline of the
width search); ``alone=<earlier slimmable_bench.json>`` reuses that run's trained-alone accuracies (same data, space,
epochs and overrides) for the seeds it has, instead of training the baselines again; other seeds
train theirs.

Arguments are ``key=value``; ``data``, ``space``, ``hardware`` and any dotted key (``data.n_train=...``,
``hardware.threads=1``, ``lut.path=...``) are Hydra overrides of ``nas-search``'s config. Prints
markdown tables, and with ``out=<dir>`` writes ``slimmable_bench.json``, ``slimmable_bench.md`` and
``slimmable_bench.png`` (accuracy against cost) there.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from nas.apps.common import (
    CONF_DIR,
    instantiate,
    make_cost_model,
    make_device,
    make_space,
)
from nas.errors import UserError
from nas.export import evaluate
from nas.latency.analytic import build_flops_model
from nas.latency.measure import measure_archs
from nas.report.slimmable_plots import plot_width_bench
from nas.strategies.slimmable import SlimmableSearch
from supernets.blocks import space_timm_net
from supernets.supernet import Supernet

OPTS = {"data": "digits", "space": "mbv2_tiny_slim", "hardware": "flops", "epochs": "10", "seeds": "0",
        "jobs": "1", "bn": "", "n_random": "", "random_widths": "", "distill": "", "distill_weight": "", "out": "",
        "uniform_check": "", "fill": "", "min_fraction": "", "threads": "1", "targets": "0.4,0.6,0.8", "alone": "train", "retrain": "false"}


#: options of the slimmable strategy itself; left empty they take conf/strategy/slimmable.yaml's values
STRATEGY_KEYS = ("bn", "n_random", "random_widths", "distill", "distill_weight", "uniform_check", "fill",
                 "min_fraction")


def options(c: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """The suite's options from ``conf/bench.yaml``'s ``slimmable:`` section (a mapping): the string
    options :func:`run` takes (unset strategy options: conf/strategy/slimmable.yaml), and the Hydra
    overrides of ``nas-search``'s config (``slimmable.overrides``)."""
    def text(v: Any) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, Sequence) and not isinstance(v, str):
            return ",".join(text(x) for x in v)
        return str(v)

    unknown = sorted(set(c) - set(OPTS) - {"module", "overrides"})
    if unknown:
        raise UserError(f"slimmable.{unknown[0]} is unknown; the suite's keys: {', '.join(sorted(OPTS))}, module, "
                        f"overrides")
    module = dict(c.get("module") or {})
    bad = sorted(set(module) - set(STRATEGY_KEYS))
    if bad:
        raise UserError(f"slimmable.module.{bad[0]} is not an option of the suite; choose from {', '.join(STRATEGY_KEYS)}")
    opts = {k: text(v) for k, v in c.items() if k in OPTS}
    opts.update({k: text(v) for k, v in module.items() if v is not None})
    return opts, [str(o) for o in (c.get("overrides") or [])]


def _compose(opts: dict[str, str], extra: list[str], seed: int):


    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("search", overrides=[f"data={opts['data']}", f"space={opts['space']}",
                                            f"hardware={opts['hardware']}", f"seed={seed}", "progress=none", *extra])


def _setup(opts: dict[str, str], extra: list[str], seed: int, log=print):
    """(cfg, space, datamodule, device, cost model, flops model) of one seed."""
    cfg = _compose(opts, extra, seed)
    space = make_space(cfg.space)
    dm = instantiate(cfg.data)
    device = make_device(cfg.hardware)
    cost = make_cost_model(cfg, space, device, dm.num_classes, log=log)
    return cfg, space, dm, device, cost, build_flops_model(space, dm.num_classes)


def train_alone(net, datamodule, epochs: int, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 4e-5,
                grad_clip: float = 5.0) -> float:
    """Train ``net`` alone with the slimmable strategy's optimizer settings; returns wall seconds."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    t0 = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for x, y in datamodule.train_dataloader():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            opt.step()
        sched.step()
    return time.perf_counter() - t0


def _from_scratch(space, arch, datamodule, test, epochs: int, seed: int) -> tuple[float, float]:
    """``arch`` as a plain timm net trained alone from scratch (seeded): (test accuracy, wall seconds)."""


    pl.seed_everything(seed, verbose=False)
    net = space_timm_net(space, arch, datamodule.num_classes)
    secs = train_alone(net, datamodule, epochs)
    return evaluate(net, test), secs


def run_seed(opts: dict[str, str], extra: list[str], seed: int) -> dict[str, Any]:
    """One slimmable run, every uniform width alone, and the width search: accuracies and archs."""


    torch.set_num_threads(int(opts["threads"]))
    epochs = int(opts["epochs"])
    cfg, space, dm, _device, cost, flops = _setup(opts, extra, seed, log=lambda m: None)
    nc = dm.num_classes
    targets = [t if t.endswith(("ms", "MFLOPs")) else float(t) for t in opts["targets"].split(",") if t]
    pl.seed_everything(seed, verbose=False)
    module = SlimmableSearch(Supernet(space, nc), cost, targets=targets, bn=opts["bn"], n_random=int(opts["n_random"]),
                             random_widths=opts["random_widths"], distill_weight=float(opts["distill_weight"]),
                             distill=_flag(opts["distill"]), uniform_check=_flag(opts["uniform_check"]),
                             fill=_flag(opts["fill"]),
                             min_fraction=None if opts["min_fraction"] in ("none", "null") else float(opts["min_fraction"]),
                             calib_batches=int(cfg.export.calib_batches))
    trainer = pl.Trainer(max_epochs=epochs, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=module.train_loaders(dm))
    slim_seconds = time.perf_counter() - t0
    test = list(dm.test_dataloader())
    earlier = _earlier_alone(opts, extra, seed) if opts["alone"] not in ("train", "skip") else {}
    rows = []
    for m, widths in space.uniform_widths().items():
        arch = module.arch_for(widths)
        slim_acc = evaluate(module.calibrated_subnet(arch), test)
        if opts["alone"] == "skip":
            alone_acc, secs = None, None
        elif earlier:
            alone_acc, secs = earlier[tuple(widths)]
        else:
            alone_acc, secs = _from_scratch(space, arch, dm, test, epochs, seed)
        rows.append({"multiplier": m, "widths": widths, "choices": dict(arch.choices), "mflops": flops.predict(arch),
                     "cost": cost.predict(arch), "slimmable_acc": slim_acc, "alone_acc": alone_acc,
                     "alone_seconds": secs})
        alone_txt = "" if alone_acc is None else f"  alone {100 * alone_acc:.2f}%"
        print(f"seed {seed} x{m:<5} widths {widths}: slimmable {100 * slim_acc:.2f}%{alone_txt}", flush=True)
    found = module.width_search(log=None)["found"]
    searched = []
    for label, f in found.items():
        acc = evaluate(module.calibrated_subnet(f["arch"]), test)
        g = f.get("greedy")  # the greedy pick, where a uniform width within the target beat it on the arch split
        searched.append({"label": label, "target": f["target"], "widths": space.widths(f["arch"]),
                         "choices": dict(f["arch"].choices), "cost": f["cost"], "mflops": flops.predict(f["arch"]),
                         "arch_split_acc": f["acc"], "test_acc": acc, "source": f.get("source", "greedy"),
                         "greedy_widths": space.widths(g["arch"]) if g else space.widths(f["arch"]),
                         "greedy_cost": g["cost"] if g else f["cost"],
                         "greedy_test_acc": evaluate(module.calibrated_subnet(g["arch"]), test) if g else acc})
    if _flag(opts["retrain"]):  # AutoSlim's protocol: each export trained from scratch like the uniform baselines
        alone_of = {tuple(r["widths"]): r["alone_acc"] for r in rows if r["alone_acc"] is not None}
        for f in searched:
            if tuple(f["widths"]) in alone_of:  # a uniform width: its baseline is this very training (same seed)
                f["retrained_acc"] = alone_of[tuple(f["widths"])]
                continue
            f["retrained_acc"], _ = _from_scratch(space, space.make_arch(f["choices"], nc), dm, test, epochs, seed)
            print(f"seed {seed} {f['label']} widths {f['widths']}: retrained alone {100 * f['retrained_acc']:.2f}%",
                  flush=True)
    return {"seed": seed, "slimmable_seconds": slim_seconds, "rows": rows, "searched": searched,
            "evaluated": len(module.width_table())}


def _flag(v: str) -> bool:
    v = str(v).lower()
    if v not in ("1", "true", "yes", "0", "false", "no"):
        raise UserError(f"{v!r} is not a switch; give true or false")
    return v in ("1", "true", "yes")


def _earlier_alone(opts: dict[str, str], extra: list[str], seed: int) -> dict[tuple, tuple[float, float]]:
    """``alone=<slimmable_bench.json>``: the trained-alone accuracies of an earlier run with the same
    data, space, epochs, overrides and seed (they do not depend on the slimmable options), so that
    slimmable settings can be compared without training the baselines again."""
    path = Path(opts["alone"])
    if not path.is_file():
        raise UserError(f"slimmable.alone={path}: not a file; give slimmable.alone=train or an earlier run's slimmable_bench.json")
    old = json.loads(path.read_text())
    same = ("data", "space", "epochs")
    if any(old["opts"][k] != opts[k] for k in same) or old["overrides"] != extra:
        theirs = ", ".join(f"{k}={old['opts'][k]}" for k in same)
        raise UserError(f"slimmable.alone={path} was run with other settings ({theirs}, overrides {old['overrides']}); "
                         f"its baselines do not apply")
    for s in old["per_seed"]:
        if s["seed"] == seed and all(r["alone_acc"] is not None for r in s["rows"]):
            return {tuple(r["widths"]): (r["alone_acc"], r["alone_seconds"]) for r in s["rows"]}
    print(f"alone={path} has no baselines for seed {seed}: training them", flush=True)
    return {}


def arch_key(choices: dict[str, str]) -> tuple:
    """A hashable key of an architecture's choices (the latency of each distinct net is measured once)."""
    return tuple(sorted(choices.items()))


def _run_seed_job(args) -> dict[str, Any]:
    return run_seed(*args)


def interpolate(x: float, xs: list[float], ys: list[float]) -> float | None:
    """Linear interpolation of the curve (xs ascending) at x; None outside its range."""
    pts = sorted(zip(xs, ys))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(per_seed: list[dict[str, Any]], latency: dict[tuple, float] | None) -> dict[str, Any]:
    """Means over seeds: the width table and the searched-vs-uniform table."""
    widths = []
    for i, r0 in enumerate(per_seed[0]["rows"]):
        slim = [100 * s["rows"][i]["slimmable_acc"] for s in per_seed]
        alone = [100 * s["rows"][i]["alone_acc"] for s in per_seed if s["rows"][i]["alone_acc"] is not None]
        diff = [a - b for a, b in zip(slim, alone)] if alone else []
        key = arch_key(r0["choices"])
        widths.append({"multiplier": r0["multiplier"], "widths": r0["widths"], "mflops": r0["mflops"],
                       "cost": r0["cost"], "measured_ms": latency.get(key) if latency else None,
                       "slimmable": _mean_std(slim), "alone": _mean_std(alone) if alone else None,
                       "diff": _mean_std(diff) if diff else None,
                       "diff_per_seed": diff})
    x_of = (lambda w: w["measured_ms"]) if latency else (lambda w: w["cost"])
    xs = [x_of(w) for w in widths]
    searched = []
    for s in per_seed:  # each seed's searched nets against the same seed's uniform curves
        slim_ys = [100 * r["slimmable_acc"] for r in s["rows"]]
        alone_ys = [100 * r["alone_acc"] for r in s["rows"]] if s["rows"][0]["alone_acc"] is not None else None
        for f in s["searched"]:
            key = arch_key(f["choices"])
            meas = latency.get(key) if latency else None
            x = meas if latency else f["cost"]
            base_slim = interpolate(x, xs, slim_ys)
            base_alone = interpolate(x, xs, alone_ys) if alone_ys else None
            acc = 100 * f["test_acc"]
            retrained = f.get("retrained_acc")
            retrained = None if retrained is None else 100 * retrained
            feasible = [y for x0, y in zip(xs, slim_ys) if x0 is not None and x0 <= f["target"]]
            g_base = interpolate(f["greedy_cost"], [w["cost"] for w in widths], slim_ys)
            searched.append({**{k: v for k, v in f.items() if k != "choices"}, "seed": s["seed"], "measured_ms": meas,
                             "error_pct": None if meas is None else 100 * (meas - f["target"]) / f["target"],
                             "test_acc": acc, "uniform_slimmable_at_same": base_slim,
                             "uniform_alone_at_same": base_alone, "retrained_acc": retrained,
                             "retrained_vs_alone": (None if retrained is None or base_alone is None
                                                    else retrained - base_alone),
                             "vs_uniform": None if base_slim is None else acc - base_slim,
                             "vs_best_uniform_within": acc - max(feasible) if feasible else None,
                             "greedy_vs_uniform": None if g_base is None else 100 * f["greedy_test_acc"] - g_base})
    per_target = {}
    for f in searched:
        per_target.setdefault(f["label"], []).append(f)
    targets = [{"label": label, "target": fs[0]["target"], "n": len(fs),
                "test_acc": _mean_std([f["test_acc"] for f in fs]),
                **{k: (_mean_std([f[k] for f in fs if f[k] is not None]) if any(f[k] is not None for f in fs) else None)
                   for k in ("vs_uniform", "vs_best_uniform_within", "greedy_vs_uniform", "retrained_vs_alone")},
                "uniform_picked": sum(f["source"] == "uniform" for f in fs),
                "max_abs_error_pct": max((abs(f["error_pct"]) for f in fs if f["error_pct"] is not None), default=None)}
               for label, fs in per_target.items()]
    return {"widths": widths, "searched": searched, "targets": targets}


def markdown(summary: dict[str, Any], unit: str, seeds: list[int], timed: bool) -> str:
    n = len(seeds)
    retrained = any(f["retrained_acc"] is not None for f in summary["searched"])
    pm = (lambda ms: f"{ms[0]:.2f} ± {ms[1]:.2f}") if n > 1 else (lambda ms: f"{ms[0]:.2f}")

    def diff_txt(w):
        if not w["diff"]:
            return "— (alone=skip)"
        return f"{w['diff'][0]:+.2f} (per seed {', '.join(f'{d:+.1f}' for d in w['diff_per_seed'])})"
    lines = [f"Test accuracy (%), mean{' ± std' if n > 1 else ''} over seeds {seeds}:", "",
             "| width | channels per stage | MFLOPs | " + ("measured ms | " if timed else f"cost ({unit}) | ")
             + "slimmable (one run) | trained alone | difference (points) |", "|---|---|---|---|---|---|---|"]
    for w in summary["widths"]:
        c = f"{w['measured_ms']:.4f}" if timed else f"{w['cost']:.4g}"
        lines.append(f"| x{w['multiplier']:g} | {'-'.join(map(str, w['widths']))} | {w['mflops']:.2f} | {c} | "
                     f"{pm(w['slimmable'])} | {pm(w['alone']) if w['alone'] else '—'} | {diff_txt(w)} |")
    same = "measured latency" if timed else "cost"
    lines += ["", "Per target, mean over seeds, test accuracy points against the same seed's uniform widths of the "
              f"slimmable run: the uniform curve interpolated at the same {same}, and the best uniform width "
              "within the target; the greedy pick alone (before the uniform check) against the curve at its own "
              "predicted cost:", "",
              f"| target | export test acc | vs uniform curve at the same {same} | vs best uniform within the target "
              "| exports that are uniform | greedy pick vs uniform curve |" + (" worst measured vs target |" if timed else "")
              + (" retrained alone vs uniform widths trained alone |" if retrained else ""),
              "|---|---|---|---|---|---|" + ("---|" if timed else "") + ("---|" if retrained else "")]

    def ms(v):
        return "— (outside the uniform range)" if v is None else f"{v[0]:+.2f} ± {v[1]:.2f}"

    for t in summary["targets"]:
        err = "" if not timed else " — |" if t["max_abs_error_pct"] is None else f" {t['max_abs_error_pct']:.1f}% |"
        if retrained:
            err += f" {ms(t['retrained_vs_alone'])} |"
        lines.append(f"| {t['label']} ({t['target']:.4g}) | {pm(t['test_acc'])} | {ms(t['vs_uniform'])} | "
                     f"{ms(t['vs_best_uniform_within'])} | {t['uniform_picked']}/{t['n']} | "
                     f"{ms(t['greedy_vs_uniform'])} |{err}")
    lines += ["", f"Each searched net (greedy, arch split) against its seed's uniform curves at the same {same}:", ""] + _searched_rows(summary, unit, timed, retrained)
    if retrained:
        lines += ["", "Retrained: each export trained from scratch for the same epochs with the same optimizer as the "
                  f"uniform widths trained alone (AutoSlim's protocol), against that curve at the same {same}."]
    return "\n".join(lines)


def _searched_rows(summary: dict[str, Any], unit: str, timed: bool, retrained: bool = False) -> list[str]:
    table = [f"| target | seed | widths | predicted ({unit}) | " + ("measured (ms) | vs target | " if timed else "")
             + "test acc | uniform (slimmable) at same | uniform (alone) at same |" + (" retrained alone |" if retrained
                                                                                     else ""),
             "|---|---|---|---|" + ("---|---|" if timed else "") + "---|---|---|" + ("---|" if retrained else "")]
    for f in summary["searched"]:
        fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731  outside the uniform range
        meas = f" {f['measured_ms']:.4f} | {f['error_pct']:+.1f}% |" if timed else ""
        table.append(f"| {f['label']} ({f['target']:.4g}) | {f['seed']} | {'-'.join(map(str, f['widths']))} | "
                     f"{f['cost']:.4g} |{meas} {f['test_acc']:.2f} | {fmt(f['uniform_slimmable_at_same'])} | "
                     f"{fmt(f['uniform_alone_at_same'])} |" + (f" {fmt(f['retrained_acc'])} |" if retrained else ""))
    return table


def run(opts: dict[str, str], extra: list[str] | None = None) -> dict[str, Any]:
    opts, extra = {**OPTS, **opts}, list(extra or [])
    module_conf = _compose(opts, ["strategy=slimmable"], 0).strategy.module
    for key in STRATEGY_KEYS:  # unset: the slimmable strategy's own defaults (conf/strategy/slimmable.yaml)
        if opts[key] == "":
            opts[key] = str(module_conf[key]).lower()
    seeds = [int(s) for s in opts["seeds"].split(",") if s != ""]
    if _flag(opts["retrain"]) and opts["alone"] == "skip":
        raise UserError("slimmable.retrain=true compares each export, trained from scratch, with the uniform widths "
                        "trained alone; give slimmable.alone=train or an earlier slimmable_bench.json, not skip")
    jobs = max(1, min(int(opts["jobs"]), len(seeds)))
    t0 = time.perf_counter()
    # build (or load) the latency table once, before any training, on a quiet machine
    _cfg, space, _dm, device, cost, _flops = _setup(opts, extra, seeds[0])
    if jobs == 1:
        per_seed = [run_seed(opts, extra, s) for s in seeds]
    else:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            per_seed = list(pool.map(_run_seed_job, [(opts, extra, s) for s in seeds]))
    train_seconds = time.perf_counter() - t0
    timed = device.timed
    latency = None
    if timed:  # every distinct network, end to end, after training (a quiet machine)
        keys = []
        for s in per_seed:
            for r in s["rows"] + s["searched"]:
                key = arch_key(r["choices"])
                if key not in keys:
                    keys.append(key)
        archs = [space.make_arch(dict(k), _dm.num_classes) for k in keys]
        print(f"measuring {len(archs)} networks on {device.name} ...", flush=True)
        ms = measure_archs(space, archs, device, reference_ms=cost.meta.get("reference_ms"), rel_ci=0.02,
                           max_repeats=200, max_seconds=120)
        latency = dict(zip(keys, ms))
    summary = summarise(per_seed, latency)
    unit = cost.unit or "units"
    md = markdown(summary, unit, seeds, timed)
    cmd = "nas-bench suite=slimmable " + " ".join(
        f"slimmable.{'module.' if k in STRATEGY_KEYS else ''}{k}={v}" for k, v in opts.items()
        if k != "out" and (v != OPTS[k] or k in ("data", "space", "epochs", "seeds"))) + (
        f" \"slimmable.overrides=[{','.join(repr(e) for e in extra)}]\"" if extra else "")
    header = (f"`{cmd}`: space {space.name}, data {opts['data']}, {opts['epochs']} epochs, bn {opts['bn']}, "
              f"n_random {opts['n_random']}, distill {opts['distill']}, cost {cost.kind} ({unit}) on {device.name}; "
              f"{(time.perf_counter() - t0) / 60:.1f} min")
    print("\n" + header + "\n\n" + md, flush=True)
    result = {"command": cmd, "space": space.name, "data": opts["data"], "opts": opts, "overrides": extra,
              "cost_kind": cost.kind, "cost_unit": cost.unit, "device": device.name, "seeds": seeds,
              "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - t0, "per_seed": per_seed,
              "summary": summary}
    if opts["out"]:
        out = Path(opts["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "slimmable_bench.json").write_text(json.dumps(result, indent=1))
        (out / "slimmable_bench.md").write_text(header + "\n\n" + md + "\n")
        plot_width_bench(summary, out / "slimmable_bench.png",
                         f"measured latency on {device.name} (ms)" if timed else f"{cost.kind} ({unit})", timed)
        print(f"wrote {out}/slimmable_bench.json, .md, .png", flush=True)
    return result
