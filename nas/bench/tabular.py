"""``nas-bench suite=tabular``: the evolutionary engine against the true accuracies of a tabular benchmark.

A tabular benchmark gives the stand-alone accuracy of every architecture of a space, so a search
*engine* can be measured without any supernet: how close the best architecture it finds under a
cost budget comes to the best one in the table (the *oracle*), after how many queries, against
random search given the same number of queries.

The table is a JSON object keyed by the architecture, one character per decision (NAS-Bench-Macro:
8 layers, ``0`` identity, ``1`` MBConv k3 e3, ``2`` MBConv k5 e6); each value holds at least
``mean_acc`` (the score, in percent) and ``flops`` (the cost). Decision ``i`` takes the characters
seen at position ``i``. An architecture missing from the table has an infinite cost (never within a
budget). Budgets are percentiles of the table's FLOPs.

Regret = oracle accuracy - the best accuracy found (points; 0 = the oracle was found). Reported per
budget: the median (and mean, and how often 0) over seeds after ``checkpoints`` queries, for the
engine and for random search within the same budget.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nas.errors import UserError
from nas.strategies.engine import evolve
from nas.strategies.predictor import KINDS, AccuracyPredictor, evolve_with_predictor, rank_quality


class Table:
    """A tabular benchmark: ``score[key]`` and ``cost[key]`` for every architecture key."""

    def __init__(self, entries: Mapping[str, Mapping[str, Any]], name: str = "table", score_key: str = "mean_acc",
                 cost_key: str = "flops"):
        if not isinstance(entries, Mapping) or not entries:
            raise UserError(f"{name}: a tabular benchmark is a non-empty JSON object keyed by architecture")
        lengths = {len(str(k)) for k in entries}
        if len(lengths) != 1 or 0 in lengths:
            raise UserError(f"{name}: every key must have one character per decision, the same number for all "
                            f"(found key lengths {sorted(lengths)})")
        self.name = name
        self.score: dict[str, float] = {}
        self.cost: dict[str, float] = {}
        for k, v in entries.items():
            if not isinstance(v, Mapping) or score_key not in v or cost_key not in v:
                raise UserError(f"{name}: entry {k!r} lacks {score_key!r} or {cost_key!r}; every value needs at "
                                f"least both")
            try:
                self.score[str(k)], self.cost[str(k)] = float(v[score_key]), float(v[cost_key])
            except (TypeError, ValueError):
                raise UserError(f"{name}: entry {k!r}: {score_key} and {cost_key} must be numbers") from None
        n = lengths.pop()
        self.decisions = {f"d{i}": tuple(sorted({k[i] for k in self.score})) for i in range(n)}

    @classmethod
    def load(cls, path: str | Path) -> Table:
        p = Path(str(path)).expanduser()
        if not p.is_file():
            raise UserError(f"tabular.path={path}: no such file; give a JSON table (keys one character per "
                            f"decision, values with mean_acc and flops), e.g. "
                            f"tabular.path=/work/shared/data/nas-bench-macro/nas-bench-macro_cifar10.json")
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"tabular.path={path} is not readable JSON: {e}") from None
        return cls(data, name=p.name)

    def key(self, arch: Mapping[str, str]) -> str:
        return "".join(arch[d] for d in self.decisions)

    def score_of(self, arch: Mapping[str, str]) -> float:
        return self.score.get(self.key(arch), -math.inf)

    def cost_of(self, arch: Mapping[str, str]) -> float:
        return self.cost.get(self.key(arch), math.inf)

    def oracle(self, budget: float) -> tuple[str, float]:
        """The best key with cost <= budget and its score."""
        key = max((k for k, c in self.cost.items() if c <= budget), key=lambda k: (self.score[k], -self.cost[k]))
        return key, self.score[key]

    def budget_at(self, percentile: float) -> float:
        return float(np.percentile(list(self.cost.values()), float(percentile)))


def run_one(table: Table, budget: float, seed: int, queries: int, engine: Mapping[str, Any],
            method: str | None = None, predictor: Mapping[str, Any] | None = None):
    """One search in ``table`` under ``budget`` (``method`` overrides the engine's, e.g. ``random``;
    ``predictor``: the engine steered by an accuracy predictor, :func:`evolve_with_predictor`)."""
    kw = dict(engine)
    if predictor is not None:
        p = {k: v for k, v in predictor.items() if k in ("kind", "fit", "rounds", "search_queries")}
        return evolve_with_predictor(table.decisions, table.score_of, table.cost_of, budget, queries=queries,
                                     seed=seed, **p, **kw)
    if method is not None:
        kw["method"] = method
    if kw.get("method") == "random":  # the baseline: uniform over the architectures within the budget
        kw["constraint"] = "rejection"
    return evolve(table.decisions, table.score_of, table.cost_of, budget, queries=queries, seed=seed, **kw)


def regret_curve(result, oracle: float, checkpoints: Sequence[int]) -> list[float]:
    return [oracle - result.best_after(n) for n in checkpoints]


def predictor_quality(table: Table, kinds: Sequence[str], fits: Sequence[int], held_out: int, seeds: Sequence[int]
                      ) -> dict[str, Any]:
    """Kendall tau of each predictor kind on ``held_out`` random architectures after fitting on ``fit``
    other random ones (true scores), median over ``seeds``."""
    keys = sorted(table.score)
    names = list(table.decisions)
    out: dict[str, Any] = {"held_out": int(held_out), "seeds": [int(s) for s in seeds], "kinds": {}}
    for kind in kinds:
        row = {}
        for n in fits:
            taus = []
            for seed in seeds:
                rng = np.random.default_rng(int(seed))
                pick = rng.choice(len(keys), size=min(len(keys), int(n) + int(held_out)), replace=False)
                chosen = [keys[i] for i in pick]
                archs = [dict(zip(names, k)) for k in chosen]
                scores = [table.score[k] for k in chosen]
                pred = AccuracyPredictor(table.decisions, kind, seed=int(seed)).fit(archs[:n], scores[:n])
                taus.append(rank_quality(pred, archs[n:], scores[n:]))
            row[str(n)] = {"median": statistics.median(taus), "min": min(taus), "max": max(taus)}
        out["kinds"][kind] = row
    return out


def run_tabular(table: Table, percentiles: Sequence[float], seeds: Sequence[int], queries: int,
                checkpoints: Sequence[int], engine: Mapping[str, Any],
                log: Callable[[str], Any] | None = None, predictor: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
    """Engine and random search (and the predictor-steered engine, when ``predictor`` is given: its
    ``enabled``, ``kind``, ``fit``, ``rounds``, ``search_queries``) at every budget and seed; medians
    of the regret by number of (true-score) queries."""
    predictor = dict(predictor or {})
    use_predictor = bool(predictor.pop("enabled", bool(predictor)))
    if use_predictor and predictor.get("kind", "gbt") not in KINDS:
        raise UserError(f"tabular.predictor.kind={predictor['kind']!r} is unknown; choose one of {', '.join(KINDS)}")
    methods: list[tuple[str, str | None, Mapping[str, Any] | None]] = [("engine", None, None), ("random", "random", None)]
    if use_predictor:
        methods.append(("predictor", None, predictor))
    pred_queries = int(predictor.pop("queries", 50)) if use_predictor else None
    extra = {pred_queries} if pred_queries and pred_queries <= queries else set()
    checkpoints = sorted({int(c) for c in checkpoints if 0 < int(c) <= queries} | {int(queries)} | extra)
    budgets = []
    for pct in percentiles:
        b = table.budget_at(pct)
        okey, oacc = table.oracle(b)
        feasible = sum(1 for c in table.cost.values() if c <= b)
        row: dict[str, Any] = {"percentile": float(pct), "budget": b, "feasible": feasible,
                               "oracle": {"arch": okey, "score": oacc, "cost": table.cost[okey]}}
        for name, method, pred in methods:
            curves, found, stats, t0 = [], [], [], time.perf_counter()
            n_q = pred_queries if pred is not None else queries  # the predictor spends fewer true scores
            cps = [n for n in checkpoints if n <= n_q]
            for seed in seeds:
                res = run_one(table, b, int(seed), n_q, engine, method, pred)
                curves.append(regret_curve(res, oacc, cps))
                found.append(table.key(res.best) if res.best else None)
                stats.append({k: v for k, v in res.stats.items() if k != "round_taus"} | {"queries": len(res.history)})
            per_n = {}
            for j, n in enumerate(cps):
                vals = [c[j] for c in curves]
                per_n[str(n)] = {"median": statistics.median(vals), "mean": statistics.fmean(vals),
                                 "max": max(vals), "oracle_found": sum(v <= 1e-9 for v in vals) / len(vals)}
            row[name] = {"regret": per_n, "regrets_final": [c[-1] for c in curves], "found": found,
                         "queries_used_median": statistics.median(s["queries"] for s in stats),
                         "duplicates_median": statistics.median(s.get("duplicates", 0) for s in stats),
                         "seconds": round(time.perf_counter() - t0, 2)}
        if log:
            e, r = row["engine"]["regret"][str(queries)], row["random"]["regret"][str(queries)]
            p_ = ""
            if use_predictor:
                n = str(pred_queries)
                p_ = (f"; after {n}: predictor {row['predictor']['regret'][n]['median']:.3f}, engine "
                      f"{row['engine']['regret'][n]['median']:.3f}, random {row['random']['regret'][n]['median']:.3f}")
            log(f"tabular: p{pct:g} (FLOPs <= {b:.4g}, {feasible} archs): oracle {oacc:.2f}; median regret after "
                f"{queries} queries: engine {e['median']:.3f}, random {r['median']:.3f}{p_}")
        budgets.append(row)
    return {"table": table.name, "architectures": len(table.score), "decisions": len(table.decisions),
            "queries": int(queries), "checkpoints": checkpoints, "seeds": [int(s) for s in seeds],
            "engine": dict(engine), "predictor": (dict(predictor, queries=pred_queries) if use_predictor else None),
            "methods": [m[0] for m in methods], "budgets": budgets}


def markdown(res: Mapping[str, Any]) -> str:
    cps = res["checkpoints"]
    eng = res["engine"]
    lines = [f"### tabular: evolution engine vs random search on {res['table']} ({res['architectures']} architectures)",
             "",
             f"Median regret (oracle accuracy - best found, points) over {len(res['seeds'])} seeds, by number of "
             f"queries; in brackets the share of seeds that found the oracle. Engine: "
             + ", ".join(f"{k}={v}" for k, v in eng.items()) + ".",
             "",
             "| FLOPs budget | archs in budget | oracle | method | " + " | ".join(f"{n} q" for n in cps) + " |",
             "|---|---:|---:|---|" + "---:|" * len(cps)]
    for b in res["budgets"]:
        for name in res.get("methods", ("engine", "random")):
            reg = b[name]["regret"]
            cells = " | ".join(f"{reg[str(n)]['median']:.3f} ({100 * reg[str(n)]['oracle_found']:.0f}%)"
                               if str(n) in reg else "—" for n in cps)
            head = (f"p{b['percentile']:g} <= {b['budget'] / 1e6:.2f}M | {b['feasible']} | "
                    f"{b['oracle']['score']:.2f} ({b['oracle']['arch']})") if name == "engine" else " | | "
            lines.append(f"| {head} | {name} | {cells} |")
    if res.get("predictor"):
        p = res["predictor"]
        lines += ["", f"predictor: the engine steered by a `{p.get('kind', 'gbt')}` accuracy predictor, {p['queries']} "
                      f"true scores ({p.get('fit') or p['queries'] // 2} random first, then {p.get('rounds', 3)} rounds of "
                      f"{p.get('search_queries', 500)} predicted scores each, the best predictions scored for real)."]
    q = res.get("predictor_quality")
    if q:
        fits = list(next(iter(q["kinds"].values())))
        lines += ["", f"Predictor rank quality: Kendall tau on {q['held_out']} held-out random architectures after fitting "
                      f"on N others (median [min, max] over {len(q['seeds'])} seeds).", "",
                  "| predictor | " + " | ".join(f"N={n}" for n in fits) + " |", "|---|" + "---:|" * len(fits)]
        for kind, row in q["kinds"].items():
            lines.append(f"| {kind} | " + " | ".join(f"{row[n]['median']:.3f} [{row[n]['min']:.2f}, {row[n]['max']:.2f}]"
                                                     for n in fits) + " |")
    return "\n".join(lines)


def verdict(res: Mapping[str, Any], goal: float = 0.1) -> dict[str, Any]:
    """Per budget: the final medians, whether the engine reached ``goal`` and beat random search."""
    q = str(res["queries"])
    out = {}
    for b in res["budgets"]:
        e, r = b["engine"]["regret"][q]["median"], b["random"]["regret"][q]["median"]
        out[f"p{b['percentile']:g}"] = {"engine": e, "random": r, "goal": goal, "reached": e <= goal,
                                        "below_random": e < r}
    return out
