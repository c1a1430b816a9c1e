"""Coupled channels, the criteria, rounding: pruning a tiny residual net and a timm net."""
from __future__ import annotations

import pytest
import timm
import torch

from nas.errors import UserError
from nas.prune.criteria import CRITERIA, channel_order, score_channels
from nas.prune.graph import channel_counts, check_prunable, find_groups, min_keep, prune, round_keep, zero_removed
from tests.prune.models import GroupedNet, TinyResNet

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _trained_like(net: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (a fresh net has gamma 1, beta 0)."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    return net.eval()


def _half(groups, round_to=8):
    return {g.name: round_keep(g.channels, g.channels / 2, round_to) for g in groups}


def test_a_residual_block_pruned_keeps_its_adds_valid():
    net = _trained_like(TinyResNet())
    groups = find_groups(net, X[:1])
    by = {g.name: g for g in groups}
    # block2's residual add couples its second conv with its shortcut (and block3's add and the classifier's input)
    res = next(g for g in groups if "block2.conv2.0" in g.layers)
    assert "block2.down.0" in res.layers and "block3.project.0" in res.layers
    # the classifier's outputs are never a group
    assert all("fc" not in g.layers for g in groups)
    plan = {g.name: min_keep(g, 8) for g in groups}
    pruned, _ = prune(net, X[:1], plan, {k: list(range(g.channels)) for k, g in by.items()})
    assert pruned.block2.conv2[0].out_channels == pruned.block2.down[0].out_channels == 8
    assert pruned.block3.project[0].out_channels == 8 == pruned.fc.in_features
    # the depthwise conv keeps in = out = groups, and squeeze-excite's expand matches it
    dw = pruned.block3.dw[0]
    assert dw.in_channels == dw.out_channels == dw.groups == pruned.block3.se_expand.out_channels
    assert pruned(X).shape == (4, 4)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_pruned_outputs_equal_the_original_with_the_removed_channels_zeroed(criterion):
    """Before any fine-tuning, pruning only removes: the pruned net computes what the original computes
    with the removed channels zeroed at their source (conv rows and BatchNorm scale and shift)."""
    net = _trained_like(TinyResNet())
    groups = find_groups(net, X[:1])
    batches = [(X, torch.tensor([0, 1, 2, 3]))]
    order = channel_order(score_channels(net, X[:1], groups, criterion, batches=batches))
    plan = _half(groups)
    pruned, _ = prune(net, X[:1], plan, order)
    zeroed = zero_removed(net, X[:1], plan, order)
    with torch.no_grad():
        a, b, full = pruned(X), zeroed(X), net(X)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a, full, atol=1e-3)  # channels were removed, and they mattered
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())


def test_the_criteria_choose_differently_and_l1_drops_the_smallest_filters():
    net = _trained_like(TinyResNet())
    groups = find_groups(net, X[:1])
    stem = next(g for g in groups if g.name == "stem.0")
    # make stem channel 5 tiny in every layer of its group: l1 ranks it first
    with torch.no_grad():
        for name, mod in net.named_modules():
            if name in stem.layers and hasattr(mod, "weight"):
                mod.weight[5] *= 1e-3
    l1 = channel_order(score_channels(net, X[:1], groups, "l1"))
    assert l1["stem.0"][0] == 5
    rnd = channel_order(score_channels(net, X[:1], groups, "random", seed=3))
    assert rnd != l1


def test_timm_efficientnet_depthwise_and_squeeze_excite_prune_consistently():
    net = _trained_like(timm.create_model("efficientnet_b0", num_classes=4))
    x = torch.randn(2, 3, 32, 32)
    groups = find_groups(net, x[:1])
    order = channel_order(score_channels(net, x[:1], groups, "l2"))
    plan = _half(groups)
    pruned, _ = prune(net, x[:1], plan, order)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zero_removed(net, x[:1], plan, order)(x), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("round_to", [8, 16])
def test_channel_counts_are_multiples_of_round_to(round_to):
    net = TinyResNet(width=32).eval()
    groups = find_groups(net, X[:1])
    for ratio in (0.2, 0.45, 0.7, 1.0):
        plan = {g.name: round_keep(g.channels, g.channels * (1 - ratio), round_to) for g in groups}
        pruned, _ = prune(net, X[:1], plan, {g.name: list(range(g.channels)) for g in groups})
        counts = channel_counts(pruned, groups)
        assert counts == plan
        # a group of at most round_to channels (squeeze-excite's 8) is kept whole
        assert all(c % round_to == 0 or c == g.channels <= round_to for g, c in zip(groups, counts.values())), counts
        for m in pruned.modules():  # every layer of every group, not just the roots
            if isinstance(m, torch.nn.Conv2d):
                assert m.out_channels % round_to == 0 or m.out_channels == 8, m  # 8: squeeze-excite, never pruned below


def test_a_grouped_convolution_is_named_with_how_to_leave_it_out():
    net = GroupedNet().eval()
    with pytest.raises(UserError, match=r"layer grouped\.0 is a grouped convolution.*ignore=\[grouped\.0\]"):
        find_groups(net, X[:1])
    groups = find_groups(net, X[:1], ignore=["grouped.0"])
    # the stem feeds the grouped conv: its channels are coupled with it and stay
    assert [g.name for g in groups] == []


def test_an_unknown_ignore_name_lists_close_names():
    with pytest.raises(UserError, match=r"ignore: 'block2.conv' is not a module.*did you mean"):
        find_groups(TinyResNet().eval(), X[:1], ignore=["block2.conv"])


def test_a_layer_the_graph_breaks_on_is_named(monkeypatch):
    """A group whose pruning breaks the model is named, with the ignore= that leaves it out."""
    net = TinyResNet().eval()
    groups = find_groups(net, X[:1])
    real_forward = type(net.block3).forward

    def picky(self, x):  # a layer that insists on its original width, as a custom op might
        if self.expand[0].out_channels != 64:
            raise RuntimeError("custom op wants 64 channels")
        return real_forward(self, x)

    monkeypatch.setattr(type(net.block3), "forward", picky)
    with pytest.raises(UserError, match=r"pruning the channels of layer block3\.\S+ \(coupled with .*block3\.expand\.0.*ignore=\[block3\."):
        check_prunable(net, X[:1], groups, 8)
