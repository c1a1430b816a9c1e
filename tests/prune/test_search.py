"""The searches on a tiny net with exact FLOPs as the cost (no timing in unit tests), and sparsity training."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from nas.latency.analytic import AnalyticDevice
from nas.prune.criteria import channel_order, score_channels
from nas.prune.graph import find_groups, prune
from nas.prune.lut import GroupLatencyTable, levels, search_evolution
from nas.prune.search import Candidates, held_out_accuracy, search_greedy, search_uniform
from nas.prune.sparsity import SparsityModule, zero_fraction
from tests.helpers import TinyData
from tests.prune.models import TinyResNet


def _cands():
    torch.manual_seed(0)
    net = TinyResNet(width=32).eval()
    x = torch.zeros(1, 3, 16, 16)
    groups = find_groups(net, x)
    data = TinyData(n=32)
    return Candidates(net, x, groups, {g.name: list(range(g.channels)) for g in groups},
                      hardware=AnalyticDevice("flops"), calib=list(data.train_dataloader())[:1],
                      evalb=list(data.val_dataloader())[:1], log=lambda _: None)


def test_levels_are_multiples_with_both_ends():
    assert levels(64, 8, 8, 4) == [8, 24, 48, 64]
    assert levels(8, 8, 8, 4) == [8]
    assert all(k % 8 == 0 for k in levels(128, 8, 8, 6))


def test_uniform_and_greedy_meet_their_targets_and_greedy_records_each_target_once():
    c = _cands()
    full, _ = c.measure([c.full(), c.smallest()])
    targets = {"t0.80": 0.8 * full, "t0.50": 0.5 * full}
    for found in (search_uniform(c, targets, log=lambda _: None),
                  search_greedy(c, targets, step=0.25, log=lambda _: None)):
        for label, t in targets.items():
            (cost,) = c.measure([found[label]["plan"]])
            assert cost == found[label]["cost"] <= t
    g = search_greedy(c, targets, step=0.25, log=lambda _: None)
    assert g["t0.80"]["steps"] <= g["t0.50"]["steps"]  # one trajectory: the larger target is reached first
    assert g["t0.80"]["trace"] == g["t0.50"]["trace"][: g["t0.80"]["steps"] + 1]


def test_greedy_refines_the_step_that_crosses_a_target_to_the_widest_count_under_it():
    """A coarse step (half a group at once) crosses a target just under the full model by far more than
    needed: the export takes the widest channel count between the step's two ends that meets the target,
    and the count one multiple wider does not."""
    c = _cands()
    (full,) = c.measure([c.full()])
    t = 0.97 * full
    found = search_greedy(c, {"t0.97": t}, step=0.5, log=lambda _: None)["t0.97"]
    coarse = found["trace"][-1]
    name = coarse["thinned"]
    assert found["refined"] and found["steps"] == 1
    k = found["plan"][name]
    assert coarse["keep"] < k < c.full()[name] and k % c.round_to == 0
    assert coarse["cost"] < found["cost"] <= t
    assert {g: v for g, v in found["plan"].items() if g != name} == {g: v for g, v in c.full().items() if g != name}
    (wider,) = c.measure([{**found["plan"], name: k + c.round_to}])
    assert wider > t


def test_the_group_table_is_exact_on_one_group_plans_and_validated_on_random_ones():
    c = _cands()
    table = GroupLatencyTable(c, n_levels=3)
    for g, ks in table.levels.items():
        for k in ks:
            plan = {**c.full(), g: k}
            assert table.predict(plan) == c.measure([plan])[0]
    v = table.validate(6)
    assert v["nets"] == 6 and len(v["pairs"]) == 6
    # FLOPs of a conv between two thinned groups is a product: the additive table is close, not exact
    assert v["spearman"] > 0.8


def test_evolution_returns_a_measured_plan_per_target():
    c = _cands()
    (full,) = c.measure([c.full()])
    found = search_evolution(c, {"t0.70": 0.7 * full}, queries=8, n_levels=3, validate_nets=4,
                             log=lambda _: None)
    r = found["t0.70"]
    assert r["cost"] == c.measure([r["plan"]])[0] and 0 <= r["held_out_acc"] <= 1
    assert r["predicted"] <= 0.7 * full  # within the budget as the table sees it


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # Lightning's own, as nas.apps.common
def test_sparsity_training_zeroes_batchnorm_scales_and_bn_scale_prunes_them_first():
    net = TinyResNet().train()
    data = TinyData(n=64)
    module = SparsityModule(net, l1=30.0, lr=0.01)
    pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
               enable_model_summary=False).fit(module, data.train_dataloader())
    assert zero_fraction(net) > 0.3  # exact zeros: the proximal step, not a penalty hovering near zero
    net.eval()
    x = torch.zeros(1, 3, 16, 16)
    groups = find_groups(net, x)
    order = channel_order(score_channels(net, x, groups, "bn_scale"))
    stem_bn = net.stem[1].weight
    zeros = int((stem_bn == 0).sum())
    assert zeros > 0 and all(stem_bn[i] == 0 for i in order["stem.0"][:zeros])


def test_a_new_model_keeps_the_costs_and_drops_the_cached_nets():
    c = _cands()
    plan = c.uniform(0.5)
    (cost,) = c.measure([plan])
    c.accuracy(plan)  # cached for the first model's pruned net
    torch.manual_seed(5)
    other = TinyResNet(width=32).eval()  # same structure, other weights: as after training the original
    c.set_model(other, c.order, c.calib, c.evalb)
    assert c.costs and c.measure([plan]) == [cost]  # still cached: a cost depends on channel counts only
    pruned, _ = prune(other, c.example, plan, c.order)
    assert c.accuracy(plan) == held_out_accuracy(pruned, c.calib, c.evalb)
