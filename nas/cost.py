"""Cost models: latency tables measured on a device, and analytic FLOPs / parameter counts.

Every cost model here is additive over the space's layers: a vector of per-candidate costs for every
searchable layer, plus a fixed part (stem, first block, head, classifier, and for latency a calibrated
per-network overhead). That gives

* ``predict(arch)``   the cost of one architecture, and
* ``expected(probs)`` sum_l sum_i p_li cost_li + fixed, differentiable in p (and so in alpha).
"""
from __future__ import annotations

import json
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from supernets.arch import Arch
from supernets.blocks import Head, Stem, make_block, space_timm_net
from supernets.space import ZERO, BlockSpec, SearchSpace

from .errors import UserError

TABLE_VERSION = 1


class CostModel:
    """Additive cost over a space: ``layer_costs[name][i]`` is the cost of candidate i of layer name."""

    kind = "cost"
    unit = ""

    def __init__(self, space: SearchSpace, layer_costs: Mapping[str, list[float]], fixed: float,
                 meta: Mapping[str, Any] | None = None):
        self.space = space
        self.layer_costs = {k: [float(c) for c in v] for k, v in layer_costs.items()}
        self.fixed = float(fixed)
        self.meta = dict(meta or {})
        for layer in space.layers:
            if len(self.layer_costs.get(layer.name, [])) != len(layer.choices):
                raise ValueError(f"cost model lacks costs for layer {layer.name}")
        self._tensors: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def _vec(self, name: str, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.device, like.dtype)
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(self.layer_costs[name], device=like.device, dtype=like.dtype)
        return self._tensors[key]

    def predict(self, arch: Arch) -> float:
        self.space.validate(arch)
        total = self.fixed
        for layer in self.space.layers:
            total += self.layer_costs[layer.name][layer.choices.index(arch.choices[layer.name])]
        return total

    def expected(self, probs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Expected cost under per-layer choice probabilities (differentiable)."""
        total = None
        for layer in self.space.layers:
            p = probs[layer.name]
            term = (p * self._vec(layer.name, p)).sum()
            total = term if total is None else total + term
        return total + self.fixed

    def bounds(self) -> tuple[float, float]:
        """Cost of the cheapest and the most expensive architecture (exact: the model is additive)."""
        lo = self.fixed + sum(min(v) for v in self.layer_costs.values())
        hi = self.fixed + sum(max(v) for v in self.layer_costs.values())
        return lo, hi

    def cheapest(self, num_classes: int) -> Arch:
        return self.space.make_arch(
            {l.name: l.choices[min(range(len(l.choices)), key=self.layer_costs[l.name].__getitem__)]
             for l in self.space.layers}, num_classes)

    def priciest(self, num_classes: int) -> Arch:
        return self.space.make_arch(
            {l.name: l.choices[max(range(len(l.choices)), key=self.layer_costs[l.name].__getitem__)]
             for l in self.space.layers}, num_classes)

    def resolve_target(self, target: float | str | None) -> float | None:
        """A target in this model's unit from ``0 < x <= 1`` (fraction of the most expensive
        architecture), a number ``> 1`` or a string like ``"2.5ms"`` (absolute). Unreachable targets
        are refused with the smallest reachable value."""
        if target is None or target == "" or (isinstance(target, str) and target.lower() == "none"):
            return None
        lo, hi = self.bounds()
        unit = self.unit
        if isinstance(target, str):
            t = target.strip().lower()
            try:
                if unit and t.endswith(unit.lower()):
                    value = float(t[: -len(unit)])
                elif t.endswith("x"):
                    value = float(t[:-1]) * hi
                else:
                    value = float(t)
                    value = value * hi if 0 < value <= 1 else value
            except ValueError:
                raise UserError(f"latency target {target!r} is not a number; give a fraction of the largest "
                                f"subnet (e.g. 0.5) or an absolute value (e.g. '{hi / 2:.3g}{unit}')") from None
        else:
            value = float(target)
            value = value * hi if 0 < value <= 1 else value
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"target {target!r} must be positive")
        if value < lo:
            raise UserError(
                f"target {target!r} = {value:.4g} {unit} is below the smallest reachable {self.kind} of this "
                f"space ({lo:.4g} {unit}, fraction {lo / hi:.3f} of the largest); choose a target >= "
                f"{lo:.4g}{unit} or a fraction >= {lo / hi:.3f}")
        return value

    def summary(self) -> dict[str, Any]:
        lo, hi = self.bounds()
        return {"kind": self.kind, "unit": self.unit, "min": lo, "max": hi, **self.meta}


class FlopsModel(CostModel):
    kind = "flops"
    unit = "MFLOPs"


class ParamsModel(CostModel):
    kind = "params"
    unit = "Mparams"


class LatencyTable(CostModel):
    kind = "latency"
    unit = "ms"

    def __init__(self, space, layer_costs, fixed, meta=None, entries=None):
        super().__init__(space, layer_costs, fixed, meta)
        self.entries: dict[str, dict[str, float]] = dict(entries or {})

    # ------------------------------------------------------------------ file format
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": TABLE_VERSION,
            "space": self.space.name,
            "space_fingerprint": self.space.fingerprint,
            **self.meta,
            "entries": self.entries,
            "layers": self.layer_costs,
            "fixed_ms": self.fixed,
        }

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=False))

    @classmethod
    def load(cls, path: str | os.PathLike, space: SearchSpace, device_fingerprint: str | None = None,
             warn=print) -> "LatencyTable":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read latency table {path}: {e}; rebuild it with "
                            f"`nas-lut space={space.name}`") from None
        if d.get("version") != TABLE_VERSION:
            raise UserError(f"latency table {path} has version {d.get('version')}, this hwnas reads "
                            f"{TABLE_VERSION}; rebuild it with `nas-lut space={space.name}`")
        if d.get("space") != space.name or d.get("space_fingerprint") != space.fingerprint:
            raise UserError(
                f"latency table {path} was built for space {d.get('space')!r} (fingerprint "
                f"{d.get('space_fingerprint')}), not for {space.name!r} ({space.fingerprint}); rebuild it with "
                f"`nas-lut space={space.name} hardware=<device>` or delete the file")
        if device_fingerprint and d.get("device_fingerprint") not in (None, device_fingerprint):
            warn(f"warning: latency table {path} was measured on another device configuration "
                 f"({d.get('device_fingerprint')}, this machine is {device_fingerprint}); predictions may be off")
        meta = {k: v for k, v in d.items() if k not in ("version", "space", "space_fingerprint", "entries",
                                                        "layers", "fixed_ms")}
        return cls(space, d["layers"], d["fixed_ms"], meta, d.get("entries"))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


# ---------------------------------------------------------------------- analytic models
def _fixed_modules(space: SearchSpace, num_classes: int) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Stem, first block and head as modules with their input shapes (C, H, W)."""
    r = space.resolution
    f = space.first
    return {
        f"stem:in{r}x{r}x{space.in_chans}:out{space.stem_chs}": (Stem(space.in_chans, space.stem_chs, space.act),
                                                             (space.in_chans, r, r)),
        f.key(): (make_block(f, space.act), (f.in_chs, f.in_size, f.in_size)),
        f"head:in{space.final_size}x{space.final_size}x{space.last_chs}:f{space.head_chs}:cls{num_classes}": (
            Head(space.last_chs, space.head_chs, num_classes, space.act),
            (space.last_chs, space.final_size, space.final_size)),
    }


def _block_items(space: SearchSpace) -> dict[str, BlockSpec]:
    items: dict[str, BlockSpec] = {}
    for layer in space.layers:
        for op in layer.choices:
            spec = layer.spec(op)
            if spec is not None:
                items.setdefault(spec.key(), spec)
    return items


def count_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (multiply and add counted separately) of one forward at batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    module = module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops())


def _analytic(space: SearchSpace, num_classes: int, measure, cls) -> CostModel:
    costs: dict[str, float] = {}
    fixed = sum(measure(m, shape) for m, shape in _fixed_modules(space, num_classes).values())
    for key, spec in _block_items(space).items():
        costs[key] = measure(make_block(spec, space.act), (spec.in_chs, spec.in_size, spec.in_size))
    layer_costs = {
        layer.name: [0.0 if op == ZERO else costs[layer.spec(op).key()] for op in layer.choices]
        for layer in space.layers
    }
    return cls(space, layer_costs, fixed, {"num_classes": num_classes})


def build_flops_model(space: SearchSpace, num_classes: int) -> FlopsModel:
    return _analytic(space, num_classes, lambda m, s: count_flops(m, s) / 1e6, FlopsModel)


def build_params_model(space: SearchSpace, num_classes: int) -> ParamsModel:
    return _analytic(space, num_classes, lambda m, s: sum(p.numel() for p in m.parameters()) / 1e6, ParamsModel)


# ---------------------------------------------------------------------- latency tables
def build_latency_table(space: SearchSpace, device, num_classes: int, *, calib_nets: int = 10, seed: int = 0,
                        progress: bool = True) -> LatencyTable:
    """Measure every candidate block at its shape, and the fixed parts, on ``device``.

    Each item is timed call by call in alternation with the device's fixed reference block (see
    :mod:`nas.devices`); the table stores the median ms with spread and count. A per-network overhead
    (what a whole net costs beyond the sum of its blocks: Python dispatch, session calls) is then
    calibrated as the median difference between end-to-end measurements of ``calib_nets`` subnets
    (largest, smallest, random) and their block sums, measured in the same alternation.
    """
    t0 = time.perf_counter()
    fixed_items = _fixed_modules(space, num_classes)
    specs = _block_items(space)
    items: dict[str, tuple[nn.Module, tuple[int, ...]]] = dict(fixed_items)
    for key, spec in specs.items():
        items[key] = (make_block(spec, space.act), (spec.in_chs, spec.in_size, spec.in_size))
    res = device.measure(items, progress=progress, desc=f"latency table {space.name} on {device.name}")
    entries = {k: {kk: float(v) for kk, v in res[k].items()} for k in items}
    layer_costs = {
        layer.name: [0.0 if op == ZERO else entries[layer.spec(op).key()]["median_ms"] for op in layer.choices]
        for layer in space.layers
    }
    parts = sum(entries[k]["median_ms"] for k in fixed_items)
    table = LatencyTable(space, layer_costs, parts, {
        "device": device.name,
        "device_fingerprint": device.fingerprint_id(),
        "device_info": device.fingerprint(),
        "num_classes": num_classes,
        "reference_ms": float(res["__reference__"]["median_ms"]),
        "overhead_ms": 0.0,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, entries)
    if calib_nets > 0:
        rng = random.Random(seed)
        archs = [space.largest(num_classes), space.smallest(num_classes)]
        archs += [space.sample(num_classes, rng) for _ in range(max(0, calib_nets - 2))]
        measured = measure_archs(space, archs, device, reference_ms=table.meta["reference_ms"],
                                 progress=progress, desc="calibrating overhead")
        scale, offset = fit_scale_offset([table.predict(a) for a in archs], measured)
        table.layer_costs = {k: [c * scale for c in v] for k, v in table.layer_costs.items()}
        table.fixed = table.fixed * scale + offset
        table.meta.update(scale=scale, overhead_ms=offset, calibration_nets=len(archs))
    table.meta["build_seconds"] = round(time.perf_counter() - t0, 2)
    return table


def fit_scale_offset(predicted: list[float], measured: list[float]) -> tuple[float, float]:
    """Least-squares ``measured ~ scale * predicted + offset``: a whole net runs its blocks back to
    back, so it costs a fraction of the blocks' standalone sum (shared per-call overhead, warm
    caches) plus a per-network constant. Falls back to a pure offset when the fit is degenerate."""
    n = len(predicted)
    mp, mm = sum(predicted) / n, sum(measured) / n
    var = sum((p - mp) ** 2 for p in predicted)
    if n < 2 or var <= 1e-12:
        return 1.0, statistics.median(m - p for p, m in zip(predicted, measured))
    scale = sum((p - mp) * (m - mm) for p, m in zip(predicted, measured)) / var
    if not 0.2 <= scale <= 5.0:  # implausible: keep the sum and fit the constant only
        return 1.0, statistics.median(m - p for p, m in zip(predicted, measured))
    return scale, mm - scale * mp


def measure_archs(space: SearchSpace, archs: list[Arch], device, *, reference_ms: float | None = None,
                  progress: bool = False, desc: str = "measuring subnets") -> list[float]:
    """End-to-end latency (ms) of each architecture's static net, in reference alternation.

    With ``reference_ms`` (a table's reference time) the result is the measured ratio to the
    reference times that value: in the table's own units, immune to the machine's speed drifting
    between the table's pass and this one."""
    items = {}
    for i, a in enumerate(archs):
        net = space_timm_net(space, a, a.num_classes).eval()
        items[f"net{i}"] = (net, (space.in_chans, space.resolution, space.resolution))
    res = device.measure(items, progress=progress, desc=desc)
    if reference_ms is not None:
        return [float(res[f"net{i}"]["ratio"]) * reference_ms for i in range(len(archs))]
    return [float(res[f"net{i}"]["median_ms"]) for i in range(len(archs))]


def table_path(cache_dir: str | os.PathLike, space: SearchSpace, device, num_classes: int) -> Path:
    return (Path(cache_dir).expanduser() / f"{space.name}-{space.fingerprint}"
            / f"{device.name}-{device.fingerprint_id()}-c{num_classes}.json")


def load_or_build_table(space: SearchSpace, device, num_classes: int, cache_dir: str | os.PathLike,
                        *, rebuild: bool = False, progress: bool = True, log=print) -> LatencyTable:
    """The cached table for (space, device, classes), built (with a progress bar) when missing."""
    path = table_path(cache_dir, space, device, num_classes)
    if path.exists() and not rebuild:
        return LatencyTable.load(path, space, device.fingerprint_id(), warn=log)
    log(f"building latency table for space {space.name} on {device.name} -> {path}")
    table = build_latency_table(space, device, num_classes, progress=progress)
    table.save(path)
    log(f"latency table built in {table.meta['build_seconds']:.1f} s: {len(table.entries)} entries, "
        f"scale {table.meta.get('scale', 1.0):.3f}, overhead {table.meta['overhead_ms']:+.3f} ms, range {table.bounds()[0]:.3f}-{table.bounds()[1]:.3f} ms")
    return table
