"""BatchNorm recalibration: exact statistics of a (sub)network over a few batches, no weight update."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


@torch.no_grad()
def calibrate_bn(model: nn.Module, batches: Iterable, device: torch.device | str | None = None) -> int:
    """Reset every BatchNorm's running statistics and recompute them as the exact cumulative average
    over ``batches`` (``momentum=None``), in train mode without gradients. Returns the number of
    batches used; the model is left in eval mode. Weights are not touched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    n = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if device is not None:
                x = x.to(device)
            model(x)
            n += 1
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    model.eval()
    return n
