"""The one-script GPU check (``launch/gpu_check.sh``, ``make gpu-check``; docs/gpu.md).

On a machine with one NVIDIA GPU it runs, in order, and stops at the first failure:

1. ``environment``: torch, CUDA, the GPU, bfloat16 support; the precisions the later steps use.
2. ``lut_b1`` / ``lut_b32``: ``nas-lut`` builds and validates the ``cuda`` latency table of
   ``mbv2_tiny`` at batch 1 and at batch 32 (small sample counts).
3. ``search``: ``nas-search`` (ProxylessNAS, texshapes: synthetic, no download) on the GPU with
   ``trainer.precision=16-mixed`` (fp16 + loss scaling), data-loader workers and pinned memory; the
   export is measured on the GPU, loaded back and compared with its ONNX file.
4. ``retrain``: ``nas-retrain`` of that export with ``bf16-mixed`` (``16-mixed`` on a GPU without
   bfloat16); the retrained model is loaded back and compared with its ONNX file.
5. ``strategies``: DDPNAS, slimmable and evolution, a short training each in this process with the
   search's precision (FLOPs as the cost); their exports derived and run.
6. ``weight_step``: the supernet's one-gate weight step against the standalone net of the same path
   (and the full DARTS mixture), fp32 and autocast: peak memory by ``torch.cuda.max_memory_allocated``,
   time by CUDA events, in rounds of shuffled order (the ratios of ``nas-bench suite=memory``).

Every step's result goes into ``gpu_check.json`` and ``gpu_check.md`` as soon as it is known, so a
failure leaves the summary of what passed. Exit status: 0 every step passed and every goal was met;
1 a step failed (one line says which and why); 3 every step passed but a goal was not met (a latency
table under its device's bar, the one-gate step above 1.15x the standalone net, over 8 minutes).

``--dry-run`` (or ``GPU_CHECK_DRY_RUN=1``) runs the same steps without CUDA: the CPU device, bf16-mixed
on the CPU, tiny sizes; for every CUDA-only measurement it prints what it would measure. Nothing is
timed in a dry run.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nas.apps.common import (
    CONF_DIR,
    instantiate,
    make_cost_model,
    make_datamodule,
    make_device,
    make_space,
)
from nas.bench import memory as bm
from nas.export import ONNX_FILE, load_subnet, read_arch_file
from nas.io import atomic_write_text, write_json
from nas.latency.devices import CudaDevice
from supernets.space import SearchSpace
from supernets.supernet import Supernet

#: the whole check, install included, should fit in this (the GPU time users get is short)
BUDGET_SECONDS = 480.0
#: the memory suite's goal for the one-gate weight step against the standalone net of its path
ONE_GATE_GOAL = 1.15
SPACE = "mbv2_tiny"

EXIT_OK, EXIT_FAILED, EXIT_GOALS = 0, 1, 3


class CheckFailed(Exception):
    """A step's result is wrong (not just slow): the message is the one line the check exits with."""


@dataclass
class Settings:
    """Sizes and options of one run of the check (GPU or dry run)."""

    dry_run: bool
    lut: list[str]
    search: list[str]
    retrain: list[str]
    search_precision: str
    retrain_precision: str
    accelerator: str
    hardware: str
    strategy_data: list[str]
    step_batch: int
    step_warmup: int
    step_rounds: int
    timeout: float

    @classmethod
    def make(cls, dry_run: bool, bf16: bool) -> "Settings":
        if dry_run:
            hw = ["hardware=cpu", "hardware.threads=1", "hardware.repeats=3", "hardware.warmup=1"]
            data = ["data=texshapes", "data.n_train=160", "data.n_test=64", "data.batch_size=32", "data.num_workers=1"]
            return cls(
                dry_run=True,
                lut=[*hw, "measure.rel_ci=null", "measure.calib_nets=4", "samples=4", "retest=true"],
                search=[*hw, *data, "strategy.epochs=2", "strategy.module.warmup_epochs=1", "export.calib_batches=2"],
                retrain=[*data, "epochs=1"],
                search_precision="bf16-mixed", retrain_precision="bf16-mixed", accelerator="cpu", hardware="cpu",
                strategy_data=[*data, "data.n_train=96"], step_batch=8, step_warmup=1, step_rounds=1, timeout=600.0)
        hw = ["hardware=cuda"]
        data = ["data=texshapes", "data.n_train=5000", "data.n_test=1000", "data.batch_size=64", "data.num_workers=2"]
        return cls(
            dry_run=False,
            lut=[*hw, "measure.rel_ci=0.02", "measure.max_repeats=200", "measure.max_seconds=20",
                 "measure.calib_nets=12",
                 "samples=30", "retest=true"],
            search=[*hw, *data, "strategy.epochs=3", "strategy.module.warmup_epochs=1", "export.calib_batches=5"],
            retrain=[*data, "epochs=3"],
            search_precision="16-mixed", retrain_precision="bf16-mixed" if bf16 else "16-mixed", accelerator="gpu",
            hardware="cuda", strategy_data=[*data, "data.n_train=1000", "data.n_test=200"], step_batch=64,
            step_warmup=5, step_rounds=20, timeout=400.0)


@dataclass
class Check:
    """One run of the check: where it writes, what it found so far."""

    out: Path
    settings: Settings
    install_seconds: float | None = None
    results: dict[str, Any] = field(default_factory=dict)  # step name -> its result
    steps: list[dict[str, Any]] = field(default_factory=list)  # the summary rows, in order
    t0: float = field(default_factory=time.perf_counter)

    @property
    def dry_run(self) -> bool:
        return self.settings.dry_run

    def env(self) -> dict[str, str]:
        return {**os.environ, "HWNAS_CACHE": str(self.out / "cache"), "WANDB_MODE": "disabled",
                "PYTHONUNBUFFERED": "1"}


@dataclass
class Step:
    name: str
    what: str
    run: Callable[[Check], dict[str, Any]]
    #: what the step measures only on a GPU (printed by a dry run); None: nothing CUDA-only
    on_gpu: str | None = None


# ---------------------------------------------------------------------- running the apps
def run_app(check: Check, step: str, module: str, overrides: list[str]) -> Path:
    """``python -m <module> <overrides>`` with its run folder ``<out>/runs/<step>`` and its output in
    ``<out>/logs/<step>.log``; a non-zero exit fails the step with the app's own last error line."""
    run_dir = check.out / "runs" / step
    log = check.out / "logs" / f"{step}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", module, *overrides, "progress=none", f"hydra.run.dir={run_dir}"]
    with open(log, "w") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        try:
            proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env=check.env(),
                                  timeout=check.settings.timeout)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"{module} did not finish in {check.settings.timeout:.0f} s (log: {log})") from None
    if proc.returncode != 0:
        raise CheckFailed(f"{module} exited {proc.returncode}: {last_error_line(log.read_text())} (log: {log})")
    return run_dir


def last_error_line(text: str) -> str:
    """The line of an app's output that says what went wrong: its ``error:`` line, else the last
    line of a traceback, else the last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback"):
            tail = [line for line in lines[i:] if not line.startswith(("File ", "^", "~"))]
            return tail[-1] if tail else lines[-1]
    return lines[-1] if lines else "(no output)"


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CheckFailed(f"{what} was not written ({path})")
    return json.loads(path.read_text())


def finite(value: Any, what: str) -> float:
    if value is None or not math.isfinite(float(value)):
        raise CheckFailed(f"{what} is {value} (not a finite number)")
    return float(value)


def logged_losses(run_dir: Path, column: str) -> list[float]:
    """Every value of ``column`` the CSV logger wrote in ``run_dir`` (Lightning's metrics.csv)."""
    files = sorted(run_dir.glob("logs/version_*/metrics.csv"))
    if not files:
        raise CheckFailed(f"no metrics.csv under {run_dir}/logs (logger=csv)")
    values = []
    with open(files[-1]) as f:
        for row in csv.DictReader(f):
            if row.get(column) not in (None, ""):
                values.append(float(row[column]))
    if not values:
        raise CheckFailed(f"{files[-1]} has no {column} values")
    return values


def compare_with_onnx(model_dir: Path, check: Check) -> dict[str, Any]:
    """Load the folder with :func:`nas.export.load_subnet` and compare it with its ``model.onnx``
    (ONNX Runtime, CPU) on a batch: the weights a user gets are the ones that were trained."""
    net = load_subnet(model_dir).eval()
    arch, raw = read_arch_file(model_dir)
    dtypes = sorted({str(p.dtype) for p in net.parameters()})
    if dtypes != ["torch.float32"]:
        raise CheckFailed(f"{model_dir}: the saved weights are {dtypes}, not float32")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, int(raw["timm"].get("in_chans", 3)), arch.resolution, arch.resolution, generator=g)
    with torch.no_grad():
        y = net(x).numpy()
    out: dict[str, Any] = {"weights_dtype": "float32"}
    try:
        import onnxruntime as ort
    except ImportError:
        out["onnx"] = "onnxruntime not installed: not compared"
        return out
    sess = ort.InferenceSession(str(model_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    y_onnx = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    diff = float(abs(y - y_onnx).max())
    scale = float(abs(y).max()) or 1.0
    out["onnx_max_abs_diff"] = diff
    if not diff <= 1e-3 * max(1.0, scale):
        raise CheckFailed(f"{model_dir}: model.onnx and model.safetensors disagree (max |diff| {diff:.3g})")
    return out


# ---------------------------------------------------------------------- the apps' command lines
def lut_overrides(s: Settings, batch: int, table: Path | str) -> list[str]:
    return [f"space={SPACE}", *s.lut, f"hardware.batch_size={batch}", f"lut.path={table}"]


def search_overrides(s: Settings, table: Path | str) -> list[str]:
    return [f"space={SPACE}", "strategy=proxyless", "strategy.targets=[0.7]", *s.search, f"lut.path={table}",
            "lut.accept_untrusted=true", f"trainer.accelerator={s.accelerator}",
            f"trainer.precision={s.search_precision}", "logger=csv"]


def retrain_overrides(s: Settings, export: Path | str) -> list[str]:
    return [f"arch={export}", *s.retrain, f"trainer.accelerator={s.accelerator}",
            f"trainer.precision={s.retrain_precision}", "logger=csv"]


def strategy_overrides(s: Settings, name: str, space: str, extra: list[str]) -> list[str]:
    return [f"strategy={name}", f"space={space}", "hardware=flops", *s.strategy_data,
            f"trainer.accelerator={s.accelerator}", f"trainer.precision={s.search_precision}", "progress=none", *extra]


# ---------------------------------------------------------------------- the steps
def step_environment(check: Check) -> dict[str, Any]:
    s = check.settings
    res: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
                           "cuda_available": torch.cuda.is_available(), "python": sys.version.split()[0],
                           "search_precision": s.search_precision, "retrain_precision": s.retrain_precision,
                           "load_avg": list(os.getloadavg())}
    if check.dry_run:
        res["device"] = "cpu (dry run)"
        return res
    if not torch.cuda.is_available():
        raise CheckFailed(f"no CUDA device is visible (torch {torch.__version__}, built for CUDA "
                          f"{torch.version.cuda}); run on a GPU node (srun --gres=gpu:1 ...), install a torch "
                          f"built for the driver's CUDA (docs/gpu.md), or use --dry-run")
    props = torch.cuda.get_device_properties(0)
    res.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
               memory_gb=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
               bf16=torch.cuda.is_bf16_supported())
    x = torch.randn(64, 64, device="cuda")
    if not torch.isfinite(x @ x).all():
        raise CheckFailed("a 64x64 matrix product on the GPU is not finite")
    return res


def step_lut(batch: int) -> Callable[[Check], dict[str, Any]]:
    def run(check: Check) -> dict[str, Any]:
        name = f"lut_b{batch}"
        table = check.out / "luts" / f"{SPACE}-{check.settings.hardware}-b{batch}.lut.json"
        run_dir = run_app(check, name, "nas.apps.lut", lut_overrides(check.settings, batch, table))
        if not table.is_file():
            raise CheckFailed(f"nas-lut wrote no table at {table}")
        report = read_json(run_dir / "lut_validation.json", "the validation report")
        s = report["summary"]
        for key in ("within_10pct", "spearman", "bias_pct"):
            finite(s.get(key), f"validation {key}")
        res = {"table": str(table), "nets": s["n"], "within_10pct": s["within_10pct"], "spearman": s["spearman"],
               "bias_pct": s["bias_pct"], "retest_within_10pct": (s.get("retest") or {}).get("within_10pct"),
               "load_avg": s.get("load_avg")}
        if not check.dry_run:
            bar = CudaDevice.trust_bar
            res["goal"] = {"what": f"within +-10% >= {bar['within_10pct']:.0%} and Spearman >= {bar['spearman']}",
                           "met": s["within_10pct"] >= bar["within_10pct"] and s["spearman"] >= bar["spearman"]}
        return res

    return run


def step_search(check: Check) -> dict[str, Any]:
    s = check.settings
    table = check.results["lut_b1"]["table"]
    run_dir = run_app(check, "search", "nas.apps.search", search_overrides(s, table))
    export = run_dir / "export"
    report = read_json(export / "report.json", "the export's report.json")
    if report.get("training", {}).get("precision") != s.search_precision:
        raise CheckFailed(f"the search trained with precision {report.get('training')}, not {s.search_precision}")
    losses = logged_losses(run_dir, "train/loss_epoch")
    arch_ms = logged_losses(run_dir, "arch/expected_ms")
    for i, v in enumerate(losses):
        finite(v, f"search train/loss of epoch {i}")
    for v in arch_ms:
        finite(v, "search arch/expected_ms")
    lat = report["latency_ms"]
    res = {"export": str(export), "val_acc": finite(report["val_acc"], "search val_acc"), "train_loss": losses,
           "expected_ms": arch_ms, "predicted_ms": lat["predicted"], "target_ms": lat["target"],
           "measured_ms": finite(lat["measured"], "the export's measured latency") if lat["measured"] is not None
           else None, "search_seconds": report["search_seconds"], "training": report["training"],
           "arch": report["arch"]}
    res.update(compare_with_onnx(export, check))
    return res


def step_retrain(check: Check) -> dict[str, Any]:
    s = check.settings
    run_dir = run_app(check, "retrain", "nas.apps.retrain", retrain_overrides(s, check.results["search"]["export"]))
    report = read_json(run_dir / "retrain_report.json", "retrain_report.json")
    if report.get("training", {}).get("precision") != s.retrain_precision:
        raise CheckFailed(f"the retrain trained with precision {report.get('training')}, not {s.retrain_precision}")
    losses = logged_losses(run_dir, "train/loss_epoch")
    for i, v in enumerate(losses):
        finite(v, f"retrain train/loss of epoch {i}")
    classes = int(report["data"]["classes"])
    res = {"model": str(run_dir / "model"), "test_acc": finite(report["test_acc"], "retrain test_acc"),
           "val_acc": report["val_acc"], "train_loss": losses, "seconds": report["seconds"],
           "training": report["training"]}
    if not check.dry_run:
        res["goal"] = {"what": f"test accuracy above chance ({1 / classes:.0%}) + 5 points",
                       "met": report["test_acc"] >= 1 / classes + 0.05}
    res.update(compare_with_onnx(run_dir / "model", check))
    return res


#: the other strategies, trained briefly in this process: (strategy, space, its options for a short run)
STRATEGY_RUNS = (
    ("ddpnas", SPACE, ["strategy.module.steps=1", "strategy.module.warmup_epochs=0", "strategy.epochs=2"]),
    ("slimmable", "mbv2_tiny_slim", ["strategy.epochs=1", "strategy.targets=[0.6]", "export.calib_batches=2",
                                     "strategy.module.eval_batches=2"]),
    ("evolution", "mbv2_tiny_slim", ["strategy.epochs=1", "strategy.targets=[0.6]", "strategy.module.queries=4",
                                     "strategy.module.calib_batches=2", "strategy.module.eval_batches=2"]),
)


def compose_search(overrides: list[str]):
    """``nas-search``'s config with ``overrides``, as the app composes it (outside a Hydra run)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("search", overrides=overrides)


def step_strategies(check: Check) -> dict[str, Any]:
    """DDPNAS, slimmable and evolution: a short training each with the search's precision on the
    check's accelerator (the analytic FLOPs model as the cost: this is about the training numerics),
    then their exports derived, extracted and run."""
    s = check.settings
    quiet_lightning()
    res: dict[str, Any] = {}
    for name, space_name, extra in STRATEGY_RUNS:
        cfg = compose_search(strategy_overrides(s, name, space_name, extra))
        torch.manual_seed(0)
        space = make_space(cfg.space)
        datamodule = make_datamodule(cfg)
        cost = make_cost_model(cfg, space, make_device(cfg.hardware), datamodule.num_classes)
        targets = cost.resolve_targets(list(cfg.strategy.targets))
        supernet = Supernet(space, datamodule.num_classes, weight_sharing=str(cfg.supernet.weight_sharing))
        module = instantiate(cfg.strategy.module)(supernet=supernet, cost_model=cost, targets=targets)
        trainer = pl.Trainer(max_epochs=int(cfg.strategy.epochs), accelerator=s.accelerator, devices=1,
                             precision=s.search_precision, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(module, train_dataloaders=module.train_loaders(datamodule),
                    val_dataloaders=datamodule.val_dataloader())
        loss = finite(trainer.callback_metrics.get("train/loss"), f"{name}'s training loss")
        module.supernet.cpu()
        dtypes = sorted({str(p.dtype) for p in module.supernet.parameters()})
        if dtypes != ["torch.float32"]:
            raise CheckFailed(f"{name}: the supernet's parameters are {dtypes} after training, not float32")
        archs = module.derive_all()
        x = next(iter(datamodule.val_dataloader()))[0][:4]
        exports = {}
        for label, arch in archs.items():
            with torch.no_grad():
                out = module.supernet.extract(arch).eval()(x)
            if not torch.isfinite(out).all():
                raise CheckFailed(f"{name}: the export {label} gives non-finite outputs")
            exports[label] = round(finite(cost.predict(arch), f"{name} {label}'s cost"), 3)  # MFLOPs
        res[name] = {"space": space_name, "train_loss": loss, "exports_mflops": exports,
                     "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan")))}
    return res


def quiet_lightning() -> None:
    """Lightning's INFO lines (accelerators, AMP, tips) are not the check's output."""
    import logging

    for logger in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(logger).setLevel(logging.WARNING)


#: the weight-step configurations measured (nas.bench.memory names)
STEP_CONFIGS = ("one/weight/elastic", "full/weight/elastic", "standalone/sampled")


def step_weight(check: Check) -> dict[str, Any]:
    s = check.settings
    space = SearchSpace.from_dict(OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "space" / f"{SPACE}.yaml"),
                                                         resolve=True))
    classes = 10
    path = space.sample(classes, random.Random(0))
    batch = bm.make_batch(space, classes, s.step_batch, 0)
    device = "cpu" if check.dry_run else "cuda"
    amp = torch.bfloat16 if s.retrain_precision == "bf16-mixed" else torch.float16
    res: dict[str, Any] = {"batch_size": s.step_batch, "path": dict(path.choices), "amp_dtype": str(amp)}
    for precision in ("fp32", "amp"):
        def autocast(on: bool = precision == "amp"):
            return torch.autocast(device, dtype=amp, enabled=on)

        rows = {}
        for name in STEP_CONFIGS:
            rows[name] = measure_config(name, space, classes, path, batch, device, autocast, s)
        res[precision] = rows
        if not check.dry_run:
            times = time_configs({n: build(n, space, classes, path, batch, device, autocast)
                                  for n in STEP_CONFIGS}, s.step_warmup, s.step_rounds)
            for n, t in times.items():
                rows[n].update(t)
            one, ref = rows["one/weight/elastic"], rows["standalone/sampled"]
            # memory: one measured step each; time: the median of the per-round ratios (neighbouring steps
            # see the same GPU state), as nas-bench suite=memory reports them
            mem, tim = one["total_mb"] / ref["total_mb"], one["ratio_to_standalone"]
            res[f"{precision}_one_vs_standalone"] = {"memory": round(mem, 3), "time": round(tim, 3)}
    if not check.dry_run:
        worst = max(max(res[f"{p}_one_vs_standalone"].values()) for p in ("fp32", "amp"))
        res["goal"] = {"what": f"one-gate weight step <= {ONE_GATE_GOAL}x the standalone net's memory and time",
                       "met": worst <= ONE_GATE_GOAL}
    return res


def build(name, space, classes, path, batch, device, autocast):
    step, _ = bm.build_step(name, space, classes, path, batch, device=device)

    def run() -> float:
        with autocast():
            return step()

    return run


def measure_config(name, space, classes, path, batch, device, autocast, s: Settings) -> dict[str, Any]:
    """Peak CUDA memory of one step of ``name`` (a dry run: two steps, their losses must be finite)."""
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    step = build(name, space, classes, path, batch, device, autocast)
    losses = [step() for _ in range(max(2, s.step_warmup))]
    for v in losses:
        finite(v, f"the loss of a {name} step")
    out: dict[str, Any] = {"loss": losses[-1]}
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out.update(total_mb=(peak - base) / 2**20, step_mb=(peak - before) / 2**20)
    del step
    return out


def time_configs(steps: dict[str, Callable[[], float]], warmup: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median GPU time of a step of each configuration between two CUDA events, the configurations in
    a freshly shuffled order every round; ``ratio`` medians are per-round ratios to the standalone net."""
    rng = random.Random(0)
    names = list(steps)
    for n in names:
        for _ in range(warmup):
            steps[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            steps[n]()
            end.record()
            end.synchronize()
            times[n].append(start.elapsed_time(end))
    ref = times["standalone/sampled"]
    return {n: {"median_ms": statistics.median(ts), "ratio_to_standalone": statistics.median(
        a / b for a, b in zip(ts, ref))} for n, ts in times.items()}


def steps() -> list[Step]:
    return [
        Step("environment", "torch, CUDA and the GPU; the precisions used below", step_environment,
             "the GPU's name, memory, compute capability and bfloat16 support"),
        Step("lut_b1", f"nas-lut builds and validates the latency table of {SPACE} at batch 1", step_lut(1),
             "the cuda table (CUDA events) at batch 1: within +-10 %, Spearman, bias, test-retest, against the "
             "cuda device's bar"),
        Step("lut_b32", f"nas-lut builds and validates the latency table of {SPACE} at batch 32", step_lut(32),
             "the cuda table at batch 32, as at batch 1"),
        Step("search", "nas-search (ProxylessNAS, texshapes) with mixed precision; export measured, loaded, "
                       "compared with its ONNX", step_search,
             "the search on the GPU with trainer.precision=16-mixed (fp16, loss scaling), 2 loader workers, "
             "pinned memory; the export timed on the cuda device"),
        Step("retrain", "nas-retrain of the export with mixed precision; model loaded, compared with its ONNX",
             step_retrain, "the retrain on the GPU with bf16-mixed (16-mixed without bfloat16 support)"),
        Step("strategies", "DDPNAS, slimmable and evolution: a short training each with mixed precision, exports "
                           "derived and run", step_strategies,
             "DDPNAS, slimmable and evolution trained on the GPU with 16-mixed (fp16, loss scaling)"),
        Step("weight_step", "supernet one-gate / full-mixture weight step vs the standalone net of the same path, "
                            "fp32 and autocast", step_weight,
             f"peak memory (torch.cuda.max_memory_allocated) and median time (CUDA events, shuffled rounds) of "
             f"{', '.join(STEP_CONFIGS)}; goal: one-gate <= {ONE_GATE_GOAL}x the standalone net"),
    ]


# ---------------------------------------------------------------------- summary
def _goal_text(res: dict[str, Any]) -> str:
    g = res.get("goal")
    if not g:
        return "-"
    return f"{'met' if g['met'] else 'NOT met'}: {g['what']}"


def _headline(name: str, res: dict[str, Any]) -> str:
    """The numbers of one step's result, for the markdown table (its plain values for a step of
    another name or shape)."""
    try:
        return _numbers(name, res)
    except (KeyError, TypeError):
        return ", ".join(f"{k} {v}" for k, v in res.items() if isinstance(v, (int, float, str)))


def _numbers(name: str, res: dict[str, Any]) -> str:
    if name == "environment":
        return f"{res.get('device')}, torch {res['torch']} (CUDA {res['cuda_build']})" + (
            f", bf16 {'yes' if res.get('bf16') else 'no'}" if "bf16" in res else "")
    if name.startswith("lut_"):
        rt = res.get("retest_within_10pct")
        return (f"{res['nets']} nets: {100 * res['within_10pct']:.0f}% within +-10%, Spearman {res['spearman']:.3f}, "
                f"bias {res['bias_pct']:+.1f}%"
                + (f", test-retest {100 * rt:.0f}% within +-10%" if rt is not None else ""))
    if name == "search":
        meas = f"{res['measured_ms']:.3f}" if res.get("measured_ms") is not None else "-"
        return (f"{res['training']['precision']}: loss {res['train_loss'][0]:.3f} -> {res['train_loss'][-1]:.3f}, "
                f"val acc {100 * res['val_acc']:.1f}%, latency predicted {res['predicted_ms']:.3f} / measured {meas} "
                f"ms "
                f"(target {res['target_ms']:.3f})")
    if name == "retrain":
        return (f"{res['training']['precision']}: loss {res['train_loss'][0]:.3f} -> {res['train_loss'][-1]:.3f}, "
                f"test acc {100 * res['test_acc']:.1f}%")
    if name == "strategies":
        return "; ".join(f"{n}: loss {r['train_loss']:.3f}, exports " + ", ".join(
            f"{k} {v} MFLOPs" for k, v in r["exports_mflops"].items()) for n, r in res.items())
    if name == "weight_step":
        parts = []
        for p in ("fp32", "amp"):
            r = res.get(f"{p}_one_vs_standalone")
            if r:
                parts.append(f"{p}: one-gate {r['memory']:.2f}x memory, {r['time']:.2f}x time")
        return "; ".join(parts) or "ran on the CPU (losses finite); nothing measured in a dry run"
    return ""


def write_summary(check: Check, status: str, reason: str | None = None) -> tuple[Path, Path]:
    total = time.perf_counter() - check.t0 + (check.install_seconds or 0.0)
    data = {"status": status, "reason": reason, "dry_run": check.dry_run, "seconds": round(total, 1),
            "install_seconds": check.install_seconds, "budget_seconds": BUDGET_SECONDS,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": check.steps, "results": check.results}
    json_path = write_json(check.out / "gpu_check.json", data)
    lines = [f"# hwnas GPU check{' (dry run: CPU, nothing timed)' if check.dry_run else ''}: {status}", ""]
    if reason:
        lines += [f"**{reason}**", ""]
    lines += [f"{total:.0f} s" + (f" including {check.install_seconds:.0f} s of install" if check.install_seconds
                                  else "") + f" (budget {BUDGET_SECONDS:.0f} s); output folder `{check.out}`", "",
              "| step | result | seconds | numbers | goal |", "|---|---|---:|---|---|"]
    for row in check.steps:
        res = check.results.get(row["step"], {})
        numbers = _headline(row["step"], res) if row["status"] == "passed" else row.get("reason", "")
        lines.append(f"| {row['step']} | {row['status']} | {row['seconds']:.0f} | {numbers} | {_goal_text(res)} |")
    if check.dry_run:
        lines += ["", "On a GPU the check would also measure:", ""]
        lines += [f"- {st.name}: {st.on_gpu}" for st in steps() if st.on_gpu]
    md_path = atomic_write_text(check.out / "gpu_check.md", "\n".join(lines) + "\n")
    return json_path, md_path


def run_check(check: Check, plan: list[Step] | None = None, log: Callable[[str], None] = print) -> int:
    """Run the steps in order; the exit status (see the module docstring)."""
    plan = steps() if plan is None else plan
    check.out.mkdir(parents=True, exist_ok=True)
    log(f"hwnas GPU check{' (DRY RUN: CPU, bf16-mixed, tiny sizes, nothing timed)' if check.dry_run else ''}: "
        f"{len(plan)} steps, output in {check.out}")
    for i, step in enumerate(plan, 1):
        log(f"[{i}/{len(plan)}] {step.name}: {step.what}")
        if check.dry_run and step.on_gpu:
            log(f"      on a GPU this measures: {step.on_gpu}")
        t = time.perf_counter()
        try:
            check.results[step.name] = step.run(check)
            row = {"step": step.name, "status": "passed"}
        except CheckFailed as e:
            row = {"step": step.name, "status": "FAILED", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - any crash is this step's failure, said in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            row = {"step": step.name, "status": "FAILED", "reason": f"{type(e).__name__}: {first}"}
        row["seconds"] = round(time.perf_counter() - t, 1)
        check.steps.append(row)
        if row["status"] != "passed":
            reason = f"gpu check FAILED at step {step.name}: {row['reason']}"
            json_path, md_path = write_summary(check, "FAILED", reason)
            log(reason)
            log(f"summary of what passed before: {md_path}")
            return EXIT_FAILED
        res = check.results[step.name]
        log(f"      passed in {row['seconds']:.0f} s: {_headline(step.name, res)}"
            + (f" (goal {_goal_text(res)})" if res.get("goal") else ""))
        write_summary(check, "running")
    total = time.perf_counter() - check.t0 + (check.install_seconds or 0.0)
    unmet = [name for name, res in check.results.items() if res.get("goal") and not res["goal"]["met"]]
    if not check.dry_run and total > BUDGET_SECONDS:
        unmet.append(f"total time {total:.0f} s > {BUDGET_SECONDS:.0f} s")
    status = "passed" if not unmet else "passed, goals NOT met: " + ", ".join(unmet)
    json_path, md_path = write_summary(check, status)
    log(f"gpu check {status}; summary: {md_path} and {json_path}")
    return EXIT_OK if not unmet else EXIT_GOALS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nas.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output folder (default: gpu_check/<date-time>)")
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN") == "1",
                        help="no CUDA: CPU device, bf16-mixed on the CPU, tiny sizes (also GPU_CHECK_DRY_RUN=1)")
    parser.add_argument("--install-seconds", type=float, default=None,
                        help="time the install took (launch/gpu_check.sh passes it): counted in the 8-minute budget")
    args = parser.parse_args(argv)
    out = Path(args.out or f"gpu_check/{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    check = Check(out=out, settings=Settings.make(args.dry_run, bf16), install_seconds=args.install_seconds)
    if args.dry_run:
        torch.set_num_threads(1)
    return run_check(check)


if __name__ == "__main__":
    sys.exit(main())
