"""An accuracy predictor for the evolutionary engine (Once-for-All's "accuracy predictor" idea).

Scoring a candidate on a supernet costs a BatchNorm recalibration and a pass over the arch split;
a predictor fitted on a few such scores answers in microseconds. :func:`evolve_with_predictor` spends
its *direct* queries (true scores) in rounds: random architectures in the band first, then, each
round, a predictor fitted on every true score so far steers a full engine run (whose queries are
predictions, free), and the ``verify`` best predicted architectures not scored yet are scored for
real. The best *truly* scored architecture is returned; its history holds only true scores, so
``best_after(n)`` compares with :func:`nas.strategies.engine.evolve` at the same number of direct
queries.

Like the engine, nothing here knows torch or a supernet: an architecture is a ``{decision: choice}``
dict, and the features are its one-hot encoding (one column per decision and choice).

Predictors (``kind``): ``ridge`` (linear in the one-hot features: one additive effect per choice),
``gbt`` (gradient-boosted trees: interactions between decisions), ``mlp`` (a small two-layer
perceptron, OFA's choice), all from scikit-learn. :func:`rank_quality` measures one on held-out
architectures (Kendall tau-b); ``nas-bench suite=tabular`` reports it on NAS-Bench-Macro.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import kendalltau

from nas.strategies.engine import EvolutionResult, Query, evolve

KINDS = ("ridge", "gbt", "mlp")


def one_hot(decisions: Mapping[str, Sequence[str]], archs: Sequence[Mapping[str, str]]) -> np.ndarray:
    """``(len(archs), sum of choices)`` 0/1 features: column ``(d, c)`` is 1 when decision d takes choice c."""
    offsets, index = [], {}
    n = 0
    for d, choices in decisions.items():
        offsets.append(n)
        for j, c in enumerate(choices):
            index[(d, c)] = n + j
        n += len(choices)
    x = np.zeros((len(archs), n), dtype=np.float64)
    for i, a in enumerate(archs):
        for d in decisions:
            x[i, index[(d, a[d])]] = 1.0
    return x


class AccuracyPredictor:
    """Fits ``score ~ f(one_hot(arch))``; :meth:`predict` returns the predicted scores."""

    def __init__(self, decisions: Mapping[str, Sequence[str]], kind: str = "gbt", seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"predictor kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
        self.decisions = {d: list(c) for d, c in decisions.items()}
        self.kind, self.seed = kind, int(seed)
        self.model: Any = None
        self._mean = 0.0
        self._scale = 1.0
        self._weights: dict[tuple[str, str], float] | None = None

    def _make(self, n: int):
        if self.kind == "ridge":
            from sklearn.linear_model import Ridge

            return Ridge(alpha=1.0)
        if self.kind == "gbt":
            from sklearn.ensemble import GradientBoostingRegressor

            return GradientBoostingRegressor(n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.8,
                                             min_samples_leaf=max(1, min(5, n // 10)), random_state=self.seed)
        from sklearn.neural_network import MLPRegressor

        return MLPRegressor(hidden_layer_sizes=(64, 64), alpha=1e-3, learning_rate_init=3e-3, max_iter=2000,
                            random_state=self.seed)

    def fit(self, archs: Sequence[Mapping[str, str]], scores: Sequence[float]) -> AccuracyPredictor:
        y = np.asarray(scores, dtype=np.float64)
        if len(archs) != len(y) or len(y) < 2 or not np.all(np.isfinite(y)):
            raise ValueError("the predictor needs at least 2 architectures with finite scores")
        # standardised targets: the MLP's and the trees' defaults assume unit scale
        self._mean, self._scale = float(y.mean()), float(y.std()) or 1.0
        self._weights = None
        self.model = self._make(len(y)).fit(one_hot(self.decisions, archs), (y - self._mean) / self._scale)
        return self

    def predict(self, archs: Sequence[Mapping[str, str]]) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("fit the predictor first")
        return self.model.predict(one_hot(self.decisions, archs)) * self._scale + self._mean

    def predict_one(self, arch: Mapping[str, str]) -> float:
        """One architecture's prediction; for ``ridge`` a sum of its choices' weights, without
        scikit-learn's per-call input checks (the engine asks one architecture at a time)."""
        if self.kind == "ridge" and self.model is not None:
            if self._weights is None:
                coef, col = self.model.coef_, 0
                self._weights = {}
                for d, choices in self.decisions.items():
                    for c in choices:
                        self._weights[(d, c)] = float(coef[col])
                        col += 1
            z = float(self.model.intercept_) + sum(self._weights[(d, arch[d])] for d in self.decisions)
            return z * self._scale + self._mean
        return float(self.predict([arch])[0])


def rank_quality(predictor: AccuracyPredictor, archs: Sequence[Mapping[str, str]], scores: Sequence[float]) -> float:
    """Kendall tau-b between the predictor's and the true scores of held-out ``archs``."""
    tau = kendalltau(predictor.predict(archs), np.asarray(scores, dtype=np.float64)).statistic
    return float(tau) if tau == tau else math.nan


def evolve_with_predictor(decisions: Mapping[str, Sequence[str]], score: Callable[[dict[str, str]], float],
                          cost: Callable[[dict[str, str]], float], budget: float, *, floor: float | None = None,
                          queries: int = 100, fit: int | None = None, rounds: int = 3, search_queries: int = 500,
                          kind: str = "gbt", seed: int = 0, log: Callable[[str], Any] | None = None,
                          **engine: Any) -> EvolutionResult:
    """The engine steered by a predictor, spending ``queries`` true scores.

    ``fit`` (default: half of ``queries``) random architectures in the band are scored first; the
    rest is spent in ``rounds`` equal rounds: fit the predictor on every true score so far, run
    :func:`evolve` (``engine`` options: method, population, ...) for ``search_queries`` predicted
    scores, and score for real the best predicted architectures not scored yet. Returns the best
    truly scored architecture in ``[floor, budget]`` and the history of the true scores (in order);
    ``stats`` adds ``predictor_fits`` and the Kendall tau of each round's predictions against the
    true scores of the architectures it picked (``round_taus``; a tau over the top of the ranking
    only, so lower than on random held-out architectures).
    """
    queries, rounds, search_queries = int(queries), int(rounds), int(search_queries)
    fit = max(2, queries // 2) if fit is None else int(fit)
    if not 2 <= fit <= queries or rounds < 1 or search_queries < 1:
        raise ValueError(f"need 2 <= fit ({fit}) <= queries ({queries}), rounds >= 1, search_queries >= 1")
    names = list(decisions)
    true: dict[tuple[str, ...], float] = {}
    history: list[Query] = []

    def key(a: Mapping[str, str]) -> tuple[str, ...]:
        return tuple(a[n] for n in names)

    def score_true(a: dict[str, str], origin: str) -> None:
        s = float(score(a))
        true[key(a)] = s
        history.append(Query(len(history), dict(a), s, float(cost(a)), origin))

    base = evolve(decisions, score, cost, budget, floor=floor, queries=fit, method="random",
                  constraint=engine.get("constraint", "rejection"), seed=seed)
    for q in base.history:
        true[key(q.arch)] = q.score
        history.append(Query(len(history), dict(q.arch), q.score, q.cost, "random"))
    stats = dict(base.stats, predictor_fits=0, round_taus=[])
    left = queries - len(history)
    for r in range(rounds):
        want = left // (rounds - r)
        if want <= 0:
            continue
        archs = [dict(q.arch) for q in history]
        pred = AccuracyPredictor(decisions, kind, seed=seed + r).fit(archs, [q.score for q in history])
        stats["predictor_fits"] += 1
        cache: dict[tuple[str, ...], float] = {}

        def predicted(a: dict[str, str]) -> float:
            k = key(a)
            if k not in cache:
                cache[k] = pred.predict_one(a)
            return cache[k]

        guided = evolve(decisions, predicted, cost, budget, floor=floor, queries=search_queries,
                        seed=seed + 1000 * (r + 1), **engine)
        # the engine's history holds each architecture once (a repeat is not a query): no dedup needed
        picks = sorted((q for q in guided.history if key(q.arch) not in true), key=lambda q: (-q.score, q.index))[:want]
        before = len(history)
        for q in picks:
            score_true(dict(q.arch), "predicted")
        left -= len(history) - before
        if len(picks) >= 3:
            tau = kendalltau([q.score for q in picks], [h.score for h in history[before:]]).statistic
            stats["round_taus"].append(float(tau) if tau == tau else math.nan)
        if log:
            log(f"predictor round {r + 1}: fitted on {before} scores, {len(picks)} picks scored, best so far "
                f"{max(h.score for h in history):.4f}")
    lo = -math.inf if floor is None else float(floor)
    feasible = [q for q in history if lo <= q.cost <= float(budget)]
    if not feasible:
        return EvolutionResult(None, -math.inf, math.nan, history, stats)
    best = max(feasible, key=lambda q: (q.score, -q.index))
    return EvolutionResult(dict(best.arch), best.score, best.cost, history, stats)
