"""Mixed precision (``trainer.precision``) in every strategy: bf16-mixed on CPU as users run it, and the
16-mixed loss-scaling path (fp16 autocast + GradScaler, on CPU through Lightning's plugin) that a GPU
runs. The architecture logits and the latency loss stay fp32; gradients are clipped after unscaling."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.plugins.precision import MixedPrecision
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from nas.export import WEIGHTS_FILE, load_subnet, write_export
from nas.latency.analytic import build_flops_model
from nas.strategies import proxyless
from nas.strategies.proxyless import ProxylessSearch
from supernets.space import SearchSpace
from supernets.supernet import Supernet
from tests.helpers import TINY, TinyData, random_table

TINY_SLIM = {**TINY, "name": "tiny_slim", "widths": [0.5, 1.0]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace.from_dict(TINY)


def _trainer(precision: str, epochs: int = 1, **kw) -> pl.Trainer:
    prec = {"plugins": [MixedPrecision("16-mixed", "cpu")]} if precision == "16-mixed" else {"precision": precision}
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, **prec, **kw)


def _conv_output_dtypes(net: torch.nn.Module) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
    return seen


def test_proxyless_bf16_search_keeps_alpha_and_latency_loss_fp32_and_exports(space, tmp_path, monkeypatch):
    torch.manual_seed(0)
    table = random_table(space, 0)
    module = ProxylessSearch(Supernet(space, 4), table, targets=[0.7], warmup_epochs=1, loss_form="abs")
    conv_dtypes = _conv_output_dtypes(module.supernet)
    seen = []

    def spy(ce, expected, target, **kw):
        out = latency_loss(ce, expected, target, **kw)
        seen.append((ce.dtype, expected.dtype, out.dtype, float(out.detach())))
        return out

    latency_loss = proxyless.latency_loss
    monkeypatch.setattr(proxyless, "latency_loss", spy)
    data = TinyData()
    trainer = _trainer("bf16-mixed", epochs=3)
    trainer.fit(module, train_dataloaders=module.train_loaders(data), val_dataloaders=data.val_dataloader())

    assert torch.bfloat16 in conv_dtypes  # autocast really ran
    assert len(seen) == 2 * 3  # 2 epochs after the warm-up x 3 batches
    assert all(d == [torch.float32] * 3 and math.isfinite(v) for *d, v in seen), seen
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    alphas = module.supernet.arch_parameters()
    assert all(a.dtype == torch.float32 and torch.isfinite(a).all() for a in alphas)
    assert any(a.abs().max() > 1e-3 for a in alphas)  # the architecture steps moved alpha
    assert all(p.dtype == torch.float32 for p in module.supernet.parameters())
    assert math.isfinite(module.history[-1]["expected"])
    # the derived net exports in fp32 and loads back to the same outputs
    arch = module.derive()
    sub = module.supernet.extract(arch).cpu().eval()
    out_dir = write_export(tmp_path / "export", space=space, arch=arch, model=sub, report={}, onnx=False)
    assert {t.dtype for t in load_file(str(out_dir / WEIGHTS_FILE)).values()} <= {torch.float32, torch.int64}
    x = data.x[:8]
    with torch.no_grad():
        assert torch.allclose(load_subnet(out_dir)(x), sub(x), atol=1e-5)


def _first_arch_grads(space, precision: str) -> list[torch.Tensor]:
    """The alpha gradients the first architecture step applies (after any unscaling)."""
    torch.manual_seed(0)
    module = ProxylessSearch(Supernet(space, 4), random_table(space, 0), targets=[0.7], warmup_epochs=0,
                             grad_clip=0.0)
    grads = []

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # after the scaler unscaled
            ids = {id(a) for a in pl_module.supernet.arch_parameters()}
            if not grads and any(id(p) in ids for p in optimizer.param_groups[0]["params"]):
                grads.extend(a.grad.detach().clone() for a in pl_module.supernet.arch_parameters())

    data = TinyData()
    _trainer(precision, limit_train_batches=1, limit_val_batches=0, callbacks=[Record()]).fit(
        module, train_dataloaders=module.train_loaders(data))
    return grads


def test_fp16_loss_scaling_gives_the_architecture_step_its_true_gradient(space):
    ref = torch.cat(_first_arch_grads(space, "32-true"))
    for precision in ("16-mixed", "bf16-mixed"):
        got = torch.cat(_first_arch_grads(space, precision))
        assert got.dtype == torch.float32
        # same sampled path, same data: only the arithmetic differs (a scaled gradient would be 65536x off)
        assert 0.7 < float(got.norm() / ref.norm()) < 1.4, precision
        assert float(F.cosine_similarity(got, ref, dim=0)) > 0.9, precision


def test_weight_gradients_are_clipped_after_unscaling(space):
    """16-mixed: the norm the weight optimizer steps with is grad_clip (clipping scaled gradients, then
    unscaling them, would leave it 65536 times smaller)."""
    clip = 1e-3
    torch.manual_seed(0)
    module = ProxylessSearch(Supernet(space, 4), random_table(space, 0), targets=[0.7], warmup_epochs=5,
                             grad_clip=clip)
    norms = []
    opt = None

    class Hook(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal opt
            opt = trainer.optimizers[0]
            params = pl_module.supernet.weight_parameters()
            opt.register_step_pre_hook(lambda o, a, k: norms.append(float(torch.norm(torch.stack(
                [p.grad.norm() for p in params if p.grad is not None])))))

    data = TinyData()
    _trainer("16-mixed", limit_train_batches=2, limit_val_batches=0, callbacks=[Hook()]).fit(
        module, train_dataloaders=module.train_loaders(data))
    assert len(norms) == 2 and all(math.isclose(n, clip, rel_tol=1e-3) for n in norms), norms


def test_gate_backward_outside_autocast_recomputes_under_the_forwards_autocast(space):
    """CUDA runs a backward on its own thread, without the caller's autocast: the gate's recomputed
    candidates must still see bf16 inputs with autocast (here: backward outside the context on CPU)."""
    torch.manual_seed(0)
    net = Supernet(space, 4).train()
    net.set_phase("arch")
    net.sample("probs")
    x, y = torch.randn(4, 3, 16, 16), torch.randint(4, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(net(x).float(), y)
    loss.backward()
    low = [a.grad.clone() for a in net.arch_parameters()]
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    ref = torch.cat([a.grad for a in net.arch_parameters()])
    got = torch.cat(low)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert float(F.cosine_similarity(got, ref, dim=0)) > 0.9


def _learnable(n: int = 48, classes: int = 4, res: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, res, res, generator=g)
    y = torch.randint(classes, (n,), generator=g)
    x[torch.arange(n), y % 3, :4, :4] += 2.0
    return x, y


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("name", ["ddpnas", "slimmable", "evolution"])
def test_other_strategies_train_in_mixed_precision_with_fp32_weights(name, precision, space):
    torch.manual_seed(0)
    if name == "ddpnas":
        from nas.strategies.ddpnas import DDPNASSearch

        module = DDPNASSearch(Supernet(space, 4), random_table(space, 0), targets=[0.8], steps=1)
    else:
        slim = SearchSpace.from_dict(TINY_SLIM)
        cost = build_flops_model(slim, 4)
        if name == "slimmable":
            from nas.strategies.slimmable import SlimmableSearch

            module = SlimmableSearch(Supernet(slim, 4), cost, targets=[0.8], calib_batches=1)
        else:
            from nas.strategies.evolution import EvolutionSearch

            module = EvolutionSearch(Supernet(slim, 4), cost, targets=[0.8], calib_batches=1, queries=2)
    before = {n: p.detach().clone() for n, p in module.supernet.named_parameters()}
    conv_dtypes = _conv_output_dtypes(module.supernet)
    x, y = _learnable()
    train = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = _trainer(precision, epochs=2)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=DataLoader(TensorDataset(x[:16], y[:16]), 16))
    assert (torch.bfloat16 if precision == "bf16-mixed" else torch.float16) in conv_dtypes
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    params = dict(module.supernet.named_parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params.values())
    assert any(not torch.equal(before[n], p) for n, p in params.items())  # weights trained
