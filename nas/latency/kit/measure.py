#!/usr/bin/env python3
"""hwnas device kit runner: time the kit's ONNX files on THIS device and write results.json.

Needs only Python 3.8+, numpy and onnxruntime (``pip install onnxruntime numpy``). Run it on the
device the latency table is for, with the machine otherwise idle:

    python measure.py --out results.json

then bring results.json back and import it where hwnas is installed:

    nas-lut mode=import results=results.json

Method (the same as hwnas's own devices, see docs/latency.md): every ONNX file gets an
``InferenceSession`` (CPU execution provider, one intra-op thread pool of ``--threads`` threads
shared by all sessions, one inter-op thread, sequential execution, all graph optimisations) and a
fixed random input. After warm-up, rounds visit the items in a shuffled order and every item
call is followed by a call of the reference; each timed call (item or reference) comes right after
``warm_calls`` untimed ones (so it runs warm, as in a deployed loop); an item call gives
``ratio = t_item / mean(t_ref_before, t_ref_after)`` (monotonic clock). An item's value is its
median ratio; full rounds continue until the 95 % confidence interval of every item's median is
within ``+-rel_ci`` or they had ``max_repeats`` calls. Calls
during which the process was preempted (an involuntary context switch, where the OS reports them)
are left out when enough clean calls remain. Four passes: ``table`` (blocks and fixed parts),
``calibration`` (whole subnets that fit the overhead model), ``validation`` (other whole subnets),
``retest`` (the same subnets again). Whole subnets are timed in groups of ``net_group`` (8) with the
reference, one group after the other, as hwnas's own table builder does: in one rotation of many
ONNX Runtime sessions each session goes cold while the others run, and every net measures slower
than it runs deployed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import sys
import tempfile
import time

import numpy as np

RESULTS_FORMAT = "hwnas-kit-results"
RESULTS_VERSION = 1
MIN_CLEAN_SAMPLES = 3
MIN_ROUNDS = 5


def processor_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def involuntary_switches():
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
    except (ImportError, OSError, AttributeError):
        return None


def median_ci(values, z: float = 1.96) -> float:
    """Relative half-width of the distribution-free ~95 % confidence interval of the median."""
    n = len(values)
    if n < 6:
        return float("inf")
    ordered = sorted(values)
    half = z * math.sqrt(n) / 2.0
    lo = max(0, int(math.floor(n / 2.0 - half)))
    hi = min(n - 1, int(math.ceil(n / 2.0 + half)))
    median = float(np.median(ordered))
    return float((ordered[hi] - ordered[lo]) / (2.0 * median)) if median > 0 else float("inf")


def robust_stats(values):
    q25, median, q75 = np.percentile(np.asarray(values, dtype=np.float64), [25.0, 50.0, 75.0])
    return float(median), (float((q75 - q25) / median) if median > 0 else float("inf"))


def usable(values, clean):
    kept = [v for v, ok in zip(values, clean) if ok]
    return kept if len(kept) >= MIN_CLEAN_SAMPLES else values


GLOBAL_POOL = {"threads": None}


def use_global_pool(threads: int) -> bool:
    """One intra-op thread pool shared by all sessions (as hwnas's onnxruntime device does): with a
    pool per session, the idle workers of dozens of sessions keep spinning and slow everything."""
    import onnxruntime as ort

    if GLOBAL_POOL["threads"] is None:
        try:
            ort.set_global_thread_pool_sizes(int(threads), 1)
            GLOBAL_POOL["threads"] = int(threads)
        except Exception:  # noqa: BLE001
            GLOBAL_POOL["threads"] = -1
    return GLOBAL_POOL["threads"] == int(threads)


def make_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if use_global_pool(threads):
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def make_call(kit_dir: str, spec: dict, batch_size: int, threads: int, seed: int):
    session = make_session(os.path.join(kit_dir, spec["file"]), threads)
    rng = np.random.RandomState(seed)
    x = rng.standard_normal((batch_size, *spec["input_shape"])).astype(np.float32)
    feed = {session.get_inputs()[0].name: x}
    outputs = [o.name for o in session.get_outputs()]

    def call():
        session.run(outputs, feed)

    return call


def measure_pass(calls: dict, ref_call, *, warmup: int, repeats: int, rel_ci, max_repeats: int, seed: int,
                 label: str, quiet: bool, max_seconds=None, warm_calls: int = 0) -> dict:
    """Time ``calls`` in alternation with ``ref_call`` (see the module docstring)."""
    names = list(calls)
    watch = rel_ci is not None and involuntary_switches() is not None
    ref_ns, ref_clean = [], []
    ratios = {n: [] for n in names}
    clean = {n: [] for n in names}
    order_rng = random.Random(seed)
    clock = time.perf_counter_ns

    def timed(call):
        if not watch:
            t0 = clock()
            call()
            return float(clock() - t0), True
        before = involuntary_switches()
        t0 = clock()
        call()
        t = float(clock() - t0)
        return t, involuntary_switches() == before

    state = {}

    def step(n):
        for _ in range(warm_calls):  # untimed: the timed call runs warm, as in a deployed loop
            calls[n]()
        t_item, item_ok = timed(calls[n])
        for _ in range(warm_calls):
            ref_call()
        ref_after, ref_ok = timed(ref_call)
        ref_ns.append(ref_after)
        ref_clean.append(ref_ok)
        ref_before, before_ok = state["ref"], state["ok"]
        if watch and before_ok != ref_ok:
            denominator = ref_after if ref_ok else ref_before
        else:
            denominator = 0.5 * (ref_before + ref_after)
        ratios[n].append(t_item / denominator)
        clean[n].append(item_ok and (ref_ok or before_ok))
        state["ref"], state["ok"] = ref_after, ref_ok

    def values(n):
        return usable(ratios[n], clean[n]) if watch else ratios[n]

    t_start = time.time()
    for _ in range(warmup):
        ref_call()
    for n in names:
        for _ in range(warmup):
            calls[n]()
    state["ref"], state["ok"] = timed(ref_call)
    ref_ns.append(state["ref"])
    ref_clean.append(state["ok"])
    total = repeats * len(names)
    done = 0
    last_print = 0.0
    for round_index in range(repeats):
        if max_seconds is not None and round_index >= MIN_ROUNDS and time.time() - t_start > max_seconds:
            break
        order = names.copy()
        order_rng.shuffle(order)
        for n in order:
            step(n)
            done += 1
        if not quiet and time.time() - last_print > 2.0:
            last_print = time.time()
            print(f"  {label}: {done}/{total} calls", file=sys.stderr, flush=True)
    cap = max(repeats, int(max_repeats))
    while rel_ci is not None and names:
        if max_seconds is not None and time.time() - t_start > max_seconds:
            break
        pending = [n for n in names if len(ratios[n]) < cap and median_ci(values(n)) > rel_ci]
        if not pending:
            break
        order = [n for n in names if len(ratios[n]) < cap]  # full rounds: the same mix of states for all
        order_rng.shuffle(order)
        for n in order:
            step(n)
            done += 1
        if not quiet and time.time() - last_print > 2.0:
            last_print = time.time()
            print(f"  {label}: {done} calls, {len(pending)} items short of +-{rel_ci:.1%}", file=sys.stderr,
                  flush=True)
    ref_values = usable(ref_ns, ref_clean) if watch else ref_ns
    ref_median, ref_spread = robust_stats(ref_values)
    ref_ms = ref_median / 1e6
    items = {}
    for n in names:
        v = values(n)
        ratio, spread = robust_stats(v)
        items[n] = {"median_ms": ratio * ref_ms, "ratio": ratio, "spread": spread, "count": len(v),
                    "calls": len(ratios[n]), "clean": sum(clean[n]), "ci": median_ci(v)}
    if not quiet:
        print(f"  {label}: {len(names)} items in {time.time() - t_start:.1f} s", file=sys.stderr, flush=True)
    return {"reference": {"median_ms": ref_ms, "spread": ref_spread, "count": len(ref_values),
                          "calls": len(ref_ns)},
            "items": items, "seconds": round(time.time() - t_start, 2)}


def measure_grouped(calls: dict, ref_call, group: int, *, label: str, max_seconds=None, **kw) -> dict:
    """:func:`measure_pass` over consecutive groups of ``group`` items (each with the reference), merged.

    An item's ``ratio`` is to the reference calls around it in its own group; the pass's ``reference``
    is the first group's, and ``groups`` holds every group's reference and item names."""
    names = list(calls)
    chunks = [names[i:i + group] for i in range(0, len(names), group)] or [[]]
    per_group = None if max_seconds is None else max_seconds / len(chunks)
    items, groups, seconds = {}, [], 0.0
    for c, chunk in enumerate(chunks):
        res = measure_pass({n: calls[n] for n in chunk}, ref_call, label=f"{label} ({c + 1}/{len(chunks)})",
                           max_seconds=per_group, **kw)
        items.update(res["items"])
        groups.append({"items": chunk, "reference": res["reference"]})
        seconds += res["seconds"]
    return {"reference": groups[0]["reference"], "items": items, "groups": groups, "seconds": round(seconds, 2)}


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", default=here, help="kit folder holding manifest.json (default: this script's)")
    parser.add_argument("--out", default="results.json", help="where to write the results (JSON)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the manifest's)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="rounds before the adaptive phase")
    parser.add_argument("--max-repeats", type=int, default=None, help="calls per item at most")
    parser.add_argument("--rel-ci", type=float, default=None,
                        help="target relative half-width of the median's 95%% CI (0 = no adaptive phase)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time budget per pass: no round starts after it, beyond 5 (0 = no limit)")
    parser.add_argument("--group", type=int, default=None,
                        help="whole subnets timed together in one rotation (default: the manifest's, 8)")
    parser.add_argument("--passes", default=None,
                        help="comma-separated subset of the manifest's passes (default: all)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    with open(os.path.join(args.kit, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != "hwnas-device-kit":
        print(f"error: {args.kit}/manifest.json is not an hwnas device kit manifest", file=sys.stderr)
        return 2
    m = manifest["measure"]
    threads = args.threads or int(m["threads"])
    warmup = int(m["warmup"] if args.warmup is None else args.warmup)
    repeats = int(m["repeats"] if args.repeats is None else args.repeats)
    max_repeats = int(m["max_repeats"] if args.max_repeats is None else args.max_repeats)
    rel_ci = m.get("rel_ci") if args.rel_ci is None else (args.rel_ci or None)
    seed = int(m.get("seed", 0))
    max_seconds = m.get("max_seconds") if args.max_seconds is None else (args.max_seconds or None)
    warm_calls = int(m.get("warm_calls", 0))
    group = max(1, int(args.group or m.get("net_group", 8)))
    batch_size = int(manifest["batch_size"])
    passes = [p for p in manifest["passes"]] if not args.passes else args.passes.split(",")
    unknown = [p for p in passes if p not in manifest["passes"]]
    if unknown:
        print(f"error: unknown pass(es) {unknown}; the kit has {list(manifest['passes'])}", file=sys.stderr)
        return 2

    import onnxruntime

    device = {
        "name": "onnxruntime",
        "processor": processor_name(),
        "machine": platform.machine(),
        "threads": threads,
        "batch_size": batch_size,
        "dtype": "float32",
        "torch": manifest.get("torch"),  # the exporter that wrote the graphs
        "onnxruntime": onnxruntime.__version__,
    }
    started = datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    t0 = time.time()
    ref_call = make_call(args.kit, manifest["reference"], batch_size, threads, seed)
    results = {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "manifest": manifest, "device": device,
               "settings": {"threads": threads, "warmup": warmup, "repeats": repeats, "max_repeats": max_repeats,
                            "rel_ci": rel_ci, "max_seconds": max_seconds, "warm_calls": warm_calls,
                            "seed": seed, "net_group": group},  # + thread_pool below
               "platform": {"python": platform.python_version(), "system": platform.platform(),
                            "numpy": np.__version__, "cpu_count": os.cpu_count()},
               "started_at": started, "passes": {}}
    if hasattr(os, "getloadavg"):
        results["load_avg_start"] = [round(x, 2) for x in os.getloadavg()]
    sessions = {}
    for p in passes:
        names = manifest["passes"][p]
        calls = {}
        for n in names:
            if n not in sessions:
                sessions[n] = make_call(args.kit, manifest["items"][n], batch_size, threads, seed)
            calls[n] = sessions[n]
        if not args.quiet:
            print(f"pass {p}: {len(names)} items", file=sys.stderr, flush=True)
        kw = dict(warmup=warmup, repeats=repeats, rel_ci=rel_ci, max_repeats=max_repeats,
                  seed=seed + len(results["passes"]), quiet=args.quiet, warm_calls=warm_calls)
        if p == "table":
            results["passes"][p] = measure_pass(calls, ref_call, label=p, max_seconds=max_seconds, **kw)
        else:
            results["passes"][p] = measure_grouped(calls, ref_call, group, label=p, max_seconds=max_seconds, **kw)
    results["seconds"] = round(time.time() - t0, 2)
    results["settings"]["thread_pool"] = "global" if GLOBAL_POOL["threads"] == threads else "per-session, no spinning"
    if hasattr(os, "getloadavg"):
        results["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]

    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), prefix=".results.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=1)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # mkstemp's 0600 -> the usual 0644
    os.replace(tmp, out)
    if not args.quiet:
        print(f"wrote {out} ({results['seconds']:.0f} s); import it with: nas-lut mode=import results={args.out}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
