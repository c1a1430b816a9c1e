"""Coupled channel groups of any model, and pruning a copy of it to given channel counts.

The coupling itself (residual adds, depthwise and grouped convolutions, concatenations, squeeze-excite)
comes from Torch-Pruning's dependency graph (``torch_pruning.DependencyGraph``, DepGraph, Fang et al.
2023): every group is a set of layers whose output channels must be removed together. This module
names the groups by their root layer, keeps channel counts on a multiple (``round_to``), prunes a
copy of the model to a *plan* (``{group name: channels kept}``) given a per-group channel order (the
criterion's, least important first), and records what was removed as plain JSON (Torch-Pruning's
pruning history: ``[layer name, out-channels?, removed indices]``) so that :func:`replay` rebuilds the
pruned structure on a fresh copy of the original without pickle.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function as tp_fn

from nas.errors import UserError

#: Layer types whose output channels root a group (as Torch-Pruning's own pruners).
ROOT_TYPES = (nn.Conv2d, nn.Conv1d, nn.Linear)


@dataclass(frozen=True)
class Group:
    """One set of coupled channels: its name (the root layer's), its channel count, and the layers
    whose output channels it removes (their names)."""

    name: str
    channels: int
    layers: tuple[str, ...]
    #: Spatial size (H*W) of the root layer's output for one input (the memory a channel costs).
    pixels: int = 1


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """The output layer(s) that must keep their outputs: timm's ``get_classifier()``, else the last
    Linear / Conv of the model."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return [head]
    last = [m for m in model.modules() if isinstance(m, ROOT_TYPES)]
    return last[-1:]


def resolve_ignored(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The modules named in ``ignore`` (a name that is not a module stops with the close names)."""
    modules = dict(model.named_modules())
    out = []
    for n in names:
        if n not in modules:
            close = difflib.get_close_matches(str(n), [k for k in modules if k], n=3)
            raise UserError(f"ignore: {n!r} is not a module of the model"
                            + (f"; did you mean {', '.join(close)}?" if close else "")
                            + " (module names as in model.named_modules(), e.g. layer4.1.conv2)")
        out.append(modules[n])
    return out


def _grouped_convs(model: nn.Module, ignored: Sequence[nn.Module]) -> list[str]:
    """Convolutions with 1 < groups < in_channels that are not ignored: their channels are coupled
    in blocks, which this pruner does not keep (Torch-Pruning's low-level graph prunes them as if
    they were plain)."""
    ign = set(map(id, ignored))
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd) and id(m) not in ign
            and 1 < m.groups and not (m.groups == m.in_channels == m.out_channels)]


def build_graph(model: nn.Module, example: torch.Tensor, ignored: Sequence[nn.Module] = ()) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``. The ``ignored`` layers are traced like any other
    (left out of the trace, the graph would couple the layers before them with the model's output);
    groups touching them are left out by :func:`find_groups`. The graph is traced through autograd, so
    every parameter requires grad while it is built (a frozen model, e.g. a teacher, is restored after)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _is_out_fn(dg: tp.DependencyGraph, fn) -> bool:
    return dg.is_out_channel_pruning_fn(fn) or fn is tp_fn.prune_depthwise_conv_out_channels


def find_groups(model: nn.Module, example: torch.Tensor, ignore: Sequence[str] = ()) -> list[Group]:
    """The prunable channel groups of ``model`` (the classifier's outputs, and every group touching an
    ignored layer's inputs or outputs, are left out). A grouped convolution that is not ignored stops with its name."""
    user_ignored = resolve_ignored(model, ignore)
    ignored = user_ignored + classifier_modules(model)
    grouped = _grouped_convs(model, ignored)
    if grouped:
        raise UserError(f"layer {grouped[0]} is a grouped convolution ({len(grouped)} in the model), whose channels "
                        f"the pruner cannot keep consistent; leave it out with ignore=[{', '.join(grouped[:3])}"
                        f"{', ...' if len(grouped) > 3 else ''}] (the layers around it are then not pruned either)")
    model.eval()
    pixels = _output_pixels(model, example)
    dg = build_graph(model, example, ignored)
    names = {m: n for n, m in model.named_modules()}
    out = []
    for g in dg.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
        root = g[0].dep.target.module
        if any(d.target.module is m for d, _ in g for m in user_ignored):
            continue  # an ignored layer keeps its inputs too, not only its outputs
        layers = tuple(dict.fromkeys(names[d.target.module] for d, _ in g
                                     if d.target.module in names and _is_out_fn(dg, d.handler)))
        out.append(Group(names[root], len(g[0].idxs), layers, pixels.get(names[root], 1)))
    return out


@torch.no_grad()
def _output_pixels(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """H*W (or 1 for a vector) of every conv / linear output for ``example``."""
    sizes: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, ROOT_TYPES):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: sizes.__setitem__(name, int(out[0, 0].numel()) if out.dim() > 2 else 1)))
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    return sizes


def round_keep(channels: int, keep: float, round_to: int) -> int:
    """``keep`` channels of ``channels`` rounded to a multiple of ``round_to`` (nearest, at least one
    multiple); a group of at most ``round_to`` channels keeps them all."""
    if channels <= round_to:
        return channels
    k = int(round(float(keep) / round_to)) * round_to
    return int(min(channels, max(round_to, k)))


def min_keep(group: Group, round_to: int) -> int:
    return round_keep(group.channels, 0, round_to)


def check_plan(groups: Sequence[Group], plan: Mapping[str, int], round_to: int) -> None:
    by = {g.name: g for g in groups}
    for name, k in plan.items():
        g = by[name]
        if not (k == g.channels or (k % round_to == 0 and round_to <= k <= g.channels)):
            raise ValueError(f"group {name}: {k} of {g.channels} channels is not a multiple of {round_to}")


def _root_group(dg: tp.DependencyGraph, model: nn.Module, name: str, idxs: list[int]):
    module = dict(model.named_modules())[name]
    pruner = dg.get_pruner_of_module(module)
    return dg.get_pruning_group(module, pruner.prune_out_channels, idxs)


def prune(model: nn.Module, example: torch.Tensor, plan: Mapping[str, int], order: Mapping[str, Sequence[int]],
          ignore: Sequence[str] = ()) -> tuple[nn.Module, list]:
    """A pruned copy of ``model``: group ``name`` keeps ``plan[name]`` channels, removing the first
    ones of ``order[name]`` (channel indices, least important first). Returns the copy and the
    pruning history (JSON: what :func:`replay` redoes)."""
    net = copy.deepcopy(model).eval()
    ignored = resolve_ignored(net, ignore) + classifier_modules(net)
    dg = build_graph(net, example, ignored)
    for name, keep in plan.items():
        ordered = list(order[name])
        drop = sorted(int(i) for i in ordered[: len(ordered) - int(keep)])
        if drop:
            _root_group(dg, net, name, drop).prune()
    return net, to_json_history(dg.pruning_history())


def to_json_history(history: list) -> list:
    return [[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in history]


def replay(model: nn.Module, example: torch.Tensor, history: list, ignore: Sequence[str] = ()) -> nn.Module:
    """Redo a pruning history (from :func:`prune`) on ``model`` in place (a freshly built original)."""
    model.eval()
    ignored = resolve_ignored(model, ignore) + classifier_modules(model)
    dg = build_graph(model, example, ignored)
    dg.load_pruning_history([[n, bool(o), list(i)] for n, o, i in history])
    return model


@torch.no_grad()
def zero_removed(model: nn.Module, example: torch.Tensor, plan: Mapping[str, int], order: Mapping[str, Sequence[int]],
                 ignore: Sequence[str] = ()) -> nn.Module:
    """A copy of ``model`` with the channels :func:`prune` would remove set to zero at their source: the
    output rows (and biases) of every layer in the group whose *output* channels go, BatchNorm scales and
    shifts included, so each removed channel carries exactly 0 downstream (where the activations map 0
    to 0). Its outputs equal the pruned net's: what the tests check."""
    net = copy.deepcopy(model).eval()
    ignored = resolve_ignored(net, ignore) + classifier_modules(net)
    with torch.enable_grad():
        dg = build_graph(net, example, ignored)
    for name, keep in plan.items():
        ordered = list(order[name])
        drop = sorted(int(i) for i in ordered[: len(ordered) - int(keep)])
        if not drop:
            continue
        for dep, idxs in _root_group(dg, net, name, drop):
            m = dep.target.module
            if not isinstance(m, nn.Module) or not _is_out_fn(dg, dep.handler):
                continue
            idx = torch.as_tensor(list(idxs), dtype=torch.long)
            for attr in ("weight", "bias"):
                p = getattr(m, attr, None)
                if isinstance(p, torch.Tensor):
                    p.data[idx] = 0
    return net


def channel_counts(model: nn.Module, groups: Sequence[Group]) -> dict[str, int]:
    """Output channels of every group's root layer in ``model`` (a pruned copy)."""
    mods = dict(model.named_modules())
    out = {}
    for g in groups:
        m = mods[g.name]
        out[g.name] = int(m.out_channels if hasattr(m, "out_channels") else m.out_features)
    return out


def check_prunable(model: nn.Module, example: torch.Tensor, groups: Sequence[Group], round_to: int,
                   ignore: Sequence[str] = ()) -> None:
    """Prune every group to its minimum, in one copy, and run it: a layer the dependency graph cannot
    handle makes that fail; then the groups are tried one by one, and the first that fails is named with
    how to leave it out (``ignore=[...]``)."""
    order = {g.name: list(range(g.channels)) for g in groups}
    plan = {g.name: min_keep(g, round_to) for g in groups}
    expected_out = _out_shape(model, example)
    if _runs(model, example, plan, order, ignore, expected_out) is None:
        return
    for g in groups:
        problem = _runs(model, example, {g.name: plan[g.name]}, order, ignore, expected_out)
        if problem is not None:
            raise UserError(f"pruning the channels of layer {g.name} (coupled with {', '.join(g.layers[1:7]) or 'nothing'}"
                            f") breaks the model ({problem}); the dependency graph does not handle a layer of this "
                            f"group: leave it out with ignore=[{g.name}]")
    raise UserError("pruning all groups together breaks the model although each group alone works; leave the "
                    "unusual layers out with ignore=[...]")


@torch.no_grad()
def _out_shape(model: nn.Module, example: torch.Tensor) -> tuple[int, ...]:
    return tuple(model.eval()(example).shape)


def _runs(model, example, plan, order, ignore, expected_out) -> str | None:
    try:
        net, _ = prune(model, example, plan, order, ignore)
        with torch.no_grad():
            out = net(example)
    except Exception as e:  # noqa: BLE001 - what the graph could not handle, named by the caller
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if tuple(out.shape) != expected_out:
        return f"the output shape changes from {expected_out} to {tuple(out.shape)}"
    return None


def describe(groups: Sequence[Group]) -> list[dict[str, Any]]:
    return [{"name": g.name, "channels": g.channels, "layers": list(g.layers)} for g in groups]
