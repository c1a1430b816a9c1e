"""The evolutionary engine as a plain function: budget, cache, history, determinism, and that it
finds better architectures than random search on a made-up problem with a known optimum."""
from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest

from nas.strategies.engine import METHODS, evolve


def made_up_problem(n: int = 7, k: int = 4, seed: int = 0):
    """``n`` decisions of ``k`` choices; an additive cost; a score with pairwise interactions between
    neighbouring decisions (so that greedy per-decision choice is not the answer)."""
    rng = random.Random(seed)
    decisions = {f"d{i}": [f"c{j}" for j in range(k)] for i in range(n)}
    unit = {(i, j): rng.uniform(0.5, 1.5) * (j + 1) for i in range(n) for j in range(k)}
    gain = {(i, j): rng.uniform(0, 1) * math.sqrt(j + 1) for i in range(n) for j in range(k)}
    pair = {(i, a, b): rng.gauss(0, 0.4) for i in range(n - 1) for a in range(k) for b in range(k)}

    def idx(arch):
        return [int(arch[f"d{i}"][1:]) for i in range(n)]

    def cost(arch):
        return sum(unit[i, j] for i, j in enumerate(idx(arch)))

    def score(arch):
        x = idx(arch)
        return sum(gain[i, j] for i, j in enumerate(x)) + sum(pair[i, x[i], x[i + 1]] for i in range(n - 1))

    return decisions, score, cost


def oracle(decisions, score, cost, budget, floor=-math.inf):
    best = -math.inf
    for combo in itertools.product(*decisions.values()):
        arch = dict(zip(decisions, combo))
        if floor <= cost(arch) <= budget:
            best = max(best, score(arch))
    return best


def test_every_query_is_within_the_budget_distinct_and_scored_once():
    decisions, score, cost = made_up_problem()
    budget = 0.5 * max(cost(dict(zip(decisions, c))) for c in itertools.product(*decisions.values()))
    calls = []

    def counted(arch):
        calls.append(tuple(arch.values()))
        return score(arch)

    res = evolve(decisions, counted, cost, budget, queries=120, seed=3)
    assert len(res.history) == 120 and len(calls) == 120 and len(set(calls)) == 120
    assert all(q.cost <= budget for q in res.history)
    assert [q.index for q in res.history] == list(range(120))
    assert all(q.score == pytest.approx(score(q.arch)) and q.cost == pytest.approx(cost(q.arch)) for q in res.history)
    assert res.stats["duplicates"] > 0  # repeats were proposed, answered by the cache, not counted as queries
    # the best is the best query, its cost within the budget
    assert res.best_score == max(q.score for q in res.history) and res.best_cost <= budget
    assert score(res.best) == pytest.approx(res.best_score)
    assert {q.origin for q in res.history} == {"random", "mutation", "crossover"}


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_search_other_seed_other_search(method):
    decisions, score, cost = made_up_problem()
    a = evolve(decisions, score, cost, 16.7, queries=60, method=method, seed=1)
    b = evolve(decisions, score, cost, 16.7, queries=60, method=method, seed=1)
    c = evolve(decisions, score, cost, 16.7, queries=60, method=method, seed=2)
    assert [q.arch for q in a.history] == [q.arch for q in b.history]
    assert [q.arch for q in a.history] != [q.arch for q in c.history]


@pytest.mark.parametrize("method", ["aging", "spos"])
def test_engine_beats_random_search_with_the_same_queries(method):
    """Over 12 seeds, the engine's median regret to the true optimum under the budget (about the 25th
    percentile of the costs) after 150 of the 16,384 architectures is lower than random search's, and small."""
    decisions, score, cost = made_up_problem()
    budget = 16.7
    best = oracle(decisions, score, cost, budget)
    eng, rnd = [], []
    for seed in range(12):
        eng.append(best - evolve(decisions, score, cost, budget, queries=150, method=method, seed=seed).best_score)
        rnd.append(best - evolve(decisions, score, cost, budget, queries=150, method="random", seed=seed).best_score)
    assert min(eng) >= -1e-9 and min(rnd) >= -1e-9
    assert statistics.median(eng) < statistics.median(rnd)
    assert statistics.median(eng) < 0.25 * statistics.median(rnd)


@pytest.mark.parametrize("constraint", ["rejection", "repair"])
def test_a_narrow_band_in_a_large_space_is_reached(constraint):
    """30 decisions of 5 choices, every query in [0.97 T, T] for a T near the cheapest end: uniform
    draws almost never land there, so rejection falls back to repair."""
    n, k = 30, 5
    decisions = {f"d{i}": [str(j) for j in range(k)] for i in range(n)}
    cost = lambda a: sum(int(v) + 1 for v in a.values())
    score = lambda a: sum(int(v) * (1 if i % 2 else -0.5) for i, v in enumerate(a.values()))
    res = evolve(decisions, score, cost, budget=45, floor=43.6, queries=40, constraint=constraint, seed=0)
    assert len(res.history) == 40
    assert all(43.6 <= q.cost <= 45 for q in res.history)
    assert res.stats["repaired"] > 0


def test_no_architecture_in_the_band_gives_no_best():
    decisions, score, cost = made_up_problem(n=3, k=2)
    res = evolve(decisions, score, cost, budget=0.1, queries=5, seed=0, max_tries=50)
    assert res.best is None and res.history == [] and res.best_score == -math.inf


def test_a_band_smaller_than_the_queries_stops_when_exhausted():
    decisions, score, cost = made_up_problem(n=3, k=3)
    archs = [dict(zip(decisions, c)) for c in itertools.product(*decisions.values())]
    budget = sorted(cost(a) for a in archs)[9]  # ten architectures fit
    res = evolve(decisions, score, cost, budget, queries=50, seed=0, population=4, sample=2, max_proposals=3000)
    assert len(res.history) == 10  # every one of them, once
    assert res.best_score == pytest.approx(oracle(decisions, score, cost, budget))


def test_bad_settings_are_refused():
    decisions, score, cost = made_up_problem(n=3, k=2)
    for kw in ({"method": "annealing"}, {"constraint": "penalty"}, {"queries": 0}, {"mutation_prob": 1.5},
               {"population": 2.5}, {"floor": 10.0}):
        with pytest.raises(ValueError):
            evolve(decisions, score, cost, 5.0, **kw)
    with pytest.raises(ValueError):
        evolve({}, score, cost, 5.0)
