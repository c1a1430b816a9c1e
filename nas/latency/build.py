"""Building a latency table on a device, and the per-(space, device, classes) cache."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from nas.errors import UserError
from nas.latency.items import (
    calibration_archs,
    describe_reference,
    fixed_keys,
    table_items,
)
from nas.latency.measure import (
    DEFAULT_CALIB_NETS,
    DEFAULT_MAX_REPEATS,
    DEFAULT_MAX_SECONDS,
    DEFAULT_REL_CI,
    DEFAULT_WARM_CALLS,
    _load_avg,
    _measure,
    clean_fraction,
    measure_archs,
    measurement_method,
)
from nas.latency.overhead import OVERHEAD_MODELS, _fit, arch_features, fit_overhead
from nas.latency.table import TABLE_VERSION, LatencyTable
from nas.latency.validate import validate_table
from supernets.arch import Arch
from supernets.space import SearchSpace


def build_latency_table(space: SearchSpace, device, num_classes: int, *, calib_nets: int = DEFAULT_CALIB_NETS,
                        seed: int = 0, progress: bool = True, rel_ci: float | None = DEFAULT_REL_CI,
                        max_repeats: int | None = DEFAULT_MAX_REPEATS,
                        max_seconds: float | None = DEFAULT_MAX_SECONDS, warm_calls: int = DEFAULT_WARM_CALLS,
                        overhead_model: str | None = None) -> LatencyTable:
    """Measure every candidate block at its shape and the fixed parts on ``device`` (one pass), then
    ``calib_nets`` whole subnets (a second pass, in the same units), and calibrate the overhead model.

    Every item is timed call by call in alternation with the fixed reference block (see
    :mod:`nas.latency.devices`); rounds visit the items in a shuffled order. The nets are converted with the
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
    table = table_from_measurements(space, entries, fixed_keys(items), archs, calib, meta,
                                    overhead_model=overhead_model)
    table.meta["build_seconds"] = round(time.perf_counter() - t0, 2)
    return table


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


def table_path(cache_dir: str | os.PathLike, space: SearchSpace, device, num_classes: int) -> Path:
    return (Path(cache_dir).expanduser() / f"{space.name}-{space.fingerprint}"
            / f"{device.name}-{device.fingerprint_id()}-c{num_classes}.json")


#: A table measured with fewer of its timed calls uninterrupted than this is not trusted.
MIN_CLEAN_FRACTION = 0.5

#: How to get a table trusted, or to use it anyway (the end of every refusal).
REMEDY = ("Rebuild it on a quiet machine (`lut.rebuild=true`, nothing else running), or use it anyway with "
          "`lut.accept_untrusted=true`")


def trust_problems(table: LatencyTable, bar: Mapping[str, float] | None) -> list[str]:
    """Why ``table`` should not be used without the user's say ([] when it meets ``bar``).

    ``bar`` is the device's: ``{"within_10pct": fraction, "spearman": value}`` on the table's own
    validation (:mod:`nas.latency.validate`); a validation that could not rank (Spearman not a
    number) fails it too. A table measured while other processes interrupted most timed calls
    (``clean_fraction`` under :data:`MIN_CLEAN_FRACTION`) fails whatever its bar, and so does one that
    predicts a non-positive latency for the smallest subnet.
    """
    problems = []
    lo = table.bounds()[0]
    if not lo > 0:  # an overhead fit through a noisy calibration can go below zero
        problems.append(f"it predicts {lo:.3g} {table.unit} for the smallest subnet (a latency must be positive)")
    clean = (table.meta.get("method") or {}).get("clean_fraction")
    if clean is not None and clean < MIN_CLEAN_FRACTION:
        problems.append(f"other processes interrupted {100 * (1 - clean):.0f}% of its timed calls")
    v = table.meta.get("validation") or {}
    for which, what in (("vs_table", "measured/predicted"), ("retest", "re-measured/measured")):
        sp = (v.get("state_split") or {}).get(which)
        if sp and sp.get("split"):
            meds = sp["group_medians"]
            problems.append(f"its validation ran in different speed states: groups of 8 nets measured "
                            f"{min(meds):.2f}x to {max(meds):.2f}x ({what}), so no single conversion to ms holds "
                            f"(set hardware.threads=1 on a shared machine)")
    if bar and v:
        w, s = v.get("within_10pct"), v.get("spearman")
        bad_w = w is not None and not w >= bar["within_10pct"]
        bad_s = s is not None and not s >= bar["spearman"]  # NaN fails
        if bad_w or bad_s:
            problems.append(f"its validation on {v.get('n')} subnets gave {100 * (w or 0):.0f}% within +-10% and "
                            f"Spearman {s if s is not None else float('nan'):.2f}, below this device's bar "
                            f"({100 * bar['within_10pct']:.0f}%, {bar['spearman']:.2f})")
    return problems


def check_trusted(table: LatencyTable, path: str | os.PathLike, *, bar: Mapping[str, float] | None,
                  accept_untrusted: bool = False, log=print) -> None:
    """Stop (:class:`UserError`) on a table below its bar unless the user accepted it; then warn (and
    mark it ``meta["untrusted"]``, which an unreachable-target message then blames)."""
    problems = trust_problems(table, bar)
    if not problems:
        return
    why = "; ".join(problems)
    if not accept_untrusted:
        raise UserError(f"latency table {path} is not trustworthy: {why}. {REMEDY}")
    table.meta["untrusted"] = why
    log(f"warning: using latency table {path} although {why} (lut.accept_untrusted=true)")


def rejected_path(path: str | os.PathLike) -> Path:
    """Where a freshly built table that failed its check is kept (beside the cache, never used unasked)."""
    path = Path(path)
    return path.with_name(path.stem + ".rejected.json")


def _load_current(path: Path, space: SearchSpace, device, log) -> LatencyTable | None:
    """The table at ``path`` if it has the current format, else None."""
    try:
        version = json.loads(path.read_text()).get("version")
    except (OSError, json.JSONDecodeError, AttributeError):
        version = None
    if version != TABLE_VERSION:
        log(f"cached latency table {path} has format version {version}; rebuilding it")
        return None
    return LatencyTable.load(path, space, device.fingerprint_id(), warn=log)


def load_or_build_table(space: SearchSpace, device, num_classes: int, cache_dir: str | os.PathLike,
                        *, rebuild: bool = False, progress: bool = True, log=print,
                        validate_samples: int = 20, accept_untrusted: bool = False) -> LatencyTable:
    """The cached table for (space, device, classes), built (with a progress bar) when missing.

    A freshly built table is validated on ``validate_samples`` random subnets (plus the largest and
    smallest; 0 skips it) so that the search reports how far to trust it; ``nas-lut`` validates
    with more. A cached file of an older format is rebuilt. A table below the device's bar
    (:func:`trust_problems`) stops the run with one line unless ``accept_untrusted``: a freshly built
    one is then kept beside the cache as ``*.rejected.json``, not cached, and a later run with
    ``accept_untrusted`` takes that file (no second build) and caches it. Interrupted (Ctrl-C), the
    build leaves nothing in the cache.
    """
    bar = device.trust_bar
    path = table_path(cache_dir, space, device, num_classes)
    rejected = rejected_path(path)
    if not rebuild:
        if path.exists():
            table = _load_current(path, space, device, log)
            if table is not None:
                check_trusted(table, path, bar=bar, accept_untrusted=accept_untrusted, log=log)
                return table
        elif accept_untrusted and rejected.exists():
            table = _load_current(rejected, space, device, log)
            if table is not None:
                check_trusted(table, rejected, bar=bar, accept_untrusted=True, log=log)
                table.save(path)
                rejected.unlink()
                log(f"latency table {rejected} accepted and cached as {path}")
                return table
    log(f"building latency table for space {space.name} on {device.name} -> {path}")
    try:
        table = build_latency_table(space, device, num_classes, progress=progress)
        log(f"latency table built in {table.meta['build_seconds']:.1f} s: {len(table.entries)} entries, "
            f"overhead model {table.meta['overhead']['model']} (scale {table.meta['scale']:.3f}, "
            f"{table.meta['per_block_ms']:+.4f} ms/block, {table.meta['overhead_ms']:+.3f} ms), "
            f"range {table.bounds()[0]:.3f}-{table.bounds()[1]:.3f} ms")
        if validate_samples > 0:
            report = validate_table(table, device, samples=validate_samples, retest=False, progress=progress)
            s = report["summary"]
            log(f"validated on {s['n']} subnets: {100 * s['within_10pct']:.0f}% within +-10%, "
                f"Spearman {s['spearman']:.3f}, RMSE {s['rmse_pct']:.1f}%")
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"while building the latency table for space {space.name} on {device.name}; "
                                f"nothing was cached, the next run builds it again") from None
    problems = trust_problems(table, bar)
    if problems and not accept_untrusted:
        table.save(rejected)
        raise UserError(f"the latency table just built for space {space.name} on {device.name} is not "
                        f"trustworthy: {'; '.join(problems)}. It was not cached (kept for inspection in "
                        f"{rejected}). {REMEDY}")
    check_trusted(table, path, bar=bar, accept_untrusted=accept_untrusted, log=log)
    table.save(path)
    if rejected.exists():
        rejected.unlink()
    return table
