"""The accuracy predictor and the engine steered by it (torch-free, like the engine)."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from nas.strategies.engine import evolve
from nas.strategies.predictor import AccuracyPredictor, evolve_with_predictor, one_hot, rank_quality

DECISIONS = {f"d{i}": ("a", "b", "c") for i in range(6)}


def _additive(seed: int = 0):
    """729 architectures whose score is a sum of per-choice effects (what ``ridge`` can learn exactly)
    and whose cost grows with the choice index."""
    rng = random.Random(seed)
    effect = {(d, c): rng.uniform(0, 1) for d in DECISIONS for c in DECISIONS[d]}
    price = {(d, c): 1.0 + "abc".index(c) + rng.uniform(0, 0.2) for d in DECISIONS for c in DECISIONS[d]}
    score = lambda a: sum(effect[d, a[d]] for d in DECISIONS)  # noqa: E731
    cost = lambda a: sum(price[d, a[d]] for d in DECISIONS)  # noqa: E731
    archs = [dict(zip(DECISIONS, p)) for p in itertools.product("abc", repeat=len(DECISIONS))]
    return archs, score, cost


def test_one_hot_has_one_column_per_decision_and_choice():
    x = one_hot({"p": ("a", "b"), "q": ("x", "y", "z")}, [{"p": "b", "q": "x"}, {"p": "a", "q": "z"}])
    assert x.tolist() == [[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]]


@pytest.mark.parametrize("kind,min_tau", [("ridge", 0.99), ("gbt", 0.6), ("mlp", 0.6)])
def test_predictors_rank_held_out_architectures_of_an_additive_table(kind, min_tau):
    archs, score, _ = _additive()
    rng = random.Random(1)
    rng.shuffle(archs)
    fit, held = archs[:120], archs[120:]
    pred = AccuracyPredictor(DECISIONS, kind, seed=0).fit(fit, [score(a) for a in fit])
    assert rank_quality(pred, held, [score(a) for a in held]) >= min_tau
    if kind == "ridge":  # an additive truth is recovered up to the fit's shrinkage
        assert np.allclose(pred.predict(held[:5]), [score(a) for a in held[:5]], atol=0.15)
    assert [pred.predict_one(a) for a in held[:5]] == pytest.approx(pred.predict(held[:5]).tolist())


def test_predictor_refuses_unknown_kinds_and_unfitted_use():
    with pytest.raises(ValueError, match="unknown"):
        AccuracyPredictor(DECISIONS, "forest")
    with pytest.raises(RuntimeError, match="fit"):
        AccuracyPredictor(DECISIONS).predict([{d: "a" for d in DECISIONS}])


def test_steered_engine_spends_exactly_its_true_scores_and_finds_the_optimum_sooner():
    """Budget at the median cost: the optimum within it is found from 40 true scores by the predictor
    (ridge) on most seeds; the plain engine and random search, at the same 40, less often. Every
    history entry is a true score within the band, none repeated."""
    archs, score, cost = _additive()
    budget = float(np.median([cost(a) for a in archs]))
    best = max(score(a) for a in archs if cost(a) <= budget)
    calls = []

    def counted(a):
        calls.append(tuple(a.values()))
        return score(a)

    hits = {"predictor": 0, "engine": 0, "random": 0}
    for seed in range(8):
        calls.clear()
        res = evolve_with_predictor(DECISIONS, counted, cost, budget, queries=40, fit=16, rounds=3,
                                    search_queries=300, kind="ridge", seed=seed)
        assert len(res.history) == 40 == len(calls) == len(set(calls))
        assert all(cost(q.arch) <= budget and q.score == score(q.arch) for q in res.history)
        assert res.best_score == max(q.score for q in res.history) and res.stats["predictor_fits"] == 3
        hits["predictor"] += res.best_score >= best - 1e-9
        for method in ("aging", "random"):
            r = evolve(DECISIONS, score, cost, budget, queries=40, method=method, seed=seed)
            hits["engine" if method == "aging" else "random"] += r.best_score >= best - 1e-9
    assert hits["predictor"] >= 6 and hits["predictor"] > hits["engine"] and hits["predictor"] > hits["random"]


def test_steered_engine_checks_its_arguments():
    archs, score, cost = _additive()
    with pytest.raises(ValueError, match="fit"):
        evolve_with_predictor(DECISIONS, score, cost, 100.0, queries=10, fit=20)
