"""The overhead model: from the sum of standalone block times to a whole network's time.

``net_ms = scale * (sum of its parts' ms) + per_block_ms * (number of searchable blocks) + offset_ms``,
fitted on whole subnets measured in a pass of their own.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from nas.latency.items import entry_key, head_key
from supernets.arch import Arch
from supernets.space import SearchSpace


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


