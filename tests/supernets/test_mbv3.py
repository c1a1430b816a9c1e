"""The MobileNetV3 / MnasNet-style ops (squeeze-excite, per-op activation) and the mbv3 space: grammar,
supernet == extracted subnet == exported timm net, SE weight sharing, unchanged older spaces."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import EfficientNet
from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite

from nas.export import load_subnet, timm_kwargs, write_export
from nas.latency.items import table_items
from supernets.blocks import space_timm_net
from supernets.bn import calibrate_bn
from supernets.space import OpSpec, SearchSpace, SpaceError, parse_candidate, parse_op
from supernets.supernet import Supernet
from tests.helpers import TINY

CONF = Path(__file__).resolve().parents[2] / "conf" / "space"

#: a small SE / h-swish space (16x16 inputs) with every new feature: stage act, stage ops, both codes
SE_TINY = {
    "name": "se_tiny",
    "resolution": 16,
    "act": "hard_swish",
    "stem": {"channels": 8, "stride": 2},
    "first": {"channels": 8, "kernel": 3},
    "stages": [{"channels": 16, "layers": 2, "stride": 2, "act": "relu",
                "ops": ["k3_e3", "k3_e4_se", "k5_e4_se", "k3_e6_se_hs", "k3_e6"]},
               {"channels": 16, "layers": 2, "stride": 1}],
    "ops": ["k3_e4", "k5_e3_se", "k3_e6_se", "k5_e6_se_re"],
    "zero": True,
    "head": {"channels": 32},
}
#: with searchable widths (slimmable layers carry the SE too)
SE_SLIM = {**SE_TINY, "name": "se_slim", "zero": False, "widths": [0.5, 1.0],
           "stages": [{"channels": 16, "layers": 2, "stride": 2, "act": "relu", "ops": ["k3_e3", "k3_e4_se"]},
                      {"channels": 24, "layers": 2, "stride": 1, "ops": ["k3_e4_se_re", "k5_e6_se"]}]}


def _blocks(net: nn.Module) -> list[InvertedResidual]:
    return [m for m in net.modules() if isinstance(m, InvertedResidual)]


def _trained(space: SearchSpace, classes: int, **kw) -> Supernet:
    """A supernet after a few uniform steps (weights and BN statistics away from their init)."""
    torch.manual_seed(0)
    net = Supernet(space, classes, **kw)
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.05)
    r = space.resolution
    for _ in range(3):
        net.sample("uniform")
        opt.zero_grad()
        F.cross_entropy(net(torch.randn(8, 3, r, r)), torch.randint(classes, (8,))).backward()
        opt.step()
    return net.eval()


def _archs(space: SearchSpace, classes: int, n: int = 6):
    rng = random.Random(1)
    return [space.largest(classes), space.smallest(classes)] + [space.sample(classes, rng) for _ in range(n)]


# ---------------------------------------------------------------------- grammar
@pytest.mark.parametrize("op,spec", [
    ("k3_e6", OpSpec(3, 6, False, None)),
    ("k5_e4_se", OpSpec(5, 4, True, None)),
    ("k3_e3_hs", OpSpec(3, 3, False, "hard_swish")),
    ("k7_e6_se_re", OpSpec(7, 6, True, "relu")),
])
def test_op_grammar(op, spec):
    assert parse_candidate(op) == spec
    assert parse_op(op) == (spec.kernel, spec.expand)


@pytest.mark.parametrize("op", ["k3_e4_hs_se", "k3_e4_xx", "k3_e4_se_se", "k3e4", "se_k3_e4"])
def test_bad_ops_are_refused_naming_the_grammar(op):
    with pytest.raises(SpaceError, match=r"k<kernel>_e<expand>\[_se\]\[_<act>\]"):
        parse_candidate(op)


def test_ops_naming_the_same_block_twice_and_unknown_stage_acts_are_refused():
    dup = {**SE_TINY, "stages": [{**SE_TINY["stages"][0], "ops": ["k3_e4", "k3_e4_re"]}]}
    with pytest.raises(SpaceError, match="same block twice"):
        SearchSpace.from_dict(dup)
    bad = {**SE_TINY, "stages": [{**SE_TINY["stages"][0], "act": "gelu"}]}
    with pytest.raises(SpaceError, match="act 'gelu' unknown"):
        SearchSpace.from_dict(bad)


def test_stage_ops_and_acts_resolve_per_layer():
    space = SearchSpace.from_dict(SE_TINY)
    l0, l2 = space.layer("s1.l0"), space.layer("s2.l0")
    assert l0.choices == ("k3_e3", "k3_e4_se", "k5_e4_se", "k3_e6_se_hs", "k3_e6")
    assert l2.choices == ("k3_e4", "k5_e3_se", "k3_e6_se", "k5_e6_se_re")
    assert (l0.spec("k3_e3").act, l0.spec("k3_e6_se_hs").act) == ("relu", "hard_swish")
    assert (l2.spec("k3_e4").act, l2.spec("k5_e6_se_re").act) == ("hard_swish", "relu")
    assert l0.spec("k3_e4_se").se == 0.25 and l0.spec("k3_e3").se == 0
    # block strings: SE as timm's _se0.25, the activation code only where it differs from the net's
    assert l0.spec("k3_e6_se_hs").timm_str("hard_swish") == "ir_r1_k3_s2_e6_c16_se0.25"
    assert l0.spec("k3_e3").timm_str("hard_swish") == "ir_r1_k3_s2_e3_c16_nre"
    # the largest op of a layer prefers SE and h-swish among equal kernel x expand
    assert space.largest(3).choices["s2.l0"] == "k5_e6_se_re"


# ---------------------------------------------------------------------- older spaces unchanged
#: fingerprints of the shipped spaces before SE / per-op activations existed (main at 884e812)
OLD_FINGERPRINTS = {"mbv2_tiny": "1883facc4f95", "mbv2_tiny_slim": "d54faf330d6e",
                    "mbv2_small_slim": "2b55347c45f8", "proxyless_mobile": "e896925fd595"}


@pytest.mark.parametrize("name", sorted(OLD_FINGERPRINTS))
def test_older_spaces_keep_fingerprint_decisions_keys_and_arch_defs(name):
    space = SearchSpace.from_yaml(CONF / f"{name}.yaml")
    assert space.fingerprint == OLD_FINGERPRINTS[name]
    assert not space.has_se and all(l.act == "relu6" for l in space.layers)
    keys = list(table_items(space, 10))
    assert not any("se=" in k or "act=" in k for k in keys)
    if name == "mbv2_tiny":
        assert "ir:in8x8x16:out16:k7:e6:s1:skip1" in keys and "stem:in32x32x3:out16" in keys
        assert space.arch_def(space.largest(10))[1] == ["ir_r1_k7_s2_e6_c16", "ir_r1_k7_s1_e6_c16"]
    assert "se_layer" not in timm_kwargs(space)


# ---------------------------------------------------------------------- supernet == subnet == timm net
@pytest.mark.parametrize("sharing", ["elastic", "separate"])
@pytest.mark.parametrize("spec", [SE_TINY, "mbv3_tiny"])
def test_extracted_subnet_equals_supernet_with_se_and_hswish(spec, sharing):
    space = SearchSpace.from_yaml(CONF / f"{spec}.yaml") if isinstance(spec, str) else SearchSpace.from_dict(spec)
    net = _trained(space, 5, weight_sharing=sharing)
    archs = _archs(space, 5)
    ops = {op for a in archs for op in a.choices.values()}
    assert any("_se" in op for op in ops) and any(op.endswith(("_hs", "_re")) for op in ops)
    r = space.resolution
    x = torch.randn(4, 3, r, r)
    for arch in archs:
        net.set_active(arch)
        sub = net.extract(arch).eval()
        assert type(sub) is EfficientNet
        assert torch.allclose(net(x), sub(x), atol=1e-5), arch.short()
        for spec_b, block in zip([b for st in space.block_specs(arch)[1:] for b in st], _blocks(sub)):
            assert isinstance(block.se, SqueezeExcite) == bool(spec_b.se)
            if spec_b.se:
                assert isinstance(block.se.gate, nn.Hardsigmoid)
                assert block.se.conv_reduce.out_channels == max(8, spec_b.in_chs // 4)
            want = {"relu": nn.ReLU, "hard_swish": nn.Hardswish}[spec_b.act]
            assert isinstance(block.bn1.act, want), (arch.short(), spec_b)


@pytest.mark.parametrize("bn", ["switchable", "shared"])
def test_se_with_widths_extracts_exactly(bn):
    space = SearchSpace.from_dict(SE_SLIM)
    net = _trained(space, 4, bn=bn)
    x = torch.randn(4, 3, 16, 16)
    for arch in _archs(space, 4):
        net.set_active(arch)
        if bn == "shared":  # one BN serves every width: exact only after recalibration
            calibrate_bn(net, [torch.randn(8, 3, 16, 16)])
        sub = net.extract(arch).eval()
        assert torch.allclose(net.eval()(x), sub(x), atol=1e-5), arch.short()


def test_se_weights_are_leading_slices_of_the_largest_expansion():
    space = SearchSpace.from_dict(SE_TINY)
    net = Supernet(space, 3, weight_sharing="elastic")
    mo = next(net.mixed_ops())
    sd = {n: mo.candidates[mo.names.index(n)].timm_state_dict() for n in ("k3_e4_se", "k5_e4_se", "k3_e6_se_hs")}
    big = sd["k3_e6_se_hs"]
    mid = sd["k3_e4_se"]["conv_pw.weight"].shape[0]
    rd = sd["k3_e4_se"]["se.conv_reduce.bias"].shape[0]
    assert rd == big["se.conv_reduce.bias"].shape[0]  # rd = in_chs / 4 rounded: one for every expansion
    assert torch.equal(sd["k3_e4_se"]["se.conv_reduce.weight"], big["se.conv_reduce.weight"][:, :mid])
    assert torch.equal(sd["k3_e4_se"]["se.conv_expand.weight"], big["se.conv_expand.weight"][:mid])
    assert torch.equal(sd["k3_e4_se"]["se.conv_expand.bias"], big["se.conv_expand.bias"][:mid])
    # kernel variants share the same SE
    assert torch.equal(sd["k3_e4_se"]["se.conv_reduce.weight"], sd["k5_e4_se"]["se.conv_reduce.weight"])
    # a layer without any SE op has no SE parameters (older spaces keep their state dicts)
    plain = Supernet(SearchSpace.from_dict(TINY), 3)
    assert not any(".se_" in k for k in plain.state_dict())


@pytest.mark.parametrize("gate", ["one", "two", "full"])
@pytest.mark.parametrize("sharing", ["elastic", "separate"])
def test_every_gate_mode_trains_se_ops(gate, sharing):
    space = SearchSpace.from_dict(SE_TINY)
    torch.manual_seed(0)
    net = Supernet(space, 4, gate=gate, weight_sharing=sharing)
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4)
    for phase in ("weight", "arch"):
        net.set_phase(phase)
        net.sample("probs")
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if phase == "arch":
            for a in net.arch_parameters():
                assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    # the SE weights of the active path learn in a weight step
    net.set_phase("weight")
    net.set_active(space.largest(4))
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    se = [p for n, p in net.named_parameters() if ".se" in n and p.grad is not None]
    assert se and all(p.grad.abs().sum() > 0 for p in se)


def test_export_round_trip_is_a_plain_timm_net_with_the_same_outputs(tmp_path):
    space = SearchSpace.from_yaml(CONF / "mbv3_tiny.yaml")
    net = _trained(space, 5)
    x = torch.randn(3, 3, 32, 32)
    for i, arch in enumerate(_archs(space, 5, n=2)):
        net.set_active(arch)
        sub = net.extract(arch).eval()
        out = write_export(tmp_path / f"e{i}", space=space, arch=arch, model=sub, report={}, onnx=False)
        loaded = load_subnet(out)
        assert type(loaded) is EfficientNet
        assert torch.allclose(loaded(x), net(x), atol=1e-5)
        # a plain timm net built from the arch_def alone takes the same weights
        fresh = space_timm_net(space, arch, 5).eval()
        fresh.load_state_dict(loaded.state_dict())
        assert torch.allclose(fresh(x), net(x), atol=1e-5)
