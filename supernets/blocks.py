"""Concrete blocks, built by timm's own EfficientNet builder so that a supernet candidate and the
block of the exported timm EfficientNet are the same module class with the same arguments.

Squeeze-excite (ops with ``_se``, block strings with ``_se0.25``) is timm's ``SqueezeExcite`` as
MobileNetV3 configures it (:data:`SE_LAYER`: ReLU inside, hard-sigmoid gate, reduced channels
rounded to multiples of 8), with the reduction taken from the block's input channels as timm's
EfficientNet builder does (``rd = round_channels(mid * 0.25 / expand)``, i.e. ``in_chs / 4``).
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn
from timm.layers import (
    create_classifier,
    create_conv2d,
    get_act_layer,
    get_norm_act_layer,
)
from timm.models import EfficientNet
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models._efficientnet_builder import (
    EfficientNetBuilder,
    decode_arch_def,
    round_channels,
)

from .space import BlockSpec, SearchSpace

__all__ = ["make_block", "Stem", "Head", "build_timm_net", "act_layer", "SE_LAYER", "se_channels"]

#: the squeeze-excite of every SE block (supernet candidates, static subnets, exports)
SE_LAYER = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU, rd_round_fn=round_channels)
#: :data:`SE_LAYER` spelled out for the ``timm`` kwargs of an export's arch.yaml (spaces with SE only)
SE_LAYER_DESC = ("functools.partial(timm.models._efficientnet_blocks.SqueezeExcite, gate_layer='hard_sigmoid', "
                 "force_act_layer=torch.nn.ReLU, rd_round_fn=timm.models._efficientnet_builder.round_channels)")


def act_layer(name: str):
    layer = get_act_layer(name)
    if layer is None:
        raise ValueError(f"unknown activation {name!r}")
    return layer


def _round(chs, **kw):
    return round_channels(chs, multiplier=1.0, **kw)


def se_channels(mid_chs: int, expand: int, se: float) -> int:
    """Reduced channels of the SE of a block with ``mid_chs`` expanded channels (exactly timm's
    arithmetic: the builder divides the ratio by the expansion, :data:`SE_LAYER` rounds)."""
    return round_channels(mid_chs * (se / float(expand)))


def make_block(spec: BlockSpec) -> nn.Module:
    """One timm block (InvertedResidual or DepthwiseSeparableConv) for ``spec`` (its activation and SE)."""
    builder = EfficientNetBuilder(round_chs_fn=_round, act_layer=act_layer(spec.act), norm_layer=nn.BatchNorm2d,
                                  se_layer=SE_LAYER)
    (stage,) = builder(spec.in_chs, decode_arch_def([[spec.timm_str()]]))
    (block,) = stage
    return block


class Stem(nn.Sequential):
    """conv_stem + bn1, named like timm's EfficientNet (for weight mapping)."""

    def __init__(self, in_chans: int, out_chs: int, act: str = "relu6"):
        norm_act = get_norm_act_layer(nn.BatchNorm2d, act_layer(act))
        super().__init__()
        self.conv_stem = create_conv2d(in_chans, out_chs, 3, stride=2, padding="")
        self.bn1 = norm_act(out_chs, inplace=True)


class Head(nn.Module):
    """conv_head + bn2 + global pool + classifier, named like timm's EfficientNet."""

    def __init__(self, in_chs: int, num_features: int, num_classes: int, act: str = "relu6"):
        super().__init__()
        norm_act = get_norm_act_layer(nn.BatchNorm2d, act_layer(act))
        self.conv_head = create_conv2d(in_chs, num_features, 1, padding="")
        self.bn2 = norm_act(num_features, inplace=True)
        self.global_pool, self.classifier = create_classifier(num_features, num_classes, pool_type="avg")

    def forward(self, x):
        return self.classifier(self.global_pool(self.bn2(self.conv_head(x))))


def build_timm_net(arch_def: list[list[str]], *, stem_chs: int, head_chs: int, num_classes: int,
                   act: str = "relu6", in_chans: int = 3) -> EfficientNet:
    """A plain timm EfficientNet from an arch_def; the same builder settings as :func:`make_block`."""
    return EfficientNet(
        block_args=decode_arch_def(arch_def),
        num_classes=num_classes,
        num_features=head_chs,
        in_chans=in_chans,
        stem_size=stem_chs,
        fix_stem=True,
        round_chs_fn=_round,
        act_layer=act_layer(act),
        norm_layer=partial(nn.BatchNorm2d),
        se_layer=SE_LAYER,
    )


def space_timm_net(space: SearchSpace, arch, num_classes: int) -> EfficientNet:
    return build_timm_net(space.arch_def(arch), stem_chs=space.stem_chs, head_chs=space.head_chs,
                          num_classes=num_classes, act=space.act, in_chans=space.in_chans)
