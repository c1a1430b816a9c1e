"""Slimmable networks (Yu et al.) and AutoSlim: train every width at once, then slim greedily to targets.

Training (sandwich rule, one optimizer step per batch): every batch runs the widest network, the
narrowest and ``n_random`` random width choices (``random_widths``: ``stage``, a random width per
stage, non-uniform nets; ``uniform``, one random multiplier for every stage; ``mixed``, either;
``budget``, the default, either a uniform one or a per-stage net whose predicted cost is in the
export band ``[min_fraction * T, T]`` of a random target ``T``, so that the nets the width search
will choose from are trained as such).
Gradients of all of them accumulate; then one SGD step. In-place distillation (on by default): the
widest learns from the labels, every other width from the widest's *detached* soft predictions,
mixed with the labels by ``distill_weight`` (``w * KD + (1 - w) * CE``; 1: the teacher only, as in
US-Nets; ``distill=false``: labels for all). A short schedule is why the default mixes: on
texshapes_width in 10 epochs, the teacher alone (w = 1) left every width below the same width
trained alone, because the widest is a poor teacher for most of the run (see docs/widths.md for
the measurements). ``warmup_epochs`` train the widest only; optional
channel reordering (``reorder: l1``) sorts every stage's channels by importance where the warm-up
ends (before any training when there is none), so that narrow slices keep the important channels.

Width search (AutoSlim): start from the widest; at each step try narrowing each stage by one width
step, evaluate each candidate on the arch split after BatchNorm calibration (exact statistics over
``calib_batches`` training batches), and keep the one that loses the least accuracy per unit of
cost saved (latency table ms or FLOPs). The network is recorded for every target the moment its
predicted cost drops to or below it, so several targets come out of one pass. Every network
evaluated goes into a table (``width_search.csv`` / ``.json`` in each export). Then (defaults) the
uniform widths are checked and each target's net is widened within its target while its score holds;
every export's predicted cost is kept in ``[min_fraction * T, T]`` where a net there is reachable
(see :func:`greedy_slim`).

Op decisions (``ops``): ``largest`` / ``smallest`` fix every layer's op (a width-only search, as
AutoSlim); ``search`` searches them with the widths: the sandwich's widest net runs every layer's
largest op, the narrowest its smallest (``zero`` where allowed), the random ones random ops, and the
greedy search may also step one layer down to its next cheaper op at the current widths (priced by
the same latency table, whose entries are per width).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from nas.errors import UserError, check_choice
from nas.export import evaluate
from nas.report.slimmable_plots import plot_width_search
from nas.strategies.base import SearchStrategy
from supernets.arch import Arch
from supernets.bn import calibrate_bn
from supernets.slimmable import BN_MODES, reorder_channels
from supernets.space import SearchSpace, op_size, width_choice, width_decision
from supernets.supernet import Supernet

OPS_MODES = ("largest", "smallest", "search")
REORDER = ("l1", "bn")
RANDOM_WIDTHS = ("stage", "uniform", "mixed", "budget")
#: ``random_widths=budget`` draws per-stage nets whose predicted cost is in [b * T, T] of a target T, b the export
#: band ``min_fraction``, or this without one
BUDGET_BAND = 0.85
#: at most this many per-stage width choices are priced for the budget pool (all of them in smaller spaces)
BUDGET_POOL = 20000


def soft_cross_entropy(logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of ``logits`` against soft targets (scaled by T^2 as in Hinton et al.)."""
    logp = F.log_softmax(logits / temperature, dim=1)
    return -(teacher_probs * logp).sum(1).mean() * temperature ** 2


def greedy_slim(space: SearchSpace, base_choices: Mapping[str, str], num_classes: int, predict: Callable[[Arch], float],
                evaluate: Callable[[Arch], float], targets: Mapping[str, float],
                log: Callable[[str], Any] | None = None,
                op_cost: Callable[[Any, str, int, int], float] | None = None,
                uniform: Sequence[Sequence[int]] = (), fill: bool = False, min_fraction: float | None = None,
                ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """AutoSlim's greedy slimming over the stage widths of ``space``, starting from the widest with
    the ops of ``base_choices``.

    With ``op_cost(layer, op, in_chs, out_chs)`` the ops are searched too: besides narrowing a stage,
    a step may replace one layer's op by its next cheaper op at the current widths.

    ``uniform``: widths (one list per uniform multiplier) evaluated after the greedy pass; a target
    whose greedy network scored lower than a uniform one within the target takes the uniform one (the
    search never returns a network that loses to a plain width multiplier on the same split). ``fill``:
    then the budget is filled: each target's network widens one stage by one step at a time, the best-scoring
    widening that stays within the target, as long as the score does not drop (``filled`` counts the
    steps; rows of kind ``fill``).

    ``min_fraction``: an export should use its budget, its predicted cost in ``[min_fraction * T, T]``.
    The uniform check then only takes uniform widths in that band, and the fill widens a network below
    the band even where its score drops (the best-scoring widening within ``T`` each step) until it
    reaches the band or nothing more fits. The search's score favours the sandwich's narrowest net,
    which trains at every step: without the band, a tight target tends to get the narrowest net far
    below it (``None``: no lower bound).

    Returns ``(found, rows)``: ``found[label]`` = ``{"arch", "cost", "acc", "step", "target", "source"}``
    for every target (the first network on the greedy path whose predicted cost is <= the target, or
    the better uniform one, ``source`` ``greedy`` / ``uniform``; a replaced greedy pick stays under
    ``"greedy"``), and one row per network evaluated (``kind`` ``greedy`` / ``uniform``, ``step``,
    ``stage`` narrowed or ``layer`` changed, ``widths``, ``ops``, ``cost``, ``acc``, ``drop_per_cost``,
    ``chosen``). ``evaluate`` is called once per distinct network.
    """
    sw = space.stage_widths
    cache: dict[Arch, float] = {}

    def arch_of(idx: Sequence[int], ops: Mapping[str, str]) -> Arch:
        widths = {width_decision(s + 1): width_choice(sw[s][i]) for s, i in enumerate(idx)}
        return space.make_arch({**ops, **widths}, num_classes)

    def acc_of(arch: Arch) -> float:
        if arch not in cache:
            cache[arch] = float(evaluate(arch))
        return cache[arch]

    def row(step, move, idx, ops, cost, acc, score, chosen, kind="greedy"):
        r = {"kind": kind, "step": step, "stage": move if isinstance(move, int) else None,
             "widths": [sw[s][i] for s, i in enumerate(idx)], "cost": cost, "acc": acc, "drop_per_cost": score,
             "chosen": chosen}
        if op_cost is not None:
            r["layer"] = move if isinstance(move, str) else None
            r["ops"] = [ops[layer.name] for layer in space.layers]
        return r

    def moves(idx, ops):
        for s in range(len(sw)):
            if idx[s] > 0:
                yield s + 1, tuple(i - 1 if k == s else i for k, i in enumerate(idx)), ops
        if op_cost is None:
            return
        chs = space.layer_chs(arch_of(idx, ops))
        for layer, (cin, cout) in zip(space.layers, chs):
            here = op_cost(layer, ops[layer.name], cin, cout)
            cheaper = [(op_cost(layer, o, cin, cout), o) for o in layer.choices if op_cost(layer, o, cin, cout) < here]
            if cheaper:
                yield layer.name, idx, {**ops, layer.name: max(cheaper)[1]}

    idx = tuple(len(ws) - 1 for ws in sw)
    ops = {layer.name: base_choices[layer.name] for layer in space.layers}
    cur = arch_of(idx, ops)
    cur_cost, cur_acc = float(predict(cur)), acc_of(cur)
    rows: list[dict[str, Any]] = [row(0, None, idx, ops, cur_cost, cur_acc, None, True)]
    found: dict[str, dict[str, Any]] = {}

    def record(step: int) -> None:
        for label, t in targets.items():
            if label not in found and cur_cost <= t:
                found[label] = {"arch": cur, "cost": cur_cost, "acc": cur_acc, "step": step, "target": t,
                                "source": "greedy"}

    record(0)
    step = 0
    while len(found) < len(targets):
        step += 1
        cands = []
        for move, nidx, nops in moves(idx, ops):
            arch = arch_of(nidx, nops)
            cost, acc = float(predict(arch)), acc_of(arch)
            saved = cur_cost - cost
            drop = cur_acc - acc
            score = drop / saved if saved > 0 else math.inf
            r = row(step, move, nidx, nops, cost, acc, score if math.isfinite(score) else None, False)
            rows.append(r)
            cands.append((score, -saved, drop, nidx, nops, arch, r, move))
        if not cands:
            break
        # the least accuracy lost per unit of cost saved; a step that saves nothing only when nothing else is left
        useful = [c for c in cands if math.isfinite(c[0])]
        best = min(useful, key=lambda c: (c[0], c[1])) if useful else min(cands, key=lambda c: (c[2], c[1]))
        best[6]["chosen"] = True
        idx, ops, cur = best[3], best[4], best[5]
        cur_cost, cur_acc = best[6]["cost"], best[6]["acc"]
        if log:
            what = f"stage {best[7]}" if isinstance(best[7], int) else f"{best[7]} -> {ops[best[7]]}"
            log(f"width search step {step}: {what}; widths {best[6]['widths']}, cost {cur_cost:.4g}, "
                f"acc {100 * cur_acc:.2f}%")
        record(step)
    base_ops = {layer.name: base_choices[layer.name] for layer in space.layers}
    for widths in uniform:
        idx = tuple(sw[s].index(int(w)) for s, w in enumerate(widths))
        arch = arch_of(idx, base_ops)
        cost, acc = float(predict(arch)), acc_of(arch)
        rows.append(row(None, None, idx, base_ops, cost, acc, None, False, kind="uniform"))
        for label, t in targets.items():
            f = found.get(label)
            in_band = min_fraction is None or cost >= min_fraction * t
            if cost <= t and in_band and (f is None or acc > f["acc"]):
                # the greedy pick it replaces (kept once, even if a later uniform width replaces this one)
                greedy = f if f is None or f["source"] == "greedy" else f.get("greedy")
                found[label] = {"arch": arch, "cost": cost, "acc": acc, "step": None, "target": t, "source": "uniform"}
                if greedy is not None:
                    found[label]["greedy"] = {k: greedy[k] for k in ("arch", "cost", "acc", "step")}
    if fill:  # fill the budget: widen one stage at a time, within the target, while arch-split accuracy holds
        # (below the band: whatever the accuracy)
        for label, t in targets.items():
            f = found.get(label)
            if f is None:
                continue
            idx = tuple(sw[s].index(w) for s, w in enumerate(space.widths(f["arch"])))
            ops = {layer.name: f["arch"].choices[layer.name] for layer in space.layers}
            cur, cur_acc, cur_cost, steps = f["arch"], f["acc"], f["cost"], 0
            while True:
                cands = []
                for s in range(len(sw)):
                    if idx[s] + 1 < len(sw[s]):
                        nidx = tuple(i + 1 if k == s else i for k, i in enumerate(idx))
                        arch = arch_of(nidx, ops)
                        cost = float(predict(arch))
                        if cost <= t:
                            acc = acc_of(arch)
                            rows.append(row(None, s + 1, nidx, ops, cost, acc, None, False, kind="fill"))
                            cands.append((acc, -cost, nidx, arch, cost, rows[-1]))
                best = max(cands, key=lambda c: c[:2]) if cands else None
                below = min_fraction is not None and cur_cost < min_fraction * t
                if best is None or (best[0] < cur_acc and not below):
                    break
                acc, _, idx, cur, cur_cost, r = best
                r["chosen"] = True
                cur_acc, steps = acc, steps + 1
            if steps:
                found[label] = {**f, "arch": cur, "cost": cur_cost, "acc": cur_acc, "filled": steps}
    if log:
        for label, f in found.items():
            if min_fraction is not None and f["cost"] < min_fraction * f["target"]:
                log(f"width search {label}: no network in [{min_fraction:g}, 1] x the target was reached "
                    f"(cost {f['cost']:.4g} for a target of {f['target']:.4g}); exporting it anyway")
            if f["source"] == "uniform":
                log(f"width search {label}: a uniform width within the target scored higher than the greedy net "
                    f"({100 * f['acc']:.2f}% vs {100 * f['greedy']['acc']:.2f}%); exporting the uniform one")
    return found, rows


class SlimmableSearch(SearchStrategy):
    name = "slimmable"

    def __init__(self, supernet, cost_model, targets=(0.4, 0.6, 0.8), *, bn: str = "switchable",
                 n_random: int = 2, distill: bool = True, distill_temperature: float = 1.0, distill_weight: float = 0.5,
                 reorder: str | None = None, ops: str = "largest", warmup_epochs: int = 0,
                 weight_lr: float = 0.05, weight_momentum: float = 0.9, weight_decay: float = 4e-5,
                 nesterov: bool = True, label_smoothing: float = 0.0, grad_clip: float = 5.0,
                 calib_batches: int = 20, eval_batches: int | None = None, random_widths: str = "budget",
                 uniform_check: bool = True, fill: bool = True, min_fraction: float | None = 0.9):
        space: SearchSpace = supernet.space
        if not space.has_widths:
            raise UserError(f"strategy slimmable searches widths, and space {space.name!r} has none; use "
                            f"space=mbv2_tiny_slim, or give this space width multipliers, e.g. "
                            f"'+space.widths=[0.5,0.75,1.0]'")
        check_choice("strategy.module.bn", bn, BN_MODES)
        check_choice("strategy.module.ops", ops, OPS_MODES)
        check_choice("strategy.module.random_widths", random_widths, RANDOM_WIDTHS)
        check_choice("strategy.module.reorder", reorder, (None, *REORDER))
        if isinstance(n_random, bool) or int(n_random) != n_random or n_random < 0:
            raise UserError(f"strategy.module.n_random={n_random!r} must be an integer >= 0 (random widths per "
                            f"batch besides the widest and the narrowest)")
        for key, v in (("distill", distill), ("uniform_check", uniform_check), ("fill", fill)):
            if not isinstance(v, bool):  # bool("no") would be True: a misspelt switch must not turn it on
                raise UserError(f"strategy.module.{key}={v!r} must be true or false")
        if min_fraction is not None and (isinstance(min_fraction, bool) or not isinstance(min_fraction, (int, float))
                                         or not 0.0 < float(min_fraction) <= 1.0):
            raise UserError(f"strategy.module.min_fraction={min_fraction!r} must be in (0, 1] (an export's predicted "
                            f"cost is kept within [min_fraction, 1] x its target), or null for no lower bound")
        for key, v in (("calib_batches", calib_batches), ("eval_batches", eval_batches)):
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
                raise UserError(f"strategy.module.{key}={v!r} must be a positive integer")
        if supernet.bn_mode != bn:  # a fresh supernet with the other BatchNorm kind (before any training)
            supernet = Supernet(space, supernet.num_classes, weight_sharing=supernet.weight_sharing, bn=bn)
        super().__init__(supernet, cost_model, targets)
        self.automatic_optimization = False
        self.bn = bn
        self.n_random = int(n_random)
        self.random_widths = random_widths
        self.uniform_check = uniform_check
        self.fill = fill
        self.min_fraction = None if min_fraction is None else float(min_fraction)
        self.distill = distill
        self.temperature = float(distill_temperature)
        if not 0.0 < float(distill_weight) <= 1.0:
            raise UserError(f"strategy.module.distill_weight={distill_weight} must be in (0, 1] (the share of the "
                            f"distillation loss in a non-widest net's loss; the rest is the label loss)")
        self.distill_weight = float(distill_weight)
        self.reorder = reorder
        self.warmup_epochs = int(warmup_epochs)
        self.weight_opt_args = dict(lr=weight_lr, momentum=weight_momentum, weight_decay=weight_decay,
                                    nesterov=nesterov)
        self.label_smoothing = label_smoothing
        self.grad_clip = grad_clip
        self.calib_batches = int(calib_batches)
        self.eval_batches = int(eval_batches) if eval_batches else None
        key = op_size  # expand x kernel area, then SE, then a costlier activation
        self.search_ops = ops == "search"
        self.ops = ops
        pick = min if ops == "smallest" else max
        self.base_choices = {layer.name: pick((c for c in layer.choices if c != "zero"), key=key)
                             for layer in space.layers}
        # the narrowest net of the sandwich (and the cheapest reachable): smallest ops when they are searched
        self.small_choices = ({layer.name: "zero" if "zero" in layer.choices else min(layer.choices, key=key)
                               for layer in space.layers} if self.search_ops else dict(self.base_choices))
        self.widest = [max(ws) for ws in space.stage_widths]
        self.narrowest = [min(ws) for ws in space.stage_widths]
        self.supernet.set_active(self.arch_for(self.widest))  # fixed ops, widest widths
        self._check_targets()
        self.last_sandwich: list[list[int]] = []  # the widths trained in the last step (widest first)
        self.last_ops: list[list[str]] = []  # and the ops of every layer in each of them
        self._datamodule = None
        self._eval_net = None
        self._derived: dict[str, Any] | None = None
        self._budget_pool: dict[str, list[tuple[int, ...]]] | None = None
        self._epoch_losses: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ targets
    def arch_for(self, widths: Sequence[int], ops: Mapping[str, str] | None = None) -> Arch:
        choices = {**(ops or self.base_choices), **{width_decision(s + 1): width_choice(w) for s, w in enumerate(widths)}}
        return self.supernet.space.make_arch(choices, self.supernet.num_classes)

    def _check_targets(self) -> None:
        """Every target is reachable by the narrowest net this strategy trains."""
        if not self.targets:
            raise UserError("strategy.targets is empty; give one or more latency targets, e.g. "
                            "strategy.targets=[0.3,0.5,0.7] (fractions of the largest net) or ['2.5ms']")
        lo = self.cost_model.predict(self.arch_for(self.narrowest, self.small_choices))
        hi = self.cost_model.predict(self.arch_for(self.widest))
        unit = self.cost_model.unit
        for label, value in self.targets.items():
            if value < lo:
                raise UserError(f"target {label[1:]} = {value:.4g} {unit} is below the narrowest network this "
                                f"strategy can reach ({lo:.4g} {unit}: every stage at its narrowest width, ops "
                                f"{sorted(set(self.small_choices.values()))}; fraction {lo / hi:.3f} of the widest); "
                                f"choose targets >= {lo:.4g}{unit} or fractions >= {lo / hi:.3f}")

    # ------------------------------------------------------------------ data and optimizers
    def train_loaders(self, datamodule):
        self._datamodule = datamodule  # BatchNorm calibration and the width search read its splits
        return datamodule.train_dataloader()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.supernet.weight_parameters(), **self.weight_opt_args)
        epochs = max(1, self.trainer.max_epochs or 1)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)]

    # ------------------------------------------------------------------ training
    def sample_widths(self) -> list[int]:
        """The widths of one random network of the sandwich (torch's RNG, saved in checkpoints):
        ``random_widths=stage`` a random width per stage (uniform over the stage's widths), ``uniform``
        one random multiplier for every stage (:meth:`SearchSpace.uniform_widths`; one strictly between
        the narrowest and the widest where there is one, since those run every step anyway), ``mixed``
        either, with probability 1/2; ``budget`` a uniform one or, with probability 1/2, a per-stage net
        from :meth:`budget_pool` of a random target (its predicted cost in the export band under it):
        the nets the width search will pick from are trained as such, not only the uniform widths."""
        kind = self.random_widths
        if kind in ("mixed", "budget") and float(torch.rand(())) < 0.5:
            kind = "uniform"
        elif kind == "mixed":
            kind = "stage"
        if kind == "budget":
            pools = list(self.budget_pool().values())
            pool = pools[int(torch.randint(len(pools), (1,)))]
            return list(pool[int(torch.randint(len(pool), (1,)))])
        if kind == "uniform":  # the sandwich's ends already run every step: draw among the widths between them
            configs = list(self.supernet.space.uniform_widths().values())
            configs = configs[1:-1] or configs
            return list(configs[int(torch.randint(len(configs), (1,)))])
        return [ws[int(torch.randint(len(ws), (1,)))] for ws in self.supernet.space.stage_widths]

    def budget_pool(self) -> dict[str, list[tuple[int, ...]]]:
        """Per target: the per-stage widths (at the base ops) whose predicted cost is in ``[b * T, T]``,
        ``b`` the export band ``min_fraction`` (``BUDGET_BAND`` without one); where none is, the 8 below
        ``T`` closest to it (every target is at least the narrowest net's cost, so no pool is empty).
        Every width choice of the space is priced when there are at most ``BUDGET_POOL``, else that many
        drawn with a fixed seed (so every rank and every resumed run has the same pool). Built once."""
        if self._budget_pool is None:
            sw = self.supernet.space.stage_widths
            if math.prod(len(ws) for ws in sw) <= BUDGET_POOL:
                combos = sorted(itertools.product(*sw))
            else:
                g = torch.Generator().manual_seed(0)
                combos = sorted({tuple(ws[int(torch.randint(len(ws), (1,), generator=g))] for ws in sw)
                                 for _ in range(BUDGET_POOL)})
            costs = [float(self.cost_model.predict(self.arch_for(c))) for c in combos]
            pools, band = {}, BUDGET_BAND if self.min_fraction is None else self.min_fraction
            for label, t in self.targets.items():
                pool = [c for c, cost in zip(combos, costs) if band * t <= cost <= t]
                if not pool:
                    below = sorted((t - cost, c) for c, cost in zip(combos, costs) if cost <= t)
                    pool = [c for _, c in below[:8]] or [tuple(self.narrowest)]
                pools[label] = pool
            self._budget_pool = pools
        return self._budget_pool

    def sample_ops(self) -> dict[str, str]:
        """A random op per layer (uniform over its choices) when ops are searched, else the fixed ones."""
        if not self.search_ops:
            return dict(self.base_choices)
        return {l.name: l.choices[int(torch.randint(len(l.choices), (1,)))] for l in self.supernet.space.layers}

    def sandwich(self) -> list[tuple[list[int], dict[str, str]]]:
        """(widths, ops) of every network trained in this step: widest first (the teacher)."""
        widest = (list(self.widest), dict(self.base_choices))
        if self.current_epoch < self.warmup_epochs:
            return [widest]
        return [widest, (list(self.narrowest), dict(self.small_choices))] + [
            (self.sample_widths(), self.sample_ops()) for _ in range(self.n_random)]

    def _sync(self, configs):
        """Every rank trains rank 0's sampled networks."""
        if not self.distributed:
            return configs
        layers = self.supernet.space.layers
        rows = [w + [l.choices.index(ops[l.name]) for l in layers] for w, ops in configs]
        rows = self.trainer.strategy.broadcast(torch.tensor(rows, dtype=torch.long), src=0).tolist()
        n = len(self.widest)
        return [(r[:n], {l.name: l.choices[i] for l, i in zip(layers, r[n:])}) for r in rows]

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._epoch_losses = {}
        if self.reorder and self.current_epoch == self.warmup_epochs:
            reorder_channels(self.supernet, self.reorder)
            for opt in self.trainer.optimizers:  # momentum buffers described the old channel order
                opt.state.clear()
            self.history.append({"epoch": int(self.current_epoch), "event": f"channels reordered by {self.reorder}"})

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        net = self.supernet
        x, y = batch
        configs = self._sync(self.sandwich())
        self.last_sandwich = [w for w, _ in configs]
        self.last_ops = [[ops[l.name] for l in net.space.layers] for _, ops in configs]
        opt.zero_grad(set_to_none=True)
        teacher = None
        losses = {}
        for k, (widths, ops) in enumerate(configs):
            if self.search_ops:
                net.set_active(self.arch_for(widths, ops))
            else:
                net.set_widths(widths)
            logits = net(x)
            if k == 0 or not self.distill:
                loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
            else:
                loss = soft_cross_entropy(logits, teacher, self.temperature)
                if self.distill_weight < 1.0:
                    w = self.distill_weight
                    loss = w * loss + (1 - w) * F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
            if k == 0:
                teacher = F.softmax(logits.detach() / self.temperature, dim=1)
            self.manual_backward(loss)
            kind = "widest" if k == 0 else "narrowest" if k == 1 else "random"
            losses.setdefault(kind, []).append(float(loss.detach()))
        opt.step()
        net.set_active(self.arch_for(self.widest))
        self.count_images(len(y))
        for kind, v in losses.items():
            self._epoch_losses.setdefault(kind, []).append(sum(v) / len(v))
        self.log("train/loss", losses["widest"][0], prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        if "narrowest" in losses:
            self.log("train/loss_narrowest", losses["narrowest"][0], on_step=False, on_epoch=True, batch_size=len(y))

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        row = {"epoch": int(self.current_epoch)}
        row.update({f"loss_{k}": sum(v) / len(v) for k, v in self._epoch_losses.items() if v})
        self.history.append(row)

    # ------------------------------------------------------------------ evaluation
    def _calib_batches(self) -> list:
        dm = self._datamodule
        if dm is None:
            return []
        return [b for b in dm.calib_dataloader(self.calib_batches)]

    def calibrated_subnet(self, arch: Arch, calib: list | None = None) -> torch.nn.Module:
        """The static net of ``arch`` with BatchNorm statistics recomputed exactly over the calibration
        batches (the supernet itself is not touched)."""
        sub = self.supernet.extract(arch).cpu()
        batches = self._calib_batches() if calib is None else calib
        if batches:
            calibrate_bn(sub, batches)
        return sub.eval()

    def on_validation_epoch_start(self) -> None:
        """The widest net, calibrated; the shared validation step and epoch end evaluate and drop it."""
        self._eval_net = self.calibrated_subnet(self.arch_for(self.widest)).to(self.device)

    # ------------------------------------------------------------------ the result
    def width_search(self, log: Callable[[str], Any] | None = print) -> dict[str, Any]:
        """Run the greedy width search once (cached): every evaluation on the arch split after BN
        calibration on the same training batches."""
        if self._derived is not None:
            return self._derived
        if self._datamodule is None:
            raise RuntimeError("the width search needs the data: call train_loaders(datamodule) (trainer.fit does)")
        calib = self._calib_batches()
        arch_batches = []
        for i, b in enumerate(self._datamodule.val_dataloader()):  # the arch split, fixed order
            if self.eval_batches and i >= self.eval_batches:
                break
            arch_batches.append(b)
        self.supernet.eval()

        def eval_arch(arch: Arch) -> float:
            return evaluate(self.calibrated_subnet(arch, calib), arch_batches)

        found, rows = greedy_slim(self.supernet.space, self.base_choices, self.supernet.num_classes,
                                  self.cost_model.predict, eval_arch, self.targets, log=log,
                                  op_cost=self.cost_model.layer_cost if self.search_ops else None,
                                  uniform=list(self.supernet.space.uniform_widths().values()) if self.uniform_check else (),
                                  fill=self.fill, min_fraction=self.min_fraction)
        self.supernet.set_active(self.arch_for(self.widest))
        self._derived = {"found": found, "rows": rows}
        return self._derived

    def derive(self) -> Arch:
        if self._derived is None:
            return self.arch_for(self.widest)
        first = next(iter(self.targets))
        return self._derived["found"][first]["arch"]

    def derive_all(self) -> dict[str, Arch]:
        found = self.width_search()["found"]
        # tightest target last, as the labels sort; every target has an arch (reachability is checked up front)
        return {label: found[label]["arch"] for label in self.targets}

    def search_state(self) -> Any:
        return {"targets": self.targets, "bn": self.bn, "ops": self.ops}

    def width_table(self) -> list[dict[str, Any]]:
        rows = self.width_search()["rows"]
        return [{**r, "widths": list(r["widths"])} for r in rows]

    def extra_plots(self, label: str | None = None, arch: Arch | None = None) -> dict[str, Callable]:
        """Files written into every export: the table of every width evaluated, and its plot."""
        if self._derived is None:
            return {}
        rows = self.width_table()
        def plain(v):
            if isinstance(v, Arch):
                return dict(v.choices)
            return {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v

        found = plain(self._derived["found"])
        unit = self.cost_model.unit

        def write_csv(path):
            buf = io.StringIO()
            w = csv.writer(buf)
            ops = self.search_ops
            w.writerow(["kind", "step", "stage", "widths"] + (["layer", "ops"] if ops else [])
                       + [f"cost_{unit or 'units'}", "acc", "drop_per_cost", "chosen"])
            for r in rows:
                w.writerow([r["kind"], "" if r["step"] is None else r["step"], r["stage"] or "",
                            "-".join(map(str, r["widths"]))]
                           + ([r["layer"] or "", " ".join(r["ops"])] if ops else [])
                           + [f"{r['cost']:.6g}", f"{r['acc']:.6f}",
                              "" if r["drop_per_cost"] is None else f"{r['drop_per_cost']:.6g}", int(r["chosen"])])
            path.write_text(buf.getvalue())

        def write_json(path):
            path.write_text(json.dumps({"unit": unit, "kind": self.cost_model.kind, "targets": self.targets,
                                        "found": found, "rows": rows}, indent=1))

        def plot(path):
            plot_width_search(rows, found, path, unit, this=label)

        return {"width_search.csv": write_csv, "width_search.json": write_json, "width_search.png": plot}
