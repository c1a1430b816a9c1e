"""Elastic MBConv: every kernel x expand candidate of a layer shares one set of conv weights.

The largest candidate's weights are held; candidate ``k{k}_e{e}`` uses the first ``in*e`` expanded
channels and the centre ``k x k`` of the depthwise kernel (as in Single-Path NAS and Once-for-All).
BatchNorms are private to each candidate (they are tiny), so running statistics are exact per
candidate and a derived subnet needs no recalibration to be correct.

Why share: with separate weights per candidate (the original ProxylessNAS), the candidates of a layer
start as unrelated random projections and the layers after them must fit every combination; on a
small dataset the supernet then barely trains in the steps a quick search has. Shared slices keep
every candidate's output in one coordinate system.

Each candidate is exposed as a module of its own (:class:`ElasticCandidate`), so the gate modes of
:class:`~supernets.mixed.MixedOp` work unchanged; its ``timm_state_dict()`` is the state dict of the
equivalent timm ``InvertedResidual``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import get_norm_act_layer, make_divisible

from .blocks import act_layer
from .space import Layer, parse_op


class ElasticWeights(nn.Module):
    """The shared conv weights of one layer (pointwise expand, depthwise, pointwise project)."""

    def __init__(self, in_chs: int, out_chs: int, max_kernel: int, max_expand: int):
        super().__init__()
        mid = make_divisible(in_chs * max_expand)
        self.conv_pw = nn.Parameter(torch.empty(mid, in_chs, 1, 1))
        self.conv_dw = nn.Parameter(torch.empty(mid, 1, max_kernel, max_kernel))
        self.conv_pwl = nn.Parameter(torch.empty(out_chs, mid, 1, 1))
        for w in (self.conv_pw, self.conv_dw, self.conv_pwl):  # timm's (TF) fan-out normal init
            fan_out = w.shape[0] * w.shape[2] * w.shape[3] // (w.shape[0] if w is self.conv_dw else 1)
            nn.init.normal_(w, 0.0, math.sqrt(2.0 / fan_out))


def _bn_act(chs: int, act: str, apply_act: bool = True) -> nn.Module:
    """BatchNorm (+ activation) exactly as timm's InvertedResidual builds it."""
    layer = get_norm_act_layer(nn.BatchNorm2d, act_layer(act))
    return layer(chs, inplace=True) if apply_act else layer(chs, apply_act=False)


class ElasticCandidate(nn.Module):
    """One candidate of an elastic layer: slices of the shared weights plus its own BatchNorms."""

    def __init__(self, shared: ElasticWeights, layer: Layer, op: str, act: str):
        super().__init__()
        self.kernel, self.expand = parse_op(op)
        self.in_chs, self.out_chs, self.stride = layer.in_chs, layer.out_chs, layer.stride
        self.mid = make_divisible(layer.in_chs * self.expand)
        self.has_skip = layer.stride == 1 and layer.in_chs == layer.out_chs
        # a plain attribute, not a submodule: the shared weights are registered once, by the layer
        object.__setattr__(self, "_shared", shared)
        self.bn1 = _bn_act(self.mid, act)
        self.bn2 = _bn_act(self.mid, act)
        self.bn3 = _bn_act(self.out_chs, act, apply_act=False)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self._shared
        kmax = s.conv_dw.shape[-1]
        o = (kmax - self.kernel) // 2
        pw = s.conv_pw[: self.mid]
        dw = s.conv_dw[: self.mid, :, o : o + self.kernel, o : o + self.kernel]
        pwl = s.conv_pwl[:, : self.mid]
        return pw, dw, pwl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pw, dw, pwl = self.weights()
        shortcut = x
        x = self.bn1(F.conv2d(x, pw))
        pad = ((self.stride - 1) + (self.kernel - 1)) // 2  # timm's symmetric padding
        x = self.bn2(F.conv2d(x, dw, stride=self.stride, padding=pad, groups=self.mid))
        x = self.bn3(F.conv2d(x, pwl))
        return x + shortcut if self.has_skip else x

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict of the equivalent timm ``InvertedResidual`` (sliced weights, own BNs)."""
        pw, dw, pwl = self.weights()
        out = {"conv_pw.weight": pw, "conv_dw.weight": dw, "conv_pwl.weight": pwl}
        for name in ("bn1", "bn2", "bn3"):
            for k, v in getattr(self, name).state_dict().items():
                out[f"{name}.{k}"] = v
        return {k: v.detach().clone().contiguous() for k, v in out.items()}
