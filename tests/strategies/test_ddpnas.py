"""DDPNAS: the pruning schedule, the theta update, the group knapsack, budgeted export, resuming."""
from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from nas.errors import UserError
from nas.latency.table import LatencyTable
from nas.strategies.ddpnas import DDPNASSearch, PruningState, softmax, theta_update
from nas.strategies.knapsack import group_knapsack
from supernets.space import SearchSpace
from supernets.supernet import Supernet
from tests.helpers import random_table

TINY = {
    "name": "ddp_tiny",
    "resolution": 16,
    "stem": {"channels": 8, "stride": 2},
    "first": {"channels": 8, "kernel": 3},
    "stages": [{"channels": 16, "layers": 2, "stride": 2}, {"channels": 16, "layers": 1, "stride": 1}],
    "ops": ["k3_e3", "k5_e3"],
    "zero": True,
    "head": {"channels": 32},
}
CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace.from_dict(TINY)


def _table(space: SearchSpace, seed: int = 0) -> LatencyTable:
    return random_table(space, seed, low=0.2, fixed=0.05)


def _loaders(n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x[torch.arange(n), y % 3, :4, :4] += 2.0  # something learnable
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)  # fixed order: exact resume
    val = DataLoader(TensorDataset(x[: n // 2], y[: n // 2]), batch_size=24, shuffle=False)
    return train, val


def _trainer(max_epochs: int, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, **kw)


def _run_state(state: PruningState, accuracy, max_epochs: int = 10_000) -> list[tuple[int, list[int]]]:
    """Drive a state to the end; ``accuracy(path)`` scores each path. Returns (round, path) per epoch."""
    log = []
    epoch = 0
    while not state.done and epoch < max_epochs:
        rnd = state.rounds_done
        path = state.draw(epoch)
        log.append((rnd, list(path)))
        state.record(path, accuracy(path))
        epoch += 1
    return log


# ---------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("sizes", [[2, 3, 2], [4, 3, 1, 2], [5, 5]])
def test_every_survivor_is_tried_once_per_round(sizes):
    state = PruningState(sizes, steps=2, seed=3)
    rng = random.Random(0)
    alive_at_round: dict[int, list[list[int]]] = {}
    epoch = 0
    draws_by_round: dict[int, list[list[int]]] = {}
    while not state.done:
        rnd = state.rounds_done
        alive_at_round.setdefault(rnd, [state.survivors(l) for l in range(len(sizes))])
        path = state.draw(epoch)
        draws_by_round.setdefault(rnd, []).append(path)
        state.record(path, rng.random())
        epoch += 1
    assert epoch == PruningState(sizes, steps=2).planned_epochs()
    for rnd, paths in draws_by_round.items():
        alive = alive_at_round[rnd]
        length = max(len(a) for a in alive)
        assert len(paths) == length, "a round lasts max(|survivors|) epochs"
        for l, surv in enumerate(alive):
            counts = Counter(p[l] for p in paths)
            assert set(counts) == set(surv), "only survivors, and every survivor, are tried"
            if len(surv) == length:
                assert all(c == 1 for c in counts.values()), "exactly once per round"
            else:  # layers with fewer survivors cycle: balanced
                assert max(counts.values()) - min(counts.values()) <= 1


def test_pruning_removes_exactly_the_lowest_theta():
    state = PruningState([4, 3, 1, 2], steps=1, seed=0)
    rng = random.Random(1)
    epoch = 0
    while not state.done:
        before = [state.survivors(l) for l in range(4)]
        path = state.draw(epoch)
        pruned = state.record(path, 0.5 + 0.03 * rng.random())
        epoch += 1
        if pruned:
            for l, i in pruned:
                assert state.theta[l][i] == min(state.theta[l][k] for k in before[l]), "the lowest theta is pruned"
                assert state.survivors(l) == [k for k in before[l] if k != i]
            assert sorted(l for l, _ in pruned) == [l for l in range(4) if len(before[l]) > 1]
        else:
            assert [state.survivors(l) for l in range(4)] == before
    # with a clear signal the worst candidates go first and the best one survives
    quality = [0.53, 0.50, 0.51, 0.52]  # a few points apart (at T = 100 far gaps saturate to ties)
    state = PruningState([4], steps=1, seed=0)
    _run_state(state, lambda p: quality[p[0]])
    assert [i for _, i, _, _ in state.pruned] == [1, 2, 3] and state.argmax() == [0]


def test_pruning_ties_prune_the_more_expensive():
    state = PruningState([3], steps=1, tiebreak=[[1.0, 3.0, 2.0]])
    _run_state(state, lambda p: 0.5)  # equal accuracy: equal theta
    assert [i for _, i, _, _ in state.pruned] == [1, 2] and state.argmax() == [0]


def test_theta_update_matches_hand_computation():
    acc = {0: [0.50, 0.52, 0.49], 1: [0.51, 0.50, 0.53]}  # round -> accuracy of candidate i
    for rule, w in (("additive", 0.5), ("ema", 0.8)):
        state = PruningState([3], steps=2, temperature=100.0, update=rule, momentum_weight=w, seed=1)
        for epoch in range(6):
            rnd = state.rounds_done
            path = state.draw(epoch)
            state.record(path, acc[rnd][path[0]])
        e = [(a + b) / 2 for a, b in zip(softmax(acc[0], 100.0), softmax(acc[1], 100.0))]
        hand_e = [sum(math.exp(100 * r[i]) / sum(math.exp(100 * x) for x in r) for r in acc.values()) / 2
                  for i in range(3)]
        assert e == pytest.approx(hand_e, rel=1e-12)
        expect = [x + w / 3 for x in e] if rule == "additive" else [w / 3 + (1 - w) * x for x in e]
        assert state.theta[0] == pytest.approx(expect, rel=1e-12)
        assert min(range(3), key=expect.__getitem__) == 0  # by hand: 0.50/0.51 loses to 0.52/0.50 and 0.49/0.53
        assert state.pruned == [(0, 0, pytest.approx(expect[0]), 0)]
        assert state.probs()[0][0] == 0 and sum(state.probs()[0]) == pytest.approx(1)
    assert theta_update([0.2, 0.4], [0.7, 0.3], "additive", 0.5) == pytest.approx([0.8, 0.5])
    assert theta_update([0.2, 0.4], [0.7, 0.3], "ema", 0.8) == pytest.approx([0.3, 0.38])


def test_latency_weight_scales_the_recorded_accuracy(space):
    table = _table(space)
    target = table.resolve_target(0.8)
    m = DDPNASSearch(Supernet(space, CLASSES), table, [0.8], latency_weight=0.07)
    path = [0, 1, 0]
    lat = table.fixed + sum(table.layer_costs[l.name][i] for l, i in zip(space.layers, path))
    assert m.score(0.9, path) == pytest.approx(0.9 * (target / lat) ** 0.07)
    assert DDPNASSearch(Supernet(space, CLASSES), table, [0.8]).score(0.9, path) == 0.9
    with pytest.raises(UserError, match="latency target"):
        DDPNASSearch(Supernet(space, CLASSES), table, None, latency_weight=0.1)


# ---------------------------------------------------------------------- the knapsack
def _brute(values, costs, budget):
    best, best_val = None, -math.inf
    for pick in itertools.product(*[range(len(v)) for v in values]):
        c = sum(costs[g][i] for g, i in enumerate(pick))
        v = sum(values[g][i] for g, i in enumerate(pick))
        if c <= budget and v > best_val + 1e-12:
            best, best_val = list(pick), v
    return best, best_val


def test_knapsack_hand_checked_case():
    values = [[1.0, 3.0, 4.0], [2.0, 2.5], [0.0, 5.0]]
    costs = [[1.0, 2.0, 4.0], [1.0, 2.0], [0.0, 3.0]]
    # budget 6: best is (1, 0, 1): cost 2+1+3 = 6, value 3+2+5 = 10 ((2,0,1) costs 8)
    assert group_knapsack(values, costs, 6.0) == [1, 0, 1]
    assert group_knapsack(values, costs, 100.0) == [2, 1, 1]  # everything fits: per-group best
    assert group_knapsack(values, costs, 2.0) == [0, 0, 0]  # exactly the cheapest selection
    assert group_knapsack(values, costs, 1.999) is None  # infeasible
    assert group_knapsack([[-math.inf, 1.0]], [[0.0, 5.0]], 4.0) is None  # the only cheap item is forbidden
    assert group_knapsack([], [], 1.0) == []


def test_knapsack_matches_brute_force_on_random_instances():
    rng = random.Random(0)
    for trial in range(150):
        groups = rng.randint(1, 5)
        values = [[rng.uniform(-2, 2) for _ in range(rng.randint(1, 4))] for _ in range(groups)]
        grid = rng.random() < 0.5
        bins = 2000
        if grid:  # costs on the DP's grid (a cost-0 item per group, binary fractions): the optimum is exact
            bins = 1024
            budget = 16.0
            costs = [[rng.randint(0, 40) * 2 ** -4 for _ in v] for v in values]
            for c in costs:
                c[rng.randrange(len(c))] = 0.0
        else:
            costs = [[rng.uniform(0.0, 3.0) for _ in v] for v in values]
            budget = rng.uniform(0.0, 3.0 * groups)
        pick = group_knapsack(values, costs, budget, bins=bins)
        best, best_val = _brute(values, costs, budget)
        if best is None:
            assert pick is None
            continue
        cost = math.fsum(costs[g][i] for g, i in enumerate(pick))
        assert cost <= budget + 1e-12 * budget, "never exceeds the budget"
        val = sum(values[g][i] for g, i in enumerate(pick))
        if grid:
            assert val == pytest.approx(best_val, abs=1e-9)
        else:  # rounding costs up loses at most one grid step per group
            lo = min(sum(min(c) for c in costs), budget)
            step = (budget - sum(min(c) for c in costs)) / bins
            shrunk, shrunk_val = _brute(values, costs, max(lo, budget - groups * step))
            assert val <= best_val + 1e-9
            if shrunk is not None:
                assert val >= shrunk_val - 1e-9


# ---------------------------------------------------------------------- Lightning: search, export, resume
def _module(space, table, **kw) -> DDPNASSearch:
    pl.seed_everything(0, verbose=False)
    kw = {"steps": 1, "warmup_epochs": 1, "seed": 7, "targets": [0.75, "1.6ms"], **kw}
    return DDPNASSearch(Supernet(space, CLASSES), table, **kw)


def test_search_runs_to_one_survivor_and_exports_within_budgets(space, tmp_path):
    table = _table(space)
    m = _module(space, table)
    planned = m.planned_epochs()
    assert planned == 1 + 1 * (3 + 2)  # warm-up + steps * sum of round lengths
    train, val = _loaders()
    trainer = _trainer(max_epochs=50)
    trainer.fit(m, train, val)
    assert m.state.done and trainer.current_epoch == planned, "the search stops itself when done"
    assert len(m.history) == planned and m.search_cost["images"] == planned * 48
    pruned_rows = [r for r in m.history if r["pruned"]]
    assert len(pruned_rows) == 2
    for row in m.history:
        for name, p in row["probs"].items():
            assert sum(p) == pytest.approx(1.0)
        assert row["expected"] == pytest.approx(table.expected(
            {k: torch.tensor(v, dtype=torch.float64) for k, v in row["probs"].items()}).item())
        assert row["derived_cost"] == pytest.approx(table.predict(space.make_arch(row["derived"], CLASSES)))
    last = m.history[-1]
    for name, p in last["probs"].items():
        assert sorted(p)[-1] == 1.0  # one survivor left per layer
    # exports: argmax + one per budget, each within its budget; budgets resolve fractions and "ms"
    archs = m.derive_all()
    assert set(archs) == {"argmax", "t0.75", "t1.6ms"}
    lo, hi = table.bounds()
    assert m.targets == {"t0.75": pytest.approx(0.75 * hi), "t1.6ms": pytest.approx(1.6)}
    assert m.export_target("t1.6ms") == pytest.approx(1.6) and m.export_target("argmax") == m.target
    for label, ms in m.targets.items():
        assert table.predict(archs[label]) <= ms
    # the knapsack export is the optimum over all architectures of the space costing in
    # [floor * budget, budget] (the whole space below the budget without a floor)
    scores = m.state.export_scores()
    cost = lambda a: table.fixed + sum(table.layer_costs[l.name][i] for l, i in zip(space.layers, a))  # noqa: E731
    every = list(itertools.product(*[range(len(l.choices)) for l in space.layers]))
    for floor in (m.budget_floor, 0.0):
        m.budget_floor = floor
        for ms in m.targets.values():  # (not at hi: the grid may hide a net costing exactly the budget)
            band = [a for a in every if floor * ms - 1e-3 <= cost(a) <= ms]
            best = max(band, key=lambda a: sum(math.log(scores[g][i]) for g, i in enumerate(a)))
            got = m.derive_budget(ms)
            assert floor * ms - 1e-3 <= table.predict(got) <= ms
            assert sum(math.log(scores[l_][got.choices[l.name] and l.choices.index(got.choices[l.name])])
                       for l_, l in enumerate(space.layers)) == pytest.approx(
                sum(math.log(scores[g][i]) for g, i in enumerate(best)))
    # no floor, an unconstrained budget: the argmax architecture (scores follow the pruning order)
    assert m.derive_budget(hi) == archs["argmax"]
    # the pruning-order plot
    plots = m.extra_plots()
    out = tmp_path / "pruning_order.png"
    plots["pruning_order.png"](out)
    assert out.stat().st_size > 1000


def test_budget_below_the_cheapest_network_is_refused(space):
    table = _table(space)
    lo, hi = table.bounds()
    with pytest.raises(UserError, match="below the smallest reachable"):
        _module(space, table, targets=[0.5 * lo / hi])
    m = _module(space, table, targets=None)  # no targets: the argmax only
    assert m.targets == {} and set(m.derive_all()) == {"argmax"}


def test_export_scores_follow_the_pruning_order():
    state = PruningState([4], steps=1, update="ema", momentum_weight=0.8)
    # a candidate pruned early can have had a higher theta than the final survivor has now
    state.theta = [[0.1, 0.9, 0.5, 0.2]]
    state.alive = [[True, False, False, True]]
    state.pruned = [(0, 1, 0.9, 0), (0, 2, 0.5, 1)]
    s = state.export_scores()[0]
    assert s[3] == 0.2 and s[0] == 0.1
    assert s[2] < s[0] and s[1] < s[2]  # survivors > last pruned > first pruned


class _Kill(pl.Callback):
    """Save a checkpoint at the end of ``epoch`` and stop, like a job killed right after it."""

    def __init__(self, epoch: int, path):
        self.epoch, self.path = epoch, path

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def test_kill_and_resume_continues_exactly(space, tmp_path):
    table = _table(space)
    train, val = _loaders()
    kw = {"steps": 2}
    full = _module(space, table, **kw)
    _trainer(max_epochs=40).fit(full, train, val)
    assert full.state.done

    ckpt = tmp_path / "mid.ckpt"
    first = _module(space, table, **kw)
    _trainer(max_epochs=40, callbacks=[_Kill(4, ckpt)]).fit(first, train, val)  # mid-block, mid-round
    assert not first.state.done and first.state.round_pos > 0 and first.state.rounds
    saved = torch.load(ckpt, weights_only=True)["hwnas"]["ddpnas"]  # plain data: safe to load
    assert saved["state"] == first.state.state_dict()

    resumed = _module(space, table, **kw)  # a fresh process: new module, state from the checkpoint
    trainer = _trainer(max_epochs=40)
    trainer.fit(resumed, train, val, ckpt_path=str(ckpt))
    assert resumed.state.done
    assert [r.get("path") for r in resumed.history] == [r.get("path") for r in full.history]
    assert resumed.state.theta == full.state.theta  # bit-identical: same draws, weights, optimizer state
    assert resumed.state.pruned == full.state.pruned
    assert [r["val_acc"] for r in resumed.history] == [r["val_acc"] for r in full.history]
    assert resumed.derive_all() == full.derive_all()


def test_resume_refuses_another_space(space, tmp_path):
    table = _table(space)
    m = _module(space, table)
    ckpt = {"hwnas": {"history": [], "search_cost": {}}}
    m.on_save_checkpoint(ckpt)
    other = SearchSpace.from_dict({**TINY, "ops": ["k3_e3", "k5_e3", "k7_e3"]})
    o = _module(other, _table(other))
    with pytest.raises(UserError, match="another search space"):
        o.on_load_checkpoint(ckpt)
    with pytest.raises(UserError, match="no DDPNAS search state"):
        m.on_load_checkpoint({"hwnas": {"history": []}})


def test_knapsack_floor_uses_the_budget():
    values = [[1.0, 3.0, 4.0], [2.0, 2.5], [0.0, 5.0]]
    costs = [[1.0, 2.0, 4.0], [1.0, 2.0], [0.0, 3.0]]
    # a floor the optimum already meets changes nothing
    assert group_knapsack(values, costs, 9.0, min_cost=8.5) == [2, 1, 1]  # cost 9, value 11.5
    assert group_knapsack(values, costs, 6.0, min_cost=5.5) == [1, 0, 1]  # the optimum already costs 6
    # budget 6, floor 5.9: among selections costing in [5.9, 6]: (1,0,1)=6 value 10, (2,1,0)=6 value 6.5
    assert group_knapsack(values, costs, 6.0, min_cost=5.9) == [1, 0, 1]
    # a cheap optimum is pushed up to the budget: values favour the cheapest items
    cheap = [[3.0, 1.0], [3.0, 1.0]]
    c2 = [[1.0, 2.0], [1.0, 2.0]]
    assert group_knapsack(cheap, c2, 4.0) == [0, 0]
    assert sorted(group_knapsack(cheap, c2, 4.0, min_cost=3.0)) == [0, 1]  # cost 3 (two equal choices)
    assert group_knapsack(cheap, c2, 4.0, min_cost=5.0) == [0, 0]  # no selection reaches it: unconstrained
