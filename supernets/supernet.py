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
from .elastic import ElasticCandidate, ElasticWeights
from .space import ZERO, Layer, SearchSpace, parse_op

WEIGHT_SHARING = ("elastic", "separate")


class Supernet(nn.Module):
    def __init__(self, space: SearchSpace, num_classes: int, gate: str = "one", weight_sharing: str = "elastic"):
        super().__init__()
        if weight_sharing not in WEIGHT_SHARING:
            raise ValueError(f"weight_sharing {weight_sharing!r} unknown; choose one of {', '.join(WEIGHT_SHARING)}")
        self.weight_sharing = weight_sharing
        self.space = space
        self.num_classes = int(num_classes)
        self.stem = Stem(space.in_chans, space.stem_chs, space.act)
        stages: list[nn.Module] = [nn.Sequential(make_block(space.first, space.act))]
        for n in space.stage_layers:
            stages.append(nn.ModuleList())
        for layer in space.layers:
            stages[layer.stage].append(self._mixed_layer(layer))
        self.blocks = nn.ModuleList(stages)
        self.head = Head(space.last_chs, space.head_chs, num_classes, space.act)
        efficientnet_init_weights(self)  # conv/BN/linear modules; elastic weights init themselves
        with torch.no_grad():
            for m in self.mixed_ops():
                m.alpha.zero_()
        self.set_gate(gate)

    def _mixed_layer(self, layer: Layer) -> MixedOp:
        ops = [op for op in layer.choices if op != ZERO]
        shared = None
        if self.weight_sharing == "elastic":
            shared = ElasticWeights(layer.in_chs, layer.out_chs, max(parse_op(o)[0] for o in ops),
                                    max(parse_op(o)[1] for o in ops))
            make = lambda op: ElasticCandidate(shared, layer, op, self.space.act)  # noqa: E731
        else:
            make = lambda op: make_block(layer.spec(op), self.space.act)  # noqa: E731
        cands = [nn.Identity() if op == ZERO else make(op) for op in layer.choices]
        return MixedOp(layer.choices, cands, shared)

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

    def path_state(self) -> torch.Tensor:
        """The sampled path as one tensor (active index and pair per layer; -1 = no pair), so that
        distributed ranks can agree on it by a broadcast."""
        rows = []
        for m in self.mixed_ops():
            pair = m._pair.tolist() if m._pair is not None else [-1, -1]
            rows.append([m.active, int(m.fixed), *pair])
        return torch.tensor(rows, dtype=torch.long)

    def load_path_state(self, state: torch.Tensor) -> None:
        for m, (active, fixed, p0, p1) in zip(self.mixed_ops(), state.tolist()):
            m.active, m.fixed = int(active), bool(fixed)
            m._pair = None if p0 < 0 else torch.tensor([p0, p1])

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
            sd = cand.timm_state_dict() if isinstance(cand, ElasticCandidate) else cand.state_dict()
            for k, v in sd.items():
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
