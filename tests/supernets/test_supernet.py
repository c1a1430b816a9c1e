"""The model side: gates, BinaryConnect gradients, extraction, spaces and architectures."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import EfficientNet

from supernets.arch import Arch, ArchError
from supernets.bn import calibrate_bn
from supernets.mixed import MixedOp
from supernets.space import ZERO, SearchSpace, SpaceError
from supernets.supernet import Supernet
from tests.helpers import TINY


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace.from_dict(TINY)


def _lin(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv2d(2, 2, 1, bias=True)


def _mixed(n=3) -> tuple[MixedOp, list[nn.Module]]:
    ops = [_lin(i) for i in range(n)]
    m = MixedOp([f"op{i}" for i in range(n)], ops)
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1][:n]))
    return m, ops


# ---------------------------------------------------------------------- BinaryConnect gradients
def test_one_mode_arch_gradient_matches_hand_formula():
    m, ops = _mixed(3)
    m.mode, m.phase = "one", "arch"
    m.fixed, m.active = False, 1
    torch.manual_seed(0)
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    w = torch.randn(4, 2, 3, 3)
    y = m(x)
    (y * w).sum().backward()
    # an architecture step does not touch the weights (they get no gradient)
    assert all(p.grad is None for op in ops for p in op.parameters())

    with torch.no_grad():
        p = F.softmax(m.alpha, 0)
        g = torch.stack([(op(x) * w).sum() for op in ops])  # dL/dg_k = sum(o_k * dL/dy)
        expect = torch.tensor([sum(g[j] * p[j] * (float(i == j) - p[i]) for j in range(3)) for i in range(3)])
    assert torch.allclose(m.alpha.grad, expect, atol=1e-5)
    # x gets the gradient through the active path only
    x2 = x.detach().clone().requires_grad_(True)
    (ops[1](x2) * w).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)


def test_two_mode_arch_gradient_and_rescale_keep_unsampled_probs():
    m, ops = _mixed(4)
    m.mode, m.phase, m.fixed = "two", "arch", False
    m._pair = torch.tensor([2, 0])  # active candidate first
    m.active = 2
    torch.manual_seed(1)
    x = torch.randn(3, 2, 2, 2)
    w = torch.randn(3, 2, 2, 2)
    (m(x) * w).sum().backward()
    with torch.no_grad():
        idx = [2, 0]
        q = F.softmax(m.alpha[idx], 0)
        g = [(ops[k](x) * w).sum() for k in idx]
        expect = torch.zeros(4)
        for a, i in enumerate(idx):
            expect[i] = sum(g[b] * q[b] * (float(a == b) - q[a]) for b in range(2))
    assert torch.allclose(m.alpha.grad, expect, atol=1e-5)
    assert m.alpha.grad[1] == 0 and m.alpha.grad[3] == 0

    before = F.softmax(m.alpha.detach(), 0)
    with torch.no_grad():
        m.alpha -= 0.7 * m.alpha.grad  # an optimizer step
    m.rescale_pair()
    after = F.softmax(m.alpha.detach(), 0)
    assert torch.allclose(before[[1, 3]], after[[1, 3]], atol=1e-6)
    assert not torch.allclose(before[[0, 2]], after[[0, 2]])


def test_recompute_in_backward_leaves_bn_statistics_alone():
    bns = [nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)) for _ in range(2)]
    m = MixedOp(["a", "b"], bns)
    m.mode, m.phase, m.fixed, m.active = "one", "arch", False, 0
    before = bns[1][1].running_mean.clone()
    m(torch.randn(4, 2, 3, 3) * 5 + 3).sum().backward()
    assert torch.equal(bns[1][1].running_mean, before)  # recomputed candidate: stats untouched
    assert not torch.equal(bns[0][1].running_mean, torch.zeros(2))  # the active path ran in train mode


def test_full_mode_is_softmax_mixture():
    m, ops = _mixed(3)
    m.mode, m.fixed = "full", False
    x = torch.randn(2, 2, 3, 3)
    p = F.softmax(m.alpha, 0)
    assert torch.allclose(m(x), sum(p[k] * ops[k](x) for k in range(3)), atol=1e-6)


def test_one_mode_weight_step_runs_only_the_active_candidate(space):
    net = Supernet(space, 5, gate="one")
    calls: dict[int, int] = {}
    for mo in net.mixed_ops():
        for k, c in enumerate(mo.candidates):
            c.register_forward_hook(lambda mod, i, o, key=id(c): calls.__setitem__(key, calls.get(key, 0) + 1))
    net.set_phase("weight")
    net.sample("uniform")
    loss = F.cross_entropy(net(torch.randn(4, 3, 16, 16)), torch.arange(4))
    loss.backward()
    for mo in net.mixed_ops():
        ran = [k for k, c in enumerate(mo.candidates) if calls.get(id(c), 0)]
        assert ran == [mo.active]
        for k, c in enumerate(mo.candidates):
            if k != mo.active:  # candidates not run get no gradient at all: no decay, no momentum
                assert all(p.grad is None for p in c.parameters())


@pytest.mark.parametrize("sharing", ["elastic", "separate"])
def test_arch_step_gives_every_layer_an_alpha_gradient(space, sharing):
    net = Supernet(space, 5, gate="one", weight_sharing=sharing)
    net.set_phase("arch")
    net.sample("probs")
    F.cross_entropy(net(torch.randn(4, 3, 16, 16)), torch.arange(4)).backward()
    for a in net.arch_parameters():
        assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
        assert abs(a.grad.sum().item()) < 1e-5  # softmax Jacobian: gradients sum to zero


# ---------------------------------------------------------------------- extraction
@pytest.mark.parametrize("sharing", ["elastic", "separate"])
def test_extracted_subnet_equals_supernet_with_choices_fixed(space, sharing):
    torch.manual_seed(0)
    net = Supernet(space, 7, weight_sharing=sharing)
    # train mode for a few steps so BN statistics and weights are not at their init values
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.1)
    for _ in range(3):
        net.sample("uniform")
        opt.zero_grad()
        F.cross_entropy(net(torch.randn(8, 3, 16, 16)), torch.randint(7, (8,))).backward()
        opt.step()
    rng = random.Random(0)
    archs = [space.largest(7), space.smallest(7)] + [space.sample(7, rng) for _ in range(4)]
    x = torch.randn(5, 3, 16, 16)
    net.eval()
    for arch in archs:
        net.set_active(arch)
        sub = net.extract(arch).eval()
        assert type(sub) is EfficientNet
        assert not any(isinstance(m, (MixedOp, Supernet)) for m in sub.modules())
        assert torch.allclose(net(x), sub(x), atol=1e-5), arch.short()


def test_elastic_candidates_share_leading_slices(space):
    net = Supernet(space, 3, weight_sharing="elastic")
    mo = next(net.mixed_ops())
    small = mo.candidates[mo.names.index("k3_e3")].timm_state_dict()
    big = mo.candidates[mo.names.index("k3_e6")].timm_state_dict()
    mid = small["conv_pw.weight"].shape[0]
    assert torch.equal(small["conv_pw.weight"], big["conv_pw.weight"][:mid])
    k5 = mo.candidates[mo.names.index("k5_e3")].timm_state_dict()["conv_dw.weight"]
    assert torch.equal(small["conv_dw.weight"], k5[:, :, 1:4, 1:4])  # centre 3x3 of the 5x5


# ---------------------------------------------------------------------- spaces and archs
def test_space_zero_only_where_shape_kept_and_not_first_in_stage(space):
    for layer in space.layers:
        legal = layer.index > 0 and layer.stride == 1 and layer.in_chs == layer.out_chs
        assert (ZERO in layer.choices) == legal, layer.name
    assert space.size() == 3 * 4 * 3 * 4


def test_fingerprint_tracks_the_spec():
    a = SearchSpace.from_dict(TINY)
    b = SearchSpace.from_dict({**TINY, "head": {"channels": 40}})
    assert a.fingerprint == SearchSpace.from_dict(dict(TINY)).fingerprint
    assert a.fingerprint != b.fingerprint


def test_bad_space_is_refused():
    with pytest.raises(SpaceError, match="multiples of 8"):
        SearchSpace.from_dict({**TINY, "head": {"channels": 30}})
    with pytest.raises(SpaceError, match="k<kernel>_e<expand>"):
        SearchSpace.from_dict({**TINY, "ops": ["k3"]})


def test_arch_yaml_round_trip_and_validation(space):
    arch = space.sample(4, random.Random(3))
    back = Arch.from_yaml(arch.to_yaml(space.arch_def(arch)))
    assert back == arch and hash(back) == hash(arch)
    space.validate(back)
    with pytest.raises(ArchError, match=r"s1\.l1.*allowed: k3_e3, k5_e3, k3_e6, zero"):
        space.validate(arch.replace(**{"s1.l1": "k9_e9"}))
    choices = dict(arch.choices)
    del choices["s2.l0"]
    with pytest.raises(ArchError, match=r"missing: s2\.l0"):
        space.validate(Arch(arch.space, arch.fingerprint, arch.resolution, 4, choices))
    with pytest.raises(ArchError, match="another version"):
        space.validate(Arch(arch.space, "0" * 12, arch.resolution, 4, arch.choices))


def test_largest_and_smallest(space):
    big, small = space.largest(3), space.smallest(3)
    assert set(big.choices.values()) == {"k5_e3"}  # largest kernel area x expand: 25*3 > 9*6
    assert all(v != ZERO for v in big.choices.values())
    assert sum(v == ZERO for v in small.choices.values()) == 2


# ---------------------------------------------------------------------- BN calibration
def test_calibrate_bn_gives_exact_statistics_of_the_batches():
    torch.manual_seed(0)
    bn_net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    batches = [torch.randn(6, 3, 4, 4) * (i + 1) + i for i in range(3)]
    n = calibrate_bn(bn_net, [(b, None) for b in batches])
    assert n == 3 and not bn_net.training
    with torch.no_grad():
        feats = [bn_net[0](b) for b in batches]
    # cumulative average of per-batch statistics (momentum=None), as BatchNorm defines it
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(bn_net[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(bn_net[1].running_var, var, atol=1e-4)
    assert bn_net[1].momentum == 0.1  # restored


# ---------------------------------------------------------------------- skip_prob (E11: depth-balanced paths)
def test_uniform_index_skip_prob_frequencies():
    from supernets.mixed import uniform_index
    names = ("k3_e3", "k5_e3", ZERO, "k7_e6")
    gen = torch.Generator().manual_seed(0)
    n = 20000
    counts = [0] * len(names)
    for _ in range(n):
        counts[uniform_index(names, gen, 0.5)] += 1
    assert abs(counts[2] / n - 0.5) < 0.015  # zero half the time
    for k in (0, 1, 3):  # the ops share the other half equally
        assert abs(counts[k] / n - 0.5 / 3) < 0.015
    gen = torch.Generator().manual_seed(0)
    assert all(uniform_index(names, gen, 0.0) != 2 for _ in range(2000))  # never skipped
    no_zero = ("k3_e3", "k5_e3")
    gen = torch.Generator().manual_seed(0)
    counts = [0, 0]
    for _ in range(4000):
        counts[uniform_index(no_zero, gen, 0.9)] += 1
    assert abs(counts[0] / 4000 - 0.5) < 0.03  # a layer without zero: unaffected


def test_uniform_index_without_skip_prob_is_the_old_uniform_draw():
    """skip_prob=None draws exactly what torch.randint did before the option (seeded runs unchanged)."""
    from supernets.mixed import uniform_index
    names = ("k3_e3", ZERO, "k5_e6")
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [uniform_index(names, g1) for _ in range(50)] == \
        [int(torch.randint(3, (1,), generator=g2)) for _ in range(50)]


def test_supernet_sample_skip_prob_skips_every_skippable_layer_at_that_rate(space):
    net = Supernet(space, 5)
    skippable = [m for m in net.mixed_ops() if ZERO in m.names]
    assert skippable
    gen = torch.Generator().manual_seed(1)
    skipped = total = 0
    for _ in range(3000):
        net.sample("uniform", gen, skip_prob=0.5)
        skipped += sum(m.names[m.active] == ZERO for m in skippable)
        total += len(skippable)
    assert abs(skipped / total - 0.5) < 0.02
    gen = torch.Generator().manual_seed(1)
    skipped = total = 0
    for _ in range(3000):
        net.sample("uniform", gen)  # default: zero as often as each op
        skipped += sum(m.names[m.active] == ZERO for m in skippable)
        total += len(skippable)
    expected = sum(1 / len(m.names) for m in skippable) / len(skippable)
    assert abs(skipped / total - expected) < 0.02


@pytest.mark.parametrize("bad", [1.0, -0.1, "half", 2])
def test_check_skip_prob_refuses_what_is_not_a_probability(bad):
    from nas.errors import UserError, check_skip_prob
    with pytest.raises(UserError, match=r"strategy.module.skip_prob=.*\[0, 1\)"):
        check_skip_prob("strategy.module.skip_prob", bad)
    assert check_skip_prob("k", None) is None and check_skip_prob("k", "0.5") == 0.5
