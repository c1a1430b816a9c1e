"""What a latency table measures: block keys, the fixed parts, and the nets used to calibrate and validate.

A table entry is keyed by every field that changes a block's cost (:func:`entry_key`: block type,
input H x W x C, output channels, kernel, expand, stride, skip, and any further field of
:class:`~supernets.space.BlockSpec` such as squeeze-excite and the activation, named whenever it
differs from the field's default, so that adding a field never changes the keys of existing spaces).
The stem and head keys name the space's activation when it is not relu6.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch.nn as nn

from supernets.arch import Arch
from supernets.blocks import Head, Stem, make_block, space_timm_net
from supernets.space import DEFAULT_ACT, ZERO, BlockSpec, SearchSpace

_KEY_FIELDS = ("type", "in_chs", "out_chs", "kernel", "expand", "stride", "in_size")


def entry_key(spec: BlockSpec) -> str:
    """The table key of a block: every field that changes its cost.

    ``ir:in8x8x16:out24:k5:e6:s2:skip0`` (type, input H x W x C, output channels, kernel, expand,
    stride, skip). Any further field a :class:`BlockSpec` carries (squeeze-excite, the activation,
    a field added later) is appended as ``:<name>=<value>`` unless it holds the field's default
    (``ir:in8x8x16:out24:k5:e6:s2:skip0:se=0.25:act=hard_swish``), so two specs that differ anywhere
    never collide and the keys of blocks without the new fields stay as they were.
    """
    key = spec.key()
    for name, value in _extra_fields(spec).items():
        key += f":{name}={value}"
    return key


def _extra_fields(spec: BlockSpec) -> dict[str, Any]:
    """The fields beyond :data:`_KEY_FIELDS` that differ from their defaults."""
    out = {}
    for f in dataclasses.fields(spec):
        if f.name in _KEY_FIELDS:
            continue
        value = getattr(spec, f.name)
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        if default is dataclasses.MISSING or value != default:
            out[f.name] = value
    return out


def entry_fields(spec: BlockSpec) -> dict[str, Any]:
    """The cost-changing fields of a block, spelled out (stored beside each table entry)."""
    d: dict[str, Any] = {
        "block": spec.type, "in_h": spec.in_size, "in_w": spec.in_size, "in_c": spec.in_chs,
        "out_h": spec.out_size, "out_w": spec.out_size, "out_c": spec.out_chs, "kernel": spec.kernel,
        "expand": spec.expand, "stride": spec.stride, "skip": bool(spec.skip),
    }
    d.update(_extra_fields(spec))
    return d


def _act_suffix(space: SearchSpace) -> str:
    return "" if space.act == DEFAULT_ACT else f":act={space.act}"


def _fixed_parts(space: SearchSpace, num_classes: int) -> dict[str, tuple[str, nn.Module, tuple[int, ...], dict]]:
    """``{role: (key, module, input_shape, fields)}`` for the stem, the fixed first block and the head."""
    r, f = space.resolution, space.first
    fs = space.final_size
    return {
        "stem": (f"stem:in{r}x{r}x{space.in_chans}:out{space.stem_chs}{_act_suffix(space)}",
                 Stem(space.in_chans, space.stem_chs, space.act), (space.in_chans, r, r),
                 {"block": "stem", "in_h": r, "in_w": r, "in_c": space.in_chans, "out_c": space.stem_chs,
                  "kernel": 3, "stride": 2}),
        "first": (entry_key(f), make_block(f), (f.in_chs, f.in_size, f.in_size), entry_fields(f)),
        "head": (head_key(space, space.last_chs, num_classes),
                 Head(space.last_chs, space.head_chs, num_classes, space.act), (space.last_chs, fs, fs),
                 {"block": "head", "in_h": fs, "in_w": fs, "in_c": space.last_chs, "features": space.head_chs,
                  "classes": num_classes}),
    }


def head_key(space: SearchSpace, in_chs: int, num_classes: int) -> str:
    fs = space.final_size
    return f"head:in{fs}x{fs}x{in_chs}:f{space.head_chs}:cls{num_classes}{_act_suffix(space)}"


def _head_width_parts(space: SearchSpace, num_classes: int) -> dict[int, tuple[str, nn.Module, tuple[int, ...], dict]]:
    """The head at every width of the last stage (spaces with widths; ``{}`` otherwise)."""
    if not space.has_widths:
        return {}
    fs = space.final_size
    return {w: (head_key(space, w, num_classes), Head(w, space.head_chs, num_classes, space.act), (w, fs, fs),
                {"block": "head", "in_h": fs, "in_w": fs, "in_c": w, "features": space.head_chs,
                 "classes": num_classes})
            for w in space.stage_widths[-1]}


def _fixed_modules(space: SearchSpace, num_classes: int) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Stem, first block and head as ``{key: (module, input shape (C, H, W))}``."""
    return {key: (module, shape) for key, module, shape, _ in _fixed_parts(space, num_classes).values()}


def _block_items(space: SearchSpace) -> dict[str, BlockSpec]:
    """Every distinct searchable block of the space, by :func:`entry_key`."""
    items: dict[str, BlockSpec] = {}
    for layer in space.layers:
        for cin, cout in layer.width_pairs():  # one pair (the layer's channels) in a space without widths
            for op in layer.choices:
                spec = layer.spec(op, cin, cout)
                if spec is not None:
                    items.setdefault(entry_key(spec), spec)
    return items


def table_items(space: SearchSpace, num_classes: int) -> dict[str, dict[str, Any]]:
    """Everything a latency table measures: ``{key: {module, input_shape, role, fields}}``.

    ``role`` is ``stem``, ``first`` or ``head`` for the fixed parts, ``head_width`` for the head at the
    narrower widths of the last stage (spaces with widths), and ``block`` for searchable blocks (at
    every width pair of their layer).
    """
    items: dict[str, dict[str, Any]] = {}
    for role, (key, module, shape, fields) in _fixed_parts(space, num_classes).items():
        items[key] = {"module": module, "input_shape": tuple(shape), "role": role, "fields": fields}
    for key, module, shape, fields in _head_width_parts(space, num_classes).values():
        items.setdefault(key, {"module": module, "input_shape": tuple(shape), "role": "head_width", "fields": fields})
    for key, spec in _block_items(space).items():
        items.setdefault(key, {"module": make_block(spec),
                               "input_shape": (spec.in_chs, spec.in_size, spec.in_size),
                               "role": "block", "fields": entry_fields(spec)})
    return items


def arch_net(space: SearchSpace, arch: Arch) -> tuple[nn.Module, tuple[int, ...]]:
    """The static (timm) net of ``arch`` in eval mode, and its input shape (C, H, W)."""
    net = space_timm_net(space, arch, arch.num_classes).eval()
    return net, (space.in_chans, space.resolution, space.resolution)


def calibration_archs(space: SearchSpace, num_classes: int, n: int, seed: int = 0) -> list[Arch]:
    """Largest, smallest and ``n - 2`` random subnets (seeded; a stream apart from validation's).

    Half of the random ones are uniform over each layer's choices (like the validation nets); the
    other half skip layers (``zero``) with a probability that sweeps from 0 to 1, so that the
    overhead fit also sees the sparse, fast nets a search under a tight target ends up with.
    """
    if n <= 0:
        return []
    rng = random.Random(f"hwnas-calibration-{seed}")
    archs = [space.largest(num_classes), space.smallest(num_classes)][:n]
    rest = n - len(archs)
    sparse = rest // 2
    for i in range(sparse):
        p_zero = (i + 0.5) / sparse
        choices = {}
        for layer in space.layers:
            ops = [c for c in layer.choices if c != ZERO]
            choices[layer.name] = ZERO if ZERO in layer.choices and rng.random() < p_zero else rng.choice(ops)
        for name in space.width_decisions():  # spaces with widths only (no draws otherwise)
            choices[name] = rng.choice(space.decisions()[name])
        archs.append(space.make_arch(choices, num_classes))
    archs += [space.sample(num_classes, rng) for _ in range(rest - sparse)]
    return archs


def validation_archs(space: SearchSpace, num_classes: int, samples: int, seed: int = 0) -> list[tuple[str, Arch]]:
    """``[(label, arch)]``: the largest, the smallest and ``samples`` random subnets (seeded, and drawn
    from a stream independent of :func:`calibration_archs`)."""
    rng = random.Random(f"hwnas-validation-{seed}")
    out = [("largest", space.largest(num_classes)), ("smallest", space.smallest(num_classes))]
    out += [(f"random{i}", space.sample(num_classes, rng)) for i in range(samples)]
    return out


def describe_reference() -> dict[str, Any]:
    """What the reference of every measurement is (stored in tables and kit manifests)."""
    return {"kind": "block", "module": "nas.devices.reference_module (conv3x3 16->32->16 + BN + ReLU6 on "
                                       "16x16x16)"}




def fixed_keys(items: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``{role: key}`` of the fixed parts (stem, first block, widest head) among :func:`table_items`."""
    return {v["role"]: k for k, v in items.items() if v["role"] in ("stem", "first", "head")}
