"""Slimmable training vs. each width trained alone (issue 4's acceptance measurement).

    python -m nas.bench_slimmable data=digits epochs=10
    python -m nas.bench_slimmable data=texshapes epochs=10 bn=shared out=/tmp/slim_texshapes.json
    python -m nas.bench_slimmable data=digits lut=<table.json> targets=0.5,0.7,0.9   # costs in table ms

One slimmable supernet (sandwich rule, in-place distillation, ``bn`` switchable or shared) is trained
for ``epochs`` epochs; then every uniform width of the space (each multiplier of its ``widths``) is
extracted, BN-calibrated and evaluated on the test split. Each of those widths is also trained
alone, from scratch, for the same epochs with the same optimizer (SGD, cosine, batch size, gradient
clipping), and evaluated on the same test split. Then the greedy width search runs on the trained
supernet for ``targets`` (arch split, as in ``nas-search``) and its networks are evaluated on the test
split too, beside the uniform widths of similar cost (the uniform-width baseline). Costs are FLOPs,
or table ms with ``lut=<latency table file>``. Prints both tables and writes them as JSON (``out``).
Arguments are ``key=value``; the data and space configs are the Hydra groups of ``nas-search``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def _parse(argv: list[str]) -> dict[str, str]:
    opts = {"data": "digits", "space": "mbv2_tiny_slim", "epochs": "10", "seed": "0", "bn": "switchable",
            "n_random": "2", "distill": "true", "out": "", "threads": "1", "lut": "", "targets": "0.4,0.6,0.8"}
    for a in argv:
        if "=" not in a:
            raise SystemExit(f"arguments are key=value (keys: {', '.join(opts)}); got {a!r}")
        k, v = a.split("=", 1)
        if k not in opts:
            raise SystemExit(f"unknown key {k!r}; keys: {', '.join(opts)}")
        opts[k] = v
    return opts


def train_alone(net, datamodule, epochs: int, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 4e-5,
                grad_clip: float = 5.0) -> float:
    """Train ``net`` alone with the slimmable strategy's optimizer settings; returns wall seconds."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    t0 = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for x, y in datamodule.train_dataloader():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            opt.step()
        sched.step()
    return time.perf_counter() - t0


def run(opts: dict[str, str]) -> dict[str, Any]:
    import pytorch_lightning as pl
    import torch
    from hydra import compose, initialize_config_dir

    from supernets.blocks import space_timm_net
    from supernets.space import make_divisible
    from supernets.supernet import Supernet

    from .cli import CONF_DIR, instantiate, make_space
    from .cost import LatencyTable, build_flops_model
    from .export import evaluate
    from .strategies.slimmable import SlimmableSearch

    torch.set_num_threads(int(opts["threads"]))
    seed, epochs = int(opts["seed"]), int(opts["epochs"])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("search", overrides=[f"data={opts['data']}", f"space={opts['space']}", f"seed={seed}"])
    space = make_space(cfg.space)
    dm = instantiate(cfg.data)
    nc = dm.num_classes
    flops = build_flops_model(space, nc)
    cost = LatencyTable.load(opts["lut"], space) if opts["lut"] else flops
    targets = [t if t.endswith(("ms", "MFLOPs")) else float(t) for t in opts["targets"].split(",") if t]
    mults = sorted(float(m) for m in space.spec_dict.get("widths") or [1.0])
    divisor = int(space.spec_dict.get("width_divisor", 8))
    bases = [max(ws) / max(mults) for ws in space.stage_widths]

    pl.seed_everything(seed, verbose=False)
    module = SlimmableSearch(Supernet(space, nc), cost, targets=targets, bn=opts["bn"], n_random=int(opts["n_random"]),
                             distill=opts["distill"].lower() in ("1", "true", "yes"), calib_batches=20)
    trainer = pl.Trainer(max_epochs=epochs, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=module.train_loaders(dm))
    slim_seconds = time.perf_counter() - t0
    test = list(dm.test_dataloader())
    rows = []
    for m in mults:
        widths = [make_divisible(b * m, divisor) for b in bases]
        arch = module.arch_for(widths)
        slim_acc = evaluate(module.calibrated_subnet(arch), test)
        pl.seed_everything(seed, verbose=False)
        alone = space_timm_net(space, arch, nc)
        secs = train_alone(alone, dm, epochs)
        alone_acc = evaluate(alone, test)
        rows.append({"multiplier": m, "widths": widths, "mflops": flops.predict(arch), "cost": cost.predict(arch),
                     "slimmable_acc": slim_acc,
                     "alone_acc": alone_acc, "diff_points": 100 * (slim_acc - alone_acc), "alone_seconds": secs})
        print(f"x{m:<5} widths {widths}: slimmable {100 * slim_acc:.2f}%  alone {100 * alone_acc:.2f}%  "
              f"({100 * (slim_acc - alone_acc):+.2f} points)", flush=True)
    found = module.width_search(log=None)["found"]
    searched = []
    for label, f in found.items():
        acc = evaluate(module.calibrated_subnet(f["arch"]), test)
        searched.append({"label": label, "target": f["target"], "widths": module.supernet.space.widths(f["arch"]),
                         "cost": f["cost"], "arch_split_acc": f["acc"], "test_acc": acc})
    result = {"data": opts["data"], "space": space.name, "epochs": epochs, "seed": seed, "bn": opts["bn"],
              "n_random": int(opts["n_random"]), "distill": opts["distill"], "slimmable_seconds": slim_seconds,
              "cost_unit": cost.unit, "rows": rows, "searched": searched}
    print(f"\n| width | channels per stage | MFLOPs | slimmable (one run) | trained alone | difference |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| x{r['multiplier']:g} | {'-'.join(map(str, r['widths']))} | {r['mflops']:.2f} | "
              f"{100 * r['slimmable_acc']:.2f}% | {100 * r['alone_acc']:.2f}% | {r['diff_points']:+.2f} |")
    unit = cost.unit
    print(f"\n| export | target ({unit}) | widths | cost ({unit}) | test acc (greedy) |")
    print("|---|---|---|---|---|")
    for r in searched:
        print(f"| {r['label']} | {r['target']:.3f} | {'-'.join(map(str, r['widths']))} | {r['cost']:.3f} | "
              f"{100 * r['test_acc']:.2f}% |")
    print(f"\nuniform widths (the same supernet, calibrated): " + ", ".join(
        f"x{r['multiplier']:g} {r['cost']:.3f} {unit} {100 * r['slimmable_acc']:.2f}%" for r in rows))
    if opts["out"]:
        Path(opts["out"]).write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    run(_parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
