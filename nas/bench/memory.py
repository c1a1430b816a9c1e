"""``nas-bench suite=memory``: peak memory and step time of the supernet's gate modes against a
standalone network, for the same batch and space.

Configurations (each a complete optimizer step: zero_grad, forward, loss, backward, clip, step):

* ``<gate>/<phase>/<sharing>`` -- a :class:`~supernets.supernet.Supernet` step with gate ``one``,
  ``two`` or ``full`` (the DARTS mixture), in the ``weight`` phase (SGD on the weights, as
  ProxylessNAS's weight step) or the ``arch`` phase (Adam on alpha with the expected cost in the
  loss, as its architecture step), with ``elastic`` (default) or ``separate`` weight sharing.
* ``standalone/largest`` and ``standalone/sampled`` -- a plain timm EfficientNet
  (:func:`supernets.blocks.space_timm_net`) of the space's largest architecture, and of the *sampled
  path*: one fixed seeded random architecture. The supernet steps run exactly that path (the gate's
  sampling still runs each step, then the path is set back to it; ``fixed`` stays off so the real
  gate code runs), so the ``one``-gate weight step and ``standalone/sampled`` compute the same net.

Peak memory, measured properly. Every (configuration, repeat) runs in a fresh subprocess
(``python -m nas.bench.memory <spec>``) so nothing of another configuration stays resident:

1. The runtime is primed: one step each of a ``full``-gate supernet (weight and arch phase) and of
   the standalone net at batch 2 pages in torch's kernels, oneDNN's code and the thread pool; the
   models are deleted. (Unprimed, the 150-350 MB of library code the first convolution pages in
   would be counted as the model's memory, the same in every configuration, diluting every ratio.)
2. glibc's malloc is then switched (``mallopt``) to serve every block >= 64 KiB by ``mmap`` and to
   trim on free, so a freed tensor leaves the resident set at once instead of staying in malloc's
   free lists where the next step would reuse it invisibly (without this, steps after the first
   show 2-10 MB instead of 39 MB).
3. ``rss_runtime`` = VmRSS now, before the model exists. The model and optimizers are built and
   ``warmup`` steps run (gradients, optimizer state).
4. For each of ``steps`` measured steps: ``gc.collect()``, ``rss_before`` = VmRSS, the kernel's
   peak counter is reset (``echo 5 > /proc/self/clear_refs`` sets VmHWM to the current RSS), one
   step, ``hwm`` = VmHWM. ``step_mb`` = hwm - rss_before (activations, gradients, temporaries of one
   step) and ``total_mb`` = hwm - rss_runtime (adds parameters and optimizer state): the headline.
   Where clear_refs or mallopt is unavailable the worker measures its first step only, with
   ``ru_maxrss``.
5. The medians over steps, then over repeats, are reported. As a cross-check the first repeat also
   records the torch profiler's allocator peak over one step (``profile_memory=True``), which
   counts tensor bytes only and agrees with ``step_mb`` within a few MB.

Step time is measured in the parent process, all configurations in one process: after warm-up,
``rounds`` rounds each visit every configuration once in a freshly shuffled order; a step's time is
wall clock. Ratios are the medians of the per-round ratios to the reference configuration timed in
the same round (the machine's speed drifts; neighbouring steps see the same state).
"""
from __future__ import annotations

import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

GATES = ("one", "two", "full")
PHASES = ("weight", "arch")
SHARINGS = ("elastic", "separate")


# ---------------------------------------------------------------------- configurations
def config_names(gates: Sequence[str] = GATES, phases: Sequence[str] = PHASES,
                 sharings: Sequence[str] = SHARINGS) -> list[str]:
    names = [f"{g}/{p}/{s}" for s in sharings for g in gates for p in phases]
    return names + ["standalone/largest", "standalone/sampled"]


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proxy_cost_model(space, num_classes: int):
    """An additive cost (expand x kernel area per candidate) for the architecture step's loss term:
    the latency term's arithmetic is the same for any table, so no device needs to be measured."""
    from nas.latency.cost import CostModel
    from supernets.space import ZERO, parse_op

    costs = {layer.name: [0.0 if op == ZERO else 0.01 * parse_op(op)[1] * parse_op(op)[0] ** 2
                          for op in layer.choices] for layer in space.layers}
    return CostModel(space, costs, 1.0, {"kind": "proxy"})


def force_path(net, arch, pair_seed: int = 0) -> None:
    """Make ``arch`` the sampled path of every mixed layer without fixing it (the gates stay live);
    in ``two`` mode the pair is the path's candidate and a seeded other one."""
    import torch

    rng = random.Random(pair_seed)
    for name, m in net.named_mixed_ops():
        idx = m.names.index(arch.choices[name])
        m.active, m.fixed = idx, False
        if m.mode == "two" and len(m.names) >= 2:
            other = rng.choice([i for i in range(len(m.names)) if i != idx])
            m._pair = torch.tensor([idx, other])
        else:
            m._pair = None


def _weight_step(net, opt, params, x, y) -> float:
    """One complete SGD step on (x, y): zero_grad, forward, cross-entropy, backward, clip, step."""
    import torch
    import torch.nn.functional as F

    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 5.0)
    opt.step()
    return float(loss.detach())


def build_step(name: str, space, num_classes: int, path, batch: tuple, *, lr: float = 0.05,
               seed: int = 0, device: str = "cpu") -> tuple[Callable[[], float], Any]:
    """The step function of configuration ``name`` and its module (for parameter counts), on
    ``device`` (the batch is moved there; path sampling stays on the CPU as in training)."""
    import torch
    import torch.nn.functional as F

    from supernets.blocks import space_timm_net
    from supernets.supernet import Supernet

    x, y = (t.to(device) for t in batch)
    torch.manual_seed(seed)
    if name.startswith("standalone/"):
        arch = space.largest(num_classes) if name.endswith("largest") else path
        net = space_timm_net(space, arch, num_classes).train().to(device)
        params = list(net.parameters())
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=4e-5, nesterov=True)

        return (lambda: _weight_step(net, opt, params, x, y)), net

    gate, phase, sharing = name.split("/")
    net = Supernet(space, num_classes, gate=gate, weight_sharing=sharing).train().to(device)
    wparams = net.weight_parameters()
    opt_w = torch.optim.SGD(wparams, lr=lr, momentum=0.9, weight_decay=4e-5, nesterov=True)
    opt_a = torch.optim.Adam(net.arch_parameters(), lr=0.01, betas=(0.0, 0.999))
    gen = torch.Generator().manual_seed(seed)
    cost = proxy_cost_model(space, num_classes)
    target = 0.5 * cost.bounds()[1]

    if phase == "weight":
        def step() -> float:
            net.set_phase("weight")
            net.sample("probs", gen)
            force_path(net, path, seed)
            return _weight_step(net, opt_w, wparams, x, y)
    else:
        def step() -> float:
            net.set_phase("arch")
            net.sample("probs", gen)
            force_path(net, path, seed)
            opt_a.zero_grad(set_to_none=True)
            ce = F.cross_entropy(net(x), y)
            # ProxylessSearch's default loss form (abs, lambda 1); written out here so the memory
            # workers need not import Lightning (4 s per subprocess)
            loss = ce + (cost.expected(net.probs()) - target).abs() / target
            loss.backward()
            opt_a.step()
            net.rescale_pairs()
            opt_w.zero_grad(set_to_none=True)  # as ProxylessSearch: the arch step is no weight step
            net.set_phase("weight")
            return float(loss.detach())

    return step, net


def make_batch(space, num_classes: int, batch_size: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, space.in_chans, space.resolution, space.resolution, generator=g)
    y = torch.randint(num_classes, (batch_size,), generator=g)
    return x, y


def _malloc_release_mode() -> bool:
    """Make glibc's malloc give freed memory back to the kernel at once: blocks >= 64 KiB are served
    by ``mmap`` (which also freezes the dynamic threshold) and the heap top is trimmed on every free.
    Then the resident set follows the live tensors and a step's peak shows up in VmHWM even if an
    earlier step needed the same amount. Set at run time (``mallopt``) after priming, because the
    page faults it causes make steps several times slower on this VM."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 65536) == 1 and libc.mallopt(m_trim_threshold, 0) == 1
    libc.malloc_trim(0)
    return bool(ok)


def profiler_peak_mb(step: Callable[[], float]) -> float | None:
    """Peak of the bytes torch's CPU allocator holds for allocations made during one step (torch
    profiler ``profile_memory``; frees of blocks allocated before the step are not seen, so this
    overstates by at most the previous step's gradients)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f).get("traceEvents", [])
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    return max(totals) / 2**20 if totals else None


# ---------------------------------------------------------------------- worker (subprocess)
def worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Measure one configuration's memory in this (fresh) process; see the module docstring."""
    import torch

    from supernets.arch import Arch
    from supernets.space import SearchSpace

    torch.set_num_threads(int(spec["threads"]))
    space = SearchSpace.from_dict(spec["space"])
    num_classes = int(spec["num_classes"])
    path = Arch.from_dict(spec["path"])
    batch = make_batch(space, num_classes, int(spec["batch_size"]), int(spec["seed"]))
    _prime(space, num_classes, path)
    released = _malloc_release_mode()
    gc.collect()
    rss_runtime = _proc_status_kb("VmRSS")
    maxrss_runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step, net = build_step(spec["name"], space, num_classes, path, batch, seed=int(spec["seed"]))
    can_reset = released and _reset_peak() and _proc_status_kb("VmHWM") is not None and rss_runtime is not None
    out: dict[str, Any] = {"name": spec["name"], "method": "vmhwm" if can_reset else "ru_maxrss",
                           "params": sum(p.numel() for p in net.parameters())}
    if not can_reset:  # the first step only, against the peak before it
        step()
        out["process_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["step_mb"] = [(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_runtime) / 1024]
        out["total_mb"] = out["step_mb"]
        return out
    for _ in range(int(spec["warmup"])):
        step()
    steps, totals = [], []
    for _ in range(int(spec["steps"])):
        gc.collect()
        before = _proc_status_kb("VmRSS")
        _reset_peak()
        step()
        hwm = _proc_status_kb("VmHWM")
        steps.append((hwm - before) / 1024)
        totals.append((hwm - rss_runtime) / 1024)
    out["step_mb"], out["total_mb"] = steps, totals
    out["runtime_mb"] = rss_runtime / 1024
    out["process_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if spec.get("profile"):
        out["torch_peak_mb"] = profiler_peak_mb(step)
    return out


def _prime(space, num_classes: int, path) -> None:
    """Run every kernel a configuration can use once, on a throw-away model at batch 2."""
    small = make_batch(space, num_classes, 2, 1)
    for name in ("full/weight/elastic", "full/arch/elastic", "standalone/sampled"):
        step, net = build_step(name, space, num_classes, path, small)
        step()
        del step, net
    gc.collect()


def _run_worker(spec: Mapping[str, Any], timeout: float = 1800.0) -> dict[str, Any]:
    env = dict(os.environ, PYTHONHASHSEED="0")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "nas.bench.memory", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker for {spec['name']} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# ---------------------------------------------------------------------- timing (parent process)
def time_steps(steps: Mapping[str, Callable[[], float]], *, warmup: int, rounds: int, seed: int = 0,
               reference: str | None = None) -> dict[str, dict[str, float]]:
    """Median wall time per step of every configuration, interleaved in shuffled rounds."""
    names = list(steps)
    rng = random.Random(seed)
    for n in names:
        for _ in range(warmup):
            steps[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            order = names[:]
            rng.shuffle(order)
            for n in order:
                t = time.perf_counter()
                steps[n]()
                times[n].append(time.perf_counter() - t)
    finally:
        if gc_was:
            gc.enable()
    out = {}
    for n in names:
        ts = times[n]
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[n] = {"median_ms": 1e3 * statistics.median(ts), "iqr_ms": 1e3 * (q[2] - q[0]), "rounds": len(ts)}
        if reference is not None:
            out[n]["ratio_to_" + reference] = statistics.median(a / b for a, b in zip(ts, times[reference]))
    return out


# ---------------------------------------------------------------------- the suite
def run_memory_suite(space, *, num_classes: int = 10, batch_size: int = 64, gates: Sequence[str] = GATES,
                     phases: Sequence[str] = PHASES, sharings: Sequence[str] = SHARINGS, repeats: int = 3,
                     warmup: int = 1, steps: int = 2, time_warmup: int = 2, time_rounds: int = 12,
                     threads: int = 2, parallel: int = 2, path_seed: int = 0, seed: int = 0,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    path = space.sample(num_classes, random.Random(path_seed))
    names = config_names(gates, phases, sharings)
    spec0 = {"space": dict(space.spec_dict), "num_classes": num_classes, "batch_size": batch_size,
             "path": path.to_dict(with_def=False), "threads": threads, "warmup": warmup, "steps": steps,
             "seed": seed}
    t0 = time.perf_counter()
    # ---- memory: fresh subprocesses (can run side by side: RSS does not depend on load)
    jobs = [dict(spec0, name=n, profile=(r == 0)) for r in range(repeats) for n in names]
    log(f"memory: {len(jobs)} subprocesses ({len(names)} configurations x {repeats} repeats, "
        f"{parallel} at a time)")
    done = [0]

    def run(spec):
        r = _run_worker(spec)
        done[0] += 1
        log(f"  [{done[0]}/{len(jobs)}] {spec['name']}: {statistics.median(r['total_mb']):.1f} MB "
            f"({r['seconds']:.0f} s)")
        return r

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        results = list(pool.map(run, jobs))
    mem: dict[str, dict[str, Any]] = {}
    for n in names:
        rs = [r for r in results if r["name"] == n]
        mem[n] = {
            "step_mb": statistics.median(statistics.median(r["step_mb"]) for r in rs),
            "total_mb": statistics.median(statistics.median(r["total_mb"]) for r in rs),
            "step_mb_repeats": [statistics.median(r["step_mb"]) for r in rs],
            "torch_peak_mb": rs[0].get("torch_peak_mb"),
            "params": rs[0]["params"],
            "method": rs[0]["method"],
            "process_peak_mb": statistics.median(r["process_peak_mb"] for r in rs),
            "runtime_mb": statistics.median(r.get("runtime_mb", 0.0) for r in rs),
        }
    log(f"memory done in {time.perf_counter() - t0:.0f} s; timing {len(names)} configurations in one process")
    # ---- time: one process, interleaved
    torch.set_num_threads(threads)
    batch = make_batch(space, num_classes, batch_size, seed)
    fns = {n: build_step(n, space, num_classes, path, batch, seed=seed)[0] for n in names}
    tim = time_steps(fns, warmup=time_warmup, rounds=time_rounds, seed=seed, reference="standalone/sampled")
    del fns
    ref_s, ref_l = mem["standalone/sampled"], mem["standalone/largest"]
    rows = []
    for n in names:
        m, t = mem[n], tim[n]
        rows.append({
            "config": n, **{k: m[k] for k in ("step_mb", "total_mb", "torch_peak_mb", "params", "process_peak_mb",
                                              "runtime_mb")},
            "step_ms": t["median_ms"], "step_ms_iqr": t["iqr_ms"],
            "mem_vs_sampled": m["total_mb"] / ref_s["total_mb"],
            "mem_vs_largest": m["total_mb"] / ref_l["total_mb"],
            "step_mem_vs_sampled": m["step_mb"] / ref_s["step_mb"],
            "time_vs_sampled": t["ratio_to_standalone/sampled"],
            "time_vs_largest": t["median_ms"] / tim["standalone/largest"]["median_ms"],
        })
    verdict = _verdict(rows)
    return {
        "space": space.name, "batch_size": batch_size, "num_classes": num_classes, "threads": threads,
        "sampled_path": dict(path.choices), "repeats": repeats, "steps": steps, "time_rounds": time_rounds,
        "memory_method": mem[names[0]]["method"],
        "rows": rows, "verdict": verdict, "seconds": round(time.perf_counter() - t0, 1),
        "load_avg": os.getloadavg(),
    }


def _verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["config"]: r for r in rows}
    out: dict[str, Any] = {}
    for sharing in SHARINGS:
        one, full = by.get(f"one/weight/{sharing}"), by.get(f"full/weight/{sharing}")
        if one is None or full is None:
            continue
        out[sharing] = {
            "one_weight_mem": one["mem_vs_sampled"], "one_weight_time": one["time_vs_sampled"],
            "full_weight_mem": full["mem_vs_sampled"], "full_weight_time": full["time_vs_sampled"],
            "one_ok": one["mem_vs_sampled"] <= 1.15 and one["time_vs_sampled"] <= 1.15,
            "full_ok": full["mem_vs_sampled"] >= 3.0 and full["time_vs_sampled"] >= 3.0,
        }
    return out


def markdown(res: Mapping[str, Any]) -> str:
    lines = [
        f"### memory and step time ({res['space']}, batch {res['batch_size']}, {res['threads']} threads; "
        f"medians of {res['repeats']} subprocesses x {res['steps']} steps / {res['time_rounds']} timing rounds; "
        f"load avg {res['load_avg'][0]:.2f})",
        "",
        "| configuration | params | peak MB (total) | step MB | torch alloc. MB | step ms | mem / sampled | "
        "time / sampled | mem / largest | time / largest |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        saved = f"{r['torch_peak_mb']:.1f}" if r.get("torch_peak_mb") is not None else "-"
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.3f}M | {r['total_mb']:.1f} | {r['step_mb']:.1f} | {saved} | "
            f"{r['step_ms']:.1f} | {r['mem_vs_sampled']:.2f}x | {r['time_vs_sampled']:.2f}x | "
            f"{r['mem_vs_largest']:.2f}x | {r['time_vs_largest']:.2f}x |")
    rt = [r.get("runtime_mb") for r in res["rows"] if r.get("runtime_mb")]
    if rt:
        lines.append("")
        lines.append(f"peak MB (total) = peak RSS of the step minus the primed torch runtime's RSS "
                     f"(~{statistics.median(rt):.0f} MB, the same in every configuration, so left out); step MB = peak "
                     f"minus RSS just before the step; torch alloc. = torch profiler's allocator peak in one step.")
    for sharing, v in res["verdict"].items():
        lines.append("")
        lines.append(
            f"{sharing}: one-gate weight step {v['one_weight_mem']:.2f}x memory / {v['one_weight_time']:.2f}x time "
            f"of the standalone sampled path (goal <= 1.15x: {'met' if v['one_ok'] else 'NOT met'}); "
            f"full mixture {v['full_weight_mem']:.2f}x / {v['full_weight_time']:.2f}x "
            f"(goal >= 3x: {'met' if v['full_ok'] else 'NOT met'})")
    return "\n".join(lines)


def plot(res: Mapping[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    labels = [r["config"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(rows)), 4))
    xs = range(len(rows))
    w = 0.4
    ax.bar([i - w / 2 for i in xs], [r["mem_vs_sampled"] for r in rows], w, label="peak memory")
    ax.bar([i + w / 2 for i in xs], [r["time_vs_sampled"] for r in rows], w, label="step time")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.15, color="g", ls="--", lw=0.8, label="1.15x")
    ax.axhline(3.0, color="r", ls="--", lw=0.8, label="3x")
    ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ratio to the standalone sampled path")
    ax.set_title(f"{res['space']}, batch {res['batch_size']}")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # the subprocess worker
    print(json.dumps(worker(json.loads(sys.argv[1]))))
