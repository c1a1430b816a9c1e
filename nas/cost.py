"""Cost models: latency tables measured on a device, and analytic FLOPs / parameter counts.

Every cost model here is additive over the space's layers: a vector of per-candidate costs for every
searchable layer, plus a fixed part (stem, first block, head, classifier, and for latency a calibrated
per-network overhead). That gives

* ``predict(arch)``   the cost of one architecture, and
* ``expected(probs)`` sum_l sum_i p_li cost_li + fixed, differentiable in p (and so in alpha).

Latency tables (file format version 2, JSON)
    ``entries`` maps a key naming every field that changes a block's cost (:func:`entry_key`: block
    type, input H x W x C, output channels, kernel, expand, stride, skip, and any further field of
    :class:`~supernets.space.BlockSpec`) to ``{median_ms, ratio, spread, count, ci, role, fields}``.
    ``fixed_parts`` names the entries of the stem, the fixed first block and the head (+ classifier).
    ``overhead`` is the per-device calibration that turns standalone block times into whole-network
    time: ``net_ms = scale * (sum of its parts' ms) + per_block_ms * (number of searchable blocks)
    + offset_ms``, fitted on whole subnets measured in a pass of their own right after the entries. ``layers`` and
    ``fixed_ms`` are the resulting additive model (derived; recomputed from the entries on load).
    The file also holds the space's name and fingerprint (a table for another space is refused), the
    device fingerprint (a table from another device configuration is loaded with a warning), the
    measurement method, and the ``validation`` summary written by ``nas-lut`` (see
    :mod:`nas.lut_validate`), which every search copies into its report.

How latency is measured: see :mod:`nas.devices` and docs/latency.md (warm calls, adaptive repeats,
preempted calls left out). All times are expressed in "table milliseconds": a median ratio to a
fixed reference block timed in alternation, times the reference's median time in the pass that
built the table, so that tables, calibration and later measurements (:func:`measure_archs` with
``reference_ms``) share one unit whatever the machine's speed state was in each pass.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from supernets.arch import Arch
from supernets.blocks import Head, Stem, make_block, space_timm_net
from supernets.space import ZERO, BlockSpec, SearchSpace

from .errors import UserError

#: Version of the latency-table file format written by :meth:`LatencyTable.save`.
TABLE_VERSION = 2
TABLE_FORMAT = "hwnas-latency-table"

#: ``hardware=`` names served by an analytic model instead of a timed device.
ANALYTIC_NAMES: tuple[str, ...] = ("flops", "params")

#: Defaults of the latency measurement (overridable per call and in conf/lut.yaml).
DEFAULT_CALIB_NETS = 24
DEFAULT_REL_CI = 0.01
DEFAULT_MAX_REPEATS = 1000
DEFAULT_MAX_SECONDS = 50.0
DEFAULT_WARM_CALLS = 1


class LatencyTableWarning(UserWarning):
    """A latency table was measured on another device configuration than this machine's."""


class CostModel:
    """Additive cost over a space: ``layer_costs[name][i]`` is the cost of candidate i of layer name.

    Spaces with widths: a layer's cost also depends on its input and output channels, which are the
    width choices of its stage and (for a stage's first layer) of the stage before. ``width_costs``
    then holds ``{layer: {(op, in_chs, out_chs): cost}}`` and ``head_delta`` ``{last width: cost of the
    head at that width minus at the widest}``; ``layer_costs`` / ``fixed`` are the costs at the widest
    widths (what :meth:`expected` over op probabilities uses). :meth:`predict` and :meth:`bounds` are
    exact over widths (bounds by dynamic programming along the chain of stages).
    """

    kind = "cost"
    unit = ""

    def __init__(self, space: SearchSpace, layer_costs: Mapping[str, list[float]], fixed: float,
                 meta: Mapping[str, Any] | None = None,
                 width_costs: Mapping[str, Mapping[tuple[str, int, int], float]] | None = None,
                 head_delta: Mapping[int, float] | None = None):
        self.space = space
        self.layer_costs = {k: [float(c) for c in v] for k, v in layer_costs.items()}
        self.fixed = float(fixed)
        self.meta = dict(meta or {})
        for layer in space.layers:
            if len(self.layer_costs.get(layer.name, [])) != len(layer.choices):
                raise ValueError(f"cost model lacks costs for layer {layer.name}")
        self.width_costs = ({k: {tuple(kk): float(vv) for kk, vv in v.items()} for k, v in width_costs.items()}
                            if width_costs is not None else None)
        self.head_delta = {int(k): float(v) for k, v in (head_delta or {}).items()}
        if space.has_widths and self.width_costs is None:
            raise ValueError(f"space {space.name!r} has widths: the cost model needs costs per width")
        self._tensors: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def layer_cost(self, layer, op: str, in_chs: int | None = None, out_chs: int | None = None) -> float:
        """Cost of ``op`` in ``layer`` at the given channels (default: the widest)."""
        if op == ZERO:
            return 0.0
        if self.width_costs is None or in_chs is None:
            return self.layer_costs[layer.name][layer.choices.index(op)]
        return self.width_costs[layer.name][(op, int(in_chs), int(out_chs))]

    def _width_extreme(self, pick) -> tuple[float, dict[str, str]]:
        """Cheapest (``pick=min``) or priciest (``max``) architecture over ops and widths: dynamic
        programming over the stages (a stage's cost depends on its width and the one before it)."""
        from supernets.space import width_choice, width_decision

        sp = self.space
        by_stage: dict[int, list] = {}
        for layer in sp.layers:
            by_stage.setdefault(layer.stage, []).append(layer)

        def stage_cost(si: int, cin: int, cout: int) -> tuple[float, dict[str, str]]:
            total, ops = 0.0, {}
            for layer in by_stage[si]:
                i = cin if layer.index == 0 else cout
                op = pick(layer.choices, key=lambda o: self.layer_cost(layer, o, i, cout))
                ops[layer.name] = op
                total += self.layer_cost(layer, op, i, cout)
            return total, ops

        # best[w] = (cost up to and including this stage with output width w, choices)
        best: dict[int, tuple[float, dict[str, str]]] = {sp.first.out_chs: (0.0, {})}
        for si, ws in enumerate(sp.stage_widths, start=1):
            nxt = {}
            for w in ws:
                options = []
                for wp, (c, ch) in best.items():
                    sc, ops = stage_cost(si, wp, w)
                    options.append((c + sc, {**ch, **ops, width_decision(si): width_choice(w)}))
                nxt[w] = pick(options, key=lambda t: t[0])
            best = nxt
        final = [(c + self.head_delta.get(w, 0.0), ch) for w, (c, ch) in best.items()]
        c, ch = pick(final, key=lambda t: t[0])
        return self.fixed + c, ch

    def _vec(self, name: str, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.device, like.dtype)
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(self.layer_costs[name], device=like.device, dtype=like.dtype)
        return self._tensors[key]

    def predict(self, arch: Arch) -> float:
        self.space.validate(arch)
        total = self.fixed
        if self.width_costs is not None:
            total += self.head_delta.get(self.space.last_width(arch), 0.0)
            for layer, (cin, cout) in zip(self.space.layers, self.space.layer_chs(arch)):
                total += self.layer_cost(layer, arch.choices[layer.name], cin, cout)
            return total
        for layer in self.space.layers:
            total += self.layer_costs[layer.name][layer.choices.index(arch.choices[layer.name])]
        return total

    def expected(self, probs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Expected cost under independent per-decision choice probabilities (differentiable).

        With width decisions in ``probs`` (``s{i}.width``) the expectation is exact over widths too: a
        stage's first layer costs ``sum p(op) p(in width) p(out width) c(op, in, out)`` (its input is
        the previous stage's width), its other layers ``sum p(op) p(w) c(op, w, w)``, and the head
        adds ``sum p(last width) head_delta``. Without them, every stage is at its widest."""
        if self.width_costs is not None and any(d in probs for d in self.space.width_decisions()):
            return self._expected_over_widths(probs)
        total = None
        for layer in self.space.layers:
            p = probs[layer.name]
            term = (p * self._vec(layer.name, p)).sum()
            total = term if total is None else total + term
        return total + self.fixed

    def _width_tensor(self, layer, like: torch.Tensor) -> torch.Tensor:
        """Costs of ``layer`` as ``[op, in width, out width]`` (first layer of a stage) or ``[op, width]``."""
        key = (f"w:{layer.name}", like.device, like.dtype)
        if key not in self._tensors:
            sp = self.space
            outs = sp.stage_widths[layer.stage - 1]
            if layer.index == 0:
                ins = sp.stage_widths[layer.stage - 2] if layer.stage > 1 else (sp.first.out_chs,)
                vals = [[[self.layer_cost(layer, op, i, o) for o in outs] for i in ins] for op in layer.choices]
            else:
                vals = [[self.layer_cost(layer, op, w, w) for w in outs] for op in layer.choices]
            self._tensors[key] = torch.tensor(vals, device=like.device, dtype=like.dtype)
        return self._tensors[key]

    def _expected_over_widths(self, probs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        sp = self.space
        like = next(iter(probs.values()))
        widest = {d: torch.nn.functional.one_hot(torch.tensor(len(ws) - 1), len(ws)).to(like)
                  for d, ws in zip(sp.width_decisions(), sp.stage_widths)}
        pw = [probs.get(d, widest[d]) for d in sp.width_decisions()]
        last = torch.tensor([self.head_delta.get(w, 0.0) for w in sp.stage_widths[-1]], device=like.device,
                            dtype=like.dtype)
        total = self.fixed + (pw[-1] * last).sum()
        for layer in sp.layers:
            c = self._width_tensor(layer, like)
            p_op, p_out = probs[layer.name], pw[layer.stage - 1]
            if layer.index == 0:
                p_in = pw[layer.stage - 2] if layer.stage > 1 else torch.ones(1, device=like.device, dtype=like.dtype)
                total = total + torch.einsum("k,kio,i,o->", p_op, c, p_in, p_out)
            else:
                total = total + torch.einsum("k,kw,w->", p_op, c, p_out)
        return total

    def bounds(self) -> tuple[float, float]:
        """Cost of the cheapest and the most expensive architecture (exact: the model is additive)."""
        if self.width_costs is not None:
            return self._width_extreme(min)[0], self._width_extreme(max)[0]
        lo = self.fixed + sum(min(v) for v in self.layer_costs.values())
        hi = self.fixed + sum(max(v) for v in self.layer_costs.values())
        return lo, hi

    def cheapest(self, num_classes: int) -> Arch:
        if self.width_costs is not None:
            return self.space.make_arch(self._width_extreme(min)[1], num_classes)
        return self.space.make_arch(
            {l.name: l.choices[min(range(len(l.choices)), key=self.layer_costs[l.name].__getitem__)]
             for l in self.space.layers}, num_classes)

    def priciest(self, num_classes: int) -> Arch:
        if self.width_costs is not None:
            return self.space.make_arch(self._width_extreme(max)[1], num_classes)
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




# ---------------------------------------------------------------------- keys and items
_KEY_FIELDS = ("type", "in_chs", "out_chs", "kernel", "expand", "stride", "in_size")


def entry_key(spec: BlockSpec) -> str:
    """The table key of a block: every field that changes its cost.

    ``ir:in8x8x16:out24:k5:e6:s2:skip0`` (type, input H x W x C, output channels, kernel, expand,
    stride, skip). Any further field a :class:`BlockSpec` may carry (e.g. a width multiplier or an
    activation) is appended as ``:<name>=<value>``, so two specs that differ anywhere never collide.
    """
    key = spec.key()
    for f in dataclasses.fields(spec):
        if f.name not in _KEY_FIELDS:
            key += f":{f.name}={getattr(spec, f.name)}"
    return key


def entry_fields(spec: BlockSpec) -> dict[str, Any]:
    """The cost-changing fields of a block, spelled out (stored beside each table entry)."""
    d: dict[str, Any] = {
        "block": spec.type, "in_h": spec.in_size, "in_w": spec.in_size, "in_c": spec.in_chs,
        "out_h": spec.out_size, "out_w": spec.out_size, "out_c": spec.out_chs, "kernel": spec.kernel,
        "expand": spec.expand, "stride": spec.stride, "skip": bool(spec.skip),
    }
    for f in dataclasses.fields(spec):
        if f.name not in _KEY_FIELDS:
            d[f.name] = getattr(spec, f.name)
    return d


def _fixed_parts(space: SearchSpace, num_classes: int) -> dict[str, tuple[str, nn.Module, tuple[int, ...], dict]]:
    """``{role: (key, module, input_shape, fields)}`` for the stem, the fixed first block and the head."""
    r, f = space.resolution, space.first
    fs = space.final_size
    return {
        "stem": (f"stem:in{r}x{r}x{space.in_chans}:out{space.stem_chs}",
                 Stem(space.in_chans, space.stem_chs, space.act), (space.in_chans, r, r),
                 {"block": "stem", "in_h": r, "in_w": r, "in_c": space.in_chans, "out_c": space.stem_chs,
                  "kernel": 3, "stride": 2}),
        "first": (entry_key(f), make_block(f, space.act), (f.in_chs, f.in_size, f.in_size), entry_fields(f)),
        "head": (f"head:in{fs}x{fs}x{space.last_chs}:f{space.head_chs}:cls{num_classes}",
                 Head(space.last_chs, space.head_chs, num_classes, space.act), (space.last_chs, fs, fs),
                 {"block": "head", "in_h": fs, "in_w": fs, "in_c": space.last_chs, "features": space.head_chs,
                  "classes": num_classes}),
    }


def head_key(space: SearchSpace, in_chs: int, num_classes: int) -> str:
    fs = space.final_size
    return f"head:in{fs}x{fs}x{in_chs}:f{space.head_chs}:cls{num_classes}"


def _head_width_parts(space: SearchSpace, num_classes: int) -> dict[int, tuple[str, nn.Module, tuple[int, ...], dict]]:
    """The head at every width of the last stage (spaces with widths; ``{}`` otherwise)."""
    if not space.has_widths:
        return {}
    fs = space.final_size
    return {w: (head_key(space, w, num_classes), Head(w, space.head_chs, num_classes, space.act), (w, fs, fs),
                {"block": "head", "in_h": fs, "in_w": fs, "in_c": w, "features": space.head_chs,
                 "classes": num_classes})
            for w in space.stage_widths[-1]}


def _fixed_modules(space: SearchSpace, num_classes: int) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Stem, first block and head as ``{key: (module, input shape (C, H, W))}``."""
    return {key: (module, shape) for key, module, shape, _ in _fixed_parts(space, num_classes).values()}


def _block_items(space: SearchSpace) -> dict[str, BlockSpec]:
    """Every distinct searchable block of the space, by :func:`entry_key`."""
    items: dict[str, BlockSpec] = {}
    for layer in space.layers:
        for cin, cout in layer.width_pairs():  # one pair (the layer's channels) in a space without widths
            for op in layer.choices:
                spec = layer.spec(op, cin, cout)
                if spec is not None:
                    items.setdefault(entry_key(spec), spec)
    return items


def table_items(space: SearchSpace, num_classes: int) -> dict[str, dict[str, Any]]:
    """Everything a latency table measures: ``{key: {module, input_shape, role, fields}}``.

    ``role`` is ``stem``, ``first`` or ``head`` for the fixed parts, ``head_width`` for the head at the
    narrower widths of the last stage (spaces with widths), and ``block`` for searchable blocks (at
    every width pair of their layer).
    """
    items: dict[str, dict[str, Any]] = {}
    for role, (key, module, shape, fields) in _fixed_parts(space, num_classes).items():
        items[key] = {"module": module, "input_shape": tuple(shape), "role": role, "fields": fields}
    for key, module, shape, fields in _head_width_parts(space, num_classes).values():
        items.setdefault(key, {"module": module, "input_shape": tuple(shape), "role": "head_width", "fields": fields})
    for key, spec in _block_items(space).items():
        items.setdefault(key, {"module": make_block(spec, space.act),
                               "input_shape": (spec.in_chs, spec.in_size, spec.in_size),
                               "role": "block", "fields": entry_fields(spec)})
    return items


def arch_net(space: SearchSpace, arch: Arch) -> tuple[nn.Module, tuple[int, ...]]:
    """The static (timm) net of ``arch`` in eval mode, and its input shape (C, H, W)."""
    net = space_timm_net(space, arch, arch.num_classes).eval()
    return net, (space.in_chans, space.resolution, space.resolution)


def calibration_archs(space: SearchSpace, num_classes: int, n: int, seed: int = 0) -> list[Arch]:
    """Largest, smallest and ``n - 2`` random subnets (seeded; a stream apart from validation's).

    Half of the random ones are uniform over each layer's choices (like the validation nets); the
    other half skip layers (``zero``) with a probability that sweeps from 0 to 1, so that the
    overhead fit also sees the sparse, fast nets a search under a tight target ends up with.
    """
    if n <= 0:
        return []
    rng = random.Random(f"hwnas-calibration-{seed}")
    archs = [space.largest(num_classes), space.smallest(num_classes)][:n]
    rest = n - len(archs)
    sparse = rest // 2
    for i in range(sparse):
        p_zero = (i + 0.5) / sparse
        choices = {}
        for layer in space.layers:
            ops = [c for c in layer.choices if c != ZERO]
            choices[layer.name] = ZERO if ZERO in layer.choices and rng.random() < p_zero else rng.choice(ops)
        for name in space.width_decisions():  # spaces with widths only (no draws otherwise)
            choices[name] = rng.choice(space.decisions()[name])
        archs.append(space.make_arch(choices, num_classes))
    archs += [space.sample(num_classes, rng) for _ in range(rest - sparse)]
    return archs


def validation_archs(space: SearchSpace, num_classes: int, samples: int, seed: int = 0) -> list[tuple[str, Arch]]:
    """``[(label, arch)]``: the largest, the smallest and ``samples`` random subnets (seeded, and drawn
    from a stream independent of :func:`calibration_archs`)."""
    rng = random.Random(f"hwnas-validation-{seed}")
    out = [("largest", space.largest(num_classes)), ("smallest", space.smallest(num_classes))]
    out += [(f"random{i}", space.sample(num_classes, rng)) for i in range(samples)]
    return out


def describe_reference() -> dict[str, Any]:
    """What the reference of every measurement is (stored in tables and kit manifests)."""
    return {"kind": "block", "module": "nas.devices.reference_module (conv3x3 16->32->16 + BN + ReLU6 on "
                                       "16x16x16)"}


# ---------------------------------------------------------------------- overhead model
def arch_features(space: SearchSpace, arch: Arch, entry_ms: Mapping[str, float],
                  fixed_keys: Sequence[str]) -> tuple[float, int]:
    """``(sum of the ms of the net's parts, number of searchable blocks)`` of ``arch``."""
    if space.has_widths:  # the head at the arch's last width instead of the widest
        widest = head_key(space, space.last_chs, arch.num_classes)
        fixed_keys = [head_key(space, space.last_width(arch), arch.num_classes) if k == widest else k
                      for k in fixed_keys]
    total = sum(entry_ms[k] for k in fixed_keys)
    blocks = 0
    for stage in space.block_specs(arch)[1:]:
        for spec in stage:
            total += entry_ms[entry_key(spec)]
            blocks += 1
    return total, blocks


OVERHEAD_MODELS = ("offset", "scale_offset", "per_block")


def _fit(model: str, sums: np.ndarray, blocks: np.ndarray, measured: np.ndarray) -> dict[str, float] | None:
    """Least squares in relative error (rows weighted by 1/measured) of one overhead model."""
    w = 1.0 / measured
    if model == "offset":
        offset = float(np.median(measured - sums))
        return {"scale": 1.0, "per_block_ms": 0.0, "offset_ms": offset}
    cols = [sums, np.ones_like(sums)] if model == "scale_offset" else [sums, blocks, np.ones_like(sums)]
    a = np.stack(cols, axis=1) * w[:, None]
    if np.linalg.matrix_rank(a) < a.shape[1]:
        return None
    coef, *_ = np.linalg.lstsq(a, measured * w, rcond=None)
    scale = float(coef[0])
    if not 0.2 <= scale <= 5.0:  # implausible: a whole net runs the same work as its parts
        return None
    if model == "scale_offset":
        return {"scale": scale, "per_block_ms": 0.0, "offset_ms": float(coef[1])}
    return {"scale": scale, "per_block_ms": float(coef[1]), "offset_ms": float(coef[2])}


def _apply(fit: Mapping[str, float], sums, blocks):
    return fit["scale"] * sums + fit["per_block_ms"] * blocks + fit["offset_ms"]


def fit_overhead(sums: Sequence[float], blocks: Sequence[int], measured: Sequence[float]) -> dict[str, Any]:
    """Fit the per-device overhead model ``net = scale * sum + per_block_ms * blocks + offset_ms``.

    Three nested models are tried: ``offset`` (scale 1, no per-block term), ``scale_offset`` and
    ``per_block`` (a fixed cost per block call that a standalone measurement counts and a whole net
    does not, e.g. one ONNX Runtime ``session.run`` per block). Each is scored by its leave-one-out
    relative RMSE over the calibration nets; a richer model must beat the simpler one by 5 % of that
    error to be chosen. Returns the chosen coefficients, ``model``, ``loo_rmse_pct`` per model and
    ``fit_rmse_pct`` (in-sample).
    """
    s, b, m = (np.asarray(v, dtype=np.float64) for v in (sums, blocks, measured))
    n = len(m)
    if n == 0:
        return {"model": "none", "scale": 1.0, "per_block_ms": 0.0, "offset_ms": 0.0, "calibration_nets": 0}
    loo: dict[str, float] = {}
    for model in OVERHEAD_MODELS:
        need = {"offset": 1, "scale_offset": 3, "per_block": 5}[model]
        if n < need or _fit(model, s, b, m) is None:
            continue
        errs = []
        for i in range(n):
            keep = np.arange(n) != i
            f = _fit(model, s[keep], b[keep], m[keep]) if n > 1 else _fit(model, s, b, m)
            if f is None:
                break
            errs.append((_apply(f, s[i], b[i]) - m[i]) / m[i])
        else:
            loo[model] = float(100.0 * math.sqrt(float(np.mean(np.square(errs)))))
    chosen = "offset"
    for model in OVERHEAD_MODELS[1:]:
        if model in loo and loo[model] < 0.95 * loo[chosen]:
            chosen = model
    fit = _fit(chosen, s, b, m)
    pred = _apply(fit, s, b)
    return {"model": chosen, **fit, "calibration_nets": n,
            "fit_rmse_pct": float(100.0 * math.sqrt(float(np.mean(np.square((pred - m) / m))))),
            "loo_rmse_pct": {k: round(v, 3) for k, v in loo.items()}}


def fit_scale_offset(predicted: list[float], measured: list[float]) -> tuple[float, float]:
    """Least-squares ``measured ~ scale * predicted + offset`` (kept for callers of the first format)."""
    f = _fit("scale_offset", np.asarray(predicted, float), np.zeros(len(predicted)), np.asarray(measured, float))
    if f is None or len(predicted) < 2:
        return 1.0, statistics.median(m - p for p, m in zip(predicted, measured))
    return f["scale"], f["offset_ms"]


# ---------------------------------------------------------------------- the table
_STRUCTURAL = ("version", "format", "space", "space_fingerprint", "entries", "fixed_parts", "overhead",
               "layers", "fixed_ms")


def _rebuild_cmd(space_name: str, device: str | None) -> str:
    return f"nas-lut space={space_name} hardware={device or '<device>'}"


class LatencyTable(CostModel):
    """Measured latency (ms) of every candidate on one device, as an additive cost model.

    Build one with :func:`build_latency_table` (or ``nas-lut``), or from entries with
    :meth:`from_entries`. ``entries`` holds the measured blocks (see the module docstring); the
    additive ``layer_costs`` / ``fixed`` follow from them and the ``overhead`` calibration.
    """

    kind = "latency"
    unit = "ms"

    def __init__(self, space, layer_costs, fixed, meta=None, entries=None, width_costs=None, head_delta=None):
        super().__init__(space, layer_costs, fixed, meta, width_costs, head_delta)
        self.entries: dict[str, dict[str, Any]] = dict(entries or {})

    @classmethod
    def from_entries(cls, space: SearchSpace, entries: Mapping[str, Mapping[str, Any]],
                     fixed_parts: Mapping[str, str], overhead: Mapping[str, Any] | None = None,
                     meta: Mapping[str, Any] | None = None) -> "LatencyTable":
        """The additive model from measured entries and an overhead calibration.

        A candidate costs ``scale * median_ms + per_block_ms``, ``zero`` costs 0, and the fixed
        part is ``scale * (stem + first + head) + offset_ms``.
        """
        ov = {"model": "none", "scale": 1.0, "per_block_ms": 0.0, "offset_ms": 0.0, **dict(overhead or {})}
        scale, per_block, offset = float(ov["scale"]), float(ov["per_block_ms"]), float(ov["offset_ms"])
        missing = [k for k in fixed_parts.values() if k not in entries]
        layer_costs: dict[str, list[float]] = {}
        for layer in space.layers:
            costs = []
            for op in layer.choices:
                spec = layer.spec(op)
                if spec is None:
                    costs.append(0.0)
                    continue
                key = entry_key(spec)
                if key not in entries:
                    missing.append(key)
                    costs.append(0.0)
                    continue
                costs.append(scale * float(entries[key]["median_ms"]) + per_block)
            layer_costs[layer.name] = costs
        width_costs, head_delta = None, None
        if space.has_widths:
            width_costs = {}
            for layer in space.layers:
                wc = {}
                for cin, cout in layer.width_pairs():
                    for op in layer.choices:
                        spec = layer.spec(op, cin, cout)
                        if spec is None:
                            continue
                        key = entry_key(spec)
                        if key not in entries:
                            missing.append(key)
                            continue
                        wc[(op, cin, cout)] = scale * float(entries[key]["median_ms"]) + per_block
                width_costs[layer.name] = wc
            num_classes = int((meta or {}).get("num_classes") or 0)
            widest = fixed_parts.get("head")
            head_delta = {}
            for w in space.stage_widths[-1]:
                key = head_key(space, w, num_classes) if num_classes else None
                if key is None or key not in entries or widest not in entries:
                    missing.append(key or f"head at width {w} (the table's meta lacks num_classes)")
                    continue
                head_delta[w] = scale * (float(entries[key]["median_ms"]) - float(entries[widest]["median_ms"]))
        if missing:
            raise UserError(f"latency table lacks {len(missing)} entries of space {space.name!r} (e.g. "
                            f"{missing[0]}); rebuild it with `{_rebuild_cmd(space.name, (meta or {}).get('device'))}`")
        fixed = scale * sum(float(entries[k]["median_ms"]) for k in fixed_parts.values()) + offset
        m = dict(meta or {})
        m.update(fixed_parts=dict(fixed_parts), overhead=ov, scale=scale, overhead_ms=offset,
                 per_block_ms=per_block)
        return cls(space, layer_costs, fixed, m, {k: dict(v) for k, v in entries.items()}, width_costs, head_delta)

    def with_overhead(self, overhead: Mapping[str, Any]) -> "LatencyTable":
        """The same entries under another overhead calibration."""
        meta = {k: v for k, v in self.meta.items() if k not in ("overhead", "scale", "overhead_ms", "per_block_ms")}
        return LatencyTable.from_entries(self.space, self.entries, self.meta["fixed_parts"], overhead, meta)

    def block_sum(self, arch: Arch) -> tuple[float, int]:
        """``(sum of the standalone ms of the net's parts, number of searchable blocks)``."""
        ms = {k: float(v["median_ms"]) for k, v in self.entries.items()}
        return arch_features(self.space, arch, ms, list(self.meta["fixed_parts"].values()))

    # ------------------------------------------------------------------ file format
    def to_dict(self) -> dict[str, Any]:
        meta = {k: v for k, v in self.meta.items() if k not in _STRUCTURAL}
        d: dict[str, Any] = {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "space": self.space.name,
            "space_fingerprint": self.space.fingerprint,
            **meta,
        }
        if "fixed_parts" in self.meta:
            d["fixed_parts"] = self.meta["fixed_parts"]
        if "overhead" in self.meta:
            d["overhead"] = self.meta["overhead"]
        d.update(entries=self.entries, layers=self.layer_costs, fixed_ms=self.fixed)
        return d

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=False, default=_json_default))

    @classmethod
    def load(cls, path: str | os.PathLike, space: SearchSpace, device_fingerprint: str | None = None,
             warn: Callable[[str], Any] | None = None) -> "LatencyTable":
        """Read a table for ``space``.

        Refuses (:class:`UserError` naming the ``nas-lut`` command to rebuild) a file that is not a
        table, has another format version, or was built for another space or another version of it
        (space fingerprint). Warns (``warn(message)``; default: a :class:`LatencyTableWarning`) when
        ``device_fingerprint`` differs from the table's.
        """
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read latency table {path}: {e}; rebuild it with "
                            f"`{_rebuild_cmd(space.name, None)}`") from None
        if not isinstance(d, dict):
            raise UserError(f"{path} is not a latency table; rebuild it with `{_rebuild_cmd(space.name, None)}`")
        device = d.get("device")
        cmd = _rebuild_cmd(space.name, device)
        if d.get("version") != TABLE_VERSION:
            raise UserError(f"latency table {path} has format version {d.get('version')}, this hwnas reads "
                            f"{TABLE_VERSION}; rebuild it with `{cmd}`")
        if d.get("space") != space.name or d.get("space_fingerprint") != space.fingerprint:
            raise UserError(
                f"latency table {path} was built for space {d.get('space')!r} (fingerprint "
                f"{d.get('space_fingerprint')}), not for {space.name!r} (fingerprint {space.fingerprint}); "
                f"rebuild it with `{cmd}` (or point lut.path at a table of this space)")
        if device_fingerprint and d.get("device_fingerprint") not in (None, device_fingerprint):
            msg = (f"latency table {path} was measured on another device configuration "
                   f"({d.get('device_fingerprint')}: {_describe_device(d.get('device_info'))}); this machine "
                   f"is {device_fingerprint}; its predictions are for that device. Rebuild with `{cmd}` to "
                   f"measure this one")
            if warn is None:
                warnings.warn(msg, LatencyTableWarning, stacklevel=2)
            else:
                warn(f"warning: {msg}")
        meta = {k: v for k, v in d.items() if k not in _STRUCTURAL}
        entries = d.get("entries") or {}
        if "fixed_parts" in d and "overhead" in d:
            return cls.from_entries(space, entries, d["fixed_parts"], d["overhead"], meta)
        try:
            return cls(space, d["layers"], d["fixed_ms"], meta, entries)
        except (KeyError, ValueError):
            raise UserError(f"latency table {path} does not cover space {space.name!r}; rebuild it with "
                            f"`{cmd}`") from None


def _describe_device(info: Any) -> str:
    if not isinstance(info, Mapping):
        return "unknown"
    keys = ("name", "processor", "threads", "batch_size", "dtype", "onnxruntime", "torch")
    return ", ".join(f"{k}={info[k]}" for k in keys if k in info)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


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
def count_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (multiply and add counted separately) of one forward at batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    module = module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops())


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _analytic(space: SearchSpace, num_classes: int, measure, cls) -> CostModel:
    costs: dict[str, float] = {}
    fixed = sum(measure(m, shape) for m, shape in _fixed_modules(space, num_classes).values())
    for key, spec in _block_items(space).items():
        costs[key] = measure(make_block(spec, space.act), (spec.in_chs, spec.in_size, spec.in_size))
    layer_costs = {
        layer.name: [0.0 if op == ZERO else costs[entry_key(layer.spec(op))] for op in layer.choices]
        for layer in space.layers
    }
    width_costs, head_delta = None, None
    if space.has_widths:
        width_costs = {layer.name: {(op, i, o): costs[entry_key(layer.spec(op, i, o))]
                                    for i, o in layer.width_pairs() for op in layer.choices if op != ZERO}
                       for layer in space.layers}
        heads = {w: measure(m, shape) for w, (_, m, shape, _) in _head_width_parts(space, num_classes).items()}
        head_delta = {w: c - heads[space.last_chs] for w, c in heads.items()}
    return cls(space, layer_costs, fixed, {"num_classes": num_classes, "device": cls.kind}, width_costs, head_delta)


def build_flops_model(space: SearchSpace, num_classes: int) -> FlopsModel:
    """MFLOPs per candidate (convolutions and the classifier; multiply and add counted separately)."""
    return _analytic(space, num_classes, lambda m, s: count_flops(m, s) / 1e6, FlopsModel)


def build_params_model(space: SearchSpace, num_classes: int) -> ParamsModel:
    """Millions of parameters per candidate (weights and BatchNorm affine parameters)."""
    return _analytic(space, num_classes, lambda m, s: count_params(m) / 1e6, ParamsModel)


class AnalyticDevice:
    """``hardware=flops`` / ``hardware=params``: an exact count instead of a timed device.

    It has the parts of a device an app touches (``name``, ``batch_size``, ``threads``,
    ``fingerprint()``, ``fingerprint_id()``); :meth:`cost_model` builds the additive model and
    :func:`measure_archs` counts whole nets (which equals the model's prediction: both are exact).
    """

    def __init__(self, name: str, threads: int | None = None, batch_size: int = 1, **kw: Any) -> None:
        if name not in ANALYTIC_NAMES:
            raise UserError(f"unknown analytic cost model {name!r}; choose one of: {', '.join(ANALYTIC_NAMES)}")
        unknown = sorted(k for k in kw if not k.startswith("_"))
        if unknown:
            raise UserError(f"unknown option(s) {', '.join(unknown)} for hardware '{name}'; allowed: threads")
        self.name = name
        self.threads = int(threads) if threads else torch.get_num_threads()
        self.batch_size = int(batch_size)

    def __repr__(self) -> str:
        return f"AnalyticDevice(name={self.name!r})"

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "analytic": True}

    def fingerprint_id(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:12]

    def count(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        if self.name == "flops":
            return count_flops(module, input_shape) / 1e6
        return count_params(module) / 1e6

    def cost_model(self, space: SearchSpace, num_classes: int) -> CostModel:
        if self.name == "flops":
            return build_flops_model(space, num_classes)
        return build_params_model(space, num_classes)


# ---------------------------------------------------------------------- measuring
def _measure(device, items: Mapping[str, tuple[nn.Module, tuple[int, ...]]], *, progress: bool, desc: str,
             rel_ci: float | None, max_repeats: int | None, max_seconds: float | None = None,
             warm_calls: int = 0) -> dict[str, dict[str, float]]:
    kw: dict[str, Any] = {} if rel_ci is None else {"rel_ci": rel_ci, "max_repeats": max_repeats}
    if max_seconds is not None:
        kw["max_seconds"] = max_seconds
    if warm_calls:
        kw["warm_calls"] = int(warm_calls)
    return device.measure(items, progress=progress, desc=desc, **kw)


def build_latency_table(space: SearchSpace, device, num_classes: int, *, calib_nets: int = DEFAULT_CALIB_NETS,
                        seed: int = 0, progress: bool = True, rel_ci: float | None = DEFAULT_REL_CI,
                        max_repeats: int | None = DEFAULT_MAX_REPEATS,
                        max_seconds: float | None = DEFAULT_MAX_SECONDS, warm_calls: int = DEFAULT_WARM_CALLS,
                        overhead_model: str | None = None) -> LatencyTable:
    """Measure every candidate block at its shape and the fixed parts on ``device`` (one pass), then
    ``calib_nets`` whole subnets (a second pass, in the same units), and calibrate the overhead model.

    Every item is timed call by call in alternation with the fixed reference block (see
    :mod:`nas.devices`); rounds visit the items in a shuffled order. The nets are converted with the
    first pass's reference time, so both passes share the table's unit. With ``rel_ci`` the rounds continue for an item
    until the 95 % confidence interval of its median ratio is within ``+-rel_ci`` (at most
    ``max_repeats`` calls, and no pass longer than ``max_seconds``). Each timed call of an item
    follows ``warm_calls`` untimed ones, so that it runs warm as in a deployed loop whatever else
    the rotation holds (blocks here, whole nets in validation). Entries store the median in
    table ms, the spread and the count. The
    calibration nets (largest, smallest, random) then fit :func:`fit_overhead` (or the given
    ``overhead_model``).
    """
    t0 = time.perf_counter()
    items = table_items(space, num_classes)
    archs = calibration_archs(space, num_classes, calib_nets, seed)
    to_measure = {k: (v["module"], v["input_shape"]) for k, v in items.items()}
    res = _measure(device, to_measure, progress=progress, desc=f"latency table {space.name} on {device.name}",
                   rel_ci=rel_ci, max_repeats=max_repeats, max_seconds=max_seconds, warm_calls=warm_calls)
    ref = res["__reference__"]
    entries = {k: {**{kk: float(vv) for kk, vv in res[k].items()}, "role": v["role"], "fields": v["fields"]}
               for k, v in items.items()}
    for e in entries.values():
        for kk in ("count", "calls", "clean"):
            if kk in e:
                e[kk] = int(e[kk])
    # The calibration nets get a pass of their own: whole nets in rotation with whole nets, as in
    # validation and in a search's export. Measured among the blocks, they came out 4-7 % faster
    # than the same kind of nets measured among nets, and the whole table with them.
    details: list[dict[str, Any]] = []
    calib = measure_archs(space, archs, device, reference_ms=float(ref["median_ms"]), progress=progress,
                          desc="calibrating the overhead on whole subnets", rel_ci=rel_ci, max_repeats=max_repeats,
                          max_seconds=max_seconds, warm_calls=warm_calls, details=details) if archs else []
    meta = {
        "device": device.name,
        "device_fingerprint": device.fingerprint_id(),
        "device_info": device.fingerprint(),
        "num_classes": num_classes,
        "batch_size": device.batch_size,
        "reference_ms": float(ref["median_ms"]),
        "reference": {**describe_reference(), **{k: float(v) for k, v in ref.items()}},
        "method": {**measurement_method(device, rel_ci, max_repeats, max_seconds, warm_calls),
                   "clean_fraction": clean_fraction({**res, **{f"calib:{i}": d for i, d in enumerate(details)}})},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_avg": _load_avg(),
    }
    table = table_from_measurements(space, entries, _fixed_keys(items), archs, calib, meta,
                                    overhead_model=overhead_model)
    table.meta["build_seconds"] = round(time.perf_counter() - t0, 2)
    return table


def clean_fraction(res: Mapping[str, Mapping[str, Any]]) -> float | None:
    """Fraction of the timed calls of a measurement that no other process interrupted (None when the
    measurement did not watch for preemption)."""
    stats = [v for v in res.values() if "clean" in v and "calls" in v]
    calls = sum(int(v["calls"]) for v in stats)
    return round(sum(int(v["clean"]) for v in stats) / calls, 4) if calls else None


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def fixed_keys(items: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``{role: key}`` of the fixed parts (stem, first block, widest head) among :func:`table_items`."""
    return {v["role"]: k for k, v in items.items() if v["role"] in ("stem", "first", "head")}


_fixed_keys = fixed_keys


def table_from_measurements(space: SearchSpace, entries: Mapping[str, Mapping[str, Any]],
                            fixed_parts: Mapping[str, str], calib_archs: Sequence[Arch],
                            calib_ms: Sequence[float], meta: Mapping[str, Any], *,
                            overhead_model: str | None = None) -> LatencyTable:
    """A table from measured entries (table ms) and calibration nets measured in the same pass."""
    ms = {k: float(v["median_ms"]) for k, v in entries.items()}
    feats = [arch_features(space, a, ms, list(fixed_parts.values())) for a in calib_archs]
    sums, blocks = [f[0] for f in feats], [f[1] for f in feats]
    overhead = fit_overhead(sums, blocks, calib_ms)
    if overhead_model and overhead_model != overhead["model"]:
        if overhead_model not in OVERHEAD_MODELS:
            raise UserError(f"overhead model {overhead_model!r} is unknown; choose one of: {', '.join(OVERHEAD_MODELS)}")
        forced = _fit(overhead_model, *(np.asarray(v, float) for v in (sums, blocks, calib_ms)))
        if forced is None:
            raise UserError(f"overhead model {overhead_model!r} cannot be fitted on {len(calib_ms)} calibration nets")
        overhead.update(forced, model=overhead_model)
    overhead["calibration"] = [
        {"choices": dict(a.choices), "sum_ms": s, "blocks": b, "measured_ms": m}
        for a, s, b, m in zip(calib_archs, sums, blocks, calib_ms)]
    return LatencyTable.from_entries(space, entries, fixed_parts, overhead, meta)


def measurement_method(device, rel_ci: float | None, max_repeats: int | None,
                       max_seconds: float | None = None, warm_calls: int = 0) -> dict[str, Any]:
    """How a table's numbers were measured (stored in the table)."""
    return {
        "statistic": "median of per-call ratios t_item / mean(t_ref_before, t_ref_after), times the "
                     "reference's median ms of the table pass",
        "warmup": getattr(device, "warmup", None),
        "repeats": getattr(device, "repeats", None),
        "rel_ci": rel_ci,
        "max_repeats": max_repeats,
        "max_seconds": max_seconds,
        "warm_calls": warm_calls,
        "preempted_calls": "left out (adaptive mode, involuntary context switch during the call)",
        "threads": getattr(device, "threads", None),
        "thread_pool": getattr(device, "thread_pool", None),
        "batch_size": getattr(device, "batch_size", None),
        "order": "shuffled rounds, one reference call between every two item calls",
    }


#: Whole nets are measured in rotations of at most this many (plus the reference). In one rotation of
#: 100 ONNX Runtime nets every net ran ~20 % slower than alone or among 8 (its session's memory and
#: thread pool go cold while 99 others run), while a deployed net runs alone: small groups measure it
#: as deployed, and calibration, validation and export all measure the same way.
NET_GROUP = 8


def measure_archs(space: SearchSpace, archs: list[Arch], device, *, reference_ms: float | None = None,
                  progress: bool = False, desc: str = "measuring subnets", rel_ci: float | None = None,
                  max_repeats: int | None = None, max_seconds: float | None = None,
                  warm_calls: int = DEFAULT_WARM_CALLS, details: list | None = None,
                  group: int | None = NET_GROUP) -> list[float]:
    """End-to-end latency (ms) of each architecture's static net, in reference alternation.

    With ``reference_ms`` (a table's reference time) the result is the measured ratio to the
    reference times that value: in the table's own units, immune to the machine's speed drifting
    between the table's pass and this one. With ``rel_ci`` the measurement is adaptive (see
    :meth:`nas.devices.Device.measure`). On an :class:`AnalyticDevice` the nets are counted.
    ``details`` (a list) receives the raw statistics of the measurement (one dict per net, then the
    reference's).
    """
    if isinstance(device, AnalyticDevice):
        return [device.count(*arch_net(space, a)) for a in archs]
    size = len(archs) if not group else max(1, int(group))
    chunks = [list(range(i, min(i + size, len(archs)))) for i in range(0, len(archs), size)]
    out: list[float] = []
    for c, idx in enumerate(chunks):
        items = {f"net{i}": arch_net(space, archs[i]) for i in idx}
        res = _measure(device, items, progress=progress,
                       desc=desc if len(chunks) == 1 else f"{desc} ({c + 1}/{len(chunks)})", rel_ci=rel_ci,
                       max_repeats=max_repeats, warm_calls=warm_calls,
                       max_seconds=None if max_seconds is None else max_seconds / len(chunks))
        if details is not None:
            details.extend([dict(res[f"net{i}"]) for i in idx] + [dict(res["__reference__"])])
        if reference_ms is not None:
            out.extend(float(res[f"net{i}"]["ratio"]) * reference_ms for i in idx)
        else:
            out.extend(float(res[f"net{i}"]["median_ms"]) for i in idx)
    return out


def table_path(cache_dir: str | os.PathLike, space: SearchSpace, device, num_classes: int) -> Path:
    return (Path(cache_dir).expanduser() / f"{space.name}-{space.fingerprint}"
            / f"{device.name}-{device.fingerprint_id()}-c{num_classes}.json")


def load_or_build_table(space: SearchSpace, device, num_classes: int, cache_dir: str | os.PathLike,
                        *, rebuild: bool = False, progress: bool = True, log=print,
                        validate_samples: int = 20) -> LatencyTable:
    """The cached table for (space, device, classes), built (with a progress bar) when missing.

    A freshly built table is validated on ``validate_samples`` random subnets (plus the largest and
    smallest; 0 skips it) so that the search reports how far to trust it; ``nas-lut`` validates
    with more. A cached file of an older format is rebuilt.
    """
    path = table_path(cache_dir, space, device, num_classes)
    if path.exists() and not rebuild:
        try:
            version = json.loads(path.read_text()).get("version")
        except (OSError, json.JSONDecodeError, AttributeError):
            version = None
        if version == TABLE_VERSION:
            return LatencyTable.load(path, space, device.fingerprint_id(), warn=log)
        log(f"cached latency table {path} has format version {version}; rebuilding it")
    log(f"building latency table for space {space.name} on {device.name} -> {path}")
    table = build_latency_table(space, device, num_classes, progress=progress)
    log(f"latency table built in {table.meta['build_seconds']:.1f} s: {len(table.entries)} entries, "
        f"overhead model {table.meta['overhead']['model']} (scale {table.meta['scale']:.3f}, "
        f"{table.meta['per_block_ms']:+.4f} ms/block, {table.meta['overhead_ms']:+.3f} ms), "
        f"range {table.bounds()[0]:.3f}-{table.bounds()[1]:.3f} ms")
    if validate_samples > 0:
        from .lut_validate import validate_table

        report = validate_table(table, device, samples=validate_samples, retest=False, progress=progress)
        s = report["summary"]
        log(f"validated on {s['n']} subnets: {100 * s['within_10pct']:.0f}% within +-10%, "
            f"Spearman {s['spearman']:.3f}, RMSE {s['rmse_pct']:.1f}%")
    table.save(path)
    return table
