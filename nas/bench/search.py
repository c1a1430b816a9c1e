"""``nas-bench suite=search``: does a search strategy beat picking at random, at equal latency?

At each latency budget B (fractions of the largest subnet's predicted latency):

* **random**: ``k`` architectures drawn uniformly from the space and kept when their predicted
  latency lies in ``[band * B, B]`` (just under the budget, as a searched net is: a random net far
  below the budget would be an easy opponent). All are retrained; the *best random* is the one with
  the best accuracy on the arch split (validation), and its **test** accuracy is what is compared.
* **uniform**: the uniformly scaled baseline of this op space: the same op in every layer (``k3_e3``
  everywhere, ..., ``k7_e6`` everywhere), optionally with every skippable layer skipped, whichever
  of these has the highest predicted latency within B.
* **each strategy's derived architecture**: ProxylessNAS searches once per budget (the budget is its
  latency target); strategies that export per-budget architectures from one search (DDPNAS,
  ``derive_budget``) search once. A strategy is included when its module and config exist.

Every architecture is trained from scratch by :class:`nas.training.RetrainModule` with the same
epochs, optimiser and seeds; identical architectures are trained once. Latencies of all of them are
then measured end to end on the device in one interleaved pass (table units). ``anchors`` adds the
space's smallest and largest nets, whose accuracy gap shows how much architecture matters on the
dataset at this training budget.
"""
from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import OmegaConf


def _quiet_lightning() -> None:
    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _trainer(epochs: int, *, validate: bool):
    import pytorch_lightning as pl

    return pl.Trainer(max_epochs=int(epochs), accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, log_every_n_steps=50,
                      **({} if validate else {"limit_val_batches": 0}))


# ---------------------------------------------------------------------- retraining
def retrain(space, arch, datamodule, *, epochs: int, seed: int, lr: float = 0.05,
            label_smoothing: float = 0.1) -> dict[str, float]:
    """Train ``arch`` from scratch (timm net, RetrainModule, SGD + cosine) and evaluate it."""
    import pytorch_lightning as pl

    from nas.export import evaluate
    from nas.training import RetrainModule
    from supernets.blocks import space_timm_net

    t0 = time.perf_counter()
    pl.seed_everything(int(seed), workers=True, verbose=False)
    net = space_timm_net(space, arch, datamodule.num_classes)
    module = RetrainModule(net, lr=lr, label_smoothing=label_smoothing)
    _trainer(epochs, validate=False).fit(module, train_dataloaders=datamodule.train_dataloader())
    net = module.net.cpu().eval()
    return {"val_acc": evaluate(net, datamodule.val_dataloader()),
            "test_acc": evaluate(net, datamodule.test_dataloader()),
            "seconds": time.perf_counter() - t0}


class Retrainer:
    """Retrains architectures once per (choices, seed) and remembers the results."""

    def __init__(self, space, datamodule, *, epochs: int, seeds: Sequence[int], lr: float, label_smoothing: float,
                 log: Callable[[str], None] = print):
        self.space, self.dm = space, datamodule
        self.epochs, self.seeds = int(epochs), [int(s) for s in seeds]
        self.lr, self.ls = float(lr), float(label_smoothing)
        self.log = log
        self.cache: dict[tuple, dict[str, Any]] = {}
        self.seconds = 0.0

    def __call__(self, arch, label: str) -> dict[str, Any]:
        key = tuple(sorted(arch.choices.items()))
        if key not in self.cache:
            runs = [retrain(self.space, arch, self.dm, epochs=self.epochs, seed=s, lr=self.lr,
                            label_smoothing=self.ls) for s in self.seeds]
            res = {"val_acc": statistics.fmean(r["val_acc"] for r in runs),
                   "test_acc": statistics.fmean(r["test_acc"] for r in runs),
                   "test_accs": [r["test_acc"] for r in runs],
                   "seconds": sum(r["seconds"] for r in runs)}
            self.seconds += res["seconds"]
            self.cache[key] = res
            self.log(f"  retrained {label:<22} val {100 * res['val_acc']:.2f}%  test {100 * res['test_acc']:.2f}%  "
                     f"({res['seconds']:.0f} s)")
        return dict(self.cache[key])


# ---------------------------------------------------------------------- baselines
def random_archs(space, cost_model, budget: float, k: int, *, band: float, num_classes: int, seed: int,
                 max_draws: int = 200_000) -> list:
    """``k`` distinct uniformly drawn architectures with predicted cost in ``[band * budget, budget]``."""
    rng = random.Random(seed)
    layers = space.layers
    out, seen = [], set()
    for _ in range(max_draws):
        picks = [rng.randrange(len(l.choices)) for l in layers]
        cost = cost_model.fixed + sum(cost_model.layer_costs[l.name][i] for l, i in zip(layers, picks))
        if band * budget <= cost <= budget:
            key = tuple(picks)
            if key not in seen:
                seen.add(key)
                out.append(space.make_arch({l.name: l.choices[i] for l, i in zip(layers, picks)}, num_classes))
                if len(out) == k:
                    break
    return out


def uniform_arch(space, cost_model, budget: float, num_classes: int):
    """The uniformly scaled net: one op everywhere (optionally skipping every skippable layer) with
    the highest predicted cost within ``budget`` (the cheapest of them when none fits)."""
    from supernets.space import ZERO

    cands = []
    for op in space.ops:
        for skip in (False, True):
            choices = {l.name: (ZERO if skip and ZERO in l.choices else op) for l in space.layers}
            if all(c in l.choices for c, l in zip(choices.values(), space.layers)):
                arch = space.make_arch(choices, num_classes)
                cands.append((cost_model.predict(arch), f"{op}{' (skips)' if skip else ''}", arch))
    fits = [c for c in cands if c[0] <= budget]
    best = max(fits, key=lambda c: c[0]) if fits else min(cands, key=lambda c: c[0])
    return best[2], best[1]


# ---------------------------------------------------------------------- strategies
def available_strategies(conf_dir: str | Path, wanted: Sequence[str]) -> dict[str, str]:
    """``{name: reason}`` for each wanted strategy that cannot run here (module or config missing)."""
    import importlib.util

    missing = {}
    for name in wanted:
        if not (Path(conf_dir) / "strategy" / f"{name}.yaml").exists():
            missing[name] = f"conf/strategy/{name}.yaml not found"
        elif importlib.util.find_spec(f"nas.strategies.{name}") is None:
            missing[name] = f"nas/strategies/{name}.py not found"
    return missing


def run_strategy(name: str, conf_dir: str | Path, overrides: Mapping[str, Any], *, space, datamodule, cost_model,
                 budgets: Mapping[str, float], seed: int, weight_sharing: str,
                 log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Search with strategy ``name``; returns ``{budget label: {"arch", "search_seconds", ...}}``."""
    import pytorch_lightning as pl

    from nas.apps.common import instantiate
    from supernets.supernet import Supernet

    cfg = OmegaConf.load(Path(conf_dir) / "strategy" / f"{name}.yaml")
    ov = OmegaConf.create(dict(overrides))
    epochs = int(ov.get("epochs", cfg.get("epochs", 10)))
    if "module" in ov:
        cfg.module = OmegaConf.merge(cfg.module, ov.module)
    factory = instantiate(cfg.module)
    per_budget = factory.func.one_target_per_search  # the others export every budget from one search
    out: dict[str, dict[str, Any]] = {}

    def search(targets: Mapping[str, float]):
        pl.seed_everything(int(seed), workers=True, verbose=False)
        supernet = Supernet(space, datamodule.num_classes, weight_sharing=weight_sharing)
        module_cfg = OmegaConf.merge(cfg.module, {})
        if "seed" in module_cfg and module_cfg.seed is None:
            module_cfg.seed = int(seed)
        module = instantiate(module_cfg)(supernet=supernet, cost_model=cost_model, targets=targets)
        t0 = time.perf_counter()
        _trainer(epochs, validate=True).fit(module, train_dataloaders=module.train_loaders(datamodule),
                                             val_dataloaders=datamodule.val_dataloader())
        return module, time.perf_counter() - t0

    if per_budget:
        for label, ms in budgets.items():
            module, secs = search({label: ms})
            arch = module.derive()
            out[label] = {"arch": arch, "search_seconds": secs, "searches": 1}
            log(f"  {name} searched for {label} ({ms:.3f} ms) in {secs:.0f} s: predicted "
                f"{cost_model.predict(arch):.3f} ms")
    else:
        module, secs = search(dict(budgets))
        archs = module.derive_all()
        for label, ms in budgets.items():
            arch = archs.get(label)
            if arch is None:
                log(f"  {name}: no architecture for {label}")
                continue
            out[label] = {"arch": arch, "search_seconds": secs, "searches": 1, "shared_search": True}
            log(f"  {name} (one search, {secs:.0f} s) for {label} ({ms:.3f} ms): predicted "
                f"{cost_model.predict(arch):.3f} ms")
    return out


# ---------------------------------------------------------------------- the suite
def run_search_suite(*, space, datamodule, device, cost_model, conf_dir: str | Path, budgets: Sequence[float],
                     k: int = 4, band: float = 0.85, epochs: int = 6, seeds: Sequence[int] = (0,),
                     lr: float = 0.05, label_smoothing: float = 0.1, strategies: Mapping[str, Any] | None = None,
                     anchors: bool = True, weight_sharing: str = "elastic", seed: int = 0,
                     measure: Mapping[str, Any] | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    from nas.latency.measure import measure_archs

    _quiet_lightning()
    t0 = time.perf_counter()
    num_classes = datamodule.num_classes
    lo, hi = cost_model.bounds()
    resolved = cost_model.resolve_targets(list(budgets))
    log(f"search suite: {space.name} on {datamodule.describe()['name']} ({datamodule.describe()['train']} train / "
        f"{datamodule.describe()['arch']} arch / {datamodule.describe()['test']} test), latency {lo:.3f}-{hi:.3f} ms "
        f"on {device.name}; budgets " + ", ".join(f"{k_}={v:.3f} ms" for k_, v in resolved.items()))
    trainer = Retrainer(space, datamodule, epochs=epochs, seeds=seeds, lr=lr, label_smoothing=label_smoothing, log=log)
    entries: list[dict[str, Any]] = []

    def add(method: str, budget: str | None, arch, **extra) -> None:
        entries.append({"method": method, "budget": budget, "arch": arch,
                        "predicted_ms": cost_model.predict(arch), **extra})

    # ---- strategies first (their archs are what the baselines are compared with)
    strategies = dict(strategies or {})
    missing = available_strategies(conf_dir, list(strategies))
    for name, why in missing.items():
        log(f"strategy {name} skipped: {why}")
    for name, ov in strategies.items():
        if name in missing:
            continue
        log(f"searching with {name}")
        found = run_strategy(name, conf_dir, dict(ov or {}), space=space, datamodule=datamodule,
                             cost_model=cost_model, budgets=resolved, seed=seed, weight_sharing=weight_sharing,
                             log=log)
        for label, r in found.items():
            add(name, label, r["arch"], search_seconds=r["search_seconds"],
                shared_search=bool(r.get("shared_search", False)))
    # ---- baselines
    for i, (label, ms) in enumerate(resolved.items()):
        arch, desc = uniform_arch(space, cost_model, ms, num_classes)
        add("uniform", label, arch, desc=desc)
        for j, a in enumerate(random_archs(space, cost_model, ms, k, band=band, num_classes=num_classes,
                                           seed=seed * 1000 + i)):
            add("random", label, a, index=j)
    if anchors:
        add("smallest", None, space.smallest(num_classes))
        add("largest", None, space.largest(num_classes))
    # ---- retrain everything (same epochs, seeds, optimiser)
    log(f"retraining {len({tuple(sorted(e['arch'].choices.items())) for e in entries})} distinct architectures "
        f"({epochs} epochs x {len(list(seeds))} seed(s) each)")
    for e in entries:
        e.update(trainer(e["arch"], f"{e['method']}@{e['budget']}" if e["budget"] else e["method"]))
    # ---- measure every architecture end to end, interleaved, in table units
    distinct: dict[tuple, Any] = {}
    for e in entries:
        distinct.setdefault(tuple(sorted(e["arch"].choices.items())), e["arch"])
    keys = list(distinct)
    m = dict(measure or {})
    log(f"measuring {len(keys)} architectures on {device.name}")
    measured = measure_archs(space, [distinct[k_] for k_ in keys], device,
                             reference_ms=cost_model.meta.get("reference_ms"), **m)
    meas = dict(zip(keys, measured))
    for e in entries:
        e["measured_ms"] = meas[tuple(sorted(e["arch"].choices.items()))]
        e["choices"] = dict(e.pop("arch").choices)
    res = {
        "space": space.name, "data": datamodule.describe(), "device": device.name,
        "latency_range_ms": [lo, hi], "budgets": resolved, "k": k, "band": band, "epochs": epochs,
        "seeds": list(seeds), "lr": lr, "label_smoothing": label_smoothing,
        "strategies": {n: dict(OmegaConf.to_container(OmegaConf.create(dict(ov or {})))) for n, ov in strategies.items()},
        "skipped_strategies": missing, "entries": entries, "retrain_seconds": trainer.seconds,
        "seconds": round(time.perf_counter() - t0, 1), "load_avg": os.getloadavg(),
    }
    res["verdict"] = verdict(res)
    if anchors:
        small = next(e for e in entries if e["method"] == "smallest")
        large = next(e for e in entries if e["method"] == "largest")
        res["gap_smallest_largest"] = {"smallest_test_acc": small["test_acc"], "largest_test_acc": large["test_acc"],
                                       "gap_points": 100 * (large["test_acc"] - small["test_acc"]),
                                       "smallest_ms": small["measured_ms"], "largest_ms": large["measured_ms"]}
    return res


def verdict(res: Mapping[str, Any]) -> dict[str, Any]:
    """Per budget: the best random (by validation accuracy) and, per strategy, whether its test
    accuracy beats it (and the uniform baseline)."""
    out: dict[str, Any] = {}
    for label in res["budgets"]:
        rows = [e for e in res["entries"] if e["budget"] == label]
        rand = [e for e in rows if e["method"] == "random"]
        uni = next((e for e in rows if e["method"] == "uniform"), None)
        best = max(rand, key=lambda e: e["val_acc"]) if rand else None
        v: dict[str, Any] = {
            "best_random_test_acc": best["test_acc"] if best else None,
            "best_random_val_acc": best["val_acc"] if best else None,
            "random_test_accs": [e["test_acc"] for e in rand],
            "uniform_test_acc": uni["test_acc"] if uni else None,
            "strategies": {},
        }
        for e in rows:
            if e["method"] in ("random", "uniform"):
                continue
            d = {"test_acc": e["test_acc"], "measured_ms": e["measured_ms"], "predicted_ms": e["predicted_ms"],
                 "within_budget_predicted": e["predicted_ms"] <= res["budgets"][label] * (1 + 1e-9)}
            if best is not None:
                d["vs_best_random_points"] = 100 * (e["test_acc"] - best["test_acc"])
                d["beats_best_random"] = e["test_acc"] > best["test_acc"]
                d["random_beaten"] = sum(e["test_acc"] > r["test_acc"] for r in rand)
            if uni is not None:
                d["vs_uniform_points"] = 100 * (e["test_acc"] - uni["test_acc"])
            v["strategies"][e["method"]] = d
        out[label] = v
    return out


def markdown(res: Mapping[str, Any]) -> str:
    d = res["data"]
    lines = [
        f"### search quality ({res['space']} on {d['name']}: {d['train']} train / {d['arch']} arch / {d['test']} test; "
        f"retrain {res['epochs']} epochs x seeds {res['seeds']}; latency on {res['device']}; "
        f"{res['seconds'] / 60:.1f} min; load avg {res['load_avg'][0]:.2f})",
        "",
        "| budget | method | predicted ms | measured ms | val acc | test acc | architecture |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    order = {"random": 2, "uniform": 1}
    for label, ms in res["budgets"].items():
        rows = sorted((e for e in res["entries"] if e["budget"] == label), key=lambda e: (order.get(e["method"], 0),
                                                                                          e["method"]))
        for e in rows:
            name = e["method"] + (f" #{e['index']}" if e["method"] == "random" else "") + (
                f" ({e['desc']})" if e.get("desc") else "")
            lines.append(f"| {label} ({ms:.3f} ms) | {name} | {e['predicted_ms']:.3f} | {e['measured_ms']:.3f} | "
                         f"{100 * e['val_acc']:.2f}% | {100 * e['test_acc']:.2f}% | {' '.join(e['choices'].values())} |")
    for e in res["entries"]:
        if e["budget"] is None:
            lines.append(f"| - | {e['method']} | {e['predicted_ms']:.3f} | {e['measured_ms']:.3f} | "
                         f"{100 * e['val_acc']:.2f}% | {100 * e['test_acc']:.2f}% | {' '.join(e['choices'].values())} |")
    lines.append("")
    for label, v in res["verdict"].items():
        if v["best_random_test_acc"] is None:
            continue
        for name, s in v["strategies"].items():
            lines.append(
                f"- budget {label}: **{name}** {100 * s['test_acc']:.2f}% vs best-of-{len(v['random_test_accs'])} random "
                f"{100 * v['best_random_test_acc']:.2f}% ({s['vs_best_random_points']:+.2f} points: "
                f"{'beats' if s['beats_best_random'] else 'does NOT beat'} it; beats {s['random_beaten']}/"
                f"{len(v['random_test_accs'])} random) and uniform {100 * v['uniform_test_acc']:.2f}% "
                f"({s['vs_uniform_points']:+.2f})" + ("" if s["within_budget_predicted"] else "; OVER the budget"))
    if res.get("skipped_strategies"):
        lines.append("- skipped: " + "; ".join(f"{k}: {v}" for k, v in res["skipped_strategies"].items()))
    g = res.get("gap_smallest_largest")
    if g:
        lines.append(f"- smallest net {100 * g['smallest_test_acc']:.2f}% ({g['smallest_ms']:.3f} ms) vs largest "
                     f"{100 * g['largest_test_acc']:.2f}% ({g['largest_ms']:.3f} ms): gap {g['gap_points']:+.2f} points")
    return "\n".join(lines)


def plot(res: Mapping[str, Any], path) -> None:
    """Pareto plot: test accuracy against measured latency, one marker per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"random": dict(marker="o", color="0.6", s=18), "uniform": dict(marker="s", color="tab:blue", s=40),
             "smallest": dict(marker="v", color="k", s=40), "largest": dict(marker="^", color="k", s=40)}
    extra = ["tab:red", "tab:green", "tab:purple", "tab:orange"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    seen = set()
    names = sorted({e["method"] for e in res["entries"]} - set(style))
    for i, n in enumerate(names):
        style[n] = dict(marker="*", color=extra[i % len(extra)], s=110)
    for e in res["entries"]:
        st = style[e["method"]]
        ax.scatter(e["measured_ms"], 100 * e["test_acc"], label=None if e["method"] in seen else e["method"],
                   zorder=3 if e["method"] not in ("random",) else 2, **st)
        seen.add(e["method"])
    for label, v in res["verdict"].items():
        best = v["best_random_test_acc"]
        rows = [e for e in res["entries"] if e["budget"] == label and e["method"] == "random"]
        if rows and best is not None:
            b = max(rows, key=lambda e: e["val_acc"])
            ax.scatter(b["measured_ms"], 100 * b["test_acc"], marker="x", color="k", s=50,
                       label=None if "best random" in seen else "best random (by val)", zorder=4)
            seen.add("best random")
    for label, ms in res["budgets"].items():
        ax.axvline(ms, color="0.3", ls="--", lw=0.8)
        ax.text(ms, ax.get_ylim()[0], f" {label}", fontsize=7, va="bottom")
    ax.set_xlabel(f"measured latency on {res['device']} (ms, table units)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{res['space']} on {res['data']['name']}: retrained {res['epochs']} epochs", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["run_search_suite", "markdown", "plot", "retrain", "random_archs", "uniform_arch", "verdict",
           "available_strategies"]
