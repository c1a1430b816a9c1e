"""Widths searched by ProxylessNAS with the ops (issue 4): width logits in the supernet, the expected
cost over widths, the REINFORCE gradient of the width logits, derive=budget over ops and widths, and
one search end to end."""
from __future__ import annotations

import itertools
import math

import pytest
import pytorch_lightning as pl
import torch

from nas.latency.analytic import build_flops_model
from nas.strategies.proxyless import ProxylessSearch
from supernets.space import SearchSpace
from supernets.supernet import Supernet
from tests.helpers import TINY, TinyData


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace.from_dict({**TINY, "name": "tiny_w", "widths": [0.5, 1.0]})


def _random_alphas(net: Supernet, seed: int = 0, scale: float = 1.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in net.arch_parameters():
            a.copy_(torch.randn(len(a), generator=g) * scale)


def _all_archs(space: SearchSpace, nc: int):
    dec = space.decisions()
    for combo in itertools.product(*dec.values()):
        yield space.make_arch(dict(zip(dec, combo)), nc)


def test_width_logits_are_arch_parameters_and_in_probs(space):
    net = Supernet(space, 4)
    assert len(net.width_alpha) == 2 and all(len(a) == 2 for a in net.width_alpha)
    ids = {id(p) for p in net.arch_parameters()}
    assert all(id(a) in ids for a in net.width_alpha)
    assert not ids & {id(p) for p in net.weight_parameters()}
    assert list(net.probs()) == list(space.decisions())  # layers, then s1.width, s2.width
    plain = Supernet(SearchSpace.from_dict(TINY), 4)  # no widths: no width logits, state dict unchanged
    assert len(plain.width_alpha) == 0 and not any("width_alpha" in k for k in plain.state_dict())


def test_ddp_leaves_every_architecture_parameter_to_the_strategy(space):
    """DDP must not bucket the width logits either (they are reduced by the strategy itself): with them in
    DDP's buckets, a two-rank search failed in its first weight step."""
    module = ProxylessSearch(Supernet(space, 4), build_flops_model(space, 4), None)
    named = dict(module.named_parameters())
    ignored = set(module._ddp_params_and_buffers_to_ignore)
    assert {n for n, p in named.items() if any(p is a for a in module.supernet.arch_parameters())} == ignored
    assert any("width_alpha" in n for n in ignored) and any(n.endswith(".alpha") for n in ignored)


def test_expected_cost_over_widths_is_the_exact_expectation(space):
    """E[cost] under independent choice probabilities, value and gradient, against the sum over every
    architecture of the space of p(arch) * cost(arch) (computed in float64 from the same softmaxes)."""
    cost = build_flops_model(space, 4)
    net = Supernet(space, 4)
    _random_alphas(net)
    params = [a.detach().double().requires_grad_(True) for a in net.arch_parameters()]
    probs = {n: torch.softmax(a, 0) for n, a in zip(space.decisions(), params)}
    fast = cost.expected(probs)
    grads_fast = torch.autograd.grad(fast, params, retain_graph=True)
    dec = space.decisions()
    brute = 0.0
    for arch in _all_archs(space, 4):
        p = 1.0
        for n in dec:
            p = p * probs[n][dec[n].index(arch.choices[n])]
        brute = brute + p * cost.predict(arch)
    grads_brute = torch.autograd.grad(brute, params)
    assert fast.item() == pytest.approx(brute.item(), rel=1e-10)
    for gf, gb in zip(grads_fast, grads_brute):
        torch.testing.assert_close(gf, gb, rtol=1e-8, atol=1e-10)
    # without width probabilities every stage is at its widest (what the op-only search used)
    no_w = {n: probs[n] for n in dec if not n.endswith(".width")}
    widest = {**no_w, **{d: torch.tensor([0.0, 1.0], dtype=torch.float64) for d in space.width_decisions()}}
    assert float(cost.expected(no_w)) == pytest.approx(float(cost.expected(widest)))


def test_width_reinforce_gradient_matches_the_hand_computed_estimator(space):
    """d/d alpha_s of (L - b) log p_s(w_s) = (L - b) (onehot(w_s) - p_s); the baseline is the moving
    average of L *before* the step (none at the first step, so the first step adds nothing)."""
    net = Supernet(space, 4)
    with torch.no_grad():
        net.width_alpha[0].copy_(torch.tensor([0.3, -0.2]))
        net.width_alpha[1].copy_(torch.tensor([-1.0, 0.5]))
    module = ProxylessSearch(net, build_flops_model(space, 4), None, width_baseline_decay=0.8)
    net.set_widths([8, 16])  # the sampled widths: index 0 in stage 1, index 1 in stage 2
    first = module.width_reinforce(torch.tensor(2.0))
    first.backward()
    assert all(float(a.grad.abs().sum()) == 0 for a in net.width_alpha) and float(module.width_baseline) == 2.0
    for a in net.width_alpha:
        a.grad = None
    module.width_reinforce(torch.tensor(3.0)).backward()
    adv = 3.0 - 2.0
    p1 = torch.softmax(torch.tensor([0.3, -0.2]), 0)
    p2 = torch.softmax(torch.tensor([-1.0, 0.5]), 0)
    torch.testing.assert_close(net.width_alpha[0].grad, adv * (torch.tensor([1.0, 0.0]) - p1))
    torch.testing.assert_close(net.width_alpha[1].grad, adv * (torch.tensor([0.0, 1.0]) - p2))
    assert float(module.width_baseline) == pytest.approx(0.8 * 2.0 + 0.2 * 3.0)
    # the op logits get nothing from this term
    assert all(m.alpha.grad is None for m in net.mixed_ops())


def test_sampling_draws_widths_and_the_path_state_carries_them(space):
    net = Supernet(space, 4)
    with torch.no_grad():
        net.width_alpha[0].copy_(torch.tensor([20.0, -20.0]))  # stage 1: almost surely 8
        net.width_alpha[1].copy_(torch.tensor([-20.0, 20.0]))  # stage 2: almost surely 16
    net.sample("probs", torch.Generator().manual_seed(0))
    assert net.widths == [8, 16]
    seen = set()
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        net.sample("uniform", g)
        seen.add(tuple(net.widths))
    assert seen == {(8, 8), (8, 16), (16, 8), (16, 16)}  # the warm-up trains every width combination
    other = Supernet(space, 4)
    other.load_path_state(net.path_state())
    assert other.widths == net.widths and [m.active for m in other.mixed_ops()] == [m.active for m in net.mixed_ops()]
    x = torch.randn(2, 3, 16, 16)
    assert net(x).shape == (2, 4)  # the sampled widths run as slices
    arch = net.argmax_arch()
    assert space.widths(arch) == [8, 16]


def test_budget_derive_over_ops_and_widths_is_the_brute_force_optimum(space):
    cost = build_flops_model(space, 4)
    net = Supernet(space, 4)
    _random_alphas(net, seed=4, scale=2.0)
    lo, hi = cost.bounds()
    target = lo + 0.6 * (hi - lo)
    derived = ProxylessSearch(net, cost, {"t": target}, derive="budget", budget_floor=0.9).derive()
    logp = {n: torch.log_softmax(p.detach().log(), 0).tolist() for n, p in net.probs().items()}
    dec = space.decisions()

    def score(arch):
        return sum(logp[n][dec[n].index(arch.choices[n])] for n in dec)

    band = [a for a in _all_archs(space, 4) if 0.9 * target <= cost.predict(a) <= target]
    assert band
    best = max(score(a) for a in band)
    assert 0.9 * target * (1 - 1e-3) <= cost.predict(derived) <= target
    assert score(derived) == pytest.approx(best, abs=1e-6)
    assert space.widths(derived) != [16, 16] or space.widths(net.argmax_arch()) == [16, 16]


def test_proxyless_search_learns_widths_and_keeps_them_in_the_history(space):
    """A short search: the width logits move (REINFORCE and the latency term), the history holds the
    width probabilities for the choice plot, and derive returns a valid arch with widths."""
    pl.seed_everything(0, verbose=False)
    dm = TinyData()
    net = Supernet(space, dm.num_classes)
    cost = build_flops_model(space, dm.num_classes)
    lo, hi = cost.bounds()
    module = ProxylessSearch(net, cost, targets={"t": lo + 0.3 * (hi - lo)}, warmup_epochs=1, arch_lr=0.05,
                             loss_form="add", loss_lambda=1.0)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=module.train_loaders(dm), val_dataloaders=dm.val_dataloader())
    assert all(float(a.detach().abs().sum()) > 0 for a in net.width_alpha)
    assert {"s1.width", "s2.width"} <= set(module.history[-1]["probs"])
    # the latency term pushes probability toward the narrow widths (target well below the widest)
    assert module.history[-1]["expected"] < module.history[0]["expected"]
    assert not math.isnan(float(module.width_baseline))
    space.validate(module.derive())
