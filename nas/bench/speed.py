"""``nas-bench suite=speed``: samples/s of the training step under each speed option, in one run.

The weight step (zero_grad, forward, cross-entropy, backward, clip, SGD step) of two nets of the
space: ``standalone`` (the sampled path's static timm net, what ``nas-retrain`` trains) and
``supernet`` (the one-gate supernet on the same path, what a ProxylessNAS / evolution weight step
costs). Options:

* ``fp32``: the default;
* ``bf16``: ``torch.autocast`` with bfloat16 around forward and loss (``trainer.precision=bf16-mixed``);
* ``channels_last``: model and input in channels-last memory format;
* ``bf16_channels_last``: both;
* ``compile``: ``torch.compile`` of the net (20-100 s to compile; the supernet's path changes would
  recompile it, so it is timed for the standalone net only).

Every configuration is timed in the same shuffled rounds (:func:`nas.bench.memory.time_steps`), so
the machine's drift hits all alike; reported as samples/s (batch / median step time) and as the ratio
to ``fp32`` of the same net. Run it on a quiet machine; the load average is recorded beside it.
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from nas.bench.memory import force_path, make_batch, time_steps
from nas.errors import UserError

OPTIONS = ("fp32", "bf16", "channels_last", "bf16_channels_last", "compile")
NETS = ("standalone", "supernet")


def build_train_step(net_kind: str, option: str, space, num_classes: int, path, batch: tuple, *, lr: float = 0.05,
                     seed: int = 0) -> Callable[[], float]:
    """The weight step of ``net_kind`` under ``option``; returns a closure giving the step's loss."""
    from supernets.blocks import space_timm_net
    from supernets.supernet import Supernet

    torch.manual_seed(seed)
    x, y = batch
    channels_last = option in ("channels_last", "bf16_channels_last")
    bf16 = option in ("bf16", "bf16_channels_last")
    if net_kind == "standalone":
        net = space_timm_net(space, path, num_classes).train()
        params = list(net.parameters())
        prepare = None
    else:
        net = Supernet(space, num_classes, gate="one").train()
        params = net.weight_parameters()
        gen = torch.Generator().manual_seed(seed)

        def prepare() -> None:
            net.set_phase("weight")
            net.sample("probs", gen)
            force_path(net, path, seed)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(net) if option == "compile" else net
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=4e-5, nesterov=True)

    def step() -> float:
        if prepare is not None:
            prepare()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        return float(loss.detach())

    return step


def run_speed_suite(space, *, num_classes: int = 10, batch_size: int = 64, threads: int = 2,
                    options: Sequence[str] = OPTIONS[:4], nets: Sequence[str] = NETS, warmup: int = 3,
                    rounds: int = 15, seed: int = 0, log: Callable[[str], Any] = print) -> dict[str, Any]:
    bad = [o for o in options if o not in OPTIONS] + [n for n in nets if n not in NETS]
    if bad or not options or not nets:
        raise UserError(f"speed: unknown options or nets {bad}; options: {', '.join(OPTIONS)}; nets: {', '.join(NETS)}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        return _run(space, num_classes, batch_size, threads, options, nets, warmup, rounds, seed, log)
    finally:
        torch.set_num_threads(before)


def _run(space, num_classes, batch_size, threads, options, nets, warmup, rounds, seed, log) -> dict[str, Any]:
    path = space.sample(num_classes, random.Random(seed))
    batch = make_batch(space, num_classes, batch_size, seed)
    steps: dict[str, Callable[[], float]] = {}
    t0 = time.perf_counter()
    for n in nets:
        for o in options:
            if o == "compile" and n == "supernet":
                continue  # its path changes every step: it would recompile, not run faster
            steps[f"{n}/{o}"] = build_train_step(n, o, space, num_classes, path, batch, seed=seed)
    losses = {k: s() for k, s in steps.items()}  # one step each before timing (compiles, allocates)
    bad_loss = [k for k, v in losses.items() if not v == v or v == float("inf")]
    if bad_loss:
        raise RuntimeError(f"speed: non-finite loss in {bad_loss}")
    load_start = list(os.getloadavg())
    log(f"speed: {len(steps)} configurations, batch {batch_size}, {threads} threads, {rounds} rounds "
        f"(load avg {load_start[0]:.2f})")
    timed = time_steps(steps, warmup=warmup, rounds=rounds, seed=seed)
    rows = []
    for key, t in timed.items():
        n, o = key.split("/")
        base = timed.get(f"{n}/fp32")
        rows.append({"net": n, "option": o, "median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"],
                     "samples_per_s": batch_size / (t["median_ms"] / 1e3),
                     "speedup_vs_fp32": (base["median_ms"] / t["median_ms"]) if base else None})
    best = {n: max((r for r in rows if r["net"] == n), key=lambda r: r["samples_per_s"])["option"]
            for n in nets if any(r["net"] == n for r in rows)}
    return {"space": space.name, "batch_size": batch_size, "threads": threads, "rounds": rounds, "warmup": warmup,
            "path": dict(path.choices), "rows": rows, "fastest": best, "load_avg_start": load_start,
            "load_avg": list(os.getloadavg()), "seconds": round(time.perf_counter() - t0, 1),
            "cpu": torch.backends.cpu.get_cpu_capability()}


def markdown(res: Mapping[str, Any]) -> str:
    lines = [f"### training speed ({res['space']}, batch {res['batch_size']}, {res['threads']} threads, "
             f"{res['rounds']} interleaved rounds; CPU capability {res['cpu']}; load avg "
             f"{res['load_avg_start'][0]:.2f} at start, {res['load_avg'][0]:.2f} at the end)", "",
             "| net | option | step ms (median) | IQR ms | samples/s | vs fp32 |", "|---|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        sp = f"{r['speedup_vs_fp32']:.2f}x" if r["speedup_vs_fp32"] else "-"
        lines.append(f"| {r['net']} | {r['option']} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | "
                     f"{r['samples_per_s']:.0f} | {sp} |")
    lines += ["", "Fastest here: " + ", ".join(f"{n}: {o}" for n, o in res["fastest"].items()) + "."]
    return "\n".join(lines)
