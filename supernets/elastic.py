"""Elastic MBConv: every kernel x expand candidate of a layer shares one set of conv weights.

The largest candidate's weights are held; candidate ``k{k}_e{e}`` uses the first ``in*e`` expanded
channels and the centre ``k x k`` of the depthwise kernel (as in Single-Path NAS and Once-for-All).
BatchNorms are private to each candidate (they are tiny), so running statistics are exact per
candidate and a derived subnet needs no recalibration to be correct.

Why share: with separate weights per candidate (the original ProxylessNAS), the candidates of a layer
start as unrelated random projections and the layers after them must fit every combination; on a
small dataset the supernet then barely trains in the steps a quick search has. Shared slices keep
every candidate's output in one coordinate system.

Squeeze-excite (ops with ``_se``): the layer holds one SE (``conv_reduce``/``conv_expand`` with their
biases) sized for its largest expansion, and every SE candidate uses its leading slices: the first
``mid`` expanded channels and the first ``rd`` reduced ones (``rd = in_chs / 4`` rounded to 8, so in a
layer of fixed width every expansion uses all reduced channels), as Once-for-All's dynamic SE does.
Kernel and activation variants of an op share the same slices. The activation (``_hs``, ``_re``, or
the stage's) only picks which nonlinearity the candidate's BatchNorms apply.

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

from .blocks import act_layer, se_channels
from .space import Layer, parse_candidate


class ElasticWeights(nn.Module):
    """The shared conv weights of one layer (pointwise expand, depthwise, pointwise project)."""

    def __init__(self, in_chs: int, out_chs: int, max_kernel: int, max_expand: int, se_rd: int = 0):
        """``se_rd``: reduced channels of the widest SE of the layer (0: no candidate has SE)."""
        super().__init__()
        mid = make_divisible(in_chs * max_expand)
        self.conv_pw = nn.Parameter(torch.empty(mid, in_chs, 1, 1))
        self.conv_dw = nn.Parameter(torch.empty(mid, 1, max_kernel, max_kernel))
        self.conv_pwl = nn.Parameter(torch.empty(out_chs, mid, 1, 1))
        convs = [self.conv_pw, self.conv_dw, self.conv_pwl]
        if se_rd:  # only then: a layer without SE keeps exactly the parameters it had
            self.se_reduce = nn.Parameter(torch.empty(se_rd, mid, 1, 1))
            self.se_reduce_bias = nn.Parameter(torch.zeros(se_rd))
            self.se_expand = nn.Parameter(torch.empty(mid, se_rd, 1, 1))
            self.se_expand_bias = nn.Parameter(torch.zeros(mid))
            convs += [self.se_reduce, self.se_expand]
        for w in convs:  # timm's (TF) fan-out normal init
            fan_out = w.shape[0] * w.shape[2] * w.shape[3] // (w.shape[0] if w is self.conv_dw else 1)
            nn.init.normal_(w, 0.0, math.sqrt(2.0 / fan_out))

    def se_weights(self, mid: int, rd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The leading slices of the SE for ``mid`` expanded and ``rd`` reduced channels."""
        return (self.se_reduce[:rd, :mid], self.se_reduce_bias[:rd], self.se_expand[:mid, :rd],
                self.se_expand_bias[:mid])


def se_forward(x: torch.Tensor, w: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """timm's ``SqueezeExcite`` as :data:`supernets.blocks.SE_LAYER` builds it, on sliced weights."""
    s = x.mean((2, 3), keepdim=True)
    s = F.relu(F.conv2d(s, w[0], w[1]))
    return x * F.hardsigmoid(F.conv2d(s, w[2], w[3]))


def se_state(w: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """State dict entries of timm's ``InvertedResidual.se`` for sliced SE weights."""
    return dict(zip(("se.conv_reduce.weight", "se.conv_reduce.bias", "se.conv_expand.weight",
                     "se.conv_expand.bias"), w))


def layer_se_rd(layer: Layer) -> int:
    """Reduced channels of the widest SE among the layer's candidates (0 when none has SE)."""
    rds = [se_channels(make_divisible(cin * c.expand), c.expand, spec.se)
           for op in layer.choices if (spec := layer.spec(op)) is not None and spec.se
           for c in (parse_candidate(op),) for cin in (layer.widths_in or (layer.in_chs,))]
    return max(rds, default=0)


def _bn_act(chs: int, act: str, apply_act: bool = True) -> nn.Module:
    """BatchNorm (+ activation) exactly as timm's InvertedResidual builds it."""
    layer = get_norm_act_layer(nn.BatchNorm2d, act_layer(act))
    return layer(chs, inplace=True) if apply_act else layer(chs, apply_act=False)


class ElasticCandidate(nn.Module):
    """One candidate of an elastic layer: slices of the shared weights plus its own BatchNorms."""

    def __init__(self, shared: ElasticWeights, layer: Layer, op: str):
        super().__init__()
        spec = layer.spec(op)
        act = spec.act
        self.kernel, self.expand, self.se = spec.kernel, spec.expand, spec.se
        self.in_chs, self.out_chs, self.stride = layer.in_chs, layer.out_chs, layer.stride
        self.mid = make_divisible(layer.in_chs * self.expand)
        self.rd = se_channels(self.mid, self.expand, self.se) if self.se else 0
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
        if self.rd:
            x = se_forward(x, self._shared.se_weights(self.mid, self.rd))
        x = self.bn3(F.conv2d(x, pwl))
        return x + shortcut if self.has_skip else x

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict of the equivalent timm ``InvertedResidual`` (sliced weights, own BNs)."""
        pw, dw, pwl = self.weights()
        out = {"conv_pw.weight": pw, "conv_dw.weight": dw, "conv_pwl.weight": pwl}
        if self.rd:
            out.update(se_state(self._shared.se_weights(self.mid, self.rd)))
        for name in ("bn1", "bn2", "bn3"):
            for k, v in getattr(self, name).state_dict().items():
                out[f"{name}.{k}"] = v
        return {k: v.detach().clone().contiguous() for k, v in out.items()}
