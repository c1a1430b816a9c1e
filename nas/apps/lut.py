"""``nas-lut``: build, validate, export (device kit) or import a latency lookup table.

    nas-lut space=mbv2_tiny hardware=onnxruntime              # build (progress bar), then validate
    nas-lut mode=validate space=mbv2_tiny hardware=cpu samples=100
    nas-lut mode=kit space=proxyless_mobile hardware=onnxruntime out=kit/
    python measure.py --out results.json                      # on the device, inside the kit: onnxruntime + numpy
    nas-lut mode=import results=results.json                  # -> a table for nas-search lut.path=...

Tables go to the cache nas-search reads (``lut.cache_dir``) unless ``lut.path`` names a file. The
validation report (``lut_validation.json``, ``lut_validation.png``) goes to the run directory, and
its summary into the table file. ``hardware=flops|params`` checks the analytic model instead.

Returns the fraction of validation subnets within +-10 % (for Hydra sweepers).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from nas.apps.common import (
    check_progress,
    console_main,
    make_device,
    make_space,
)
from nas.errors import UserError
from nas.latency.build import build_latency_table, table_path
from nas.latency.kit import export_kit, import_results
from nas.latency.table import LatencyTable
from nas.latency.validate import (
    busy_warning,
    print_report,
    validate_table,
    write_report,
)

MODES = ("build", "validate", "kit", "import")


def _progress(cfg: DictConfig) -> bool:
    return check_progress(cfg.get("progress", "auto")) != "none"


def _run_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001 - called outside a Hydra run
        return Path.cwd()


def _table_file(cfg: DictConfig, space, device, num_classes: int) -> Path:
    if cfg.lut.get("path"):
        return Path(str(cfg.lut.path)).expanduser()
    return table_path(cfg.lut.cache_dir, space, device, num_classes)


def _validate(cfg: DictConfig, table, device, out_dir: Path) -> dict[str, Any]:
    retest = bool(cfg.retest) and device.timed  # a count does not vary
    report = validate_table(table, device, samples=int(cfg.samples), seed=int(cfg.seed), retest=retest,
                            progress=_progress(cfg))
    _finish_report(report, out_dir)
    return report


def _finish_report(report: dict[str, Any], out_dir: Path) -> None:
    print_report(report)
    json_path, png = write_report(report, out_dir)
    print(f"validation report: {json_path}" + (f", plot: {png}" if png else ""))


def run_lut(cfg: DictConfig) -> float:
    mode = str(cfg.mode)
    if mode not in MODES:
        raise UserError(f"unknown mode={mode}; choose one of: {', '.join(MODES)}")
    out_dir = _run_dir()
    if mode == "import":
        return _import(cfg, out_dir)



    space = make_space(cfg.space)
    device = make_device(cfg.hardware)
    torch.set_num_threads(int(device.threads))
    num_classes = int(cfg.num_classes)

    if not device.timed:
        if mode == "kit":
            raise UserError(f"hardware={device.name} is an analytic model: there is nothing to measure on a "
                            f"device; use hardware=onnxruntime for a kit")
        model = device.cost_model(space, num_classes)
        lo, hi = model.bounds()
        print(f"{device.name} model of space {space.name}: {lo:.4g}-{hi:.4g} {model.unit}")
        report = _validate(cfg, model, device, out_dir)
        return float(report["summary"]["within_10pct"])

    if mode == "kit":
        if device.name != "onnxruntime":
            raise UserError(f"a device kit runs ONNX Runtime on the device; use hardware=onnxruntime "
                            f"(its threads and batch_size become the kit's defaults), not hardware={device.name}")
        if not cfg.get("out"):
            raise UserError("mode=kit needs out=<folder> (e.g. out=kit/)")
        m = cfg.measure
        manifest = export_kit(space, str(cfg.out), num_classes=num_classes, batch_size=device.batch_size,
                              threads=device.threads, warmup=device.warmup, repeats=device.repeats,
                              rel_ci=m.get("rel_ci"), max_repeats=int(m.max_repeats),
                              max_seconds=m.get("max_seconds"), warm_calls=int(m.get("warm_calls", 1)),
                              samples=int(cfg.samples),
                              calib_nets=int(m.calib_nets), seed=int(cfg.seed), retest=bool(cfg.retest),
                              progress=_progress(cfg))
        kit = manifest.parent
        print(kit_instructions(kit))
        return 0.0

    path = _table_file(cfg, space, device, num_classes)
    if mode == "build":
        m = cfg.measure
        print(f"building latency table for space {space.name} on {device.name} "
              f"(threads {device.threads}, batch {device.batch_size}) -> {path}")
        table = build_latency_table(space, device, num_classes, calib_nets=int(m.calib_nets), seed=int(cfg.seed),
                                    progress=_progress(cfg), rel_ci=m.get("rel_ci"),
                                    max_repeats=int(m.max_repeats), max_seconds=m.get("max_seconds"),
                                    warm_calls=int(m.get("warm_calls", 1)),
                                    overhead_model=m.get("overhead_model"))
        _print_table(table)
        table.save(path)
        if not cfg.get("validate", True):
            return 0.0
    else:  # validate
        if not path.exists():
            raise UserError(f"no latency table at {path}; build one with `nas-lut space={space.name} "
                            f"hardware={device.name}`" + (" or fix lut.path" if cfg.lut.get("path") else ""))
        table = LatencyTable.load(path, space, device.fingerprint_id(), warn=print)
    report = _validate(cfg, table, device, out_dir)
    table.save(path)
    print(f"table with its validation summary: {path}")
    return float(report["summary"]["within_10pct"])


def kit_instructions(kit: Path) -> str:
    """What to do with a kit, without this machine's paths: the device has its own file system."""
    return (f"kit written to {kit}\nOn the device, inside the copied folder {kit.name}/: "
            f"`python measure.py --out results.json`\nThen here: `nas-lut mode=import results=results.json`")


def _loo_text(loo: Any) -> str:
    """``offset 34.9%, scale_offset 12.1%`` from ``{'offset': 34.859, ...}``."""
    if not isinstance(loo, dict) or not loo:
        return "n/a"
    return ", ".join(f"{k} {float(v):.1f}%" for k, v in loo.items())


def _print_table(table) -> None:
    ov = table.meta["overhead"]
    counts = [e["count"] for e in table.entries.values()]
    cis = [e.get("ci") for e in table.entries.values() if e.get("ci") is not None]
    lo, hi = table.bounds()
    print(f"built in {table.meta['build_seconds']:.1f} s: {len(table.entries)} entries "
          f"(reference {table.meta['reference_ms']:.4f} ms; calls per entry {min(counts)}-{max(counts)}"
          + (f"; median CI +-{100 * sorted(cis)[len(cis) // 2]:.2f}%" if cis else "") + ")")
    print(f"overhead model {ov['model']}: net = {ov['scale']:.3f} x sum(parts) {ov['per_block_ms']:+.4f} ms/block "
          f"{ov['offset_ms']:+.4f} ms; fit on {ov['calibration_nets']} nets, RMSE {ov.get('fit_rmse_pct', 0):.1f}% "
          f"(leave-one-out error per model: {_loo_text(ov.get('loo_rmse_pct'))})")
    print(f"latency range of the space: {lo:.4f}-{hi:.4f} ms")
    method = table.meta.get("method") or {}
    if method.get("clean_fraction") is not None:
        print(f"{100 * method['clean_fraction']:.0f}% of the timed calls ran uninterrupted "
              f"(load average {table.meta.get('load_avg')})")
        busy_warning(method["clean_fraction"])


def _import(cfg: DictConfig, out_dir: Path) -> float:
    if not cfg.get("results"):
        raise UserError("mode=import needs results=<results.json written by kit/measure.py>")
    results = Path(str(cfg.results)).expanduser()
    table, report = import_results(results)
    if cfg.get("out"):
        path = Path(str(cfg.out)).expanduser()
    else:
        path = results.with_name(f"{table.space.name}-{table.meta['device']}-{table.meta['device_fingerprint']}"
                                 f"-c{table.meta['num_classes']}.lut.json")
    _print_table(table)
    if report is not None:
        _finish_report(report, out_dir)
    table.save(path)
    print(f"imported latency table: {path}\nuse it with: nas-search space={table.space.name} "
          f"hardware={table.meta['device']} lut.path={path}")
    return float(report["summary"]["within_10pct"]) if report else 0.0


def _lut_and_time(cfg: DictConfig) -> float:
    t0 = time.perf_counter()
    value = run_lut(cfg)
    print(f"nas-lut {cfg.mode}: done in {time.perf_counter() - t0:.0f} s")
    return value


main = console_main(_lut_and_time, "lut")


if __name__ == "__main__":
    main()
