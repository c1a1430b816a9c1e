"""Slimmable layers: elastic MBConv weights sliced along their input and output channels too.

A layer of a space with widths holds the weights of its widest form (largest kernel, expand, input
and output channels, see :class:`~supernets.elastic.ElasticWeights`). At input width ``i`` and output
width ``o`` candidate ``k{k}_e{e}`` uses the *leading* channels: ``conv_pw[:mid, :i]``, the centre
``k x k`` of ``conv_dw[:mid]`` and ``conv_pwl[:o, :mid]`` with ``mid = make_divisible(i * e)``, exactly
what timm's ``InvertedResidual(i, o, k, e)`` holds. The output width is the stage's (set on the
shared weights by the supernet); the input width is whatever arrives.

BatchNorm, two modes (``bn=``):

``switchable``  one BatchNorm per width (Slimmable Networks): ``bn1``/``bn2`` per input width,
                ``bn3`` per (input, output) pair, each with its own affine parameters and running
                statistics. Statistics are exact for every width the net was trained at.
``shared``      one BatchNorm of the widest size whose leading channels serve every width (US-Nets):
                the affine parameters are shared, and the running statistics are a blur of all
                widths, so they must be recalibrated (:func:`supernets.bn.calibrate_bn`) for a chosen
                width before it is evaluated or exported.

The head's ``conv_head`` is sliced along its input channels (the last stage's width).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import make_divisible

from .blocks import Head, se_channels
from .elastic import ElasticWeights, _bn_act, se_forward, se_state
from .space import Layer

BN_MODES = ("switchable", "shared")


def sliced_bn_act(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``bn`` (a timm ``BatchNormAct2d`` or plain BatchNorm) applied to the leading ``x.shape[1]``
    channels of its parameters and statistics: the same arithmetic as its own forward (momentum,
    or the cumulative average when ``momentum is None``), so a narrow slice behaves like a BN of
    that size holding those values."""
    c = x.shape[1]
    if c == bn.num_features:
        return bn(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or bn.running_mean is None
    track = not bn.training or bn.track_running_stats
    y = F.batch_norm(x, bn.running_mean[:c] if track else None, bn.running_var[:c] if track else None,
                     bn.weight[:c] if bn.weight is not None else None,
                     bn.bias[:c] if bn.bias is not None else None, use_batch, factor, bn.eps)
    if hasattr(bn, "act"):
        y = bn.act(bn.drop(y))
    return y


def _bn_slice_state(bn: nn.Module, c: int) -> dict[str, torch.Tensor]:
    """State dict of a BN of ``c`` channels holding the leading channels of ``bn``."""
    out = {}
    for k, v in bn.state_dict().items():
        out[k] = v if k == "num_batches_tracked" else v[:c]
    return out


class SlimCandidate(nn.Module):
    """Candidate ``op`` of a slimmable layer: width-sliced views of the shared weights plus BatchNorms
    (switchable: one per width; shared: one, sliced)."""

    def __init__(self, shared: ElasticWeights, layer: Layer, op: str, bn: str = "switchable"):
        super().__init__()
        if bn not in BN_MODES:
            raise ValueError(f"bn mode {bn!r} unknown; choose one of {', '.join(BN_MODES)}")
        spec = layer.spec(op)
        act = spec.act
        self.kernel, self.expand, self.se = spec.kernel, spec.expand, spec.se
        self.stride = layer.stride
        self.bn_mode = bn
        self.widths_in = tuple(layer.widths_in or (layer.in_chs,))
        self.widths_out = tuple(layer.widths_out or (layer.out_chs,))
        object.__setattr__(self, "_shared", shared)  # registered once, by the layer (MixedOp)
        if bn == "shared":
            mid = self.mid(max(self.widths_in))
            self.bn1 = _bn_act(mid, act)
            self.bn2 = _bn_act(mid, act)
            self.bn3 = _bn_act(max(self.widths_out), act, apply_act=False)
        else:
            self.bn1 = nn.ModuleDict({str(i): _bn_act(self.mid(i), act) for i in self.widths_in})
            self.bn2 = nn.ModuleDict({str(i): _bn_act(self.mid(i), act) for i in self.widths_in})
            self.bn3 = nn.ModuleDict({f"{i}_{o}": _bn_act(o, act, apply_act=False)
                                      for i in self.widths_in for o in self.widths_out})

    def mid(self, in_chs: int) -> int:
        return make_divisible(in_chs * self.expand)

    def rd(self, in_chs: int) -> int:
        """Reduced channels of the SE at input width ``in_chs`` (0 without SE)."""
        return se_channels(self.mid(in_chs), self.expand, self.se) if self.se else 0

    @property
    def out_width(self) -> int:
        return int(getattr(self._shared, "out_width", max(self.widths_out)))

    def bns(self, cin: int, cout: int) -> tuple[nn.Module, nn.Module, nn.Module]:
        if self.bn_mode == "shared":
            return self.bn1, self.bn2, self.bn3
        try:
            return self.bn1[str(cin)], self.bn2[str(cin)], self.bn3[f"{cin}_{cout}"]
        except KeyError:
            raise ValueError(f"layer has no BatchNorm for input width {cin} / output width {cout} (input widths "
                             f"{self.widths_in}, output widths {self.widths_out})") from None

    def weights(self, cin: int, cout: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self._shared
        mid = self.mid(cin)
        kmax = s.conv_dw.shape[-1]
        o = (kmax - self.kernel) // 2
        pw = s.conv_pw[:mid, :cin]
        dw = s.conv_dw[:mid, :, o : o + self.kernel, o : o + self.kernel]
        pwl = s.conv_pwl[:cout, :mid]
        return pw, dw, pwl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cin, cout = x.shape[1], self.out_width
        pw, dw, pwl = self.weights(cin, cout)
        bn1, bn2, bn3 = self.bns(cin, cout)
        shortcut = x
        y = sliced_bn_act(bn1, F.conv2d(x, pw))
        pad = ((self.stride - 1) + (self.kernel - 1)) // 2  # timm's symmetric padding
        y = sliced_bn_act(bn2, F.conv2d(y, dw, stride=self.stride, padding=pad, groups=pw.shape[0]))
        if self.se:
            y = se_forward(y, self._shared.se_weights(pw.shape[0], self.rd(cin)))
        y = sliced_bn_act(bn3, F.conv2d(y, pwl))
        # timm adds the residual wherever the shapes allow it, so the static net of these widths does too
        return y + shortcut if self.stride == 1 and cin == cout else y

    def timm_state_dict(self, cin: int, cout: int) -> dict[str, torch.Tensor]:
        """State dict of timm's ``InvertedResidual(cin, cout, k, e)`` holding the leading channels."""
        pw, dw, pwl = self.weights(cin, cout)
        out = {"conv_pw.weight": pw, "conv_dw.weight": dw, "conv_pwl.weight": pwl}
        if self.se:
            out.update(se_state(self._shared.se_weights(self.mid(cin), self.rd(cin))))
        bns = self.bns(cin, cout)
        sizes = (self.mid(cin), self.mid(cin), cout)
        for name, bn, c in zip(("bn1", "bn2", "bn3"), bns, sizes):
            for k, v in _bn_slice_state(bn, c).items():
                out[f"{name}.{k}"] = v
        return {k: v.detach().clone().contiguous() for k, v in out.items()}


class SlimHead(Head):
    """The head with ``conv_head`` sliced along its input channels (the last stage's width)."""

    def forward(self, x):
        w = self.conv_head.weight
        if x.shape[1] != w.shape[1]:
            x = F.conv2d(x, w[:, : x.shape[1]], self.conv_head.bias)
        else:
            x = self.conv_head(x)
        return self.classifier(self.global_pool(self.bn2(x)))

    def timm_state_dict(self, cin: int) -> dict[str, torch.Tensor]:
        sd = {k: v for k, v in self.state_dict().items()}
        sd["conv_head.weight"] = sd["conv_head.weight"][:, :cin]
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}


@torch.no_grad()
def reorder_channels(supernet, by: str = "l1") -> dict[str, list[int]]:
    """Permute every stage's output channels (and every layer's expanded channels) so that the most
    important come first, where the slices of narrower widths find them. Importance: the L1 norm of
    the weights that produce a channel (``l1``), or the magnitude of the BatchNorm scale that
    follows it (``bn``, Network Slimming; summed over the layer's candidates). The widest network computes the same function
    before and after (the permutation is applied to every consumer of a channel too).

    Stage channels are coupled by the residual adds: one permutation per stage, applied to the
    outputs of all its layers (``conv_pwl`` rows, ``bn3``), the inputs of its layers' ``conv_pw`` and
    of the next stage's first layer (or of ``conv_head``). Switchable BatchNorms of narrower widths
    are reset (their statistics described other channels). Returns the permutation per stage.
    """
    if by not in ("l1", "bn"):
        raise ValueError(f"channel importance {by!r} unknown; choose l1 or bn")
    space = supernet.space
    stages: dict[int, list] = {}
    for layer, m in zip(space.layers, supernet.mixed_ops()):
        stages.setdefault(layer.stage, []).append(m)
    perms: dict[str, list[int]] = {}

    def permute_bn(bn, idx):
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            if t is not None and t.shape[0] == len(idx):
                t.copy_(t[idx])

    def bn_scale(m, which, n):
        """Sum over the layer's candidates of |gamma| of their widest BN ``which`` (n channels)."""
        total = torch.zeros(n)
        for cand in m.candidates:
            if isinstance(cand, SlimCandidate):
                bnx = getattr(cand, which)
                bn = bnx[list(bnx.keys())[-1]] if isinstance(bnx, nn.ModuleDict) else bnx
                if bn.num_features == n:
                    total += bn.weight.detach().abs().cpu()
        return total

    def widest_bns(cand, which):
        bnx = getattr(cand, which)
        if isinstance(bnx, nn.ModuleDict):
            keys = list(bnx.keys())
            widest = keys[-1]
            for k in keys[:-1]:
                bnx[k].reset_running_stats()
            return [bnx[widest]]
        return [bnx]

    # expanded (mid) channels: private to each layer
    for name_m, m in supernet.named_mixed_ops():
        w = m.shared
        if w is None:
            continue
        score = w.conv_pw.abs().sum(dim=(1, 2, 3)) if by == "l1" else bn_scale(m, "bn1", w.conv_pw.shape[0])
        idx = torch.argsort(score.to(w.conv_pw.device), descending=True)
        w.conv_pw.copy_(w.conv_pw[idx])
        w.conv_dw.copy_(w.conv_dw[idx])
        w.conv_pwl.copy_(w.conv_pwl[:, idx])
        if hasattr(w, "se_reduce"):  # the SE reads and gates the expanded channels
            w.se_reduce.copy_(w.se_reduce[:, idx])
            w.se_expand.copy_(w.se_expand[idx])
            w.se_expand_bias.copy_(w.se_expand_bias[idx])
        for cand in m.candidates:
            if isinstance(cand, SlimCandidate):
                for which in ("bn1", "bn2"):
                    for bn in widest_bns(cand, which):
                        if bn.num_features == len(idx):
                            permute_bn(bn, idx)
                        else:
                            bn.reset_running_stats()
        perms[f"{name_m}.mid"] = idx.tolist()
    # stage (coupled) channels
    for si in sorted(stages):
        ms = [m for m in stages[si] if m.shared is not None]
        if not ms:
            continue
        if by == "l1":
            score = sum(m.shared.conv_pwl.abs().sum(dim=(1, 2, 3)) for m in ms)
        else:
            score = sum(bn_scale(m, "bn3", m.shared.conv_pwl.shape[0]) for m in ms)
        idx = torch.argsort(score.to(ms[0].shared.conv_pwl.device), descending=True)
        for li, m in enumerate(ms):
            m.shared.conv_pwl.copy_(m.shared.conv_pwl[idx])
            if li > 0:  # input of the stage's later layers
                m.shared.conv_pw.copy_(m.shared.conv_pw[:, idx])
            for cand in m.candidates:
                if isinstance(cand, SlimCandidate):
                    for bn in widest_bns(cand, "bn3"):
                        permute_bn(bn, idx)
        nxt = stages.get(si + 1)
        if nxt:
            first = nxt[0].shared
            first.conv_pw.copy_(first.conv_pw[:, idx])
        else:
            head = supernet.head.conv_head
            head.weight.copy_(head.weight[:, idx])
        perms[f"s{si}"] = idx.tolist()
    return perms
