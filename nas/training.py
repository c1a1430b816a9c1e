"""Training a standalone network (an export of a search): SGD + cosine, optional distillation.

:class:`RetrainModule` is what ``nas-retrain`` and the search benchmark train with. Lightning keeps
the train/eval mode a module has when ``fit`` starts, and a net loaded from an export
(:func:`nas.export.load_subnet`) comes in eval mode: trained that way its BatchNorm layers normalise
with the supernet's running statistics and never update them, and the net trains to chance. So the
student is put in ``train()`` when fit starts, whatever mode it was handed over in; the teacher is
frozen in ``eval()`` and held outside the module's children (Lightning neither switches nor
checkpoints it, and its "modules in eval mode" check sees the student only).
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F


class ChannelsLast(pl.Callback):
    """Train in channels-last (NHWC) memory format (``trainer.channels_last``, on by default).

    The module's 4-D weights are converted in ``setup`` (before Lightning wraps the model for DDP or
    builds the optimizers) and converted back in ``teardown``, so what is exported after training
    (safetensors needs contiguous tensors) and every later use see the default layout. The inputs stay
    NCHW: oneDNN and cuDNN pick the channels-last kernels from the weights. Measured with
    ``nas-bench suite=speed`` here (2 cores, AVX-512, batch 64): the weight step 1.59x (the retrained
    net) and 1.84x (the one-gate supernet) faster than fp32 NCHW; the weights alone converted gave the
    same as weights and inputs (2.03x vs 2.07x in one probe). On GPUs it is what tensor cores want under
    mixed precision."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.contiguous_format)


class RetrainModule(pl.LightningModule):
    """Cross-entropy training of ``net`` (label smoothing), with knowledge distillation from
    ``teacher`` when one is given: ``loss = (1 - kd_alpha) * CE + kd_alpha * T^2 * KL(teacher || student)``."""

    def __init__(self, net: nn.Module, *, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 4e-5,
                 label_smoothing: float = 0.1, teacher: nn.Module | None = None, kd_alpha: float = 0.5,
                 kd_temperature: float = 4.0):
        super().__init__()
        self.net = net.train()
        # a tuple: not a registered child, so neither .train() nor a checkpoint reaches it
        self._teacher = (teacher.eval().requires_grad_(False),) if teacher is not None else ()
        self.opt_args = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
        self.label_smoothing = label_smoothing
        self.kd_alpha, self.kd_t = kd_alpha, kd_temperature

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def forward(self, x):
        return self.net(x)

    def on_fit_start(self) -> None:
        # Lightning keeps the mode a module has at the start of fit (and restores it after each
        # validation): a student handed over in eval mode would train with frozen BatchNorm statistics
        self.train()
        if self.teacher is not None:
            self.teacher.eval().to(self.device)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = self.teacher(x)
            t = self.kd_t
            kd = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(t_logits / t, 1), log_target=True,
                          reduction="batchmean") * t * t
            loss = (1 - self.kd_alpha) * loss + self.kd_alpha * kd
            self.log("train/kd", kd, on_epoch=True, on_step=False, batch_size=len(y))
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, batch_size=len(y))
        return loss

    def _eval(self, batch, prefix):
        x, y = batch
        logits = self.net(x)
        self.log(f"{prefix}/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, on_epoch=True,
                 batch_size=len(y), sync_dist=True)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y), sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._eval(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval(batch, "test")

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.net.parameters(), **self.opt_args)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs or 1))
        return [opt], [sched]
