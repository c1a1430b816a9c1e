"""The evolutionary search engine: a plain function over decisions, a score and a cost.

Nothing here knows torch, a supernet or a space: an architecture is a ``{decision: choice}`` dict,
``score(arch)`` is to be maximised (accuracy on a held-out split, or a tabular benchmark's true
accuracy), ``cost(arch)`` is cheap (a latency table, FLOPs) and bounded by ``budget`` (and, when
given, from below by ``floor``). :func:`evolve` spends a number of *queries* (distinct architectures
scored; a repeat is answered from the cache and costs nothing) and returns the best architecture
found with the history of every query.

Methods (``method``):

* ``aging``: regularised evolution (Real et al., 2019). A population of ``population``
  architectures, first random; then each step picks the best of ``sample`` random members
  (tournament), mutates it (or, with probability ``crossover_prob``, crosses it with a second
  tournament winner), scores the child, adds it and removes the *oldest* member.
* ``spos``: the SPOS / OFA scheme. ``population`` random architectures; then each generation
  makes ``population`` children of the ``parents`` best architectures seen so far, a
  ``crossover_prob`` share by crossover of two of them, the rest by mutation.
* ``random``: random search in the budget (the baseline), with the same caching and counting.

Mutation resamples every decision with probability ``mutation_prob`` (at least one decision
changes); crossover takes every decision from either parent with probability 1/2.

The budget (``constraint``): ``rejection`` draws (random architectures) or generates (children)
again until one is within ``[floor, budget]``; ``repair`` moves an architecture outside the band
into it by single-decision changes, each a random one among those that bring its cost closer to the
band. Rejection falls back to repair after ``max_tries`` draws of a random architecture in vain (a
narrow band in a large space; from then on it repairs random draws at once), so every target the
space can reach gets candidates.
"""
from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

METHODS = ("aging", "spos", "random")
CONSTRAINTS = ("rejection", "repair")
#: random starting points a repair tries before the band is taken as unreachable
REPAIR_TRIES = 100

Arch = dict  # {decision: choice}


@dataclass(frozen=True)
class Query:
    """One architecture scored by the engine (a cached repeat is not a query)."""

    index: int  # 0-based, in the order of scoring
    arch: dict[str, str]
    score: float
    cost: float
    origin: str  # random | mutation | crossover

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "arch": dict(self.arch), "score": self.score, "cost": self.cost,
                "origin": self.origin}


@dataclass
class EvolutionResult:
    """The best architecture within the budget (``None`` if none was found) and every query."""

    best: dict[str, str] | None
    best_score: float
    best_cost: float
    history: list[Query]
    stats: dict[str, int] = field(default_factory=dict)  # proposals, duplicates, rejected, repaired

    def best_after(self, n: int) -> float:
        """The best score among the first ``n`` queries (``-inf`` before any)."""
        return max((q.score for q in self.history[:n]), default=-math.inf)

    def to_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_score": self.best_score, "best_cost": self.best_cost,
                "stats": dict(self.stats), "history": [q.to_dict() for q in self.history]}


def _check(decisions: Mapping[str, Sequence[str]], budget: float, floor: float | None, queries: int,
           population: int, sample: int, parents: int, mutation_prob: float, crossover_prob: float,
           method: str, constraint: str) -> None:
    if not decisions or any(len(c) == 0 for c in decisions.values()):
        raise ValueError("decisions must be a non-empty mapping of decision -> non-empty list of choices")
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; choose one of {', '.join(METHODS)}")
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint {constraint!r} is unknown; choose one of {', '.join(CONSTRAINTS)}")
    for name, v, lo in (("queries", queries, 1), ("population", population, 1), ("sample", sample, 1),
                        ("parents", parents, 1)):
        if isinstance(v, bool) or int(v) != v or v < lo:
            raise ValueError(f"{name}={v!r} must be an integer >= {lo}")
    for name, v in (("mutation_prob", mutation_prob), ("crossover_prob", crossover_prob)):
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name}={v!r} must be in [0, 1]")
    if not math.isfinite(float(budget)):
        raise ValueError(f"budget={budget!r} must be finite")
    if floor is not None and float(floor) > float(budget):
        raise ValueError(f"floor={floor} is above budget={budget}")


def evolve(decisions: Mapping[str, Sequence[str]], score: Callable[[dict[str, str]], float],
           cost: Callable[[dict[str, str]], float], budget: float, *, floor: float | None = None,
           queries: int = 300, method: str = "aging", population: int = 20, sample: int = 5,
           parents: int = 10, mutation_prob: float = 0.1, crossover_prob: float = 0.5,
           constraint: str = "rejection", seed: int = 0, max_tries: int = 2000,
           max_proposals: int | None = None,
           log: Callable[[str], Any] | None = None) -> EvolutionResult:
    """Search ``decisions`` for the architecture of highest ``score`` with ``floor <= cost <= budget``.

    ``queries``: distinct architectures scored (the search stops earlier after ``max_proposals``
    candidates, default ``50 * queries``, e.g. when the band holds fewer architectures). ``score`` is
    called once per distinct architecture, ``cost`` once per distinct architecture looked at (both
    cached). ``sample`` is the tournament size of ``aging``, ``parents`` the number of parents of
    ``spos``; see the module docstring for the methods and ``constraint``. Deterministic for a given
    ``seed``. Returns the best architecture, its score and cost, every query in order, and counts
    (``proposals`` candidates generated, ``duplicates`` already scored, ``rejected`` outside the band,
    ``repaired`` moved into it).
    """
    _check(decisions, budget, floor, queries, population, sample, parents, mutation_prob, crossover_prob,
           method, constraint)
    names = list(decisions)
    choices = [list(decisions[n]) for n in names]
    rng = random.Random(seed)
    lo = -math.inf if floor is None else float(floor)
    hi = float(budget)
    max_proposals = 50 * int(queries) if max_proposals is None else int(max_proposals)
    costs: dict[tuple[int, ...], float] = {}
    scored: dict[tuple[int, ...], float] = {}
    history: list[Query] = []
    stats = {"proposals": 0, "duplicates": 0, "rejected": 0, "repaired": 0}

    def as_arch(key: tuple[int, ...]) -> dict[str, str]:
        return {n: c[i] for n, c, i in zip(names, choices, key)}

    def cost_of(key: tuple[int, ...]) -> float:
        if key not in costs:
            costs[key] = float(cost(as_arch(key)))
        return costs[key]

    def gap(key: tuple[int, ...]) -> float:
        """How far the cost is outside the band (0 inside)."""
        c = cost_of(key)
        return max(0.0, lo - c, c - hi)

    def repair(key: tuple[int, ...]) -> tuple[int, ...] | None:
        """Random single-decision changes that each bring the cost closer to the band, until inside."""
        g = gap(key)
        while g > 0:
            better = []
            for d, cs in enumerate(choices):
                for i in range(len(cs)):
                    if i != key[d]:
                        k = key[:d] + (i,) + key[d + 1:]
                        gk = gap(k)
                        if gk < g:
                            better.append((k, gk))
            if not better:
                return None
            key, g = better[rng.randrange(len(better))]
        return key

    def random_key() -> tuple[int, ...]:
        return tuple(rng.randrange(len(cs)) for cs in choices)

    draws_fail = [False]  # rejection drew max_tries random architectures in vain once: repair from then on

    def random_feasible() -> tuple[int, ...] | None:
        if constraint == "rejection" and not draws_fail[0]:
            for _ in range(max_tries):
                key = random_key()
                if gap(key) == 0:
                    return key
                stats["rejected"] += 1
            draws_fail[0] = True
        for _ in range(min(max_tries, REPAIR_TRIES)):  # repair (or rejection that found nothing)
            key = random_key()
            if gap(key) == 0:
                return key
            fixed = repair(key)
            if fixed is not None:
                stats["repaired"] += 1
                return fixed
        return None

    def mutate(key: tuple[int, ...]) -> tuple[int, ...]:
        new = list(key)
        movable = [d for d, cs in enumerate(choices) if len(cs) > 1]
        if not movable:
            return key
        changed = False
        for d in movable:
            if rng.random() < mutation_prob:
                new[d] = rng.choice([i for i in range(len(choices[d])) if i != key[d]])
                changed = True
        if not changed:  # at least one decision changes
            d = rng.choice(movable)
            new[d] = rng.choice([i for i in range(len(choices[d])) if i != key[d]])
        return tuple(new)

    def crossover(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))

    def constrain(key: tuple[int, ...]) -> tuple[int, ...] | None:
        if gap(key) == 0:
            return key
        if constraint == "repair":
            fixed = repair(key)
            if fixed is not None:
                stats["repaired"] += 1
                return fixed
        stats["rejected"] += 1
        return None

    def query(key: tuple[int, ...], origin: str) -> bool:
        """Score a new architecture (False for a repeat: nothing is spent)."""
        stats["proposals"] += 1
        if key in scored:
            stats["duplicates"] += 1
            return False
        s = float(score(as_arch(key)))
        scored[key] = s
        history.append(Query(len(history), as_arch(key), s, cost_of(key), origin))
        if log and (len(history) % 50 == 0 or len(history) == queries):
            best = max(q.score for q in history)
            log(f"evolution: {len(history)}/{queries} queries, best score {best:.4g}")
        return True

    def budget_left() -> bool:
        return len(history) < queries and stats["proposals"] < max_proposals

    def fill_random(pop: deque | None, n: int) -> bool:
        """Add ``n`` new random architectures (to ``pop`` if given); False if the band holds none."""
        added = 0
        while added < n and budget_left():
            key = random_feasible()
            if key is None:
                return False
            if query(key, "random"):
                added += 1
                if pop is not None:
                    pop.append(key)
        return True

    def child_of(pick: Callable[[], tuple[int, ...]]) -> tuple[tuple[int, ...] | None, str]:
        if crossover_prob > 0 and rng.random() < crossover_prob:
            return constrain(crossover(pick(), pick())), "crossover"
        return constrain(mutate(pick())), "mutation"

    if method == "random":
        fill_random(None, queries)
    elif method == "aging":
        pop: deque = deque()
        if fill_random(pop, population):
            def tournament() -> tuple[int, ...]:
                contenders = rng.sample(list(pop), min(sample, len(pop)))
                return max(contenders, key=lambda k: scored[k])

            while budget_left():
                child, origin = child_of(tournament)
                if child is not None and query(child, origin):
                    pop.append(child)
                    if len(pop) > population:
                        pop.popleft()
                elif child is None:
                    stats["proposals"] += 1
    else:  # spos
        if fill_random(None, population):
            top: list[tuple[int, ...]] = []

            def parent() -> tuple[int, ...]:
                return rng.choice(top)

            while budget_left():
                top[:] = sorted(scored, key=lambda k: -scored[k])[:parents]
                made = 0
                while made < population and budget_left():
                    child, origin = child_of(parent)
                    if child is None:
                        stats["proposals"] += 1
                    elif query(child, origin):
                        made += 1
    feasible = [q for q in history if lo <= q.cost <= hi]
    if not feasible:
        return EvolutionResult(None, -math.inf, math.nan, history, stats)
    best = max(feasible, key=lambda q: (q.score, -q.index))  # ties: the first found
    return EvolutionResult(dict(best.arch), best.score, best.cost, history, stats)
