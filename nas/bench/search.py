"""``nas-bench suite=search``: does a search strategy beat what a user gets without it, at equal latency?

Protocol (defaults in ``conf/bench.yaml``, on Fashion-MNIST, latency from the onnxruntime table):

1. **Discrimination check.** The space's smallest and largest nets, retrained with every seed: the
   gap of their mean test accuracies must be at least ``discrimination.min_gap`` points and the seed
   std of each at most ``discrimination.max_std_ratio`` of the gap; otherwise the task does not tell
   architectures apart at these settings, and (``discrimination.stop``) the suite stops there.
2. **Searches.** Each strategy at each target (a fraction of the largest net's predicted latency):
   ProxylessNAS once per target, DDPNAS once for all.
3. **Baselines at each target T.** ``uniform``: the same op in every layer (optionally skipping every
   skippable layer), the priciest within T: what a user does without NAS. ``random``: ``k``
   uniformly drawn architectures with predicted latency in ``[band * T, T]`` (their mean and spread).
   ``random_search``: random search at equal search cost: a supernet trained with uniform single-path
   sampling (SPOS) for as many epochs as one ProxylessNAS search, ``random_search.candidates`` random
   architectures in the band ranked by their supernet accuracy (inherited weights, BatchNorm
   recalibrated, on the arch split), the best one retrained.
4. **Retraining.** Every architecture from scratch with the same recipe and the same seeds
   (``jobs`` worker processes, one thread each); identical architectures are trained once.
5. **Statistics.** Per method and target: mean +- std over seeds; for each strategy the paired
   difference to each baseline (per seed; the random baseline's value at a seed is the mean of its
   ``k`` nets at that seed) with a 95 % t interval over the seeds.
6. **Supernet ranking.** Kendall tau between the SPOS supernet's accuracy (inherited weights, BN
   recalibrated) of every retrained architecture (>= 20, spread over the latency range) and the same
   architectures' stand-alone test accuracy (mean over seeds).
7. **Latency.** Every net measured end to end on the device, in table units.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import OmegaConf

from nas.errors import UserError, check_skip_prob


def _quiet_lightning() -> None:
    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def _trainer(epochs: int, *, validate: bool, accelerator: str = "cpu", precision: str = "32-true",
             channels_last: bool = True):
    import pytorch_lightning as pl

    from nas.training import ChannelsLast

    return pl.Trainer(max_epochs=int(epochs), accelerator=accelerator, precision=precision, devices=1, logger=False,
                      callbacks=[ChannelsLast()] if channels_last else [],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, log_every_n_steps=50,
                      **({} if validate else {"limit_val_batches": 0}))


# ---------------------------------------------------------------------- statistics
#: two-sided 95 % quantiles of Student's t by degrees of freedom (a df between two rows takes the lower
#: row's value: the wider, conservative interval)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    if df < 1:
        return math.nan
    return _T975[max(k for k in _T975 if k <= df)] if df < 1000 else 1.96


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired difference ``a - b`` over seeds (points): mean, std and the 95 % t interval."""
    d = [100.0 * (x - y) for x, y in zip(a, b)]
    m, sd = mean_std(d)
    half = t975(len(d) - 1) * sd / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return {"diff": m, "std": sd, "ci95": [m - half, m + half], "n": len(d), "per_seed": d}


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either variable are accounted for)."""
    n = len(x)
    conc = disc = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom else math.nan


# ---------------------------------------------------------------------- retraining
def retrain(space, arch, datamodule, *, epochs: int, seed: int, lr: float = 0.05,
            label_smoothing: float = 0.1, accelerator: str = "cpu", precision: str = "32-true",
            channels_last: bool = True) -> dict[str, float]:
    """Train ``arch`` from scratch (timm net, RetrainModule, SGD + cosine) and evaluate it."""
    import pytorch_lightning as pl

    from nas.export import evaluate
    from nas.training import RetrainModule
    from supernets.blocks import space_timm_net

    t0 = time.perf_counter()
    pl.seed_everything(int(seed), workers=True, verbose=False)
    net = space_timm_net(space, arch, datamodule.num_classes)
    module = RetrainModule(net, lr=lr, label_smoothing=label_smoothing)
    _trainer(epochs, validate=False, accelerator=accelerator, precision=precision, channels_last=channels_last).fit(
        module, train_dataloaders=datamodule.train_dataloader())
    net = module.net.cpu().eval()
    return {"val_acc": evaluate(net, datamodule.val_dataloader()),
            "test_acc": evaluate(net, datamodule.test_dataloader()),
            "seconds": time.perf_counter() - t0}


_WORKER: dict[str, Any] = {}


def _worker_init(space, datamodule, threads: int) -> None:
    import torch

    torch.set_num_threads(int(threads))
    _quiet_lightning()
    _WORKER.update(space=space, dm=datamodule)


def _worker_retrain(choices: dict[str, str], num_classes: int, kw: dict[str, Any]) -> dict[str, float]:
    space = _WORKER["space"]
    return retrain(space, space.make_arch(choices, num_classes), _WORKER["dm"], **kw)


def arch_key(arch) -> tuple:
    return tuple(sorted(arch.choices.items()))


class Retrainer:
    """Retrains architectures once per (choices, seed), ``jobs`` at a time, and remembers the results.

    With ``cache`` (a JSON-lines file), every result is appended as soon as it is in, and the results
    already there for the same *recipe* (space, data splits and options, epochs, lr, label smoothing,
    accelerator) are reused instead of retrained: a suite stopped half-way resumes where it stopped.
    """

    def __init__(self, space, datamodule, *, epochs: int, seeds: Sequence[int], lr: float, label_smoothing: float,
                 jobs: int = 1, threads: int = 1, accelerator: str = "cpu", precision: str = "32-true",
                 log: Callable[[str], None] = print, cache: str | Path | None = None):
        self.space, self.dm = space, datamodule
        self.epochs, self.seeds = int(epochs), [int(s) for s in seeds]
        self.kw = dict(epochs=self.epochs, lr=float(lr), label_smoothing=float(label_smoothing),
                       accelerator=accelerator, precision=precision, channels_last=True)
        self.jobs, self.threads = max(1, int(jobs)), max(1, int(threads))
        self.log = log
        self.runs: dict[tuple, dict[str, Any]] = {}  # (arch key, seed) -> result
        self.seconds = 0.0
        self.reused = 0
        self._pool: ProcessPoolExecutor | None = None
        self.cache = Path(cache) if cache is not None else None
        self.recipe = self._recipe()
        if self.cache is not None and self.cache.is_file():
            self._load_cache()

    def _recipe(self) -> str:
        """A hash of everything that decides a retraining's result besides the architecture and seed."""
        d = {k: v for k, v in self.dm.describe().items() if k not in ("source", "folder")}
        opts = ("train_size", "test_size", "arch_fraction", "batch_size", "seed", "augment", "shift")
        d.update({f"data_{k}": getattr(self.dm, k, None) for k in opts}, space=self.space.fingerprint, **self.kw)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _load_cache(self) -> None:
        for line in self.cache.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when a run was stopped
                continue
            if rec.get("recipe") == self.recipe and int(rec.get("seed", -1)) in self.seeds:
                self.runs[(tuple(sorted(rec["choices"].items())), int(rec["seed"]))] = rec["result"]
        self.reused = len(self.runs)
        if self.reused:
            self.log(f"reusing {self.reused} retrainings of the same recipe from {self.cache}")

    def _remember(self, arch, seed: int, result: Mapping[str, Any]) -> None:
        if self.cache is None:
            return
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        with self.cache.open("a") as f:
            f.write(json.dumps({"recipe": self.recipe, "choices": dict(arch.choices), "seed": int(seed),
                                "result": dict(result)}) + "\n")

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                                             initargs=(self.space, self.dm, self.threads))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def train(self, archs: Sequence[tuple[str, Any]]) -> None:
        """Retrain every ``(label, arch)`` with every seed (what is not trained yet)."""
        todo, seen = [], set()
        for label, arch in archs:
            for s in self.seeds:
                key = (arch_key(arch), s)
                if key not in self.runs and key not in seen:
                    seen.add(key)
                    todo.append((label, arch, s))
        if not todo:
            return
        self.log(f"retraining {len(todo)} runs ({len({arch_key(a) for _, a, _ in todo})} architectures x "
                 f"{len(self.seeds)} seeds, {self.epochs} epochs, {self.jobs} job(s))")
        if self.jobs == 1:
            results = (retrain(self.space, a, self.dm, seed=s, **self.kw) for _, a, s in todo)
        else:
            pool = self._executor()
            futures = [pool.submit(_worker_retrain, dict(a.choices), self.dm.num_classes, dict(self.kw, seed=s))
                       for _, a, s in todo]
            results = (f.result() for f in futures)
        for (label, arch, s), r in zip(todo, results):
            self.runs[(arch_key(arch), s)] = r
            self._remember(arch, s, r)
            self.seconds += r["seconds"]
            self.log(f"  retrained {label:<24} seed {s}: val {100 * r['val_acc']:.2f}%  test {100 * r['test_acc']:.2f}%"
                     f"  ({r['seconds']:.0f} s)")

    def result(self, arch) -> dict[str, Any]:
        runs = [self.runs[(arch_key(arch), s)] for s in self.seeds]
        tests = [r["test_acc"] for r in runs]
        m, sd = mean_std(tests)
        return {"val_acc": statistics.fmean(r["val_acc"] for r in runs), "test_acc": m, "test_std": sd,
                "test_accs": tests, "val_accs": [r["val_acc"] for r in runs],
                "seconds": sum(r["seconds"] for r in runs)}


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
                 budgets: Mapping[str, float], seed: int, weight_sharing: str, accelerator: str = "cpu",
                 precision: str = "32-true", log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Search with strategy ``name``; returns ``{budget label: {"arch", "search_seconds", ...}}``."""
    cfg, epochs = strategy_config(name, conf_dir, overrides)
    from nas.apps.common import instantiate

    per_budget = instantiate(cfg.module).func.one_target_per_search  # the others export every budget at once
    out: dict[str, dict[str, Any]] = {}

    def search(targets: Mapping[str, float]):
        return train_search_module(cfg.module, space=space, datamodule=datamodule, cost_model=cost_model,
                                   targets=targets, epochs=epochs, seed=seed, weight_sharing=weight_sharing,
                                   accelerator=accelerator, precision=precision)

    if per_budget:
        for label, ms in budgets.items():
            module, secs = search({label: ms})
            arch = module.derive()
            out[label] = {"arch": arch, "search_seconds": secs, "searches": 1, "epochs": epochs}
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
            out[label] = {"arch": arch, "search_seconds": secs, "searches": 1, "shared_search": True,
                          "epochs": epochs}
            log(f"  {name} (one search, {secs:.0f} s) for {label} ({ms:.3f} ms): predicted "
                f"{cost_model.predict(arch):.3f} ms")
    return out


def strategy_config(name: str, conf_dir: str | Path, overrides: Mapping[str, Any]):
    """``(strategy config with the suite's overrides merged into its module, epochs)``."""
    # under a `strategy` root, as nas-search composes it: the options' ${strategy.*} interpolations resolve
    cfg = OmegaConf.create({"strategy": OmegaConf.load(Path(conf_dir) / "strategy" / f"{name}.yaml")}).strategy
    ov = OmegaConf.create(dict(overrides))
    epochs = int(ov.get("epochs", cfg.get("epochs", 10)))
    if "module" in ov:
        cfg.module = OmegaConf.merge(cfg.module, ov.module)
    return cfg, epochs


def check_strategies(conf_dir: str | Path, strategies: Mapping[str, Any], *, space, num_classes: int, cost_model,
                     budgets: Mapping[str, float], weight_sharing: str) -> None:
    """Build every strategy's module once, untrained, so that a bad option stops the suite in one line
    before any training rather than an hour into it (strategies not available here are left to the
    suite, which reports them as skipped)."""
    from nas.apps.common import instantiate
    from supernets.supernet import Supernet

    missing = available_strategies(conf_dir, list(strategies))
    for name, ov in strategies.items():
        if name in missing:
            continue
        cfg, _ = strategy_config(name, conf_dir, dict(ov or {}))
        make = instantiate(cfg.module)
        targets = dict(list(budgets.items())[:1]) if make.func.one_target_per_search else dict(budgets)
        try:
            make(supernet=Supernet(space, num_classes, weight_sharing=weight_sharing), cost_model=cost_model,
                 targets=targets)
        except UserError as e:
            raise UserError(f"search.strategies.{name}: {e}") from None


def train_search_module(module_cfg, *, space, datamodule, cost_model, targets, epochs: int, seed: int,
                        weight_sharing: str, accelerator: str = "cpu", precision: str = "32-true"):
    """Build the strategy module of ``module_cfg`` on a fresh supernet and train it; ``(module, seconds)``."""
    import pytorch_lightning as pl

    from nas.apps.common import instantiate
    from supernets.supernet import Supernet

    pl.seed_everything(int(seed), workers=True, verbose=False)
    supernet = Supernet(space, datamodule.num_classes, weight_sharing=weight_sharing)
    module_cfg = OmegaConf.merge(module_cfg, {})
    if "seed" in module_cfg and module_cfg.seed is None:
        module_cfg.seed = int(seed)
    module = instantiate(module_cfg)(supernet=supernet, cost_model=cost_model, targets=targets)
    t0 = time.perf_counter()
    _trainer(epochs, validate=True, accelerator=accelerator, precision=precision).fit(
        module, train_dataloaders=module.train_loaders(datamodule), val_dataloaders=datamodule.val_dataloader())
    module.supernet.cpu()
    return module, time.perf_counter() - t0


def train_spos_supernet(conf_dir: str | Path, *, space, datamodule, cost_model, epochs: int, seed: int,
                        weight_sharing: str, accelerator: str = "cpu", precision: str = "32-true",
                        skip_prob: float | None = None):
    """A supernet trained with uniform single-path sampling (SPOS) for ``epochs``: ProxylessNAS's warm-up
    phase for the whole run (weights only, one uniformly random path per batch, no architecture step).
    ``skip_prob``: how often a layer that can be skipped is (``None``: like each op)."""
    cfg = OmegaConf.load(Path(conf_dir) / "strategy" / "proxyless.yaml")
    module_cfg = OmegaConf.merge(cfg.module, {"warmup_epochs": int(epochs), "loss_form": "none", "derive": "argmax",
                                              "skip_prob": skip_prob})
    module, secs = train_search_module(module_cfg, space=space, datamodule=datamodule, cost_model=cost_model,
                                       targets=None, epochs=epochs, seed=seed, weight_sharing=weight_sharing,
                                       accelerator=accelerator, precision=precision)
    return module.supernet, secs


def supernet_accuracy(supernet, arch, datamodule, calib: list) -> float:
    """Accuracy on the arch split of ``arch`` with the supernet's weights, BatchNorm recalibrated."""
    from nas.export import evaluate
    from supernets.bn import calibrate_bn

    sub = supernet.extract(arch).cpu()
    calibrate_bn(sub, calib)
    return evaluate(sub, datamodule.val_dataloader())


# ---------------------------------------------------------------------- the suite
def discrimination(trainer: Retrainer, space, num_classes: int, *, min_gap: float, max_std_ratio: float) -> dict:
    small, large = space.smallest(num_classes), space.largest(num_classes)
    trainer.train([("smallest", small), ("largest", large)])
    s, l_ = trainer.result(small), trainer.result(large)
    gap = 100 * (l_["test_acc"] - s["test_acc"])
    worst_std = 100 * max(s["test_std"], l_["test_std"])
    ok = gap >= min_gap and worst_std <= max_std_ratio * gap
    return {"smallest_test_acc": s["test_acc"], "smallest_std": s["test_std"], "smallest_accs": s["test_accs"],
            "largest_test_acc": l_["test_acc"], "largest_std": l_["test_std"], "largest_accs": l_["test_accs"],
            "gap_points": gap, "max_seed_std_points": worst_std, "min_gap": min_gap, "max_std_ratio": max_std_ratio,
            "discriminates": ok, "seeds": trainer.seeds}


def run_search_suite(*, space, datamodule, device, cost_model, conf_dir: str | Path, targets: Sequence[float | str],
                     k: int = 4, band: float = 0.85, epochs: int = 6, seeds: Sequence[int] = (0,),
                     lr: float = 0.05, label_smoothing: float = 0.1, strategies: Mapping[str, Any] | None = None,
                     random_search: Mapping[str, Any] | None = None, disc: Mapping[str, Any] | None = None,
                     ranking: Mapping[str, Any] | None = None, weight_sharing: str = "elastic", seed: int = 0,
                     measure: Mapping[str, Any] | None = None, jobs: int = 1, threads: int = 1,
                     accelerator: str = "cpu", precision: str = "32-true", search_datamodule=None,
                     retrain_cache: str | Path | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """The protocol of docs/search-quality.md. ``search_datamodule`` (default: ``datamodule``) is what
    the searches, the random-search supernet and the ranking's supernet scores use: a proxy subset
    for the searches, as ProxylessNAS searched on part of ImageNet; every net is retrained on
    ``datamodule``. ``accelerator`` and ``precision`` are those of every training (Lightning's names)."""
    _quiet_lightning()
    t0 = time.perf_counter()
    num_classes = datamodule.num_classes
    sdm = datamodule if search_datamodule is None else search_datamodule
    lo, hi = cost_model.bounds()
    resolved = cost_model.resolve_targets(list(targets))
    d = datamodule.describe()
    disc = {"min_gap": 2.0, "max_std_ratio": 1 / 3, "stop": True, **dict(disc or {})}
    rs = {"candidates": 30, "epochs": None, "calib_batches": 10, "skip_prob": None, **dict(random_search or {})}
    rs["skip_prob"] = check_skip_prob("search.random_search.skip_prob", rs["skip_prob"])
    ranking = {"enabled": True, **dict(ranking or {})}
    log(f"search suite: {space.name} on {d['name']} ({d['train']} train / {d['arch']} arch / {d['test']} test), "
        f"latency {lo:.3f}-{hi:.3f} ms on {device.name}; targets "
        + ", ".join(f"{k_}={v:.3f} ms" for k_, v in resolved.items()))
    trainer = Retrainer(space, datamodule, epochs=epochs, seeds=seeds, lr=lr, label_smoothing=label_smoothing,
                        jobs=jobs, threads=threads, accelerator=accelerator, precision=precision, log=log,
                        cache=retrain_cache)
    res: dict[str, Any] = {
        "space": space.name, "data": d, "device": device.name, "device_fingerprint": device.fingerprint(),
        "latency_range_ms": [lo, hi], "budgets": resolved, "k": k, "band": band, "epochs": epochs,
        "seeds": list(seeds), "lr": lr, "label_smoothing": label_smoothing, "jobs": jobs,
        "accelerator": accelerator, "precision": precision,
        "strategies": {n: OmegaConf.to_container(OmegaConf.create(dict(ov or {}))) for n, ov in
                       (strategies or {}).items()},
        "random_search": dict(rs), "entries": [], "load_avg_start": list(os.getloadavg()),
    }
    if sdm is not datamodule:
        sd = sdm.describe()
        res["search_data"] = sd
        log(f"searches on a proxy subset: {sd['train']} train / {sd['arch']} arch images")
    try:
        # ---- 1. does the task tell architectures apart at these settings?
        log("discrimination check: smallest vs largest net")
        res["discrimination"] = g = discrimination(trainer, space, num_classes, min_gap=float(disc["min_gap"]),
                                                   max_std_ratio=float(disc["max_std_ratio"]))
        log(f"discrimination: smallest {100 * g['smallest_test_acc']:.2f} +- {100 * g['smallest_std']:.2f}%, largest "
            f"{100 * g['largest_test_acc']:.2f} +- {100 * g['largest_std']:.2f}%: gap {g['gap_points']:+.2f} points "
            f"({'discriminates' if g['discriminates'] else 'does NOT discriminate'})")
        if not g["discriminates"] and disc["stop"]:
            res["stopped"] = (f"the smallest and largest nets differ by {g['gap_points']:.2f} points (seed std up to "
                              f"{g['max_seed_std_points']:.2f}); the check needs >= {disc['min_gap']} points with std "
                              f"<= {disc['max_std_ratio']:.2f} of the gap: train longer (search.epochs) or on more "
                              f"images (data.train_size)")
            log("stopping: " + res["stopped"])
            return _finish(res, trainer, t0)
        entries = res["entries"]

        def add(method: str, budget: str | None, arch, **extra) -> None:
            entries.append({"method": method, "budget": budget, "arch": arch,
                            "predicted_ms": cost_model.predict(arch), **extra})

        # ---- 2. the strategies
        strategies = dict(strategies or {})
        missing = available_strategies(conf_dir, list(strategies))
        res["skipped_strategies"] = missing
        for name, why in missing.items():
            log(f"strategy {name} skipped: {why}")
        search_epochs = []
        for name, ov in strategies.items():
            if name in missing:
                continue
            log(f"searching with {name}")
            found = run_strategy(name, conf_dir, dict(ov or {}), space=space, datamodule=sdm,
                                 cost_model=cost_model, budgets=resolved, seed=seed, weight_sharing=weight_sharing,
                                 accelerator=accelerator, precision=precision, log=log)
            for label, r in found.items():
                add(name, label, r["arch"], search_seconds=r["search_seconds"], search_epochs=r["epochs"],
                    shared_search=bool(r.get("shared_search", False)))
                if not r.get("shared_search"):
                    search_epochs.append(r["epochs"])
        # ---- 3. baselines: uniform, k random, random search on a supernet trained as long as one search
        for i, (label, ms) in enumerate(resolved.items()):
            arch, desc = uniform_arch(space, cost_model, ms, num_classes)
            add("uniform", label, arch, desc=desc)
            for j, a in enumerate(random_archs(space, cost_model, ms, k, band=band, num_classes=num_classes,
                                               seed=seed * 1000 + i)):
                add("random", label, a, index=j)
        spos_epochs = int(rs["epochs"] or (max(search_epochs) if search_epochs else epochs))
        log(f"random search: SPOS supernet, {spos_epochs} epochs")
        supernet, spos_secs = train_spos_supernet(conf_dir, space=space, datamodule=sdm, cost_model=cost_model,
                                                  epochs=spos_epochs, seed=seed, weight_sharing=weight_sharing,
                                                  accelerator=accelerator, precision=precision,
                                                  skip_prob=rs["skip_prob"])
        calib = list(sdm.calib_dataloader(int(rs["calib_batches"])))
        res["random_search"].update(supernet_epochs=spos_epochs, supernet_seconds=spos_secs)
        sn_acc: dict[tuple, float] = {}

        def sn(arch) -> float:
            key = arch_key(arch)
            if key not in sn_acc:
                sn_acc[key] = supernet_accuracy(supernet, arch, sdm, calib)
            return sn_acc[key]

        for i, (label, ms) in enumerate(resolved.items()):
            t_rs = time.perf_counter()
            cands = random_archs(space, cost_model, ms, int(rs["candidates"]), band=band, num_classes=num_classes,
                                 seed=seed * 1000 + 500 + i)
            scored = sorted(((sn(a), j, a) for j, a in enumerate(cands)), key=lambda t: (-t[0], t[1]))
            best_acc, _, best = scored[0]
            add("random_search", label, best, supernet_acc=best_acc, candidates=len(cands),
                search_seconds=spos_secs + time.perf_counter() - t_rs, search_epochs=spos_epochs)
            log(f"  random search {label}: best of {len(cands)} on the supernet {100 * best_acc:.2f}% "
                f"(worst {100 * scored[-1][0]:.2f}%)")
        # ---- 4. retrain everything (same recipe and seeds)
        trainer.train([(f"{e['method']}@{e['budget']}", e["arch"]) for e in entries])
        g_small, g_large = space.smallest(num_classes), space.largest(num_classes)
        add("smallest", None, g_small)
        add("largest", None, g_large)
        for e in entries:
            e.update(trainer.result(e["arch"]))
        # ---- 5. supernet ranking: every distinct retrained architecture
        distinct: dict[tuple, Any] = {}
        for e in entries:
            distinct.setdefault(arch_key(e["arch"]), e["arch"])
        if ranking["enabled"]:
            log(f"supernet ranking over {len(distinct)} architectures")
            for a in distinct.values():
                sn(a)
        for e in entries:
            e["supernet_acc"] = sn_acc.get(arch_key(e["arch"]))
        # ---- 6. measure every net end to end
        keys = list(distinct)
        log(f"measuring {len(keys)} architectures on {device.name}")
        measured = device.measure_nets(space, [distinct[k_] for k_ in keys],
                                       reference_ms=cost_model.meta.get("reference_ms"), **dict(measure or {}))
        meas = dict(zip(keys, measured))
        for e in entries:
            e["measured_ms"] = meas[arch_key(e["arch"])]
        if ranking["enabled"]:
            res["ranking"] = ranking_report(entries)
        for e in entries:
            e["choices"] = dict(e.pop("arch").choices)
        res["verdict"] = verdict(res)
    finally:
        trainer.close()
    return _finish(res, trainer, t0)


def _finish(res: dict[str, Any], trainer: Retrainer, t0: float) -> dict[str, Any]:
    res["retrain_seconds"] = trainer.seconds
    res["retrainings_reused"] = trainer.reused
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["load_avg"] = list(os.getloadavg())
    return res


def ranking_report(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Kendall tau between supernet accuracy and stand-alone accuracy over the distinct architectures."""
    rows: dict[tuple, dict[str, Any]] = {}
    for e in entries:
        if e.get("supernet_acc") is None:
            continue
        key = tuple(sorted(e["arch"].choices.items())) if "arch" in e else tuple(sorted(e["choices"].items()))
        rows.setdefault(key, {"supernet_acc": e["supernet_acc"], "test_acc": e["test_acc"],
                              "test_accs": list(e.get("test_accs") or []),
                              "measured_ms": e.get("measured_ms"), "predicted_ms": e["predicted_ms"],
                              "methods": []})["methods"].append(f"{e['method']}@{e['budget']}")
    rs = list(rows.values())
    tau = kendall_tau([r["supernet_acc"] for r in rs], [r["test_acc"] for r in rs]) if len(rs) > 1 else math.nan
    ms = [r["predicted_ms"] for r in rs]
    return {"kendall_tau": tau, "n": len(rs), "latency_span_ms": [min(ms), max(ms)] if ms else None,
            "retest_tau": retest_tau([r["test_accs"] for r in rs]), "archs": rs}


def retest_tau(accs_per_net: Sequence[Sequence[float]]) -> float:
    """How well one stand-alone retraining ranks the nets like another: the mean Kendall tau over pairs of
    seeds between the nets' accuracies at one seed and at the other (NaN with < 2 seeds or < 2 nets).
    A supernet's tau against the seed mean is read against it: a recipe whose own retrainings disagree
    cannot be predicted better than they agree."""
    n_seeds = min((len(a) for a in accs_per_net), default=0)
    if n_seeds < 2 or len(accs_per_net) < 2:
        return math.nan
    taus = [kendall_tau([a[i] for a in accs_per_net], [a[j] for a in accs_per_net])
            for i in range(n_seeds) for j in range(i + 1, n_seeds)]
    return sum(taus) / len(taus)


BASELINES = ("uniform", "random", "random_search")


def verdict(res: Mapping[str, Any]) -> dict[str, Any]:
    """Per target: mean +- std of each method, and for each strategy the paired difference to each
    baseline over the seeds (random: the mean of its k nets at each seed) with its 95 % t interval."""
    out: dict[str, Any] = {}
    seeds = res["seeds"]
    for label in res["budgets"]:
        rows = [e for e in res["entries"] if e["budget"] == label]
        rand = [e for e in rows if e["method"] == "random"]
        per_method: dict[str, list[float]] = {}
        for e in rows:
            if e["method"] != "random":
                per_method[e["method"]] = list(e["test_accs"])
        if rand:
            per_method["random"] = [statistics.fmean(e["test_accs"][i] for e in rand) for i in range(len(seeds))]
        # predicted ms of each method's net (random: the mean of its k), for the latency a strategy leaves unspent
        latency = {e["method"]: e["predicted_ms"] for e in rows if e["method"] != "random"}
        if rand:
            latency["random"] = statistics.fmean(e["predicted_ms"] for e in rand)
        v: dict[str, Any] = {"methods": {}, "strategies": {}}
        for m, accs in per_method.items():
            mean, sd = mean_std(accs)
            v["methods"][m] = {"mean": mean, "std": sd, "per_seed": accs}
        if rand:
            arch_means = [e["test_acc"] for e in rand]
            v["methods"]["random"].update(k=len(rand), arch_means=arch_means, arch_spread=mean_std(arch_means)[1],
                                          arch_min=min(arch_means), arch_max=max(arch_means))
        for e in rows:
            if e["method"] in BASELINES:
                continue
            s = {"mean": v["methods"][e["method"]]["mean"], "std": v["methods"][e["method"]]["std"],
                 "measured_ms": e["measured_ms"], "predicted_ms": e["predicted_ms"],
                 "within_budget_predicted": e["predicted_ms"] <= res["budgets"][label] * (1 + 1e-9), "vs": {}}
            for b in BASELINES:
                if b in per_method:
                    p = paired(per_method[e["method"]], per_method[b])
                    p["verdict"] = ("wins" if p["ci95"][0] > 0 else "loses" if p["ci95"][1] < 0 else "level")
                    # the verdict compares accuracy at the budget; this says at what latency (E13: level, at 0.6x)
                    p["latency_ratio"] = e["predicted_ms"] / latency[b] if latency.get(b) else None
                    s["vs"][b] = p
            v["strategies"][e["method"]] = s
        out[label] = v
    return out


def _pm(mean: float, sd: float) -> str:
    return f"{100 * mean:.2f} ± {100 * sd:.2f}"


def markdown(res: Mapping[str, Any]) -> str:
    d = res["data"]
    lines = [
        f"### search quality ({res['space']} on {d['name']}: {d['train']} train / {d['arch']} arch / {d['test']} test; "
        f"retrain {res['epochs']} epochs x seeds {res['seeds']}; latency on {res['device']} "
        f"(threads {res.get('device_fingerprint', {}).get('threads', '?')}); {res['seconds'] / 60:.1f} min; "
        f"load avg {res['load_avg_start'][0]:.2f} at start, {res['load_avg'][0]:.2f} at the end)", ""]
    if res.get("search_data"):
        sd = res["search_data"]
        lines += [f"Searches and the random-search supernet trained on a proxy subset: {sd['train']} train / "
                  f"{sd['arch']} arch images; every net retrained on the {d['train']} above.", ""]
    g = res.get("discrimination")
    if g:
        lines.append(f"Discrimination check: smallest net {_pm(g['smallest_test_acc'], g['smallest_std'])} %, largest "
                     f"{_pm(g['largest_test_acc'], g['largest_std'])} % over seeds {g['seeds']}: gap "
                     f"{g['gap_points']:+.2f} points, seed std up to {g['max_seed_std_points']:.2f} "
                     f"({'passes' if g['discriminates'] else 'FAILS'}: needs >= {g['min_gap']} points, std <= "
                     f"{g['max_std_ratio']:.2f} of the gap).")
        lines.append("")
    if res.get("stopped"):
        lines.append(f"**Stopped**: {res['stopped']}.")
        return "\n".join(lines)
    lines += ["| target | method | predicted ms | measured ms | test acc % (mean ± std over seeds) | supernet acc % "
              "| vs uniform | vs random (mean of k) | vs random search |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def ci(p: Mapping[str, Any] | None) -> str:
        if not p:
            return "-"
        return f"{p['diff']:+.2f} [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]"

    order = {"uniform": 1, "random": 2, "random_search": 3}
    for label, ms in res["budgets"].items():
        v = res["verdict"][label]
        rows = sorted((e for e in res["entries"] if e["budget"] == label),
                      key=lambda e: (order.get(e["method"], 0), e["method"], e.get("index", 0)))
        for e in rows:
            if e["method"] == "random":
                continue
            s = v["strategies"].get(e["method"], {})
            name = e["method"] + (f" ({e['desc']})" if e.get("desc") else "")
            sa = e.get("supernet_acc")
            lines.append(f"| {label} ({ms:.3f} ms) | {name} | {e['predicted_ms']:.3f} | {e['measured_ms']:.3f} | "
                         f"{_pm(e['test_acc'], e['test_std'])} | {'-' if sa is None else f'{100 * sa:.2f}'} | "
                         f"{ci(s.get('vs', {}).get('uniform'))} | {ci(s.get('vs', {}).get('random'))} | "
                         f"{ci(s.get('vs', {}).get('random_search'))} |")
        r = v["methods"].get("random")
        if r:
            rr = [e for e in rows if e["method"] == "random"]
            lines.append(f"| {label} ({ms:.3f} ms) | random (k={r['k']}: mean ± std over seeds; archs "
                         f"{100 * r['arch_min']:.2f}-{100 * r['arch_max']:.2f}, spread {100 * r['arch_spread']:.2f}) | "
                         f"{statistics.fmean(e['predicted_ms'] for e in rr):.3f} | "
                         f"{statistics.fmean(e['measured_ms'] for e in rr):.3f} | {_pm(r['mean'], r['std'])} | - | | | |")
    for e in res["entries"]:
        if e["budget"] is None:
            sa = e.get("supernet_acc")
            lines.append(f"| - | {e['method']} | {e['predicted_ms']:.3f} | {e['measured_ms']:.3f} | "
                         f"{_pm(e['test_acc'], e['test_std'])} | {'-' if sa is None else f'{100 * sa:.2f}'} | | | |")
    lines.append("")
    lines.append("Differences are paired over seeds, in points, with a 95 % t interval: [lo, hi] above 0 = wins, "
                 "below 0 = loses, containing 0 = level. The verdict is of accuracy under the target; \"at 0.60x\" "
                 "is the strategy's net's predicted latency over the baseline's (random: the mean of its k), what a "
                 "level net leaves unspent.")
    for label, v in res["verdict"].items():
        for name, s in v["strategies"].items():
            parts = [f"{b} {s['vs'][b]['verdict']} ({s['vs'][b]['diff']:+.2f}"
                     + (f", at {s['vs'][b]['latency_ratio']:.2f}x its predicted latency"
                        if s["vs"][b].get("latency_ratio") else "") + ")"
                     for b in BASELINES if b in s["vs"]]
            lines.append(f"- {label}: **{name}** {_pm(s['mean'], s['std'])} %: " + ", ".join(parts)
                         + ("" if s["within_budget_predicted"] else "; OVER the target"))
    rk = res.get("ranking")
    if rk:
        span = rk["latency_span_ms"]
        lines.append(f"- supernet ranking: Kendall tau {rk['kendall_tau']:.3f} between the SPOS supernet's accuracy "
                     f"(inherited weights, BN recalibrated, {res['random_search']['supernet_epochs']} epochs) and "
                     f"stand-alone test accuracy over {rk['n']} architectures ({span[0]:.3f}-{span[1]:.3f} ms predicted)"
                     + (f"; the retrainings themselves agree with tau {rk['retest_tau']:.3f} from seed to seed"
                        if not math.isnan(rk.get("retest_tau", math.nan)) else ""))
    if res.get("skipped_strategies"):
        lines.append("- skipped: " + "; ".join(f"{k}: {v}" for k, v in res["skipped_strategies"].items()))
    for e in res["entries"]:
        if e["budget"] is not None and e["method"] not in ("random",):
            lines.append(f"- {e['budget']} {e['method']}: `{' '.join(e['choices'].values())}`")
    return "\n".join(lines)


def plot(res: Mapping[str, Any], path) -> None:
    """Pareto plot: test accuracy (mean over seeds, bars: std) against measured latency, every net."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"random": dict(marker="o", color="0.6", ms=4), "uniform": dict(marker="s", color="tab:blue", ms=6),
             "random_search": dict(marker="D", color="tab:olive", ms=6),
             "smallest": dict(marker="v", color="k", ms=6), "largest": dict(marker="^", color="k", ms=6)}
    extra = ["tab:red", "tab:green", "tab:purple", "tab:orange"]
    names = sorted({e["method"] for e in res["entries"]} - set(style))
    for i, n in enumerate(names):
        style[n] = dict(marker="*", color=extra[i % len(extra)], ms=11)
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    seen = set()
    for e in res["entries"]:
        st = style[e["method"]]
        ax.errorbar(e["measured_ms"], 100 * e["test_acc"], yerr=100 * e.get("test_std", 0.0), ls="none", capsize=2,
                    label=None if e["method"] in seen else e["method"], zorder=2 if e["method"] == "random" else 3,
                    **st)
        seen.add(e["method"])
    for label, ms in res["budgets"].items():
        ax.axvline(ms, color="0.3", ls="--", lw=0.8)
        ax.text(ms, ax.get_ylim()[0], f" {label}", fontsize=7, va="bottom")
    ax.set_xlabel(f"measured latency on {res['device']} (ms, table units)")
    ax.set_ylabel("test accuracy (%, mean ± std over seeds)")
    ax.set_title(f"{res['space']} on {res['data']['name']}: retrained {res['epochs']} epochs x {len(res['seeds'])} "
                 f"seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["run_search_suite", "markdown", "plot", "retrain", "random_archs", "uniform_arch", "verdict",
           "available_strategies", "kendall_tau", "paired", "t975", "ranking_report", "retest_tau", "discrimination"]
