"""The weight-sharing supernet over a :class:`SearchSpace`.

Module names follow timm's EfficientNet (``conv_stem``, ``bn1``, ``blocks.<stage>.<layer>``,
``conv_head``, ``bn2``, ``classifier``) so that :meth:`Supernet.extract` is a key mapping: the chosen
candidate of every layer becomes the block of a plain timm EfficientNet built from the arch_def.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models._efficientnet_builder import efficientnet_init_weights

from .arch import Arch
from .blocks import Head, Stem, make_block, space_timm_net
from .elastic import ElasticCandidate, ElasticWeights, layer_se_rd
from .mixed import GATE_MODES, PHASES, MixedOp
from .slimmable import BN_MODES, SlimCandidate, SlimHead
from .space import ZERO, Layer, SearchSpace, parse_op, width_choice

WEIGHT_SHARING = ("elastic", "separate")


class Supernet(nn.Module):
    """``bn`` (spaces with widths only): ``switchable`` (one BatchNorm per width) or ``shared`` (one,
    sliced; recalibrate before evaluating a width), see :mod:`supernets.slimmable`.

    Width decisions have logits too (``width_alpha[i]`` for stage ``i + 1``, in
    :meth:`arch_parameters`): :meth:`sample` draws one width per stage with the ops (uniformly or
    from p = softmax), :meth:`probs` and :meth:`argmax_arch` include them. A sampled width is one
    discrete slice, so no gradient reaches its logits through the forward pass: ProxylessNAS trains
    them with REINFORCE (:meth:`width_log_prob`) and the expected latency.
    """

    def __init__(self, space: SearchSpace, num_classes: int, gate: str = "one", weight_sharing: str = "elastic",
                 bn: str = "switchable"):
        super().__init__()
        if weight_sharing not in WEIGHT_SHARING:
            raise ValueError(f"weight_sharing {weight_sharing!r} unknown; choose one of {', '.join(WEIGHT_SHARING)}")
        if bn not in BN_MODES:
            raise ValueError(f"bn {bn!r} unknown; choose one of {', '.join(BN_MODES)}")
        if space.has_widths and weight_sharing != "elastic":
            raise ValueError(f"space {space.name!r} has widths: they slice shared weights, so weight_sharing must "
                             f"be elastic")
        self.weight_sharing = weight_sharing
        self.bn_mode = bn
        self.space = space
        self.num_classes = int(num_classes)
        self.stem = Stem(space.in_chans, space.stem_chs, space.act)
        stages: list[nn.Module] = [nn.Sequential(make_block(space.first))]
        for n in space.stage_layers:
            stages.append(nn.ModuleList())
        for layer in space.layers:
            stages[layer.stage].append(self._mixed_layer(layer))
        self.blocks = nn.ModuleList(stages)
        head_cls = SlimHead if space.has_widths else Head
        self.head = head_cls(space.last_chs, space.head_chs, num_classes, space.act)
        efficientnet_init_weights(self)  # conv/BN/linear modules; elastic weights init themselves
        with torch.no_grad():
            for m in self.mixed_ops():
                m.alpha.zero_()
        self.set_gate(gate)
        # logits of the width decisions, one vector per stage (zeros: uniform)
        self.width_alpha = nn.ParameterList([nn.Parameter(torch.zeros(len(ws))) for ws in space.stage_widths])
        self.widths: list[int] = [max(ws) for ws in space.stage_widths]
        if space.has_widths:
            self.set_widths(self.widths)

    def _mixed_layer(self, layer: Layer) -> MixedOp:
        ops = [op for op in layer.choices if op != ZERO]
        shared = None
        if self.weight_sharing == "elastic":
            shared = ElasticWeights(layer.in_chs, layer.out_chs, max(parse_op(o)[0] for o in ops),
                                    max(parse_op(o)[1] for o in ops), layer_se_rd(layer))
            if self.space.has_widths:
                make = lambda op: SlimCandidate(shared, layer, op, self.bn_mode)  # noqa: E731
            else:
                make = lambda op: ElasticCandidate(shared, layer, op)  # noqa: E731
        else:
            make = lambda op: make_block(layer.spec(op))  # noqa: E731
        cands = [nn.Identity() if op == ZERO else make(op) for op in layer.choices]
        return MixedOp(layer.choices, cands, shared)

    # ------------------------------------------------------------------ parameters
    def mixed_ops(self) -> Iterator[MixedOp]:
        for stage in self.blocks[1:]:
            yield from stage

    def named_mixed_ops(self) -> Iterator[tuple[str, MixedOp]]:
        return zip((layer.name for layer in self.space.layers), self.mixed_ops())

    def arch_parameters(self) -> list[nn.Parameter]:
        return [m.alpha for m in self.mixed_ops()] + list(self.width_alpha)

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

    def sample(self, how: str = "probs", generator: torch.Generator | None = None,
               skip_prob: float | None = None) -> None:
        """Sample every layer's path and (spaces with widths) every stage's width: ``uniform`` or from
        p = softmax(alpha) (``probs``). ``skip_prob`` (``uniform``): how often a layer that can be
        skipped is (``None``: as often as each op, 1/n)."""
        for m in self.mixed_ops():
            m.sample(how, generator, skip_prob)
        if self.space.has_widths:
            idx = []
            for a in self.width_alpha:
                if how == "uniform":
                    idx.append(int(torch.randint(len(a), (1,), generator=generator)))
                else:
                    p = F.softmax(a.detach().float().cpu(), dim=0)
                    idx.append(int(torch.multinomial(p, 1, generator=generator)))
            self.set_widths([ws[i] for ws, i in zip(self.space.stage_widths, idx)])

    def width_log_prob(self) -> torch.Tensor:
        """log p of the current widths under softmax(width_alpha) (differentiable; 0 without widths)."""
        total = torch.zeros((), device=next(self.parameters()).device)
        for a, ws, w in zip(self.width_alpha, self.space.stage_widths, self.widths):
            total = total + F.log_softmax(a, dim=0)[ws.index(w)]
        return total

    def path_state(self) -> torch.Tensor:
        """The sampled path as one tensor (active index and pair per layer; -1 = no pair; then one
        row per stage with the index of its width), so that distributed ranks can agree on it by a
        broadcast."""
        rows = []
        for m in self.mixed_ops():
            pair = m._pair.tolist() if m._pair is not None else [-1, -1]
            rows.append([m.active, int(m.fixed), *pair])
        for ws, w in zip(self.space.stage_widths, self.widths):
            rows.append([ws.index(w), 0, -1, -1])
        return torch.tensor(rows, dtype=torch.long)

    def load_path_state(self, state: torch.Tensor) -> None:
        rows = state.tolist()
        n = len(self.space.layers)
        for m, (active, fixed, p0, p1) in zip(self.mixed_ops(), rows[:n]):
            m.active, m.fixed = int(active), bool(fixed)
            m._pair = None if p0 < 0 else torch.tensor([p0, p1])
        if self.space.has_widths:
            self.set_widths([ws[int(r[0])] for ws, r in zip(self.space.stage_widths, rows[n:])])

    def rescale_pairs(self) -> None:
        for m in self.mixed_ops():
            m.rescale_pair()

    def set_widths(self, widths) -> None:
        """Output channels of every stage (a list, stage 1 first; each one of the stage's widths)."""
        widths = [int(w) for w in widths]
        sw = self.space.stage_widths
        if len(widths) != len(sw) or any(w not in ws for w, ws in zip(widths, sw)):
            raise ValueError(f"widths {widths} do not fit space {self.space.name!r} (per stage: {[list(w) for w in sw]})")
        self.widths = widths
        for layer, m in zip(self.space.layers, self.mixed_ops()):
            if m.shared is not None:
                m.shared.out_width = widths[layer.stage - 1]

    def width_choices(self) -> dict[str, str]:
        return {n: width_choice(w) for n, w in zip(self.space.width_decisions(), self.widths)}

    def set_active(self, arch: Arch) -> None:
        """Fix every choice to ``arch`` (a static path, whatever the gate mode)."""
        self.space.validate(arch)
        for name, m in self.named_mixed_ops():
            m.set_choice(arch.choices[name])
        if self.space.has_widths:
            self.set_widths(self.space.widths(arch))

    def active_arch(self) -> Arch:
        return self.space.make_arch({**{n: m.names[m.active] for n, m in self.named_mixed_ops()},
                                     **self.width_choices()}, self.num_classes)

    def probs(self) -> dict[str, torch.Tensor]:
        """p = softmax(alpha) of every decision: layers, then (spaces with widths) ``s{i}.width``."""
        out = {n: m.probs() for n, m in self.named_mixed_ops()}
        out.update({n: F.softmax(a, dim=0) for n, a in zip(self.space.width_decisions(), self.width_alpha)})
        return out

    def argmax_arch(self) -> Arch:
        """The most probable choice of every decision (widths included)."""
        widths = {n: width_choice(ws[int(a.detach().argmax())])
                  for n, a, ws in zip(self.space.width_decisions(), self.width_alpha, self.space.stage_widths)}
        return self.space.make_arch({**{n: m.argmax() for n, m in self.named_mixed_ops()}, **widths},
                                    self.num_classes)

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
        chs = self.space.layer_chs(arch)
        for layer, m, (cin, cout) in zip(self.space.layers, self.mixed_ops(), chs):
            op = arch.choices[layer.name]
            if op == ZERO:
                continue
            cand = m.candidates[m.names.index(op)]
            if isinstance(cand, SlimCandidate):
                sd = cand.timm_state_dict(cin, cout)
            else:
                sd = cand.timm_state_dict() if isinstance(cand, ElasticCandidate) else cand.state_dict()
            for k, v in sd.items():
                out[f"blocks.{layer.stage}.{kept[layer.stage]}.{k}"] = v
            kept[layer.stage] += 1
        head = (self.head.timm_state_dict(self.space.last_width(arch)) if isinstance(self.head, SlimHead)
                else self.head.state_dict())
        for k, v in head.items():
            out[k] = v
        return {k: v.detach().clone() for k, v in out.items()}

    def extract(self, arch: Arch) -> nn.Module:
        """A static timm EfficientNet holding the chosen candidates' weights (no supernet code)."""
        net = space_timm_net(self.space, arch, self.num_classes)
        net.load_state_dict(self.subnet_state_dict(arch), strict=True)
        return net.to(next(self.parameters()).device).train(self.training)

    def load_state_dict_compat(self, state: Mapping[str, torch.Tensor]) -> None:
        self.load_state_dict(dict(state), strict=True)
