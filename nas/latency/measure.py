"""Measuring whole subnets end to end on a device, in groups and in reference alternation."""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch.nn as nn

from nas.latency.items import arch_net
from supernets.arch import Arch
from supernets.space import SearchSpace

#: Defaults of the latency measurement (overridable per call and in conf/lut.yaml).
DEFAULT_CALIB_NETS = 24
DEFAULT_REL_CI = 0.01
DEFAULT_MAX_REPEATS = 1000
DEFAULT_MAX_SECONDS = 50.0
DEFAULT_WARM_CALLS = 1


def _measure(device, items: Mapping[str, tuple[nn.Module, tuple[int, ...]]], *, progress: bool, desc: str,
             rel_ci: float | None, max_repeats: int | None, max_seconds: float | None = None,
             warm_calls: int = 0) -> dict[str, dict[str, float]]:
    kw: dict[str, Any] = {} if rel_ci is None else {"rel_ci": rel_ci, "max_repeats": max_repeats}
    if max_seconds is not None:
        kw["max_seconds"] = max_seconds
    if warm_calls:
        kw["warm_calls"] = int(warm_calls)
    return device.measure(items, progress=progress, desc=desc, **kw)


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


def measurement_method(device, rel_ci: float | None, max_repeats: int | None,
                       max_seconds: float | None = None, warm_calls: int = 0) -> dict[str, Any]:
    """How a table's numbers were measured (stored in the table)."""
    return {
        "statistic": "median of per-call ratios t_item / mean(t_ref_before, t_ref_after), times the "
                     "reference's median ms of the table pass",
        "warmup": device.warmup,
        "repeats": device.repeats,
        "rel_ci": rel_ci,
        "max_repeats": max_repeats,
        "max_seconds": max_seconds,
        "warm_calls": warm_calls,
        "preempted_calls": "left out (adaptive mode, involuntary context switch during the call)",
        "threads": device.threads,
        "thread_pool": getattr(device, "thread_pool", None),
        "batch_size": device.batch_size,
        "order": "shuffled rounds, one reference call between every two item calls",
    }


#: Whole nets are measured in rotations of at most this many (plus the reference). In one rotation of
#: 100 ONNX Runtime nets every net ran ~20 % slower than alone or among 8 (its session's memory and
#: thread pool go cold while 99 others run), while a deployed net runs alone: small groups measure it
#: as deployed, and calibration, validation and export all measure the same way.
NET_GROUP = 8


def measure_timed(space: SearchSpace, archs: list[Arch], device, *, reference_ms: float | None = None,
                  progress: bool = False, desc: str = "measuring subnets", rel_ci: float | None = None,
                  max_repeats: int | None = None, max_seconds: float | None = None,
                  warm_calls: int = DEFAULT_WARM_CALLS, details: list | None = None,
                  group: int | None = NET_GROUP) -> list[float]:
    """End-to-end latency (ms) of each architecture's static net, in reference alternation.

    With ``reference_ms`` (a table's reference time) the result is the measured ratio to the
    reference times that value: in the table's own units, immune to the machine's speed drifting
    between the table's pass and this one. With ``rel_ci`` the measurement is adaptive (see
    :meth:`nas.latency.devices.Device.measure`).
    ``details`` (a list) receives the raw statistics of the measurement (one dict per net, then the
    reference's).
    """
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




def measure_modules(device, items: Mapping[str, tuple[nn.Module, tuple[int, ...]]], *,
                    reference_ms: float | None = None, progress: bool = False, desc: str = "measuring nets",
                    rel_ci: float | None = None, max_repeats: int | None = None,
                    warm_calls: int = DEFAULT_WARM_CALLS, group: int | None = NET_GROUP) -> dict[str, float]:
    """End-to-end latency (ms) of each whole module on a timed ``device``, in groups of ``group`` in
    reference alternation (as :func:`measure_timed` does for a space's subnets, for any ``nn.Module``:
    a pruned net, a user's own model). With ``reference_ms`` the result is the measured ratio to the
    reference times that value (the units of an earlier pass of the same run, immune to the machine's
    speed drifting between passes); else the median ms of this pass."""
    names = list(items)
    size = len(names) if not group else max(1, int(group))
    chunks = [names[i:i + size] for i in range(0, len(names), size)]
    out: dict[str, float] = {}
    for c, chunk in enumerate(chunks):
        res = _measure(device, {n: items[n] for n in chunk}, progress=progress,
                       desc=desc if len(chunks) == 1 else f"{desc} ({c + 1}/{len(chunks)})", rel_ci=rel_ci,
                       max_repeats=max_repeats, warm_calls=warm_calls)
        for n in chunk:
            out[n] = (float(res[n]["ratio"]) * reference_ms if reference_ms is not None
                      else float(res[n]["median_ms"]))
        out.setdefault("__reference__", float(res["__reference__"]["median_ms"]))
    return out


def measure_archs(space: SearchSpace, archs: list[Arch], device, **kw: Any) -> list[float]:
    """End-to-end cost of each architecture on ``device`` (timed in groups, or counted where exact)."""
    return device.measure_nets(space, archs, **kw)
