"""``nas-bench``: the numbers that say where hwnas stands, each as a ratio measured in one run.

    nas-bench suite=memory            # peak memory and step time: gate one / two / full vs a standalone net
    nas-bench suite=lut               # latency-table accuracy on every device available here
    nas-bench suite=search            # Fashion-MNIST: strategies vs uniform, random and random search, 3 targets
    nas-bench suite=slimmable         # slimmable training vs each width alone; width search vs uniform widths
    nas-bench suite=tabular tabular.path=<table.json>   # the evolution engine vs random search, true accuracies
    nas-bench suite=all out=bench/    # everything: markdown on stdout, bench.json, bench.md, PNG plots

Each suite lives in its own module (:mod:`nas.bench.memory`, :mod:`nas.bench.search`,
:mod:`nas.bench.slimmable`; the LUT suite
calls :func:`nas.latency.validate.validate_table`). Results of a suite replace that suite's entry in
``<out>/bench.json``, so suites run one at a time into the same folder add up. Returns the search
suite's mean paired advantage of the strategies over random search at equal cost (test accuracy points),
else the memory suite's one-gate weight-step time ratio, else the mean fraction of LUT validation
nets within +-10 %.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from nas.apps.common import (
    CONF_DIR,
    check_precision,
    console_main,
    instantiate,
    make_cost_model,
    make_device,
    make_space,
    uses_cuda,
)
from nas.bench import memory as bm
from nas.bench import search as bs
from nas.bench import slimmable as bsl
from nas.bench import speed as bspeed
from nas.bench import tabular as tb
from nas.errors import UserError, check_skip_prob
from nas.io import atomic_write_text, json_default
from nas.latency.build import build_latency_table, table_path
from nas.latency.devices import _processor_name
from nas.latency.table import LatencyTable
from nas.latency.validate import plot_report, summary_line, validate_table
from nas.strategies.engine import evolve

#: ``suite=all`` runs these (tabular only with tabular.path); ``slimmable`` (long) runs only when named
SUITES = ("memory", "lut", "search", "tabular")
EXTRA_SUITES = ("slimmable", "speed")
RESULTS_FILE = "bench.json"
MARKDOWN_FILE = "bench.md"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _suites(value: Any) -> list[str]:
    names = [s.strip() for s in str(value).split(",") if s.strip()]
    if names == ["all"]:
        return list(SUITES)
    bad = [s for s in names if s not in (*SUITES, *EXTRA_SUITES)]
    if bad or not names:
        raise UserError(f"suite={value!r} unknown; choose one of: {', '.join((*SUITES, *EXTRA_SUITES))}, all "
                        f"(or several, comma-separated: suite=memory,lut)")
    return names


def _machine() -> dict[str, Any]:
    return {"processor": _processor_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg_start": [round(x, 2) for x in os.getloadavg()]}


def _atomic_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=json_default))


# ---------------------------------------------------------------------- the three suites
def run_memory(cfg: DictConfig, out: Path) -> tuple[dict[str, Any], str]:
    space = make_space(cfg.space)
    m = cfg.memory
    for key, allowed in (("gates", bm.GATES), ("phases", bm.PHASES), ("sharings", bm.SHARINGS)):
        bad = [v for v in m[key] if v not in allowed]
        if bad or not m[key]:
            raise UserError(f"memory.{key}={list(m[key])}: choose from {', '.join(allowed)}")
    res = bm.run_memory_suite(space, num_classes=int(m.num_classes), batch_size=int(m.batch_size),
                              gates=list(m.gates), phases=list(m.phases), sharings=list(m.sharings),
                              repeats=int(m.repeats), warmup=int(m.warmup), steps=int(m.steps),
                              time_warmup=int(m.time_warmup), time_rounds=int(m.time_rounds),
                              threads=int(m.threads), parallel=int(m.parallel), path_seed=int(m.path_seed),
                              seed=int(cfg.seed), log=_log)
    bm.plot(res, out / "memory.png")
    res["plot"] = "memory.png"
    return res, bm.markdown(res)


def run_lut(cfg: DictConfig, out: Path) -> tuple[dict[str, Any], str]:
    """Build (or load from the cache) each available device's table and validate it end to end."""
    space = make_space(cfg.space)
    c = cfg.lut
    num_classes = int(c.num_classes)
    devices: dict[str, Any] = {}
    lines = [f"### latency tables ({space.name}; {int(c.samples)} random subnets + largest + smallest per device)",
             "", "| device | entries | within 5% | within 10% | Spearman | RMSE % | bias % | worst % | retest median diff % "
             "| build s | validation s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in c.devices:
        hw_file = Path(CONF_DIR) / "hardware" / f"{name}.yaml"
        if not hw_file.exists():
            raise UserError(f"lut.devices: no hardware config {hw_file}; available: "
                            f"{', '.join(p.stem for p in sorted((Path(CONF_DIR) / 'hardware').glob('*.yaml')))}")
        try:
            hw = OmegaConf.merge(OmegaConf.load(hw_file), c.get("device_overrides") or {})
            device = make_device(hw)
        except UserError as e:
            devices[name] = {"available": False, "reason": str(e)}
            _log(f"lut: {name} not available here: {e}")
            lines.append(f"| {name} | not available here | | | | | | | | | |")
            continue
        if not device.timed:
            devices[name] = {"available": False, "reason": "analytic model (nothing is timed)"}
            continue
        torch.set_num_threads(int(device.threads))
        path = table_path(c.cache_dir, space, device, num_classes)
        t0 = time.perf_counter()
        table = None
        if path.exists() and not c.rebuild:
            try:
                table = LatencyTable.load(path, space, device.fingerprint_id(), warn=_log)
                _log(f"lut: {name}: cached table {path}")
            except UserError as e:  # an old format: rebuild
                _log(f"lut: {name}: {e}; rebuilding")
        if table is None:
            _log(f"lut: {name}: building the table -> {path}")
            mm = c.measure
            table = build_latency_table(space, device, num_classes, calib_nets=int(mm.calib_nets), seed=int(cfg.seed),
                                        progress=False, rel_ci=mm.get("rel_ci"), max_repeats=int(mm.max_repeats),
                                        max_seconds=mm.get("max_seconds"))
            table.save(path)
        build_s = time.perf_counter() - t0
        _log(f"lut: {name}: validating on {int(c.samples) + 2} subnets")
        report = validate_table(table, device, samples=int(c.samples), seed=int(cfg.seed), retest=bool(c.retest))
        table.save(path)
        s = report["summary"]
        png = out / f"lut_{name}.png"
        try:
            plot_report(report, png)
        except Exception as e:  # noqa: BLE001 - a plot never costs the numbers
            _log(f"warning: could not draw {png}: {e}")
        devices[name] = {"available": True, "table": str(path), "entries": len(table.entries),
                         "build_or_load_seconds": round(build_s, 1), "summary": s, "plot": png.name,
                         "nets": report["nets"]}
        rt = s.get("retest", {}).get("median_abs_pct")
        lines.append(f"| {name} | {len(table.entries)} | {100 * s['within_5pct']:.0f}% | {100 * s['within_10pct']:.0f}% | "
                     f"{s['spearman']:.3f} | {s['rmse_pct']:.1f} | {s['bias_pct']:+.1f} | {s['max_abs_pct']:.1f} | "
                     f"{'-' if rt is None else f'{rt:.1f}'} | {build_s:.0f} | {s['seconds']:.0f} |")
        _log(f"lut: {name}: {summary_line(s)}")
    lines.append("")
    lines.append(f"load avg at the end: {[round(x, 2) for x in os.getloadavg()]}; tables from the cache are reused "
                 f"(lut.rebuild=true measures them again)")
    return {"space": space.name, "devices": devices, "samples": int(c.samples)}, "\n".join(lines)


def run_search(cfg: DictConfig, out: Path) -> tuple[dict[str, Any], str]:
    """The search-quality suite (:mod:`nas.bench.search`) on ``data`` (Fashion-MNIST by default)."""
    s = cfg.search
    if s.get("budgets") is not None:
        raise UserError("search.budgets was renamed: the suite takes its latency targets as strategies do, "
                        f"search.targets={list(s.budgets)}")
    if not s.targets or len(list(s.targets)) < 1:
        raise UserError("search.targets is empty; give 2-3 fractions of the largest subnet's latency, e.g. "
                        "search.targets=[0.45,0.6,0.8]")
    seeds = list(s.seeds)
    if len(seeds) < 2:
        raise UserError(f"search.seeds={seeds}: paired intervals need at least 2 seeds, e.g. search.seeds=[0,1,2]")
    check_skip_prob("search.random_search.skip_prob", (s.get("random_search") or {}).get("skip_prob"))
    space = make_space(cfg.space)
    if not any(all(op in layer.choices for layer in space.layers) for op in space.ops):
        raise UserError(f"suite=search compares with the uniformly scaled net (one op in every layer), and no op of "
                        f"space={space.name} is a choice of every layer; use a space whose layers share an op, e.g. "
                        f"space=mbv2_tiny")
    if space.has_widths:
        raise UserError(f"suite=search does not handle width decisions yet (its uniform and random baselines draw "
                        f"ops only); space={space.name} has widths: use an op-only space such as space=mbv2_tiny, "
                        f"or suite=slimmable for widths")
    device = make_device(cfg.hardware)
    threads = int(s.get("threads") or 1)
    torch.set_num_threads(threads)
    accelerator = str(s.get("accelerator") or "cpu")
    precision = check_precision(s.get("precision") or "32-true", accelerator)
    datamodule = instantiate(cfg.data)
    datamodule.pin_memory = uses_cuda(accelerator)
    datamodule.prepare_data()
    datamodule.setup()
    search_dm = None
    search_size = s.get("search_train_size")
    if search_size is not None:
        if isinstance(search_size, bool) or not isinstance(search_size, int) or search_size < 20:
            raise UserError(f"search.search_train_size={search_size!r} must be an integer >= 20 (images the searches "
                            f"use), or null (the searches use the whole data.train_size)")
        if "train_size" not in cfg.data:
            raise UserError(f"search.search_train_size needs a data module with a train_size option; data="
                            f"{cfg.data.get('name', '?')} has none: set search.search_train_size=null")
        search_dm = instantiate(OmegaConf.merge(cfg.data, {"train_size": int(search_size)}))
        search_dm.pin_memory = datamodule.pin_memory
        search_dm.prepare_data()
        search_dm.setup()
    cost_model = make_cost_model(cfg, space, device, datamodule.num_classes, log=_log)
    if cost_model.kind != "latency":
        raise UserError(f"suite=search compares measured latencies; hardware={device.name} is an analytic model. "
                        f"Use hardware=onnxruntime or hardware=cpu")
    budgets = cost_model.resolve_targets(list(s.targets))  # an unreachable target stops here, before any training
    strategies = OmegaConf.to_container(s.strategies, resolve=True) if s.strategies else {}
    bs.check_strategies(CONF_DIR, strategies, space=space, num_classes=datamodule.num_classes, cost_model=cost_model,
                        budgets=budgets, weight_sharing=str(cfg.supernet.weight_sharing))
    container = lambda key: OmegaConf.to_container(s[key], resolve=True) if s.get(key) else None  # noqa: E731
    res = bs.run_search_suite(
        space=space, datamodule=datamodule, device=device, cost_model=cost_model, conf_dir=CONF_DIR,
        targets=list(s.targets), k=int(s.k), band=float(s.band), epochs=int(s.epochs), seeds=seeds,
        lr=float(s.lr), label_smoothing=float(s.label_smoothing), strategies=strategies,
        random_search=container("random_search"), disc=container("discrimination"), ranking=container("ranking"),
        weight_sharing=str(cfg.supernet.weight_sharing), seed=int(cfg.seed), measure=container("measure"),
        jobs=int(s.get("jobs") or 1), threads=threads, accelerator=accelerator, precision=precision,
        search_datamodule=search_dm,
        retrain_cache=(out / str(s.retrain_cache)) if s.get("retrain_cache") else None, log=_log)
    res["preset"] = str(s.get("preset", "none"))
    if res.get("entries"):
        bs.plot(res, out / "search_pareto.png")
        res["plot"] = "search_pareto.png"
    return res, bs.markdown(res)


def run_slimmable(cfg: DictConfig, out: Path) -> tuple[dict[str, Any], str]:
    """Slimmable training vs each width alone, and the width search vs uniform widths (``slimmable:``)."""
    opts, overrides = bsl.options(OmegaConf.to_container(cfg.slimmable, resolve=True))
    res = bsl.run({**opts, "out": str(out)}, overrides)
    return res, (out / "slimmable_bench.md").read_text()


def run_tabular(cfg: DictConfig, out: Path) -> tuple[dict[str, Any], str]:
    """The evolution engine against a tabular benchmark's true accuracies (no torch, no supernet)."""
    t = cfg.tabular
    if not t.get("path"):
        if str(cfg.suite) == "all":
            _log("tabular: skipped (tabular.path is not set)")
            return {"skipped": "tabular.path is not set"}, "### tabular: skipped (tabular.path is not set)"
        raise UserError("suite=tabular needs a table: tabular.path=<json> (keys one character per decision, values "
                        "with mean_acc and flops), e.g. NAS-Bench-Macro's nas-bench-macro_cifar10.json")
    seeds = t.seeds
    seeds = list(range(int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]
    engine = OmegaConf.to_container(t.engine, resolve=True) or {}
    allowed = {"method", "population", "sample", "parents", "mutation_prob", "crossover_prob", "constraint",
               "max_tries"}
    bad = sorted(set(engine) - allowed)
    if bad or not seeds or int(t.queries) < 1:
        raise UserError(f"tabular: unknown engine keys {bad}; allowed: {', '.join(sorted(allowed))}" if bad else
                        "tabular.seeds and tabular.queries must be >= 1")
    table = tb.Table.load(t.path)
    try:  # a bad engine setting stops here, in one line, before the runs
        evolve(table.decisions, table.score_of, table.cost_of, max(table.cost.values()), queries=1, **engine)
    except ValueError as e:
        raise UserError(f"tabular.engine: {e}") from None
    pred = OmegaConf.to_container(t.get("predictor") or {}, resolve=True) or {}
    bad = sorted(set(pred) - {"enabled", "kind", "queries", "fit", "rounds", "search_queries"})
    if bad:
        raise UserError(f"tabular.predictor: unknown keys {bad}; allowed: enabled, kind, queries, fit, rounds, "
                        f"search_queries")
    res = tb.run_tabular(table, [float(p) for p in t.percentiles], seeds, int(t.queries), list(t.checkpoints),
                         engine, log=_log, predictor=pred if pred.get("enabled", False) else None)
    quality = t.get("predictor_quality")
    if quality and quality.get("kinds"):
        q_seeds = quality.seeds
        q_seeds = list(range(int(q_seeds))) if isinstance(q_seeds, int) else [int(s) for s in q_seeds]
        res["predictor_quality"] = tb.predictor_quality(table, list(quality.kinds), [int(n) for n in quality.fits],
                                                        int(quality.held_out), q_seeds)
        for kind, row in res["predictor_quality"]["kinds"].items():
            _log(f"tabular: predictor {kind}: Kendall tau on {quality.held_out} held-out archs "
                 + ", ".join(f"N={n}: {v['median']:.3f}" for n, v in row.items()))
    res["path"] = str(t.path)
    res["verdict"] = tb.verdict(res, float(t.goal))
    return res, tb.markdown(res)


def run_speed(cfg: DictConfig, out: Path) -> tuple[dict[str, Any], str]:
    """Samples/s of the training step under each speed option (fp32, bf16, channels_last, compile)."""
    sp = cfg.speed
    res = bspeed.run_speed_suite(make_space(cfg.space), num_classes=int(sp.num_classes), batch_size=int(sp.batch_size),
                                 threads=int(sp.threads), options=list(sp.options), nets=list(sp.nets),
                                 warmup=int(sp.warmup), rounds=int(sp.rounds), seed=int(cfg.seed), log=_log)
    return res, bspeed.markdown(res)


RUNNERS: dict[str, Callable[[DictConfig, Path], tuple[dict[str, Any], str]]] = {
    "memory": run_memory, "lut": run_lut, "search": run_search, "slimmable": run_slimmable, "tabular": run_tabular,
    "speed": run_speed}


def _metric(results: dict[str, Any]) -> float:
    search = results.get("search")
    if search and search.get("verdict"):
        pts = [d["vs"]["random_search"]["diff"] for v in search["verdict"].values() for d in v["strategies"].values()
               if "random_search" in d.get("vs", {})]
        if pts:
            return float(sum(pts) / len(pts))
    mem = results.get("memory")
    if mem:
        one = next((r for r in mem["rows"] if r["config"].startswith("one/weight/")), None)
        if one:
            return float(one["time_vs_sampled"])
    tab = results.get("tabular")
    if tab and tab.get("verdict"):  # the engine's median regret, mean over the budgets (lower is better)
        return float(sum(v["engine"] for v in tab["verdict"].values()) / len(tab["verdict"]))
    lut = results.get("lut")
    if lut:
        vals = [d["summary"]["within_10pct"] for d in lut["devices"].values() if d.get("available")]
        if vals:
            return float(sum(vals) / len(vals))
    return 0.0


def run_bench(cfg: DictConfig) -> float:
    suites = _suites(cfg.suite)
    out = Path(str(cfg.out)).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    try:
        results = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        results = {}
    command = "nas-bench " + " ".join(sys.argv[1:])
    sections = []
    t_all = time.perf_counter()
    for name in suites:
        _log(f"suite {name}: start (load avg {[round(x, 2) for x in os.getloadavg()]})")
        t0 = time.perf_counter()
        res, md = RUNNERS[name](cfg, out)
        res.update(command=command, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                   wall_seconds=round(time.perf_counter() - t0, 1), machine=_machine(),
                   load_avg_end=[round(x, 2) for x in os.getloadavg()])
        results[name] = res
        results["markdown_" + name] = md
        _atomic_json(path, results)  # after every suite: a later crash keeps the numbers
        _log(f"suite {name}: done in {res['wall_seconds'] / 60:.1f} min")
        sections.append(md)
        print(md + "\n", flush=True)
    md_all = "\n\n".join(results[f"markdown_{n}"] for n in (*SUITES, *EXTRA_SUITES) if f"markdown_{n}" in results)

    atomic_write_text(out / MARKDOWN_FILE, f"<!-- {command} -->\n\n{md_all}\n")
    _log(f"nas-bench: {', '.join(suites)} in {(time.perf_counter() - t_all) / 60:.1f} min -> {path}, "
         f"{out / MARKDOWN_FILE} and plots in {out}")
    return _metric(results)


main = console_main(run_bench, "bench")


if __name__ == "__main__":
    main()
