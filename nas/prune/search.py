"""Choosing how many channels each group keeps, under a measured cost.

A *plan* is ``{group name: channels kept}``; :class:`Candidates` turns a plan into a pruned net (the
criterion's channel order decides which channels go) and keeps what it has measured. Costs are those of
whole nets: on a timed device every candidate net is measured end to end in groups of eight in
reference alternation, as the latency package measures subnets (:meth:`Hardware.measure_modules`), in
the units of the first pass (the reference's ms then), so passes minutes apart stay comparable. Whole
nets rather than a per-layer table: a pruned model's channel counts are arbitrary multiples of
``round_to``, a table over them would need as many entries as the search measures nets, and a whole-net
measurement is what the target is checked against at the end anyway (no model error to validate).

Searches (each returns one plan per target, largest target first):

* ``uniform``: one ratio for every group; the ratio is searched in two passes of seven ratios each
  (k-ary bisection, every pass measured together), keeping the widest plan under the target;
* ``global``: all channels ranked across groups by the criterion's normalised scores (Group Fisher's
  memory normalisation with ``memory_normalise``), the search over how many of them go;
* ``greedy`` (NetAdapt / AutoSlim): from the full model, step by step, each group thinned by one step
  is a candidate; all are measured in one pass together with the current plan (savings are differences
  within one pass), and their accuracy taken on a few held-out batches after BatchNorm recalibration;
  the one losing the least accuracy per unit of cost saved is kept. One trajectory
  serves every target: the plan is recorded as it first gets under each;
* ``evolution``: regularised evolution over per-group channel counts under a validated per-group
  latency table (:mod:`nas.prune.lut`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from nas.latency.analytic import count_flops
from nas.prune.graph import Group, min_keep, prune, round_keep
from supernets.bn import calibrate_bn

SEARCHES = ("uniform", "global", "greedy", "evolution")
COSTS = ("latency", "flops")


def plan_key(plan: Mapping[str, int]) -> tuple:
    return tuple(sorted((k, int(v)) for k, v in plan.items()))


class Candidates:
    """Pruned nets of one model by plan, their measured cost (cached per plan) and their accuracy."""

    def __init__(self, model: nn.Module, example: torch.Tensor, groups: Sequence[Group],
                 order: Mapping[str, Sequence[int]], *, hardware, cost: str = "latency", round_to: int = 8,
                 ignore: Sequence[str] = (), calib: Sequence = (), evalb: Sequence = (),
                 measure_kw: Mapping[str, Any] | None = None, log: Callable[[str], Any] = print):
        self.model, self.example, self.groups, self.order = model, example, list(groups), order
        self.hardware, self.cost, self.round_to, self.ignore = hardware, cost, int(round_to), list(ignore)
        self.calib, self.evalb, self.log = list(calib), list(evalb), log
        #: passed to ``measure_modules`` (``rel_ci``, ``max_repeats``: the adaptive measurement, which also
        #: leaves out calls another process preempted)
        self.measure_kw = dict(measure_kw or {})
        self.input_shape = tuple(example.shape[1:])
        self.reference_ms: float | None = None
        self.costs: dict[tuple, float] = {}
        self.accs: dict[tuple, float] = {}
        self.measured_nets = 0
        self._nets: dict[tuple, nn.Module] = {}

    def set_model(self, model: nn.Module, order: Mapping[str, Sequence[int]], calib: Sequence = (),
                  evalb: Sequence = ()) -> None:
        """Another model of the same structure (trained since) and the criterion's channel order: the
        measured costs stay (they depend on the channel counts only), pruned nets and accuracies go."""
        self.model, self.order, self.calib, self.evalb = model, order, list(calib), list(evalb)
        self._nets.clear()
        self.accs.clear()

    @property
    def unit(self) -> str:
        return "MFLOPs" if self.cost == "flops" else self.hardware.unit

    # ------------------------------------------------------------------ plans
    def full(self) -> dict[str, int]:
        return {g.name: g.channels for g in self.groups}

    def smallest(self) -> dict[str, int]:
        return {g.name: min_keep(g, self.round_to) for g in self.groups}

    def uniform(self, ratio: float) -> dict[str, int]:
        """Every group keeps ``1 - ratio`` of its channels (rounded)."""
        return {g.name: round_keep(g.channels, g.channels * (1 - ratio), self.round_to) for g in self.groups}

    def net(self, plan: Mapping[str, int]) -> tuple[nn.Module, list]:
        """A freshly pruned copy of the model for ``plan`` and its pruning history."""
        return prune(self.model, self.example, {k: v for k, v in plan.items()}, self.order, self.ignore)

    #: Pruned nets kept for reuse between a plan's measurement and its accuracy (a greedy step's candidates).
    KEEP_NETS = 64

    def _cached_net(self, plan: Mapping[str, int]) -> nn.Module:
        k = plan_key(plan)
        if k not in self._nets:
            if len(self._nets) >= self.KEEP_NETS:
                self._nets.pop(next(iter(self._nets)))
            self._nets[k] = self.net(plan)[0]
        return self._nets[k]

    # ------------------------------------------------------------------ costs
    def measure(self, plans: Sequence[Mapping[str, int]]) -> list[float]:
        """The cost of each plan (cached; the new ones measured together)."""
        todo = {}
        for p in plans:
            k = plan_key(p)
            if k not in self.costs and k not in todo:
                todo[k] = p
        if todo:
            nets = {f"net{i}": (self._cached_net(p), self.input_shape) for i, p in enumerate(todo.values())}
            if self.cost == "flops":
                res = {n: count_flops(m, s) / 1e6 for n, (m, s) in nets.items()}
            else:
                res = self.hardware.measure_modules(nets, reference_ms=self.reference_ms, **self.measure_kw)
                if self.reference_ms is None and "__reference__" in res:
                    self.reference_ms = res["__reference__"]
            self.measured_nets += len(nets)
            for i, k in enumerate(todo):
                self.costs[k] = float(res[f"net{i}"])
        return [self.costs[plan_key(p)] for p in plans]

    def remeasure(self, plans: Sequence[Mapping[str, int]]) -> list[float]:
        """A fresh measurement of ``plans`` together (not from the cache), e.g. of the exports, or of a
        greedy step's current plan beside its candidates (their differences then come from one pass)."""
        if self.cost == "flops" or not self.hardware.timed:
            return self.measure(plans)  # exact counts: nothing to measure again
        for p in plans:
            self.costs.pop(plan_key(p), None)
        return self.measure(plans)

    # ------------------------------------------------------------------ accuracy
    @torch.no_grad()
    def accuracy(self, plan: Mapping[str, int]) -> float:
        """Accuracy on the held-out batches after BatchNorm recalibration on the calibration batches."""
        k = plan_key(plan)
        if k not in self.accs:
            self.accs[k] = held_out_accuracy(self._cached_net(plan), self.calib, self.evalb)
        return self.accs[k]


@torch.no_grad()
def held_out_accuracy(net: nn.Module, calib: Sequence, evalb: Sequence) -> float:
    if calib:
        calibrate_bn(net, calib)
    net.eval()
    correct = total = 0
    for x, y in evalb:
        correct += int((net(x).argmax(1) == y).sum())
        total += len(y)
    return correct / max(1, total)


# ---------------------------------------------------------------------------------------- k-ary search
def kary_search(plan_of: Callable[[float], dict[str, int]], cands: Candidates, target: float, *,
                passes: int = 2, points: int = 7) -> tuple[dict[str, int], float, float]:
    """The least pruning ``x`` in [0, 1] (``plan_of(0)`` the full model, ``plan_of(1)`` the smallest) whose
    plan costs at most ``target``: ``passes`` rounds, each measuring ``points`` values of ``x`` evenly
    inside the current interval together. Returns (plan, cost, x)."""
    lo, hi = 0.0, 1.0
    best = (plan_of(1.0), cands.measure([plan_of(1.0)])[0], 1.0)
    for _ in range(passes):
        xs = [lo + (hi - lo) * (i + 1) / (points + 1) for i in range(points)]
        plans = [plan_of(x) for x in xs]
        costs = cands.measure(plans)
        under = [i for i, c in enumerate(costs) if c <= target]
        if under:
            i = under[0]
            if xs[i] <= best[2]:
                best = (plans[i], costs[i], xs[i])
            hi = xs[i]
            lo = xs[i - 1] if i > 0 else lo
        else:
            lo = xs[-1]
    return best


def search_uniform(cands: Candidates, targets: Mapping[str, float], log: Callable[[str], Any] = print
                   ) -> dict[str, dict[str, Any]]:
    out = {}
    for label, t in targets.items():
        plan, cost, x = kary_search(cands.uniform, cands, t)
        log(f"uniform {label}: ratio {x:.3f} -> {cost:.4g} {cands.unit} (target {t:.4g})")
        out[label] = {"plan": plan, "cost": cost, "ratio": round(x, 4)}
    return out


def global_plan_fn(cands: Candidates, scores: Mapping[str, np.ndarray]) -> Callable[[float], dict[str, int]]:
    """``x`` -> the plan removing the fraction ``x`` of all channels, lowest normalised scores first."""
    names, vals = [], []
    for g in cands.groups:
        names += [g.name] * g.channels
        vals.append(np.asarray(scores[g.name], dtype=np.float64))
    allv = np.concatenate(vals) if vals else np.zeros(0)
    ranked = np.argsort(allv, kind="stable")
    names_arr = np.asarray(names)

    def plan_of(x: float) -> dict[str, int]:
        k = int(round(x * len(ranked)))
        removed: dict[str, int] = {}
        for n in names_arr[ranked[:k]]:
            removed[n] = removed.get(n, 0) + 1
        return {g.name: (min_keep(g, cands.round_to) if x >= 1 else
                         round_keep(g.channels, g.channels - removed.get(g.name, 0), cands.round_to))
                for g in cands.groups}

    return plan_of


def search_global(cands: Candidates, targets: Mapping[str, float], scores: Mapping[str, np.ndarray],
                  log: Callable[[str], Any] = print) -> dict[str, dict[str, Any]]:
    plan_of = global_plan_fn(cands, scores)
    out = {}
    for label, t in targets.items():
        plan, cost, x = kary_search(plan_of, cands, t)
        log(f"global {label}: {100 * x:.1f}% of the channels removed -> {cost:.4g} {cands.unit} (target {t:.4g})")
        out[label] = {"plan": plan, "cost": cost, "removed_fraction": round(x, 4)}
    return out


def search_greedy(cands: Candidates, targets: Mapping[str, float], *, step: float = 0.125,
                  log: Callable[[str], Any] = print, max_steps: int = 1000) -> dict[str, dict[str, Any]]:
    """NetAdapt / AutoSlim (see the module docstring). ``step``: the fraction of a group's original
    channels one step removes (rounded to ``round_to``, at least ``round_to``)."""
    sizes = {g.name: max(cands.round_to, int(round(g.channels * step / cands.round_to)) * cands.round_to)
             for g in cands.groups}
    floor = cands.smallest()
    plan = cands.full()
    (cost,) = cands.measure([plan])
    acc = cands.accuracy(plan)
    pending = dict(sorted(targets.items(), key=lambda kv: -kv[1]))
    out: dict[str, dict[str, Any]] = {}
    trace = [{"step": 0, "cost": cost, "acc": acc, "thinned": None}]
    for i in range(1, max_steps + 1):
        for label, t in list(pending.items()):
            if cost <= t:
                out[label] = {"plan": dict(plan), "cost": cost, "held_out_acc": acc, "steps": i - 1}
                log(f"greedy {label}: reached after {i - 1} steps: {cost:.4g} {cands.unit} (target {t:.4g}), "
                    f"held-out acc {100 * acc:.2f}%")
                del pending[label]
        if not pending:
            break
        options = []
        for g in cands.groups:
            k = plan[g.name]
            if k <= floor[g.name]:
                continue
            new = max(floor[g.name], round_keep(g.channels, k - sizes[g.name], cands.round_to))
            if new < k:
                options.append((g.name, {**plan, g.name: new}))
        if not options:
            break
        # the current plan is measured again beside its candidates: a saving is a difference within one
        # pass, immune to the machine's load changing between steps
        cur, *costs = cands.remeasure([plan] + [p for _, p in options])
        best = None
        for (name, p), c in zip(options, costs):
            saved = cur - c
            a = cands.accuracy(p)
            # a step that saves nothing measurable ranks behind every step that does
            score = (acc - a) / saved if saved > 0 else math.inf
            key = (score, -saved)
            if best is None or key < best[0]:
                best = (key, name, p, c, a)
        prev = plan
        _, name, plan, cost, acc = best
        trace.append({"step": i, "cost": cost, "acc": acc, "thinned": name, "keep": plan[name]})
        log(f"greedy step {i}: {name} -> {plan[name]} channels: {cost:.4g} {cands.unit}, held-out acc "
            f"{100 * acc:.2f}%")
        crossed = {label: t for label, t in pending.items() if cost <= t}
        if crossed:
            for label, found in _refine_crossing(cands, prev, plan, name, crossed).items():
                found.update(steps=i, trace_step=i)
                out[label] = found
                del pending[label]
                log(f"greedy {label}: reached at step {i} with {name} -> {found['plan'][name]} channels "
                    f"(the step's {plan[name]} refined): {found['cost']:.4g} {cands.unit} (target "
                    f"{crossed[label]:.4g}), held-out acc {100 * found['held_out_acc']:.2f}%")
    for label, t in pending.items():  # not reached (noise at the floor): the smallest plan
        p = cands.smallest()
        (c,) = cands.measure([p])
        out[label] = {"plan": p, "cost": c, "held_out_acc": cands.accuracy(p), "steps": len(trace) - 1}
    for v in out.values():
        v["trace"] = trace[: v.pop("trace_step", v["steps"]) + 1]
    return out


def _refine_crossing(cands: Candidates, prev: Mapping[str, int], plan: Mapping[str, int], name: str,
                     targets: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """The step from ``prev`` to ``plan`` thinned group ``name`` by a whole greedy step and crossed each of
    ``targets``: the channel counts between the two (multiples of ``round_to``) are measured together, and
    a target takes the widest of them under it. One greedy step of a wide group can save far more than
    the last few per cent a target needs (NetAdapt's step size problem); without this the export lands
    well under its target, a net slower than allowed would have been more accurate. Targets no
    intermediate count meets are left to the main loop (which records ``plan`` for them)."""
    r = cands.round_to
    keeps = list(range(plan[name] + r, prev[name], r))
    if not keeps:
        return {}
    mids = [{**prev, name: k} for k in keeps]
    costs = cands.measure(mids)
    out = {}
    for label, t in targets.items():
        fits = [(k, p, c) for k, p, c in zip(keeps, mids, costs) if c <= t]
        if fits:
            _, p, c = max(fits, key=lambda f: f[0])
            out[label] = {"plan": dict(p), "cost": c, "held_out_acc": cands.accuracy(p), "refined": True}
    return out
