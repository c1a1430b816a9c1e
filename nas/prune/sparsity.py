"""Sparsity training before pruning (network slimming, Liu et al. 2017, in its proximal form): training
with an L1 penalty on every BatchNorm scale, applied as a proximal (ISTA, soft-thresholding) step after
each optimizer step, so that unimportant scales reach exact zeros rather than hovering near them. The
``bn_scale`` criterion then ranks those channels last, and pruning them changes the output only through
their BatchNorm shift.

FISTA's extrapolation step is not added on top of SGD with Nesterov momentum (two momenta would fight);
the soft-thresholding after each step is what brings the scales to zero.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from nas.training import RetrainModule


def bn_scales(net: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]


@torch.no_grad()
def soft_threshold(net: nn.Module, amount: float) -> None:
    """``gamma <- sign(gamma) * max(|gamma| - amount, 0)`` for every BatchNorm scale: the proximal step of
    ``amount / lr * sum |gamma|``."""
    for w in bn_scales(net):
        w.copy_(w.sign() * (w.abs() - amount).clamp_min(0))


def zero_fraction(net: nn.Module) -> float:
    scales = bn_scales(net)
    total = sum(w.numel() for w in scales)
    return sum(int((w == 0).sum()) for w in scales) / max(1, total)


class SparsityModule(RetrainModule):
    """:class:`RetrainModule` plus, after every optimizer step, the proximal step of ``l1 * sum |gamma|``
    (threshold ``lr * l1`` at the step's learning rate)."""

    def __init__(self, net: nn.Module, *, l1: float, **kw):
        super().__init__(net, **kw)
        self.l1 = float(l1)

    def configure_optimizers(self):
        """SGD as :class:`RetrainModule`'s, but the BatchNorm scales in their own group without momentum or
        weight decay: with momentum, a scale the threshold zeroed is pushed off zero again by its buffer at
        every step (measured: no scale stayed at zero), which is not the proximal gradient method."""
        scales = {id(w) for w in bn_scales(self.net)}
        rest = [p for p in self.net.parameters() if id(p) not in scales]
        opt = torch.optim.SGD([{"params": rest},
                               {"params": bn_scales(self.net), "momentum": 0.0, "nesterov": False,
                                "weight_decay": 0.0}], **self.opt_args)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs or 1))
        return [opt], [sched]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        lr = self.trainer.optimizers[0].param_groups[-1]["lr"]
        soft_threshold(self.net, lr * self.l1)
        self.log("train/bn_zero", zero_fraction(self.net), on_epoch=True, on_step=False, batch_size=len(batch[1]))
