"""Slimmable widths (issue 4): width decisions in the space, slimmable layers, the sandwich-rule
strategy, BN calibration, the greedy (AutoSlim) width search and its exports."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from supernets.arch import ArchError
from supernets.blocks import make_block
from supernets.space import BlockSpec, SearchSpace, SpaceError
from supernets.supernet import Supernet

REPO = Path(__file__).resolve().parents[2]
SLIM = REPO / "conf" / "space" / "mbv2_tiny_slim.yaml"
TINY = REPO / "conf" / "space" / "mbv2_tiny.yaml"


def slim_space(**changes) -> SearchSpace:
    import yaml

    d = yaml.safe_load(SLIM.read_text())
    d.update(changes)
    return SearchSpace.from_dict(d)


def randomise_bn(net: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that equality tests test them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)


# ---------------------------------------------------------------------- 1. widths in the space
def test_space_without_widths_is_unchanged():
    space = SearchSpace.from_yaml(TINY)
    assert not space.has_widths
    assert all(".width" not in k for k in space.decisions())
    assert list(space.decisions()) == [layer.name for layer in space.layers]
    # the fingerprint the space had before widths existed (caches and exports are keyed by it)
    assert space.fingerprint == "1883facc4f95"
    assert space.size() == 21781872


def test_width_decisions_one_per_stage_multiples_of_8():
    space = SearchSpace.from_yaml(SLIM)
    dec = space.decisions()
    assert space.width_decisions() == ["s1.width", "s2.width", "s3.width", "s4.width"]
    # multipliers 0.25/0.5/0.75/1.0 of 16, 24, 32, 64, rounded to multiples of 8 (never below 8)
    assert dec["s1.width"] == ("c8", "c16")
    assert dec["s2.width"] == ("c8", "c16", "c24")
    assert dec["s3.width"] == ("c8", "c16", "c24", "c32")
    assert dec["s4.width"] == ("c16", "c32", "c48", "c64")
    assert all(w % 8 == 0 for ws in space.stage_widths for w in ws)
    assert space.size() == 2 * 3 * 4 * 4
    explicit = slim_space(widths=None, stages=[{"channels": 16, "layers": 2, "stride": 2, "widths": [8, 16]},
                                               {"channels": 24, "layers": 1, "stride": 2}])
    assert explicit.decisions()["s1.width"] == ("c8", "c16") and explicit.decisions()["s2.width"] == ("c24",)


def test_coupled_layers_share_their_stage_width():
    space = SearchSpace.from_yaml(SLIM)
    rng = random.Random(0)
    for _ in range(20):
        arch = space.sample(10, rng)
        widths = space.widths(arch)
        for si, stage in enumerate(space.arch_def(arch)[1:]):
            assert {b.split("_c")[-1] for b in stage} == {str(widths[si])}, (stage, widths)
        for layer, (cin, cout) in zip(space.layers, space.layer_chs(arch)):
            assert cout == widths[layer.stage - 1]
            if layer.index > 0:
                assert cin == cout  # the residual add inside the stage: always valid


def test_width_validation_names_decision_and_allowed():
    space = SearchSpace.from_yaml(SLIM)
    arch = space.largest(10)
    with pytest.raises(ArchError, match=r"s2\.width.*c40.*allowed: c8, c16, c24"):
        space.validate(arch.replace(**{"s2.width": "c40"}))
    bad = dict(arch.choices)
    del bad["s3.width"]
    with pytest.raises(ArchError, match=r"missing: s3\.width"):
        space.validate(type(arch)(arch.space, arch.fingerprint, arch.resolution, 10, bad))
    with pytest.raises(SpaceError, match="multiples of 8"):
        slim_space(stages=[{"channels": 16, "layers": 1, "stride": 2, "widths": [12, 16]}])
    with pytest.raises(SpaceError, match="positive multipliers"):
        slim_space(widths=[0.5, -1])


# ---------------------------------------------------------------------- 2. slimmable layers
def test_slice_keeps_leading_channels_and_matches_hand_built_layer():
    """A narrow candidate equals a timm InvertedResidual built by hand from the leading channels."""
    space = SearchSpace.from_yaml(SLIM)
    torch.manual_seed(0)
    for bn in ("switchable", "shared"):
        net = Supernet(space, 10, bn=bn)
        randomise_bn(net, 1)
        layer, m = space.layers[3], list(net.mixed_ops())[3]  # s2.l1: 24 -> 24 at its widest, residual
        cand = m.candidates[0]
        cin = cout = 16
        net.set_widths([16, 16, 32, 64])
        ref = make_block(BlockSpec("ir", cin, cout, 3, 6, 1, layer.in_size)).eval()
        mid = 96
        with torch.no_grad():
            ref.conv_pw.weight.copy_(m.shared.conv_pw[:mid, :cin])
            ref.conv_dw.weight.copy_(m.shared.conv_dw[:mid])
            ref.conv_pwl.weight.copy_(m.shared.conv_pwl[:cout, :mid])
            bns = cand.bns(cin, cout)
            for name, src, c in zip(("bn1", "bn2", "bn3"), bns, (mid, mid, cout)):
                dst = getattr(ref, name)
                for t in ("weight", "bias", "running_mean", "running_var"):
                    getattr(dst, t).copy_(getattr(src, t)[:c])
        x = torch.randn(2, cin, layer.in_size, layer.in_size)
        cand.eval()
        torch.testing.assert_close(cand(x), ref(x), rtol=0, atol=0)
        assert ref.has_skip


@pytest.mark.parametrize("bn", ["switchable", "shared"])
def test_extract_equals_supernet_for_nonuniform_widths(bn):
    space = SearchSpace.from_yaml(SLIM)
    torch.manual_seed(0)
    net = Supernet(space, 10, bn=bn)
    randomise_bn(net, 2)
    net.eval()
    x = torch.randn(3, 3, 32, 32)
    rng = random.Random(3)
    archs = [space.largest(10), space.smallest(10)] + [space.sample(10, rng) for _ in range(6)]
    assert any(len(set(space.widths(a))) > 1 for a in archs)
    for arch in archs:
        net.set_active(arch)
        sub = net.extract(arch).eval()
        assert type(sub).__module__.startswith("timm")
        torch.testing.assert_close(sub(x), net(x), rtol=0, atol=0)
        chans = [b.conv_pwl.out_channels for stage in sub.blocks[1:] for b in stage]
        assert chans == [w for layer, (_, w) in zip(space.layers, space.layer_chs(arch))]


def test_switchable_bn_has_one_bn_per_width_shared_has_one():
    space = SearchSpace.from_yaml(SLIM)
    sw = Supernet(space, 10, bn="switchable")
    sh = Supernet(space, 10, bn="shared")
    cand_sw = list(sw.mixed_ops())[2].candidates[0]  # s2.l0: input widths of s1 (8, 16), outputs of s2
    assert sorted(cand_sw.bn1.keys()) == ["16", "8"]
    assert sorted(cand_sw.bn3.keys()) == sorted(f"{i}_{o}" for i in (8, 16) for o in (8, 16, 24))
    cand_sh = list(sh.mixed_ops())[2].candidates[0]
    assert isinstance(cand_sh.bn1, nn.BatchNorm2d) and cand_sh.bn3.num_features == 24
    # training a narrow width in shared mode moves only the leading statistics
    sh.train()
    sh.set_widths([8, 8, 8, 16])
    before = cand_sh.bn3.running_mean.clone()
    sh(torch.randn(4, 3, 32, 32))
    after = cand_sh.bn3.running_mean
    assert not torch.equal(after[:8], before[:8]) and torch.equal(after[8:], before[8:])


# ---------------------------------------------------------------------- 6. cost per width
def test_cost_models_key_blocks_by_channels():
    from nas.latency.analytic import build_flops_model, count_flops
    from nas.latency.items import arch_net, table_items
    from nas.latency.items import fixed_keys as _fixed_keys
    from nas.latency.table import LatencyTable

    space = SearchSpace.from_yaml(SLIM)
    items = table_items(space, 10)
    blocks = [v["fields"] for v in items.values() if v["role"] == "block"]
    # every (input, output) width pair of every layer is an entry: s2.l0 alone has 2 x 3
    s2l0 = {(f["in_c"], f["out_c"]) for f in blocks if f["in_h"] == 8 and f["stride"] == 2}
    assert s2l0 == {(i, o) for i in (8, 16) for o in (8, 16, 24)}
    assert sum(v["role"] == "head_width" for v in items.values()) == 3
    from nas.latency.items import fixed_keys

    fixed = fixed_keys(items)  # what tables (and device kits) sum as the fixed part: the widest head only
    assert set(fixed) == {"stem", "first", "head"} and items[fixed["head"]]["fields"]["in_c"] == 64
    flops = build_flops_model(space, 10)
    rng = random.Random(0)
    archs = [space.largest(10), space.smallest(10)] + [space.sample(10, rng) for _ in range(4)]
    for arch in archs:  # FLOPs are exact: the additive model equals the count of the whole net
        assert flops.predict(arch) == pytest.approx(count_flops(*arch_net(space, arch)) / 1e6, rel=1e-9)
    lo, hi = flops.bounds()
    assert lo == pytest.approx(flops.predict(space.smallest(10))) and hi == pytest.approx(flops.predict(space.largest(10)))
    # a latency table from entries (here: each item's FLOPs as its "ms") predicts per width the same way
    entries = {k: {"median_ms": count_flops(v["module"], v["input_shape"]) / 1e6} for k, v in items.items()}
    table = LatencyTable.from_entries(space, entries, _fixed_keys(items), {"scale": 1.0, "offset_ms": 0.5},
                                      {"num_classes": 10})
    for arch in archs:
        assert table.predict(arch) == pytest.approx(flops.predict(arch) + 0.5)
    del entries[next(k for k, v in items.items() if v["role"] == "head_width")]
    from nas.errors import UserError

    with pytest.raises(UserError, match="lacks 1 entries"):
        LatencyTable.from_entries(space, entries, _fixed_keys(items), None, {"num_classes": 10})


def test_tables_of_spaces_without_widths_are_unchanged():
    from nas.latency.items import table_items

    space = SearchSpace.from_yaml(TINY)
    items = table_items(space, 10)
    assert {v["role"] for v in items.values()} == {"stem", "first", "head", "block"}
    expected = {f"{layer.spec(op).key()}" for layer in space.layers for op in layer.choices if op != "zero"}
    assert {k for k, v in items.items() if v["role"] == "block"} == expected


# ---------------------------------------------------------------------- 3. the strategy
def _strategy(bn: str = "switchable", **kw):
    from nas.latency.analytic import build_flops_model
    from nas.strategies.slimmable import SlimmableSearch

    space = SearchSpace.from_yaml(SLIM)
    torch.manual_seed(0)
    return SlimmableSearch(Supernet(space, 10), build_flops_model(space, 10), bn=bn, **kw)


def _fit(module, batches: int = 3, epochs: int = 1):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(8 * batches, 3, 32, 32, generator=g), torch.randint(10, (8 * batches,), generator=g))
    trainer = pl.Trainer(max_epochs=epochs, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, train_dataloaders=DataLoader(ds, batch_size=8))
    return trainer


def test_sandwich_trains_widest_narrowest_and_n_random_each_step():
    module = _strategy(n_random=3, targets=[0.8])
    seen_steps: list[list[list[int]]] = []
    forwards: list[list[int]] = []
    module.supernet.register_forward_pre_hook(lambda m, args: forwards.append(list(m.widths)))
    orig = module.training_step

    def step(batch, batch_idx):
        out = orig(batch, batch_idx)
        seen_steps.append([list(w) for w in module.last_sandwich])
        return out

    module.training_step = step
    _fit(module, batches=4)
    space = module.supernet.space
    assert len(seen_steps) == 4
    for configs in seen_steps:
        assert len(configs) == 2 + 3
        assert configs[0] == [16, 24, 32, 64] and configs[1] == [8, 8, 8, 16]
        assert all(w in ws for c in configs[2:] for w, ws in zip(c, space.stage_widths))
    # every sampled width ran a forward, in order (widest first: the teacher)
    assert forwards == [c for configs in seen_steps for c in configs]
    randoms = {tuple(c) for configs in seen_steps for c in configs[2:]}
    assert len(randoms) > 1  # random, not a fixed middle width
    assert module.search_cost["images"] == 32 and module.history[-1]["epoch"] == 0
    assert {"loss_widest", "loss_narrowest", "loss_random"} <= set(module.history[-1])


def test_uniform_widths_one_multiplier_for_every_stage():
    space = slim_space()
    assert space.uniform_widths() == {0.25: [8, 8, 8, 16], 0.5: [8, 16, 16, 32], 0.75: [16, 24, 24, 48],
                                      1.0: [16, 24, 32, 64]}
    import yaml

    d = yaml.safe_load(SLIM.read_text())
    d.pop("widths")
    for st, ws in zip(d["stages"], ([8, 16], [16, 24], [16, 24, 32], [32, 48, 64])):
        st["widths"] = ws
    own = SearchSpace.from_dict(d)  # stages' own width lists: the same rank in every stage
    assert own.uniform_widths() == {0.0: [8, 16, 16, 32], 0.5: [16, 24, 24, 48], 1.0: [16, 24, 32, 64]}
    assert SearchSpace.from_yaml(TINY).uniform_widths() == {1.0: [16, 24, 32, 64]}


@pytest.mark.parametrize("kind", ["stage", "uniform", "mixed"])
def test_random_widths_per_stage_uniform_or_mixed(kind):
    """``random_widths``: the sandwich's random nets are per-stage random (non-uniform nets, for the
    greedy search), one random multiplier for every stage (each uniform width trained as such), or both."""
    module = _strategy(random_widths=kind, targets=[0.8])
    torch.manual_seed(0)
    drawn = {tuple(module.sample_widths()) for _ in range(200)}
    uniform = {tuple(w) for w in module.supernet.space.uniform_widths().values()}
    assert all(w in ws for c in drawn for w, ws in zip(c, module.supernet.space.stage_widths))
    if kind == "uniform":  # the middle multipliers: the widest and the narrowest run every step anyway
        assert drawn == uniform - {(8, 8, 8, 16), (16, 24, 32, 64)}
    else:
        assert len(drawn - uniform) > 10  # non-uniform nets
    if kind == "mixed":
        assert uniform - {(8, 8, 8, 16), (16, 24, 32, 64)} <= drawn
    from nas.errors import UserError

    with pytest.raises(UserError, match="random_widths='layer' is unknown; choose one of: stage, uniform, mixed, budget"):
        _strategy(random_widths="layer")


def test_budget_widths_train_the_nets_just_under_each_target():
    """``random_widths=budget``: half the random nets are the middle uniform widths, the other half
    per-stage nets whose predicted cost is within 15 % under a random target, from a pool that is
    exactly every such width choice of the space."""
    import itertools

    module = _strategy(random_widths="budget", targets=[0.45, 0.8], min_fraction=0.85)
    space, cost = module.supernet.space, module.cost_model
    priced = {c: cost.predict(module.arch_for(c)) for c in itertools.product(*space.stage_widths)}
    pool = module.budget_pool()
    for label, t in module.targets.items():
        assert sorted(pool[label]) == sorted(c for c, v in priced.items() if 0.85 * t <= v <= t)
        assert len(pool[label]) > 3
    torch.manual_seed(0)
    drawn = [tuple(module.sample_widths()) for _ in range(400)]
    middle = {tuple(w) for w in space.uniform_widths().values()} - {tuple(module.widest), tuple(module.narrowest)}
    in_band = {label: [c for c in drawn if c in pool[label]] for label in pool}
    assert set(drawn) <= middle | set(pool["t0.45"]) | set(pool["t0.80"])
    assert 150 < sum(c in middle for c in drawn) < 250  # half uniform
    for label in pool:  # each target gets about a quarter of the draws, from many different nets
        assert 60 < len(in_band[label]) and len(set(in_band[label])) >= min(10, len(pool[label]))


def test_budget_pool_with_no_net_in_the_band_takes_the_closest_under_the_target():
    """A coarse space can leave no net within the band under a target: the pool then holds the 8
    nets under the target closest to it, never one above it (here the band ``min_fraction=1`` is
    empty: no net costs exactly the target)."""
    import itertools

    module = _strategy(random_widths="budget", targets=[0.6], min_fraction=1.0)
    (label, t), = module.targets.items()
    costs = sorted({module.cost_model.predict(module.arch_for(c)) for c in itertools.product(*module.supernet.space.stage_widths)})
    below = [v for v in costs if v <= t]
    assert below[-1] < t
    pool = module.budget_pool()[label]
    assert sorted(module.cost_model.predict(module.arch_for(c)) for c in pool) == sorted(below)[-8:]


@pytest.mark.parametrize("key", ["distill", "uniform_check", "fill"])
def test_switches_refuse_anything_but_true_or_false(key):
    """Hydra passes ``fill=no`` as the string 'no', which bool() would read as on."""
    from nas.errors import UserError

    with pytest.raises(UserError, match=f"strategy.module.{key}='no' must be true or false"):
        _strategy(**{key: "no"})


def test_inplace_distillation_is_on_by_default_and_uses_the_detached_widest(monkeypatch):
    import yaml

    import nas.strategies.slimmable as slim

    conf = yaml.safe_load((REPO / "conf" / "strategy" / "slimmable.yaml").read_text())
    assert conf["module"]["distill"] is True and conf["module"]["n_random"] == 2
    module = _strategy(targets=[0.8])
    assert module.distill is True
    outputs, calls = [], []
    module.supernet.register_forward_hook(lambda m, args, out: outputs.append(out))
    real = slim.soft_cross_entropy

    def spy(logits, teacher, temperature=1.0):
        calls.append((logits, teacher))
        return real(logits, teacher, temperature)

    monkeypatch.setattr(slim, "soft_cross_entropy", spy)
    _fit(module, batches=1)
    assert len(outputs) == 4 and len(calls) == 3  # widest learns the labels; narrowest + 2 random learn from it
    widest = outputs[0]
    for logits, teacher in calls:
        assert teacher.grad_fn is None and not teacher.requires_grad  # no gradient into the teacher pass
        torch.testing.assert_close(teacher, torch.softmax(widest.detach(), 1))
        assert logits.grad_fn is not None
    # and the loss differs from the labels' cross-entropy (it is not silently off)
    x_logits, teacher = calls[0]
    assert not torch.allclose(real(x_logits, teacher), torch.nn.functional.cross_entropy(x_logits, teacher.argmax(1)))
    calls.clear()
    outputs.clear()
    off = _strategy(targets=[0.8], distill=False)
    _fit(off, batches=1)
    assert calls == []


def test_distill_weight_mixes_the_distillation_and_label_losses():
    """distill_weight=w: a non-widest net's loss is w * KD(widest) + (1 - w) * CE(labels); the widest's is
    the label loss. Checked on the losses the step actually backpropagates."""
    import torch.nn.functional as F

    from nas.errors import UserError
    from nas.strategies.slimmable import soft_cross_entropy

    module = _strategy(targets=[0.8], distill_weight=0.25)
    outputs, losses, batches = [], [], []
    module.supernet.register_forward_hook(lambda m, args, out: outputs.append(out.detach()))
    module.manual_backward = lambda loss, *a, **k: (losses.append(loss.detach()), loss.backward())
    orig = module.training_step
    module.training_step = lambda batch, *rest: (batches.append(batch), orig(batch, *rest))[1]
    _fit(module, batches=1)
    y = batches[0][1]
    teacher = torch.softmax(outputs[0], 1)
    torch.testing.assert_close(losses[0], F.cross_entropy(outputs[0], y))
    for logits, loss in zip(outputs[1:], losses[1:]):
        torch.testing.assert_close(loss, 0.25 * soft_cross_entropy(logits, teacher) + 0.75 * F.cross_entropy(logits, y))
    with pytest.raises(UserError, match=r"distill_weight=0 must be in \(0, 1\]"):
        _strategy(distill_weight=0)


def test_channel_reordering_keeps_the_widest_function():
    from supernets.slimmable import reorder_channels

    space = SearchSpace.from_yaml(SLIM)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for bn in ("switchable", "shared"):
        torch.manual_seed(1)
        net = Supernet(space, 10, bn=bn)
        randomise_bn(net, 3)
        net.eval()
        before = net(x)
        perms = reorder_channels(net, "l1")
        torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-4)  # summation order
        for si, m in enumerate(m for _, m in net.named_mixed_ops()):
            norms = m.shared.conv_pw.abs().sum(dim=(1, 2, 3))
            assert torch.all(norms[:-1] >= norms[1:])  # expanded channels: most important first
        assert sorted(perms["s4"]) == list(range(64))
        perms = reorder_channels(net, "bn")  # by |BN scale| of the widest: still the same function
        torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-4)  # summation order
        s4 = [m.candidates[0].bn3 for m in list(net.mixed_ops())[-2:]]  # stage 4: 32->64, 64->64
        gamma = sum((b["32_64" if i == 0 else "64_64"] if bn == "switchable" else b).weight.abs()
                    for i, b in enumerate(s4))
        assert torch.all(gamma[:-1] >= gamma[1:])


# ---------------------------------------------------------------------- 4. BN calibration
def test_bn_calibration_is_the_exact_cumulative_statistics():
    from supernets.bn import calibrate_bn

    space = SearchSpace.from_yaml(SLIM)
    torch.manual_seed(0)
    net = Supernet(space, 10, bn="shared")
    arch = space.make_arch({**{l.name: "k3_e6" for l in space.layers},
                            "s1.width": "c8", "s2.width": "c24", "s3.width": "c16", "s4.width": "c48"}, 10)
    sub = net.extract(arch)
    randomise_bn(sub, 4)  # stale statistics that calibration must replace
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 32, 32, generator=g) * (1 + i), torch.zeros(6)) for i in range(4)]
    bns = [m for m in sub.modules() if isinstance(m, nn.BatchNorm2d)]
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(bns))}
    hooks = [bn.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].detach().clone()))
             for i, bn in enumerate(bns)]
    for bn in bns:
        bn.momentum = 0.1  # calibration ignores the configured momentum
    assert calibrate_bn(sub, batches) == 4
    for h in hooks:
        h.remove()
    for i, bn in enumerate(bns):
        xs = inputs[i]
        assert len(xs) == 4
        mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0)
        var = torch.stack([x.transpose(0, 1).flatten(1).var(1, unbiased=True) for x in xs]).mean(0)
        full = torch.cat(xs).mean(dim=(0, 2, 3))  # equal batch sizes: the mean of a full pass
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_mean, full, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
        assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 4
    assert not sub.training


# ---------------------------------------------------------------------- 5. greedy width search
def test_greedy_search_one_arch_per_target_under_target_and_monotone():
    from nas.latency.analytic import build_flops_model
    from nas.strategies.slimmable import greedy_slim

    space = SearchSpace.from_yaml(SLIM)
    flops = build_flops_model(space, 10)
    base = {l.name: "k3_e6" for l in space.layers}
    calls = []

    def fake_acc(arch):  # stage 4's width costs no accuracy, stage 1's the most: a rule we can check by hand
        calls.append(arch)
        w = space.widths(arch)
        return 1.0 - 0.05 * (16 - w[0]) / 8 - 0.02 * (24 - w[1]) / 8 - 0.01 * (32 - w[2]) / 8

    hi = flops.predict(space.largest(10))
    targets = {"t0.80": 0.8 * hi, "t0.60": 0.6 * hi, "t0.40": 0.4 * hi}
    found, rows = greedy_slim(space, base, 10, flops.predict, fake_acc, targets)
    assert list(found) == ["t0.80", "t0.60", "t0.40"]
    costs = [found[k]["cost"] for k in found]
    for label, f in found.items():
        assert f["cost"] <= targets[label] and flops.predict(f["arch"]) == pytest.approx(f["cost"])
    assert costs == sorted(costs, reverse=True)
    chosen = [r for r in rows if r["chosen"]]
    # each target's arch is the first on the greedy path at or under it
    for label, f in found.items():
        before = [r for r in chosen if r["step"] < f["step"]]
        assert all(r["cost"] > targets[label] for r in before)
    # the first steps narrow stage 4 (free in accuracy) until it is at its narrowest
    assert [r["stage"] for r in chosen[1:4]] == [4, 4, 4]
    assert len(calls) == len({tuple(space.widths(a)) for a in calls})  # each network evaluated once
    assert len(rows) == 1 + sum(1 for r in rows if r["step"] > 0) and all(r["kind"] == "greedy" for r in rows)


def test_width_search_never_returns_less_than_a_uniform_width_within_the_target():
    """uniform=...: after the greedy pass every uniform width is evaluated; a target whose greedy net
    scored lower than a uniform width within the target takes the uniform one (the greedy pick is
    kept beside it), and a target whose greedy net is better keeps it."""
    from nas.latency.analytic import build_flops_model
    from nas.strategies.slimmable import greedy_slim

    space = SearchSpace.from_yaml(SLIM)
    flops = build_flops_model(space, 10)
    base = {l.name: "k3_e6" for l in space.layers}
    uniform = list(space.uniform_widths().values())

    def acc(arch):  # uniform nets score high, everything else by width
        w = space.widths(arch)
        return 0.9 + sum(w) / 10000 if w in uniform else 0.5 + sum(w) / 1000

    hi = flops.predict(space.largest(10))
    targets = {"t0.80": 0.8 * hi, "t0.40": 0.4 * hi}
    greedy_only, _ = greedy_slim(space, base, 10, flops.predict, acc, targets)
    found, rows = greedy_slim(space, base, 10, flops.predict, acc, targets, uniform=uniform)
    for label, t in targets.items():
        best_uniform = max((u for u in uniform if flops.predict(space.make_arch(
            {**base, **{f"s{i + 1}.width": f"c{c}" for i, c in enumerate(u)}}, 10)) <= t), key=sum)
        assert found[label]["source"] == "uniform" and space.widths(found[label]["arch"]) == best_uniform
        assert found[label]["cost"] <= t and found[label]["greedy"]["arch"] == greedy_only[label]["arch"]
    assert [r["widths"] for r in rows if r["kind"] == "uniform"] == uniform
    # where the greedy net is better, it stays
    found2, _ = greedy_slim(space, base, 10, flops.predict, lambda a: 0.99 if space.widths(a) not in uniform else 0.1,
                            targets, uniform=uniform)
    assert all(f["source"] == "greedy" and "greedy" not in f for f in found2.values())


def test_fill_also_widens_greedy_picks_without_the_uniform_check():
    """``uniform_check=false, fill=true``: the greedy net of each target is widened within the target
    while the score holds (score: a weighted total width, so every widening that fits is taken; with
    stage 1 weighted 8x the greedy path crosses t0.50 with budget to spare)."""
    from nas.latency.analytic import build_flops_model
    from nas.strategies.slimmable import greedy_slim

    space = SearchSpace.from_yaml(SLIM)
    flops = build_flops_model(space, 10)
    base = {l.name: "k3_e6" for l in space.layers}
    hi = flops.predict(space.largest(10))
    targets = {"t0.50": 0.5 * hi}
    score = lambda a: sum(w * c for w, c in zip(space.widths(a), (8, 1, 1, 1))) / 1000  # noqa: E731
    plain, _ = greedy_slim(space, base, 10, flops.predict, score, targets)
    filled, rows = greedy_slim(space, base, 10, flops.predict, score, targets, fill=True)
    f = filled["t0.50"]
    assert f["source"] == "greedy" and f["cost"] <= targets["t0.50"]
    assert plain["t0.50"].get("filled") is None and f["filled"] == 3  # three widenings fitted
    assert f["filled"] == sum(r["chosen"] for r in rows if r["kind"] == "fill")
    assert f["acc"] > plain["t0.50"]["acc"] and f["cost"] > plain["t0.50"]["cost"]
    idx = [space.stage_widths[s].index(w) for s, w in enumerate(space.widths(f["arch"]))]
    for s in range(4):  # no single widening of the result fits the target any more
        if idx[s] + 1 < len(space.stage_widths[s]):
            wider = list(space.widths(f["arch"]))
            wider[s] = space.stage_widths[s][idx[s] + 1]
            a = space.make_arch({**base, **{f"s{i + 1}.width": f"c{c}" for i, c in enumerate(wider)}}, 10)
            assert flops.predict(a) > targets["t0.50"]


def test_width_search_fills_the_budget_where_accuracy_holds():
    """After the uniform check each target's net widens one stage at a time within the target while the
    score does not drop: where the score grows with width, no single widening of the result fits."""
    from nas.latency.analytic import build_flops_model
    from nas.strategies.slimmable import greedy_slim

    space = SearchSpace.from_yaml(SLIM)
    flops = build_flops_model(space, 10)
    base = {l.name: "k3_e6" for l in space.layers}

    def arch(widths):
        return space.make_arch({**base, **{f"s{i + 1}.width": f"c{c}" for i, c in enumerate(widths)}}, 10)

    hi = flops.predict(space.largest(10))
    targets = {"t0.60": 0.6 * hi, "t0.45": 0.45 * hi}

    def score(a):  # stages 1-3 at 8 channels are best; otherwise wider is better
        w = space.widths(a)
        return sum(w) / 1000 + 1.0 * (w[:3] == [8, 8, 8])

    found, rows = greedy_slim(space, base, 10, flops.predict, score, targets, uniform=[[8, 8, 8, 16]], fill=True)
    # t0.60: the uniform net won the check, then stage 4 widened 16 -> 32 -> 48 -> 64 within the target
    assert found["t0.60"]["source"] == "uniform" and found["t0.60"]["filled"] == 3
    assert [r["widths"] for r in rows if r["kind"] == "fill" and r["chosen"]][:3] == [[8, 8, 8, 32], [8, 8, 8, 48],
                                                                                    [8, 8, 8, 64]]
    for label, t in targets.items():
        w = space.widths(found[label]["arch"])
        assert found[label]["cost"] <= t and w[:3] == [8, 8, 8] and w[3] > 16
        if w[3] != 64:  # stage 4 widened as far as the target allows (widening stages 1-3 loses the score)
            wider = w[:3] + [space.stage_widths[3][space.stage_widths[3].index(w[3]) + 1]]
            assert flops.predict(arch(wider)) > t  # the budget is used up


def test_min_fraction_keeps_each_export_within_its_band():
    """``min_fraction``: the sandwich's narrowest net scores best (it trains at every step); without a
    band, a tight target exports it far below the target. With ``min_fraction=0.85`` the uniform check
    only takes uniform widths in [0.85 T, T], and the fill widens a net below the band even where the
    score drops, until it is in the band or nothing more fits."""
    from nas.latency.analytic import build_flops_model
    from nas.strategies.slimmable import greedy_slim

    space = SearchSpace.from_yaml(SLIM)
    flops = build_flops_model(space, 10)
    base = {l.name: "k3_e6" for l in space.layers}
    uniform = list(space.uniform_widths().values())
    narrowest = [min(ws) for ws in space.stage_widths]

    def score(a):  # the narrowest is best; otherwise narrower is better too (every widening loses score)
        w = space.widths(a)
        return 1.0 if w == narrowest else 0.8 - sum(w) / 1000

    hi = flops.predict(space.largest(10))
    lo = flops.predict(space.make_arch({**base, **{f"s{i + 1}.width": f"c{c}" for i, c in enumerate(narrowest)}}, 10))
    targets = {"t0.80": 0.8 * hi, "t0.45": 0.45 * hi}
    assert lo < 0.85 * targets["t0.45"]  # the narrowest is below the band of the tightest target
    free, _ = greedy_slim(space, base, 10, flops.predict, score, targets, uniform=uniform, fill=True)
    assert all(space.widths(f["arch"]) == narrowest for f in free.values())
    banded, rows = greedy_slim(space, base, 10, flops.predict, score, targets, uniform=uniform, fill=True,
                               min_fraction=0.85)
    for label, t in targets.items():
        f = banded[label]
        assert 0.85 * t <= f["cost"] <= t, (label, f["cost"] / t)
        assert space.widths(f["arch"]) != narrowest
    # a band so high that the greedy pick falls below it: the fill widens while the score drops
    t = {"t0.60": 0.6 * hi}
    plain, _ = greedy_slim(space, base, 10, flops.predict, score, t, fill=True)
    assert plain["t0.60"].get("filled") is None and plain["t0.60"]["cost"] < 0.99 * t["t0.60"]
    logged: list[str] = []
    high, rows = greedy_slim(space, base, 10, flops.predict, score, t, fill=True, min_fraction=0.99, log=logged.append)
    f = high["t0.60"]
    assert f["cost"] < 0.99 * t["t0.60"]  # the band is out of reach here (checked below), and the log says so
    assert any("t0.60: no network in [0.99, 1] x the target was reached" in m for m in logged)
    assert f["filled"] >= 1 and f["acc"] < plain["t0.60"]["acc"] and plain["t0.60"]["cost"] < f["cost"] <= t["t0.60"]
    w = space.widths(f["arch"])  # still below the band: because no single widening fits any more
    for s, ws in enumerate(space.stage_widths):
        if ws.index(w[s]) + 1 < len(ws):
            wider = [ws[ws.index(c) + 1] if k == s else c for k, c in enumerate(w)]
            a = space.make_arch({**base, **{f"s{i + 1}.width": f"c{c}" for i, c in enumerate(wider)}}, 10)
            assert flops.predict(a) > t["t0.60"]


def test_min_fraction_must_be_a_fraction():
    from nas.errors import UserError

    for bad in (0, 1.5, "most", True):
        with pytest.raises(UserError, match=r"min_fraction=.* must be in \(0, 1\]"):
            _strategy(min_fraction=bad, targets=[0.8])
    assert _strategy(min_fraction=None, targets=[0.8]).min_fraction is None


def test_unreachable_target_and_spaces_without_widths_are_user_errors():
    from nas.errors import UserError
    from nas.latency.analytic import build_flops_model
    from nas.strategies.slimmable import SlimmableSearch

    with pytest.raises(UserError, match=r"below the smallest reachable.*fraction >= 0\.311"):
        _strategy(targets=[0.9, 0.3])
    # ops fixed to the largest: the narrowest reachable net is dearer than the space's cheapest
    two_ops = slim_space(ops=["k3_e3", "k3_e6"])
    flops = build_flops_model(two_ops, 10)
    lo, hi = flops.bounds()
    narrowest = SlimmableSearch(Supernet(two_ops, 10), flops, targets=[0.9]).arch_for([8, 8, 8, 16])
    frac = flops.predict(narrowest) / hi
    assert lo / hi < frac - 0.01
    with pytest.raises(UserError, match=rf"below the narrowest network.*fractions >= {frac:.3f}"):
        SlimmableSearch(Supernet(two_ops, 10), flops, targets=[0.9, (lo / hi + frac) / 2])
    with pytest.raises(UserError, match="bn='sync' is unknown; choose one of: switchable, shared"):
        _strategy(bn="sync")
    with pytest.raises(UserError, match="n_random"):
        _strategy(n_random=-1)
    tiny = SearchSpace.from_yaml(TINY)
    with pytest.raises(UserError, match="space=mbv2_tiny_slim"):
        SlimmableSearch(Supernet(tiny, 10), build_flops_model(tiny, 10), targets=[0.5])
    assert list(_strategy(targets=[0.5, "2.5MFLOPs", 0.9]).targets) == ["t0.90", "t2.5mflops", "t0.50"]  # loosest first


def test_export_of_width_arch_loads_back_to_the_same_outputs(tmp_path):
    from nas.export import load_subnet, write_export

    space = SearchSpace.from_yaml(SLIM)
    torch.manual_seed(0)
    for bn in ("switchable", "shared"):
        net = Supernet(space, 10, bn=bn)
        randomise_bn(net, 5)
        net.eval()
        arch = space.make_arch({**{l.name: "k3_e6" for l in space.layers},
                                "s1.width": "c16", "s2.width": "c8", "s3.width": "c24", "s4.width": "c32"}, 10)
        out = write_export(tmp_path / bn, space=space, arch=arch, model=net.extract(arch), report={"bn": bn},
                           onnx=False)
        loaded = load_subnet(out)
        net.set_active(arch)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
        assert "c8" in (out / "arch.yaml").read_text() and "ir_r1_k3_s2_e6_c8" in (out / "arch.yaml").read_text()


# ---------------------------------------------------------------------- end to end
def test_nas_search_slimmable_one_export_per_target(tmp_path):
    import csv
    import json

    from nas.export import load_subnet
    from tests.helpers import run_app

    run_dir = tmp_path / "run"
    run = run_app("nas.apps.search", "strategy=slimmable", "space=mbv2_tiny_slim", "hardware=flops", "strategy.epochs=1",
                  "strategy.targets=[0.4,0.6,0.8]", "strategy.module.bn=shared", "progress=none",
                  "export.calib_batches=2", "hardware.threads=1", f"hydra.run.dir={run_dir}")
    assert run.returncode == 0, run.describe()
    exports = sorted(p.name for p in (run_dir / "export").iterdir() if p.is_dir())
    assert exports == ["t0.40", "t0.60", "t0.80"], run.describe()
    costs = {}
    for label in exports:
        d = run_dir / "export" / label
        report = json.loads((d / "report.json").read_text())
        lat = report["latency_ms"]
        assert lat["predicted"] <= lat["target"] + 1e-9 and lat["measured"] == pytest.approx(lat["predicted"])
        assert report["strategy"] == "slimmable" and report["label"] == label
        costs[label] = lat["predicted"]
        net = load_subnet(d)
        assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
        rows = list(csv.DictReader((d / "width_search.csv").open()))
        assert rows[0]["widths"] == "16-24-32-64" and {"width_search.png", "width_search.json"} <= set(report["files"])
    assert costs["t0.40"] <= costs["t0.60"] <= costs["t0.80"]
    assert "export t0.40" in run.stdout
    # an export of a width choice retrains like any other export
    retrain = run_app("nas.apps.retrain", f"arch={run_dir / 'export' / 't0.40'}", "epochs=1", "progress=none",
                      f"hydra.run.dir={tmp_path / 'retrain'}")
    assert retrain.returncode == 0, retrain.describe()
    assert json.loads((tmp_path / "retrain" / "retrain_report.json").read_text())


def test_nas_search_slimmable_unreachable_target_stops_before_training(tmp_path):
    from tests.helpers import run_app

    run = run_app("nas.apps.search", "strategy=slimmable", "space=mbv2_tiny_slim", "hardware=flops",
                  "strategy.targets=[0.5,0.2]", "progress=none", f"hydra.run.dir={tmp_path / 'run'}")
    assert run.returncode == 2, run.describe()
    assert run.stderr.count("error:") == 1 and "target 0.2" in run.stderr and "Traceback" not in run.stderr
    assert "searching with" not in run.stdout


@pytest.mark.slow
def test_calibration_does_not_collapse_nonuniform_widths():
    """A slimmable net trained with shared BN (4 epochs on digits, ~25 s): after calibration a
    non-uniform width is as good as the uniform widths around it, and far better than with the
    running statistics training left behind (a blur over all widths)."""
    import pytorch_lightning as pl

    from nas.data import DigitsDataModule
    from nas.export import evaluate
    from nas.latency.analytic import build_flops_model
    from nas.strategies.slimmable import SlimmableSearch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same arithmetic (and accuracies) on every machine
    pl.seed_everything(0, verbose=False)
    space = SearchSpace.from_yaml(SLIM)
    dm = DigitsDataModule(resolution=32, batch_size=64, seed=0)
    # per-stage random widths: non-uniform nets are trained as often as uniform ones, so what is left to
    # tell them apart is the BatchNorm statistics (what this test is about)
    module = SlimmableSearch(Supernet(space, 10), build_flops_model(space, 10), targets=[0.8], bn="shared",
                             calib_batches=5, random_widths="stage")
    trainer = pl.Trainer(max_epochs=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, train_dataloaders=module.train_loaders(dm))
    val = list(dm.val_dataloader())
    acc = {}
    for name, widths in {"x0.5": [8, 16, 16, 32], "x0.75": [16, 24, 24, 48], "mixed": [8, 24, 16, 48]}.items():
        arch = module.arch_for(widths)
        acc[name] = (evaluate(module.supernet.extract(arch), val), evaluate(module.calibrated_subnet(arch), val))
    torch.set_num_threads(threads)
    raw_mixed, cal_mixed = acc["mixed"]
    assert cal_mixed >= min(acc["x0.5"][1], acc["x0.75"][1]) - 0.05, acc
    assert cal_mixed >= raw_mixed + 0.2, acc


# ---------------------------------------------------------------------- 7. widths together with ops
def test_ops_searched_with_widths_sandwich_and_greedy_moves():
    from nas.latency.analytic import build_flops_model
    from nas.strategies.slimmable import SlimmableSearch, greedy_slim

    space = slim_space(ops=["k3_e3", "k3_e6", "k5_e6"], zero=True)
    flops = build_flops_model(space, 10)
    torch.manual_seed(0)
    module = SlimmableSearch(Supernet(space, 10), flops, targets=[0.5], ops="search", n_random=2)
    steps = []
    orig = module.training_step

    def step(batch, batch_idx):
        out = orig(batch, batch_idx)
        steps.append((module.last_sandwich, module.last_ops))
        return out

    module.training_step = step
    _fit(module, batches=2)
    for widths, ops in steps:
        assert widths[0] == [16, 24, 32, 64] and ops[0] == ["k5_e6"] * 9
        assert widths[1] == [8, 8, 8, 16] and ops[1] == [("zero" if "zero" in l.choices else "k3_e3")
                                                        for l in space.layers]
    assert len({tuple(o) for _, ops in steps for o in ops[2:]}) > 1
    # greedy over widths and ops: an accuracy that ignores ops makes op steps free, so they come first
    acc = lambda a: sum(space.widths(a)) / 200  # noqa: E731
    hi = flops.predict(space.largest(10))
    found, rows = greedy_slim(space, module.base_choices, 10, flops.predict, acc, {"t0.50": 0.5 * hi},
                              op_cost=flops.layer_cost)
    chosen = [r for r in rows if r["chosen"]][1:]
    assert chosen[0]["layer"] is not None and chosen[0]["stage"] is None
    assert found["t0.50"]["cost"] <= 0.5 * hi
    first_ops = [r["ops"] for r in rows if r["step"] == 1 and r["layer"]]
    # each op move is one layer one step cheaper: k5_e6 -> k3_e6 at the widest widths
    assert all(sum(o != "k5_e6" for o in ops) == 1 and "k3_e6" in ops for ops in first_ops)


SLIM_SEARCH = ("strategy=slimmable", "space=mbv2_tiny_slim", "hardware=flops", "hardware.threads=1", "progress=none",
               "export.calib_batches=2", "export.onnx=false", "strategy.targets=[0.5,0.8]")


@pytest.mark.slow
def test_slimmable_resumes_from_last_checkpoint(tmp_path):
    import json

    from tests.helpers import run_app

    run_dir = tmp_path / "run"
    first = run_app("nas.apps.search", *SLIM_SEARCH, "strategy.epochs=1", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.describe()
    second = run_app("nas.apps.search", *SLIM_SEARCH, "strategy.epochs=2", f"hydra.run.dir={run_dir}")
    assert second.returncode == 0, second.describe()
    assert "resuming from" in second.stdout
    report = json.loads((run_dir / "export" / "t0.50" / "report.json").read_text())
    assert report["search_cost"]["epochs"] == 2  # one epoch from each run, not two from the second


@pytest.mark.slow
def test_slimmable_ddp_on_two_cpu_processes_ranks_agree(tmp_path):
    import json

    from tests.helpers import run_app

    run_dir = tmp_path / "ddp"
    run = run_app("nas.apps.search", *SLIM_SEARCH, "strategy.epochs=1", "trainer=ddp", "trainer.devices=2",
                  f"hydra.run.dir={run_dir}")
    assert run.returncode == 0, run.describe()
    reports = [json.loads(p.read_text()) for p in run_dir.rglob("report.json")]
    assert sorted(r["label"] for r in reports) == ["t0.50", "t0.80"]  # rank 0 alone exports
    for report in reports:
        assert report["distributed"]["world_size"] == 2 and report["distributed"]["ranks_agree"] is True
