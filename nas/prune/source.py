"""Where the model to prune comes from, as plain JSON: a timm model name, an hwnas export folder, or
any ``nn.Module`` by ``_target_``; its weights from a local file (safetensors, or a torch file loaded
with ``weights_only=True``). The same JSON rebuilds the unpruned structure when a pruned export is
loaded (:func:`nas.prune.export.load_pruned`)."""
from __future__ import annotations

import difflib
import pickle
import shutil
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
import torch.nn as nn
from hydra.utils import instantiate
from safetensors import SafetensorError
from safetensors.torch import load_file

from nas.errors import UserError
from nas.export import ARCH_FILE, WEIGHTS_FILE, build_from_arch_file, load_subnet, read_arch_file

#: The copy of an export source's ``arch.yaml`` inside a pruned model's folder.
SOURCE_ARCH_FILE = "source_arch.yaml"


def source_spec(*, name: str | None, export: str | None, module: Mapping[str, Any] | None,
                num_classes: int, in_chans: int, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON description of the model (exactly one of ``name``, ``export``, ``module``)."""
    given = [k for k, v in (("model.name", name), ("model.export", export), ("model.module", module)) if v]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise UserError(f"give the model to prune as exactly one of model.name (a timm model, e.g. "
                        f"model.name=resnet18 model.weights=<file>), model.export (an hwnas export folder) or "
                        f"model.module (any nn.Module: {{_target_: ...}}); got {what}")
    if name:
        name = str(name)
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
            raise UserError(f"model.name={name!r} is not a timm model"
                            + (f"; close names: {', '.join(close)}" if close else "")
                            + " (timm.list_models('*pattern*') lists them)")
        kw = {**dict(kwargs or {}), "num_classes": int(num_classes), "in_chans": int(in_chans)}
        return {"kind": "timm", "name": name, "kwargs": kw}
    if export:
        folder = Path(str(export)).expanduser()
        if not (folder / ARCH_FILE).is_file():
            raise UserError(f"model.export={folder} is not an export folder (it has no {ARCH_FILE}); pass a "
                            f"folder written by nas-search or nas-retrain (arch.yaml + model.safetensors)")
        return {"kind": "export", "path": str(folder.resolve())}
    cfg = dict(module)
    if "_target_" not in cfg:
        raise UserError("model.module needs a _target_ (the class or function that builds the nn.Module), "
                        "e.g. model.module={_target_: my_pkg.MyNet, num_classes: 10}")
    return {"kind": "module", "config": cfg}


def build(spec: Mapping[str, Any], *, arch_file: str | Path | None = None) -> nn.Module:
    """The unpruned structure of ``spec``, freshly initialised (an export: built from ``arch_file``,
    default the export's own ``arch.yaml``)."""
    kind = spec["kind"]
    if kind == "timm":
        return timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
    if kind == "export":
        net, _ = build_from_arch_file(arch_file or Path(spec["path"]) / ARCH_FILE)
        return net
    if kind == "module":
        try:
            net = instantiate(dict(spec["config"]))
        except Exception as e:  # noqa: BLE001 - a user's own class or arguments
            raise UserError(f"model.module: {spec['config'].get('_target_')} could not be built ({e})") from None
        if not isinstance(net, nn.Module):
            raise UserError(f"model.module: {spec['config'].get('_target_')} built a {type(net).__name__}, "
                            f"not an nn.Module")
        return net
    raise ValueError(f"unknown model source {kind!r}")


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A weights file as a state dict: safetensors, or a torch file loaded with ``weights_only=True``
    (a Lightning checkpoint's ``state_dict`` is taken)."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise UserError(f"model.weights={path} does not exist; pass a local weights file (.safetensors, or a "
                        f"torch state dict .pt/.pth)")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"model.weights={path} cannot be read as weights ({first[:200]}); pass a .safetensors "
                        f"file or a torch state dict saved with torch.save(model.state_dict(), ...)") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.weights={path} holds a {type(state).__name__}, not a state dict of tensors; save "
                        f"the weights with torch.save(model.state_dict(), ...) or safetensors")
    return dict(state)


def _strip_prefix(state: dict[str, torch.Tensor], own: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` with a common wrapper prefix (``net.``, ``model.``, ``module.``) removed when that
    makes its keys the model's."""
    if set(state) == set(own):
        return state
    for prefix in ("net.", "model.", "module.", "_orig_mod."):
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if stripped and set(stripped) == set(own):
            return stripped
    return state


def load_weights(net: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` into ``net``; a file that does not fit stops naming the first mismatched key."""
    state = _strip_prefix(read_state(path), net.state_dict())
    own = net.state_dict()
    for k, v in own.items():
        if k not in state:
            raise UserError(f"model.weights={path} does not fit the model: it lacks {k} {tuple(v.shape)} "
                            f"(first of {sum(1 for kk in own if kk not in state)} missing keys); are the weights "
                            f"for another model or another number of classes?")
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(f"model.weights={path} does not fit the model: {k} is {tuple(state[k].shape)} in the file "
                            f"and {tuple(v.shape)} in the model (e.g. another number of classes: the data has "
                            f"{_classes(net)}; or another model)")
    extra = [k for k in state if k not in own]
    if extra:
        raise UserError(f"model.weights={path} does not fit the model: it has {extra[0]}, which the model lacks "
                        f"(first of {len(extra)} unexpected keys); are the weights for another model?")
    net.load_state_dict(state)
    return net


def _classes(net: nn.Module) -> str:
    return str(getattr(net, "num_classes", "?"))


def load_original(spec: Mapping[str, Any], weights: str | None) -> nn.Module:
    """The unpruned model of ``spec`` with its weights (an export's own, or ``weights``)."""
    if spec["kind"] == "export":
        if weights:
            net = build(spec)
            return load_weights(net, weights)
        return load_subnet(spec["path"])
    net = build(spec)
    if weights:
        load_weights(net, weights)
    return net


def export_meta(spec: Mapping[str, Any]) -> tuple[int | None, int | None, int | None]:
    """``(classes, resolution, in_chans)`` an export source fixes (Nones for the others)."""
    if spec["kind"] != "export":
        return None, None, None
    arch, raw = read_arch_file(Path(spec["path"]))
    return arch.num_classes, arch.resolution, int(raw.get("timm", {}).get("in_chans", 3))


def copy_source_files(spec: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """Copy what rebuilding needs beside the pruned model (an export's ``arch.yaml``); the spec as saved."""
    if spec["kind"] == "export":
        shutil.copy(Path(spec["path"]) / ARCH_FILE, folder / SOURCE_ARCH_FILE)
        return {"kind": "export", "arch_file": SOURCE_ARCH_FILE}
    return dict(spec)


__all__ = ["SOURCE_ARCH_FILE", "WEIGHTS_FILE", "build", "copy_source_files", "export_meta", "load_original",
           "load_weights", "read_state", "source_spec"]
