"""Mixed layers: one searchable layer holding every candidate op, with three gate modes.

``one``  ProxylessNAS binarized path. One candidate, sampled from p = softmax(alpha), runs. In the
         architecture step its output goes through :class:`BinaryGate`, whose backward recomputes the
         other candidates under ``no_grad`` and forms dL/dg_k = sum(o_k * dL/dy); returning that as the
         gradient w.r.t. p lets autograd apply softmax's Jacobian, which is exactly the BinaryConnect
         estimator dL/dalpha_i = sum_j dL/dg_j p_j (delta_ij - p_i). Activation memory: one path.
``two``  as ``one`` but over two candidates sampled without replacement, probabilities renormalised
         over the pair; after the optimizer step the pair's alphas are shifted so that the
         probabilities of the unsampled candidates do not change.
``full`` DARTS-style mixture sum_k p_k o_k(x): every path computed (the baseline).

In the weight step of ``one``/``two`` only the active candidate runs, so the others get no gradient
(``None``): neither momentum nor weight decay moves them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .space import ZERO

GATE_MODES = ("one", "two", "full")
PHASES = ("weight", "arch")


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module):
    """Run ``module`` in train mode (batch statistics) without touching its running statistics."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, nbt in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(nbt)


#: Device types whose autocast state :class:`BinaryGate` carries from its forward to its backward.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES]


@contextlib.contextmanager
def _autocast_as(state: Sequence[tuple[str, bool, torch.dtype]]):
    """Autocast exactly as recorded by :func:`_autocast_state` (on or off per device type)."""
    with contextlib.ExitStack() as stack:
        for device, enabled, dtype in state:
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


class BinaryGate(torch.autograd.Function):
    """y = ops[active](x); backward gives x its true gradient and p the BinaryConnect gate gradients.

    ``probs`` are the (renormalised) probabilities of exactly the candidates in ``ops``; only their
    gradient is formed here, autograd carries it through the softmax to alpha.

    Mixed precision: the backward recomputes the other candidates under the autocast state of the
    forward (CUDA runs a backward on its own thread, where the caller's autocast is off: a bf16 input
    would meet fp32 weights), and sums each ``o_k * dL/dy`` in fp32, returning p's gradient in p's dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, probs: torch.Tensor, ops: Sequence[Callable], active: int):
        x_d = x.detach().requires_grad_(x.requires_grad)
        with torch.enable_grad():
            out = ops[active](x_d)
        ctx.x_d, ctx.out, ctx.ops, ctx.active = x_d, out, ops, active
        ctx.autocast, ctx.probs_dtype = _autocast_state(), probs.dtype
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_d, out, ops, active = ctx.x_d, ctx.out, ctx.ops, ctx.active
        grad_x = None
        if x_d.requires_grad:
            if out is x_d:  # identity candidate
                grad_x = grad_out
            else:
                (grad_x,) = torch.autograd.grad(out, x_d, grad_out)
        grads = []
        g = grad_out.float()
        with torch.no_grad(), _autocast_as(ctx.autocast):
            for k, op in enumerate(ops):
                if k == active:
                    o = out.detach()
                else:
                    with frozen_bn_stats(op) if isinstance(op, nn.Module) else contextlib.nullcontext():
                        o = op(x_d.detach())
                grads.append((o.float() * g).sum())
        del ctx.x_d, ctx.out, ctx.ops
        return grad_x, torch.stack(grads).to(ctx.probs_dtype), None, None


def uniform_index(names: Sequence[str], generator: torch.Generator | None = None,
                  skip_prob: float | None = None) -> int:
    """A random index into ``names`` (torch's RNG): every candidate alike, or, with ``skip_prob`` and a
    ``zero`` candidate, ``zero`` with that probability and the others sharing the rest equally."""
    n = len(names)
    if skip_prob is None or ZERO not in names or n == 1:
        return int(torch.randint(n, (1,), generator=generator))
    zero = list(names).index(ZERO)
    if float(torch.rand((), generator=generator)) < float(skip_prob):
        return zero
    k = int(torch.randint(n - 1, (1,), generator=generator))
    return k + (k >= zero)


class MixedOp(nn.Module):
    """A searchable layer: candidates (``nn.Identity`` for ``zero``) and their logits ``alpha``."""

    def __init__(self, names: Sequence[str], candidates: Sequence[nn.Module], shared: nn.Module | None = None):
        super().__init__()
        if len(names) != len(candidates) or not names:
            raise ValueError("names and candidates must be non-empty and of equal length")
        self.names = tuple(names)
        self.shared = shared  # weights the candidates slice (elastic layers), registered once here
        self.candidates = nn.ModuleList(candidates)
        # architecture logits; kept out of the weight optimizer by Supernet.weight_parameters()
        self.alpha = nn.Parameter(torch.zeros(len(names)))
        self.mode = "one"
        self.phase = "weight"
        self.active = 0
        self.fixed = False  # True after set_active(): a static choice, whatever the mode
        self._pair: torch.Tensor | None = None
        self._pair_alpha: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.names)

    def probs(self) -> torch.Tensor:
        return F.softmax(self.alpha, dim=0)

    # ---------------------------------------------------------------- choosing paths
    def set_choice(self, name: str) -> None:
        self.active = self.names.index(name)
        self.fixed = True
        self._pair = None

    def sample(self, how: str = "probs", generator: torch.Generator | None = None,
               skip_prob: float | None = None) -> None:
        """Pick the active path: ``uniform`` (warm-up) or from p (``probs``; ``two`` samples a pair).

        ``skip_prob`` (``uniform`` only): the probability of the ``zero`` candidate where the layer has
        one, the other candidates sharing the rest equally; ``None`` draws every candidate alike (1/n)."""
        self.fixed = False
        n = len(self.names)
        if how == "uniform":
            self.active = uniform_index(self.names, generator, skip_prob)
            self._pair = None
            return
        with torch.no_grad():
            p = self.probs().detach().float().cpu()
            if self.mode == "two" and n >= 2:
                pair = torch.multinomial(p, 2, replacement=False, generator=generator)
                p_pair = F.softmax(self.alpha.detach().cpu()[pair], dim=0)
                c = int(torch.multinomial(p_pair, 1, generator=generator))
                self._pair = pair if c == 0 else pair.flip(0)  # active candidate first
                self.active = int(self._pair[0])
            else:
                self.active = int(torch.multinomial(p, 1, generator=generator))
                self._pair = None

    def argmax(self) -> str:
        return self.names[int(self.alpha.detach().argmax())]

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed:
            return self.candidates[self.active](x)
        if self.mode == "full":
            p = self.probs()
            return sum(p[k] * op(x) for k, op in enumerate(self.candidates))
        if self.phase == "arch":
            if self.mode == "two" and self._pair is not None:
                idx = self._pair.to(self.alpha.device)
                self._pair_alpha = self.alpha.detach()[idx].clone()
                probs = F.softmax(self.alpha[idx], dim=0)
                ops = [self.candidates[int(i)] for i in self._pair]
                return BinaryGate.apply(x, probs, ops, 0)
            return BinaryGate.apply(x, self.probs(), list(self.candidates), self.active)
        return self.candidates[self.active](x)

    @torch.no_grad()
    def rescale_pair(self) -> None:
        """After an arch optimizer step in ``two`` mode: keep the unsampled probabilities unchanged."""
        if self.mode != "two" or self._pair is None or self._pair_alpha is None:
            return
        idx = self._pair.to(self.alpha.device)
        new = self.alpha[idx]
        offset = torch.logsumexp(new, 0) - torch.logsumexp(self._pair_alpha, 0)
        self.alpha[idx] -= offset
        self._pair_alpha = None
