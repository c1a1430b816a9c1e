"""Analytic cost models (``hardware=flops``, ``hardware=params``): exact counts instead of timing."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from nas.errors import UserError
from nas.latency.cost import CostModel, FlopsModel, ParamsModel
from nas.latency.hardware import Hardware, register_hardware
from nas.latency.items import (
    _block_items,
    _fixed_modules,
    _head_width_parts,
    arch_net,
    entry_key,
)
from supernets.arch import Arch
from supernets.blocks import make_block
from supernets.space import ZERO, SearchSpace

#: ``hardware=`` names served by an analytic model instead of a timed device.
ANALYTIC_NAMES: tuple[str, ...] = ("flops", "params")


def count_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (multiply and add counted separately) of one forward at batch 1."""
    module = module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops())


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def peak_activation_bytes(module: nn.Module, input_shape: tuple[int, ...], bytes_per_value: int = 4) -> int:
    """Peak activation memory of one forward at batch 1, estimated as MCUNet does for chain nets: the
    largest input + output of any single layer (leaf module), in bytes. What a residual connection keeps
    alive for its add is not counted, so it is a lower bound for nets with skips; it ranks nets by the
    memory an inference engine that frees activations as it goes needs."""
    peak = 0

    def hook(mod, inputs, output) -> None:
        nonlocal peak
        n_in = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))
        n_out = output.numel() if isinstance(output, torch.Tensor) else 0
        peak = max(peak, n_in + n_out)

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            module.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    return int(peak * bytes_per_value)


def _analytic(space: SearchSpace, num_classes: int, measure, cls) -> CostModel:
    costs: dict[str, float] = {}
    fixed = sum(measure(m, shape) for m, shape in _fixed_modules(space, num_classes).values())
    for key, spec in _block_items(space).items():
        costs[key] = measure(make_block(spec), (spec.in_chs, spec.in_size, spec.in_size))
    layer_costs = {
        layer.name: [0.0 if op == ZERO else costs[entry_key(layer.spec(op))] for op in layer.choices]
        for layer in space.layers
    }
    width_costs, head_delta = None, None
    if space.has_widths:
        width_costs = {layer.name: {(op, i, o): costs[entry_key(layer.spec(op, i, o))]
                                    for i, o in layer.width_pairs() for op in layer.choices if op != ZERO}
                       for layer in space.layers}
        heads = {w: measure(m, shape) for w, (_, m, shape, _) in _head_width_parts(space, num_classes).items()}
        head_delta = {w: c - heads[space.last_chs] for w, c in heads.items()}
    return cls(space, layer_costs, fixed, {"num_classes": num_classes, "device": cls.kind}, width_costs, head_delta)


def build_flops_model(space: SearchSpace, num_classes: int) -> FlopsModel:
    """MFLOPs per candidate (convolutions and the classifier; multiply and add counted separately)."""
    return _analytic(space, num_classes, lambda m, s: count_flops(m, s) / 1e6, FlopsModel)


def build_params_model(space: SearchSpace, num_classes: int) -> ParamsModel:
    """Millions of parameters per candidate (weights and BatchNorm affine parameters)."""
    return _analytic(space, num_classes, lambda m, s: count_params(m) / 1e6, ParamsModel)


@register_hardware(*ANALYTIC_NAMES)
class AnalyticDevice(Hardware):
    """``hardware=flops`` / ``hardware=params``: an exact count instead of a timed device.

    :meth:`cost_model` builds the additive model; :meth:`measure_nets` counts whole nets (which
    equals the model's prediction: both are exact).
    """

    timed = False

    def __init__(self, name: str, threads: int | None = None, batch_size: int = 1, **kw: Any) -> None:
        if name not in ANALYTIC_NAMES:
            raise UserError(f"unknown analytic cost model {name!r}; choose one of: {', '.join(ANALYTIC_NAMES)}")
        unknown = sorted(k for k in kw if not k.startswith("_"))
        if unknown:
            raise UserError(f"unknown option(s) {', '.join(unknown)} for hardware '{name}'; allowed: threads")
        self.name = name
        self.threads = int(threads) if threads else torch.get_num_threads()
        self.batch_size = int(batch_size)
        self.unit = FlopsModel.unit if name == "flops" else ParamsModel.unit

    def __repr__(self) -> str:
        return f"AnalyticDevice(name={self.name!r})"

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "analytic": True}

    def count(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        if self.name == "flops":
            return count_flops(module, input_shape) / 1e6
        return count_params(module) / 1e6

    def cost_model(self, space: SearchSpace, num_classes: int, *, path: str | None = None,
                   log: Callable[[str], Any] = print, **_: Any) -> CostModel:
        if path:
            log(f"note: hardware={self.name} is analytic; lut.path={path} is not used")
        if self.name == "flops":
            return build_flops_model(space, num_classes)
        return build_params_model(space, num_classes)

    def measure_nets(self, space: SearchSpace, archs: Sequence[Arch], **_: Any) -> list[float]:
        return [self.count(*arch_net(space, a)) for a in archs]

    def measure_modules(self, items: Mapping[str, tuple[nn.Module, tuple[int, ...]]], **_: Any) -> dict[str, float]:
        return {name: self.count(module, tuple(shape)) for name, (module, shape) in items.items()}
