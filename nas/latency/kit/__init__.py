"""Device kit: latency tables for hardware hwnas cannot run on.

``export_kit`` writes a folder a user copies to the device::

    kit/
      manifest.json      space (spec + fingerprint), batch size, measuring settings, passes, items
      measure.py         the runner: numpy + onnxruntime only (a copy of nas/kit/measure.py)
      README.md          what to run
      onnx/reference.onnx, onnx/e000.onnx ..., onnx/c000.onnx ..., onnx/v000.onnx ...

Items are every table entry (searchable blocks at their shapes, stem, first block, head), the
calibration subnets (measured in a pass of their own right after the entries: they fit the overhead
model) and the validation subnets (largest, smallest, random; measured in a separate pass, and again
for the test-retest spread). The reference block of the alternation ships as ONNX too.

``import_results`` turns the runner's ``results.json`` into a :class:`~nas.latency.table.LatencyTable` (the
same file format as ``nas-lut`` builds, usable with ``nas-search lut.path=...``) and its validation
report.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from nas.console import item_progress
from nas.errors import UserError
from nas.io import atomic_write_text, export_onnx
from nas.latency.build import table_from_measurements
from nas.latency.devices import reference_module
from nas.latency.items import (
    arch_net,
    calibration_archs,
    describe_reference,
    fixed_keys,
    table_items,
    validation_archs,
)
from nas.latency.measure import (
    DEFAULT_CALIB_NETS,
    DEFAULT_MAX_REPEATS,
    DEFAULT_MAX_SECONDS,
    DEFAULT_REL_CI,
    DEFAULT_WARM_CALLS,
    NET_GROUP,
    clean_fraction,
)
from nas.latency.table import LatencyTable
from nas.latency.validate import validate_measured
from supernets.space import SearchSpace, SpaceError

KIT_FORMAT = "hwnas-device-kit"
KIT_VERSION = 1
RUNNER = Path(__file__).with_name("measure.py")

_README = """# hwnas device kit: {space} ({n_items} ONNX files)

On the device (Python 3.8+, `pip install onnxruntime numpy`), with the machine otherwise idle:

    python measure.py --out results.json          # about {minutes} at the defaults below

Options: `--threads N` (default {threads}), `--repeats`, `--max-repeats`, `--rel-ci`, `--passes table`.
Bring `results.json` back and import it where hwnas is installed:

    nas-lut mode=import results=results.json
    nas-search space={space} hardware=onnxruntime lut.path=<the table it prints>

Batch size {batch} (fixed in the ONNX files), float32. Method: docs/latency.md in hwnas.
"""


def _fingerprint_id(info: Mapping[str, Any]) -> str:
    """Same as :meth:`nas.latency.devices.Device.fingerprint_id`: sha1 of the sorted-key JSON, 12 digits."""
    blob = json.dumps(dict(info), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:12]


def _export(module: torch.nn.Module, input_shape, batch_size: int, path: Path) -> None:
    module = module.eval()
    x = torch.randn((batch_size, *input_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        export_onnx(module, x, str(path))


def export_kit(space: SearchSpace, out: str | Path, *, num_classes: int, batch_size: int = 1, threads: int = 2,
               warmup: int = 10, repeats: int = 50, rel_ci: float | None = DEFAULT_REL_CI,
               max_repeats: int = DEFAULT_MAX_REPEATS, max_seconds: float | None = DEFAULT_MAX_SECONDS,
               warm_calls: int = DEFAULT_WARM_CALLS,
               samples: int = 100, calib_nets: int = DEFAULT_CALIB_NETS,
               seed: int = 0, retest: bool = True, progress: bool = True, log=print) -> Path:
    """Write a device kit for ``space`` into ``out`` (see the module docstring); returns the manifest."""
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        if not (out / "manifest.json").exists():
            raise UserError(f"out={out} exists and is not an hwnas kit; choose an empty or new folder")
        shutil.rmtree(out / "onnx", ignore_errors=True)
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    items: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, torch.nn.Module, tuple[int, ...]]] = []
    for i, (key, v) in enumerate(table_items(space, num_classes).items()):
        name = key
        items[name] = {"file": f"onnx/e{i:03d}.onnx", "input_shape": list(v["input_shape"]), "kind": "entry",
                       "role": v["role"], "fields": v["fields"]}
        todo.append((name, v["module"], v["input_shape"]))
    table_pass = list(items)
    calib_pass = []
    for i, arch in enumerate(calibration_archs(space, num_classes, calib_nets, seed)):
        name = f"calib:{i}"
        net, shape = arch_net(space, arch)
        items[name] = {"file": f"onnx/c{i:03d}.onnx", "input_shape": list(shape), "kind": "calibration",
                       "choices": dict(arch.choices)}
        todo.append((name, net, shape))
        calib_pass.append(name)
    valid_pass = []
    for i, (label, arch) in enumerate(validation_archs(space, num_classes, samples, seed)):
        name = f"valid:{label}"
        net, shape = arch_net(space, arch)
        items[name] = {"file": f"onnx/v{i:03d}.onnx", "input_shape": list(shape), "kind": "validation",
                       "label": label, "choices": dict(arch.choices)}
        todo.append((name, net, shape))
        valid_pass.append(name)
    ref_module, ref_shape = reference_module()
    todo.append(("__reference__", ref_module, ref_shape))

    t0 = time.perf_counter()
    bar = item_progress(unit="files") if progress else None
    with (bar if bar is not None else _Null()) as b:
        task = b.add_task("exporting ONNX", total=len(todo)) if bar is not None else None
        for name, module, shape in todo:
            file = "onnx/reference.onnx" if name == "__reference__" else items[name]["file"]
            _export(module, shape, batch_size, out / file)
            if bar is not None:
                b.advance(task)
    passes: dict[str, list[str]] = {"table": table_pass}
    if calib_pass:
        passes["calibration"] = calib_pass
    if valid_pass:
        passes["validation"] = valid_pass
        if retest:
            passes["retest"] = list(valid_pass)
    manifest = {
        "format": KIT_FORMAT,
        "version": KIT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "space": {"name": space.name, "fingerprint": space.fingerprint, "spec": dict(space.spec_dict)},
        "num_classes": int(num_classes),
        "batch_size": int(batch_size),
        "dtype": "float32",
        "torch": torch.__version__,
        "measure": {"threads": int(threads), "warmup": int(warmup), "repeats": int(repeats),
                    "max_repeats": int(max_repeats), "rel_ci": rel_ci, "seed": int(seed),
                    "max_seconds": max_seconds, "warm_calls": int(warm_calls), "net_group": NET_GROUP},
        "samples": int(samples),
        "reference": {"file": "onnx/reference.onnx", "input_shape": list(ref_shape),
                      **describe_reference()},
        "passes": passes,
        "items": items,
    }
    path = atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    shutil.copyfile(RUNNER, out / "measure.py")
    calls = sum(len(v) for v in passes.values())
    atomic_write_text(out / "README.md", _README.format(
        space=space.name, n_items=len(items) + 1, threads=threads, batch=batch_size,
        minutes=f"{max(1, round(calls * repeats * 0.004 / 60))} min or more"))
    log(f"device kit for {space.name}: {len(items)} items + reference exported to {out} in "
        f"{time.perf_counter() - t0:.0f} s")
    return path


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _read_results(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read kit results {path}: {e}; run `python kit/measure.py --out {path}` "
                        f"on the device first") from None
    if not isinstance(d, dict) or d.get("format") != "hwnas-kit-results":
        raise UserError(f"{path} is not the results.json of an hwnas device kit (written by kit/measure.py)")
    if d.get("version") != 1:
        raise UserError(f"{path} has kit results version {d.get('version')}; this hwnas reads 1")
    if "table" not in d.get("passes", {}):
        raise UserError(f"{path} lacks the 'table' pass; run kit/measure.py without --passes")
    return d


def import_results(results: str | Path) -> tuple[LatencyTable, dict[str, Any] | None]:
    """A latency table (and its validation report, when the kit measured one) from kit results."""
    d = _read_results(Path(results))
    manifest = d["manifest"]
    try:
        space = SearchSpace.from_dict(manifest["space"]["spec"])
    except (SpaceError, KeyError) as e:
        raise UserError(f"kit results {results}: the space in the manifest is unreadable: {e}") from None
    if space.fingerprint != manifest["space"]["fingerprint"]:
        raise UserError(f"kit results {results}: space fingerprint {manifest['space']['fingerprint']} does not "
                        f"match its own spec ({space.fingerprint}); re-export the kit with `nas-lut mode=kit "
                        f"space={space.name} hardware=onnxruntime out=kit/`")
    num_classes = int(manifest["num_classes"])
    items = manifest["items"]
    table_pass = d["passes"]["table"]
    ref = table_pass["reference"]
    ref_ms = float(ref["median_ms"])
    measured = table_pass["items"]
    expected = table_items(space, num_classes)
    missing = [k for k in expected if k not in measured]
    if missing:
        raise UserError(f"kit results {results} lack {len(missing)} table entries (e.g. {missing[0]}); "
                        f"run the whole kit: `python measure.py --out results.json`")
    entries = {}
    for key, v in expected.items():
        r = measured[key]
        entries[key] = {"median_ms": float(r["ratio"]) * ref_ms, "ratio": float(r["ratio"]),
                        "spread": float(r["spread"]), "count": int(r["count"]), "ci": r.get("ci"),
                        "calls": r.get("calls"), "role": v["role"], "fields": v["fields"]}
    fixed_parts = fixed_keys(expected)  # stem, first, head (not the narrower heads of a space with widths)
    calib_items = d["passes"].get("calibration", {}).get("items", {})
    calib_names = [n for n in calib_items if items.get(n, {}).get("kind") == "calibration"]
    calib_archs = [space.make_arch(items[n]["choices"], num_classes) for n in calib_names]
    calib_ms = [float(calib_items[n]["ratio"]) * ref_ms for n in calib_names]
    device = dict(d["device"])
    settings = d.get("settings", {})
    meta = {
        "device": device.get("name", "onnxruntime"),
        "device_fingerprint": _fingerprint_id(device),
        "device_info": device,
        "num_classes": num_classes,
        "batch_size": int(manifest["batch_size"]),
        "reference_ms": ref_ms,
        "reference": {**{k: v for k, v in manifest["reference"].items() if k not in ("file", "input_shape")},
                      **ref},
        "method": {"statistic": "median ratio to the reference (kit/measure.py)", **settings,
                   "clean_fraction": clean_fraction({**table_pass["items"], "__reference__": ref})},
        "built_at": d.get("started_at"),
        "load_avg": d.get("load_avg_start"),
        "build_seconds": table_pass.get("seconds"),
        "source": {"kit_results": str(Path(results).resolve()), "platform": d.get("platform"),
                   "load_avg_start": d.get("load_avg_start"), "load_avg_end": d.get("load_avg_end")},
    }
    table = table_from_measurements(space, entries, fixed_parts, calib_archs, calib_ms, meta)
    report = None
    if "validation" in d["passes"]:
        v_items = d["passes"]["validation"]["items"]
        names = [n for n in v_items if items.get(n, {}).get("kind") == "validation"]
        labelled = [(items[n]["label"], space.make_arch(items[n]["choices"], num_classes)) for n in names]
        meas = [float(v_items[n]["ratio"]) * ref_ms for n in names]
        second = None
        if "retest" in d["passes"]:
            r_items = d["passes"]["retest"]["items"]
            if all(n in r_items for n in names):
                second = [float(r_items[n]["ratio"]) * ref_ms for n in names]
        report = validate_measured(table, labelled, meas, second, samples=int(manifest.get("samples", len(names))),
                                   device=meta["device"], device_fingerprint=meta["device_fingerprint"],
                                   measured_at=d.get("started_at"), source="device kit",
                                   load_avg=d.get("load_avg_end"))
    return table, report
