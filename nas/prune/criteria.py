"""Channel importance criteria: which channels of each coupled group go first.

Every criterion scores every channel of every group on the unpruned model once; a group then loses
its lowest-scored channels (:func:`channel_order`). Torch-Pruning's importance classes do the scoring
where they fit (each sums the criterion over all layers of a group, so coupled channels are judged
together):

* ``l1`` / ``l2``: magnitude of the group's weights (``GroupMagnitudeImportance(p=1|2)``);
* ``bn_scale``: |gamma| of the group's BatchNorms (network slimming; ``BNScaleImportance``); a group
  without BatchNorm falls back to ``l1``;
* ``fpgm``: distance to the geometric median of the group's filters (``FPGMImportance``);
* ``taylor``: first-order Taylor |w * dL/dw| summed over the group, gradients accumulated over a few
  training batches (``GroupTaylorImportance``);
* ``random``: the control.

Group Fisher pruning (Liu et al. 2021) normalises a channel's importance by the memory removing it
saves, because speed follows memory more than FLOPs; Torch-Pruning lacks it. ``memory_normalise``
divides each group's scores by the activation size of one of its channels (:func:`normalised`); it
only matters where groups are compared with each other (``strategy.search=global``).
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from nas.prune.graph import Group, build_graph, classifier_modules, resolve_ignored

CRITERIA = ("l1", "l2", "bn_scale", "fpgm", "taylor", "random")


def _importance(criterion: str):
    imp = tp.importance
    if criterion == "l1":
        return imp.GroupMagnitudeImportance(p=1, normalizer=None)
    if criterion == "l2":
        return imp.GroupMagnitudeImportance(p=2, normalizer=None)
    if criterion == "bn_scale":
        return imp.BNScaleImportance(normalizer=None)
    if criterion == "fpgm":
        return imp.FPGMImportance(p=2, normalizer=None)
    if criterion == "taylor":
        return imp.GroupTaylorImportance(normalizer=None)
    if criterion == "random":
        return imp.RandomImportance()
    raise ValueError(f"unknown criterion {criterion!r}")


def _accumulate_grads(model: nn.Module, batches: Iterable) -> int:
    """Sum of the cross-entropy gradients over ``batches`` in ``.grad`` (eval-mode BatchNorm: the
    statistics stay those of the trained model). Returns the batches used."""
    model.eval()
    model.zero_grad(set_to_none=True)
    n = 0
    with torch.enable_grad():
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
            n += 1
    return n


def score_channels(model: nn.Module, example: torch.Tensor, groups: Sequence[Group], criterion: str, *,
                   batches: Iterable = (), ignore: Sequence[str] = (), seed: int = 0) -> dict[str, np.ndarray]:
    """``{group name: importance of each of its channels}`` on the unpruned ``model`` (not modified:
    gradients are taken on a copy)."""
    net = copy.deepcopy(model).eval()
    if criterion == "taylor":
        if _accumulate_grads(net, batches) == 0:
            raise ValueError("the taylor criterion needs training batches for its gradients")
    ignored = resolve_ignored(net, ignore) + classifier_modules(net)
    dg = build_graph(net, example, ignored)
    mods = dict(net.named_modules())
    imp = _importance(criterion)
    fallback = _importance("l1")
    out: dict[str, np.ndarray] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for g in groups:
            root = mods[g.name]
            pruner = dg.get_pruner_of_module(root)
            group = dg.get_pruning_group(root, pruner.prune_out_channels, list(range(g.channels)))
            s = imp(group)
            if s is None:
                s = fallback(group)
            out[g.name] = s.detach().float().cpu().numpy().reshape(-1)[: g.channels]
    return out


def channel_order(scores: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    """Channel indices of every group, least important first (ties by index: deterministic)."""
    return {k: [int(i) for i in np.lexsort((np.arange(len(v)), v))] for k, v in scores.items()}


def normalised(scores: Mapping[str, np.ndarray], groups: Sequence[Group], memory: bool) -> dict[str, np.ndarray]:
    """Scores comparable across groups: each group's divided by its mean (magnitude-like criteria
    differ in scale between layers); with ``memory`` (Group Fisher) divided instead by the activation
    memory one channel of the group costs (its output pixels, summed over the group's layers)."""
    out = {}
    for g in groups:
        s = np.asarray(scores[g.name], dtype=np.float64)
        if memory:
            out[g.name] = s / max(1, g.pixels * max(1, len(g.layers)))
        else:
            m = float(np.mean(np.abs(s)))
            out[g.name] = s / m if m > 0 else s
    return out
