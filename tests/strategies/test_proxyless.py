"""Cost model algebra, the ProxylessNAS strategy in Lightning, and the export round trip."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from nas.errors import UserError
from nas.export import evaluate, load_subnet, write_export
from nas.latency.table import LatencyTable
from nas.strategies.proxyless import ProxylessSearch, latency_loss
from supernets.bn import calibrate_bn
from supernets.space import SearchSpace
from supernets.supernet import Supernet
from tests.helpers import TINY, TinyData, random_table


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace.from_dict(TINY)


def _table(space: SearchSpace, seed: int = 0) -> LatencyTable:
    return random_table(space, seed, low=0.1, fixed=0.5)


def test_expected_latency_equals_hand_sum_for_one_hot(space):
    table = _table(space)
    arch = space.sample(4, random.Random(1))
    probs = {l.name: F.one_hot(torch.tensor(l.choices.index(arch.choices[l.name])), len(l.choices)).float()
             for l in space.layers}
    hand = 0.5 + sum(table.layer_costs[l.name][l.choices.index(arch.choices[l.name])] for l in space.layers)
    assert math.isclose(table.expected(probs).item(), hand, rel_tol=1e-6)
    assert math.isclose(table.predict(arch), hand, rel_tol=1e-9)


def test_expected_latency_is_differentiable_in_alpha(space):
    table = _table(space)
    net = Supernet(space, 4)
    e = table.expected(net.probs())
    e.backward()
    for layer, a in zip(space.layers, net.arch_parameters()):
        p = F.softmax(a.detach(), 0)
        c = torch.tensor(table.layer_costs[layer.name])
        assert torch.allclose(a.grad, p * (c - (p * c).sum()), atol=1e-6)  # d/dalpha of p . c


def test_bounds_and_targets(space):
    table = _table(space)
    lo, hi = table.bounds()
    assert math.isclose(table.predict(table.cheapest(4)), lo) and math.isclose(table.predict(table.priciest(4)), hi)
    assert math.isclose(table.resolve_target(0.9), 0.9 * hi)
    assert math.isclose(table.resolve_target(f"{hi * 0.9:.6f}ms"), hi * 0.9, rel_tol=1e-5)
    assert table.resolve_target(None) is None
    with pytest.raises(UserError, match="smallest reachable"):
        table.resolve_target(lo / hi * 0.5)
    with pytest.raises(UserError, match="not a number"):
        table.resolve_target("fast")


def test_latency_loss_forms():
    ce = torch.tensor(2.0)
    e = torch.tensor(3.0, requires_grad=True)
    t = 2.0
    assert torch.isclose(latency_loss(ce, e, t, "mul_log", a=0.2, b=0.3),
                         2.0 * 0.2 * (math.log(3000) / math.log(2000)) ** 0.3 * torch.ones(()))
    assert torch.isclose(latency_loss(ce, e, t, "add", lam=0.1), torch.tensor(2.0 + 0.1 * 0.5))
    assert torch.isclose(latency_loss(ce, torch.tensor(1.0), t, "abs", lam=0.1), torch.tensor(2.0 + 0.1 * 0.5))
    assert latency_loss(ce, e, None, "add") is ce
    # every form penalises being over the target
    for form in ("mul_log", "add", "abs"):
        e.grad = None
        latency_loss(ce, e, t, form).backward()
        assert e.grad > 0, form


@pytest.mark.parametrize("gate", ["one", "two", "full"])
def test_proxyless_search_runs_and_moves_alpha(space, gate):
    pl.seed_everything(0, verbose=False)
    dm = TinyData()
    net = Supernet(space, dm.num_classes)
    table = _table(space)
    lo, hi = table.bounds()
    module = ProxylessSearch(net, table, targets={"t": (lo + hi) / 2}, gate=gate, warmup_epochs=1, arch_lr=0.05,
                             loss_form="add", loss_lambda=1.0)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=module.train_loaders(dm), val_dataloaders=dm.val_dataloader())
    alphas = torch.cat([a.detach() for a in net.arch_parameters()])
    assert alphas.abs().sum() > 0  # architecture steps happened after the warm-up
    assert len(module.history) == 3 and set(module.history[-1]["probs"]) == {l.name for l in space.layers}
    assert module.history[0]["expected"] == pytest.approx(table.expected(
        {k: torch.full((len(v),), 1 / len(v)) for k, v in space.decisions().items()}).item())  # warm-up: uniform
    assert module.search_cost["images"] > 0 and module.search_cost["epochs"] == 3
    arch = module.derive()
    space.validate(arch)
    # the additive latency term lowers the expected latency against the uniform start
    assert module.history[-1]["expected"] < module.history[0]["expected"]


def test_export_loads_back_to_the_same_outputs(space, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    net = Supernet(space, 4)
    arch = space.sample(4, random.Random(7))
    sub = net.extract(arch).eval()
    out = write_export(tmp_path / "export", space=space, arch=arch, model=sub, report={"val_acc": 0.5})
    assert {p.name for p in out.iterdir()} == {"arch.yaml", "model.safetensors", "model.onnx", "report.json"}
    assert json.loads((out / "report.json").read_text())["val_acc"] == 0.5
    loaded = load_subnet(out)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), sub(x), atol=1e-6)
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        onnx_out = sess.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(onnx_out, sub(x).detach().numpy(), atol=1e-4)
    # a second export to the same place keeps the first one
    write_export(tmp_path / "export", space=space, arch=arch, model=sub, report={"val_acc": 0.6}, onnx=False)
    assert json.loads((tmp_path / "export.prev" / "report.json").read_text())["val_acc"] == 0.5
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_load_subnet_refuses_incomplete_folder(tmp_path):
    with pytest.raises(UserError, match="no architecture file"):
        load_subnet(tmp_path)


def test_budget_derive_is_the_most_probable_arch_in_the_band(space):
    """derive=budget: the highest sum log p among archs with predicted latency in [0.9 T, T], checked
    against every architecture of the tiny space; derive=argmax stays the per-layer argmax."""
    import itertools

    table = _table(space, seed=3)
    net = Supernet(space, 4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer, a in zip(space.layers, net.arch_parameters()):
            a.copy_(torch.randn(len(a), generator=g) * 2)
            if "zero" in layer.choices:  # the zero op wins the argmax, as in a collapsed search
                a[layer.choices.index("zero")] = 10.0
    lo, hi = table.bounds()
    target = lo + 0.7 * (hi - lo)
    argmax = ProxylessSearch(net, table, targets={"t": target}, derive="argmax").derive()
    assert argmax == net.argmax_arch() and table.predict(argmax) < 0.9 * target
    derived = ProxylessSearch(net, table, targets={"t": target}, derive="budget", budget_floor=0.9).derive()
    logp = {n: torch.log_softmax(a.detach(), 0).tolist() for n, a in zip([l.name for l in space.layers],
                                                                         net.arch_parameters())}

    def score(choices):
        return sum(logp[l.name][l.choices.index(c)] for l, c in zip(space.layers, choices))

    best, best_score = None, -math.inf
    for choices in itertools.product(*[l.choices for l in space.layers]):
        arch = space.make_arch(dict(zip([l.name for l in space.layers], choices)), 4)
        if 0.9 * target <= table.predict(arch) <= target and score(choices) > best_score + 1e-9:
            best, best_score = arch, score(choices)
    assert best is not None
    assert 0.9 * target - 1e-3 <= table.predict(derived) <= target
    assert score([derived.choices[l.name] for l in space.layers]) == pytest.approx(best_score, abs=1e-6)
    with pytest.raises(UserError, match="derive"):
        ProxylessSearch(net, table, targets={"t": target}, derive="best")


def _fit_proxyless(space, recalibrate: int):
    pl.seed_everything(0, verbose=False)
    dm = TinyData()
    net = Supernet(space, dm.num_classes)
    lo, hi = _table(space).bounds()
    module = ProxylessSearch(net, _table(space), targets={"t": (lo + hi) / 2}, warmup_epochs=1, arch_lr=0.05)
    if recalibrate:
        module.recalibrate_validation(dm, recalibrate)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=module.train_loaders(dm), val_dataloaders=dm.val_dataloader())
    return module, dm, float(trainer.callback_metrics["val/acc"])


def test_validation_reports_the_derived_net_as_exported(space):
    """With recalibrate_validation (what nas-search sets), an epoch's val/acc is the accuracy the export
    gets: the derived net extracted, BatchNorm recalibrated on the same batches. The search itself is
    the one it is without it: same architecture parameters, same weights (no RNG is drawn)."""
    module, dm, val = _fit_proxyless(space, recalibrate=2)
    sub = module.supernet.extract(module.derive())
    calibrate_bn(sub, dm.calib_dataloader(2))
    assert val == pytest.approx(evaluate(sub, dm.val_dataloader()), abs=1e-6)
    plain, _, _ = _fit_proxyless(space, recalibrate=0)
    ours, theirs = module.supernet.state_dict(), plain.supernet.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:  # weights, architecture parameters and the supernet's own BatchNorm statistics
        assert torch.equal(ours[name], theirs[name]), name
    assert module.derive() == plain.derive()


def test_warmup_paths_skip_layers_at_skip_prob(space):
    """strategy.module.skip_prob reaches the warm-up's path sampling: with 0.9, nine in ten skippable
    layers are skipped on the paths trained (the default draws zero like each op)."""
    pl.seed_everything(0, verbose=False)
    dm = TinyData()
    net = Supernet(space, dm.num_classes)
    skippable = [m for m in net.mixed_ops() if "zero" in m.names]
    drawn = []
    sample = net.sample

    def record(*args, **kwargs):
        sample(*args, **kwargs)
        drawn.extend(m.names[m.active] == "zero" for m in skippable)

    net.sample = record
    module = ProxylessSearch(net, _table(space), targets=None, warmup_epochs=6, skip_prob=0.9, loss_form="none")
    trainer = pl.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=module.train_loaders(dm), val_dataloaders=dm.val_dataloader())
    assert len(drawn) >= 30 and sum(drawn) / len(drawn) > 0.75
