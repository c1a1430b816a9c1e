"""A per-group latency table for the channel counts in play, validated against whole nets, and the
evolutionary search over per-group channel counts that needs it.

Measured whole nets are what ``uniform``, ``global`` and ``greedy`` compare, but the evolution engine
(:func:`nas.strategies.engine.evolve`) asks for the cost of every architecture it looks at (thousands
under rejection), which only a model can answer. :class:`GroupLatencyTable` is NetAdapt's table: for each
group and each of a few channel counts, the unpruned model with only that group thinned is measured
whole; the prediction of a plan is the unpruned latency plus the sum of each group's change,
interpolated linearly between the measured counts. It is validated like the latency tables: random plans
measured whole against their prediction (fraction within +-10 %, Spearman), and the result is kept in the
report. Evolution's winners are measured whole at the end like every search's.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from nas.prune.graph import min_keep
from nas.prune.search import Candidates
from nas.strategies.engine import evolve


def levels(channels: int, floor: int, round_to: int, n: int) -> list[int]:
    """At most ``n`` channel counts from ``floor`` to ``channels`` (multiples of ``round_to``, both ends)."""
    if channels <= floor:
        return [channels]
    allowed = sorted(set(list(range(floor, channels, round_to)) + [channels]))
    if len(allowed) <= n:
        return allowed
    idx = np.unique(np.round(np.linspace(0, len(allowed) - 1, n)).astype(int))
    return [allowed[i] for i in idx]


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


class GroupLatencyTable:
    """``predict(plan) = unpruned + sum_g delta_g(keep_g)`` from one-group-at-a-time measurements."""

    def __init__(self, cands: Candidates, n_levels: int = 6):
        self.cands = cands
        self.levels = {g.name: levels(g.channels, min_keep(g, cands.round_to), cands.round_to, n_levels)
                       for g in cands.groups}
        full = cands.full()
        plans = [full] + [{**full, g: k} for g, ks in self.levels.items() for k in ks if k != full[g]]
        costs = cands.remeasure(plans)
        self.base = costs[0]
        self.delta: dict[str, dict[int, float]] = {g: {cands.full()[g]: 0.0} for g in self.levels}
        i = 1
        for g, ks in self.levels.items():
            for k in ks:
                if k != full[g]:
                    self.delta[g][k] = costs[i] - self.base
                    i += 1
        self.validation: dict[str, Any] = {}

    def _group(self, g: str, k: int) -> float:
        ks = sorted(self.delta[g])
        return float(np.interp(k, ks, [self.delta[g][x] for x in ks]))

    def predict(self, plan: Mapping[str, int]) -> float:
        return self.base + sum(self._group(g, int(k)) for g, k in plan.items())

    def validate(self, n: int = 10, seed: int = 0) -> dict[str, Any]:
        """``n`` random plans (each group at a random level) measured whole against their prediction."""
        rng = random.Random(seed)
        plans = [{g: rng.choice(ks) for g, ks in self.levels.items()} for _ in range(n)]
        measured = self.cands.remeasure(plans)
        predicted = [self.predict(p) for p in plans]
        err = [p / m - 1 for p, m in zip(predicted, measured)]
        self.validation = {"nets": n, "within_10pct": float(np.mean([abs(e) <= 0.10 for e in err])),
                           "spearman": _spearman(predicted, measured),
                           "mean_abs_error_pct": float(100 * np.mean(np.abs(err))),
                           "pairs": [[round(p, 5), round(m, 5)] for p, m in zip(predicted, measured)]}
        return self.validation


def search_evolution(cands: Candidates, targets: Mapping[str, float], *, queries: int = 60, n_levels: int = 6,
                     validate_nets: int = 10, seed: int = 0, log: Callable[[str], Any] = print
                     ) -> dict[str, dict[str, Any]]:
    """Regularised evolution (``evolve``) over per-group channel counts: held-out accuracy (BatchNorm
    recalibrated) under the table's predicted cost, a band of [0.85, 1] x target per target."""
    table = GroupLatencyTable(cands, n_levels)
    v = table.validate(validate_nets, seed=seed)
    log(f"per-group table: {cands.measured_nets} nets measured; validation on {v['nets']} random plans: "
        f"{100 * v['within_10pct']:.0f}% within +-10%, Spearman {v['spearman']:.2f}, mean error "
        f"{v['mean_abs_error_pct']:.1f}%")
    decisions = {g: [str(k) for k in ks] for g, ks in table.levels.items()}

    def as_plan(arch: Mapping[str, str]) -> dict[str, int]:
        return {g: int(k) for g, k in arch.items()}

    out = {}
    for label, t in targets.items():
        res = evolve(decisions, lambda a: cands.accuracy(as_plan(a)), lambda a: table.predict(as_plan(a)), t,
                     floor=0.85 * t, queries=queries, method="aging", population=max(4, queries // 4),
                     sample=max(2, queries // 12), seed=seed)
        if res.best is None:  # nothing in the band: the smallest plan
            plan = cands.smallest()
        else:
            plan = as_plan(res.best)
        (measured,) = cands.remeasure([plan])
        log(f"evolution {label}: held-out acc {100 * res.best_score:.2f}%, predicted {table.predict(plan):.4g}, "
            f"measured {measured:.4g} {cands.unit} (target {t:.4g}; {len(res.history)} queries)")
        out[label] = {"plan": plan, "cost": measured, "predicted": table.predict(plan),
                      "held_out_acc": res.best_score, "queries": len(res.history), "table_validation": v}
    return out
