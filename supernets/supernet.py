"""The weight-sharing supernet over a :class:`SearchSpace`.

Module names follow timm's EfficientNet (``conv_stem``, ``bn1``, ``blocks.<stage>.<layer>``,
``conv_head``, ``bn2``, ``classifier``) so that :meth:`Supernet.extract` is a key mapping: the chosen
candidate of every layer becomes the block of a plain timm EfficientNet built from the arch_def.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.nn as nn
from timm.models._efficientnet_builder import efficientnet_init_weights

from .arch import Arch
from .blocks import Head, Stem, make_block, space_timm_net
from .mixed import GATE_MODES, PHASES, MixedOp
from .space import ZERO, SearchSpace


class Supernet(nn.Module):
    def __init__(self, space: SearchSpace, num_classes: int, gate: str = "one"):
        super().__init__()
        self.space = space
        self.num_classes = int(num_classes)
        self.stem = Stem(space.in_chans, space.stem_chs, space.act)
        stages: list[nn.Module] = [nn.Sequential(make_block(space.first, space.act))]
        for n in space.stage_layers:
            stages.append(nn.ModuleList())
        for layer in space.layers:
            cands = [nn.Identity() if op == ZERO else make_block(layer.spec(op), space.act) for op in layer.choices]
            stages[layer.stage].append(MixedOp(layer.choices, cands))
        self.blocks = nn.ModuleList(stages)
        self.head = Head(space.last_chs, space.head_chs, num_classes, space.act)
        efficientnet_init_weights(self)
        with torch.no_grad():
            for m in self.mixed_ops():
                m.alpha.zero_()
        self.set_gate(gate)

    # ------------------------------------------------------------------ parameters
    def mixed_ops(self) -> Iterator[MixedOp]:
        for stage in self.blocks[1:]:
            yield from stage

    def named_mixed_ops(self) -> Iterator[tuple[str, MixedOp]]:
        return zip((layer.name for layer in self.space.layers), self.mixed_ops())

    def arch_parameters(self) -> list[nn.Parameter]:
        return [m.alpha for m in self.mixed_ops()]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    # ------------------------------------------------------------------ gates
    def set_gate(self, mode: str) -> None:
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode {mode!r} unknown; choose one of {', '.join(GATE_MODES)}")
        self.gate = mode
        for m in self.mixed_ops():
            m.mode = mode

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r} unknown; choose one of {', '.join(PHASES)}")
        for m in self.mixed_ops():
            m.phase = phase

    def sample(self, how: str = "probs", generator: torch.Generator | None = None) -> None:
        for m in self.mixed_ops():
            m.sample(how, generator)

    def rescale_pairs(self) -> None:
        for m in self.mixed_ops():
            m.rescale_pair()

    def set_active(self, arch: Arch) -> None:
        """Fix every choice to ``arch`` (a static path, whatever the gate mode)."""
        self.space.validate(arch)
        for name, m in self.named_mixed_ops():
            m.set_choice(arch.choices[name])

    def active_arch(self) -> Arch:
        return self.space.make_arch({n: m.names[m.active] for n, m in self.named_mixed_ops()}, self.num_classes)

    def probs(self) -> dict[str, torch.Tensor]:
        return {n: m.probs() for n, m in self.named_mixed_ops()}

    def argmax_arch(self) -> Arch:
        return self.space.make_arch({n: m.argmax() for n, m in self.named_mixed_ops()}, self.num_classes)

    # ------------------------------------------------------------------ forward / extract
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.blocks:
            for block in stage:
                x = block(x)
        return self.head(x)

    def subnet_state_dict(self, arch: Arch) -> dict[str, torch.Tensor]:
        """State dict of the timm EfficientNet for ``arch``, taken from the shared weights."""
        self.space.validate(arch)
        out: dict[str, torch.Tensor] = {}
        for k, v in self.stem.state_dict().items():
            out[k] = v
        for k, v in self.blocks[0].state_dict().items():
            out[f"blocks.0.{k}"] = v
        kept = [0] * len(self.blocks)
        for layer, m in zip(self.space.layers, self.mixed_ops()):
            op = arch.choices[layer.name]
            if op == ZERO:
                continue
            cand = m.candidates[m.names.index(op)]
            for k, v in cand.state_dict().items():
                out[f"blocks.{layer.stage}.{kept[layer.stage]}.{k}"] = v
            kept[layer.stage] += 1
        for k, v in self.head.state_dict().items():
            out[k] = v
        return {k: v.detach().clone() for k, v in out.items()}

    def extract(self, arch: Arch) -> nn.Module:
        """A static timm EfficientNet holding the chosen candidates' weights (no supernet code)."""
        net = space_timm_net(self.space, arch, self.num_classes)
        net.load_state_dict(self.subnet_state_dict(arch), strict=True)
        return net.to(next(self.parameters()).device).train(self.training)

    def load_state_dict_compat(self, state: Mapping[str, torch.Tensor]) -> None:
        self.load_state_dict(dict(state), strict=True)
