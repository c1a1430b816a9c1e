"""Multiple-choice ("group") knapsack: one item per group, maximum total value, total cost <= budget.

Used to export latency-budgeted architectures: a group is a searchable layer, an item one of its
candidates, the cost its entry in an additive cost model (ms, MFLOPs, ...), the value a score of the
search (e.g. log theta of DDPNAS).

The dynamic program runs over costs on an integer grid. Two exact transformations come first:

* every group's cheapest cost is subtracted from its items and from the budget, so the grid only
  spans what can actually be traded (the *excess* over the cheapest network), and
* if even the most expensive item of every group fits, the answer is the per-group maximum (no grid).

Excess costs are then rounded **up** to grid steps of ``slack / bins``. A selection whose rounded
cost fits the grid therefore truly costs at most the budget: the answer never exceeds it. Rounding
can only hide selections that lie within ``len(groups)`` grid steps under the budget, so the answer
is at least as good as the true optimum for ``budget - len(groups) * slack / bins``; on grid-aligned
costs it is the exact optimum.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["group_knapsack"]

_FLOAT_TOL = 1e-12  # relative tolerance for "budget equals the cheapest selection" (float noise)


def group_knapsack(values: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float,
                   bins: int = 2000, min_cost: float | None = None) -> list[int] | None:
    """Index of one item per group maximising ``sum(values)`` with ``sum(costs) <= budget``.

    ``values[g][i]`` and ``costs[g][i]`` describe item ``i`` of group ``g``; values may be ``-inf``
    (the item is never taken). Returns ``None`` when no selection fits the budget. Ties go to the
    cheaper selection, then to lower item indices.

    ``min_cost``: only selections costing at least this much are considered ("use the budget"),
    when any exists; otherwise the unconstrained answer is returned. The floor is checked on the
    rounded-up grid, so a selection may undercut it by at most ``len(groups)`` grid steps.
    """
    if len(values) != len(costs):
        raise ValueError(f"values has {len(values)} groups, costs has {len(costs)}")
    if int(bins) < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    bins = int(bins)
    vals = [np.asarray(v, dtype=np.float64) for v in values]
    cost = [np.asarray(c, dtype=np.float64) for c in costs]
    for g, (v, c) in enumerate(zip(vals, cost)):
        if v.ndim != 1 or v.shape != c.shape or len(v) == 0:
            raise ValueError(f"group {g}: values and costs must be non-empty lists of equal length")
        if not np.all(np.isfinite(c)):
            raise ValueError(f"group {g}: costs must be finite")
        if np.any(np.isnan(v)) or np.any(v == np.inf):
            raise ValueError(f"group {g}: values must be finite or -inf")
    if not vals:
        return [] if budget >= 0 else None

    # only items that can ever be taken matter (value -inf never is)
    usable = [np.isfinite(v) for v in vals]
    if not all(u.any() for u in usable):
        return None
    base = [float(c[u].min()) for c, u in zip(cost, usable)]
    excess = [np.where(u, c - b, np.inf) for c, u, b in zip(cost, usable, base)]
    slack = float(budget) - math.fsum(base)
    if slack < 0:
        if slack < -_FLOAT_TOL * max(1.0, abs(float(budget))):
            return None
        slack = 0.0

    # everything fits: no trade-off, take the best item of every group (cheapest among equals)
    if math.fsum(float(e[u].max()) for e, u in zip(excess, usable)) <= slack:
        best = [_best(v, c, u) for v, c, u in zip(vals, cost, usable)]
        if min_cost is None or math.fsum(float(c[i]) for c, i in zip(cost, best)) >= min_cost:
            return best

    # integer grid: excess costs rounded up, capacity `bins` (or 0 when only the cheapest items fit)
    if slack > 0:
        step = slack / bins
        # (less a float tolerance: a selection costing exactly the budget must not round past it)
        units = [np.where(u, np.ceil(e / step - 1e-9), np.inf) for e, u in zip(excess, usable)]
        cap = bins
    else:
        units = [np.where(u & (e <= 0), 0.0, np.inf) for e, u in zip(excess, usable)]
        cap = 0
    # dp[b] = best value with rounded cost exactly b; choice[g][b] = item taken in group g
    dp = np.full(cap + 1, -np.inf)
    dp[0] = 0.0
    choices = np.zeros((len(vals), cap + 1), dtype=np.int64)
    for g, (v, w) in enumerate(zip(vals, units)):
        new = np.full(cap + 1, -np.inf)
        pick = np.zeros(cap + 1, dtype=np.int64)
        for i in range(len(v)):
            if not np.isfinite(w[i]) or w[i] > cap:
                continue
            s = int(w[i])
            cand = np.full(cap + 1, -np.inf)
            cand[s:] = dp[: cap + 1 - s] + v[i]
            better = cand > new  # strict: ties keep the lower item index
            new[better] = cand[better]
            pick[better] = i
        dp, choices[g] = new, pick
    if not np.isfinite(dp).any():
        return None
    b = int(np.argmax(dp))  # first maximum: the cheapest rounded cost among equal values
    if min_cost is not None and slack > 0:
        lo = max(0, int(math.ceil((float(min_cost) - math.fsum(base)) / step - 1e-9)))
        if lo <= cap and np.isfinite(dp[lo:]).any():
            b = lo + int(np.argmax(dp[lo:]))
    out = [0] * len(vals)
    for g in range(len(vals) - 1, -1, -1):
        i = int(choices[g][b])
        out[g] = i
        b -= int(units[g][i])
    assert b == 0
    return out


def _best(v: np.ndarray, c: np.ndarray, usable: np.ndarray) -> int:
    idx = [i for i in range(len(v)) if usable[i]]
    return max(idx, key=lambda i: (v[i], -c[i], -i))
