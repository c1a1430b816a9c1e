"""One export folder per derived architecture, and loading it back as a plain timm EfficientNet.

Folder layout::

    arch.yaml           schema_version, space, fingerprint, resolution, classes, choices, arch_def, timm kwargs
    model.safetensors   inherited weights (BatchNorm recalibrated)
    model.onnx          the same net, batch dimension dynamic
    report.json         latency (predicted / measured), params, FLOPs, accuracy, search cost
    *.png               plots (architecture probabilities over epochs, ...)

A folder is written complete into a temporary sibling and renamed into place; an existing folder of
the same name is kept as ``<name>.prev``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nas.errors import UserError
from nas.io import export_onnx, usual_modes
from nas.latency.analytic import count_flops
from supernets.arch import Arch, ArchError
from supernets.blocks import SE_LAYER_DESC, build_timm_net
from supernets.space import SearchSpace

ARCH_FILE = "arch.yaml"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
REPORT_FILE = "report.json"


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` over ``loader`` (eval mode)."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    if total == 0:
        raise UserError("the evaluation split is empty; use a larger dataset or a smaller arch_fraction")
    return correct / total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_model_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    return count_flops(model, input_shape)


def timm_kwargs(space: SearchSpace) -> dict[str, Any]:
    """The ``timm.models.EfficientNet`` arguments besides the arch_def (``se_layer`` spelled out for spaces
    with squeeze-excite: :func:`supernets.blocks.build_timm_net` always builds it)."""
    out = {"stem_size": space.stem_chs, "num_features": space.head_chs, "act_layer": space.act,
           "in_chans": space.in_chans}
    if space.has_se:
        out["se_layer"] = SE_LAYER_DESC
    return out


def write_export(out_dir: str | os.PathLike, *, space: SearchSpace, arch: Arch, model: nn.Module,
                 report: Mapping[str, Any], plots: Mapping[str, Callable[[Path], None]] | None = None,
                 onnx: bool = True) -> Path:
    """Write one export folder atomically (see the module docstring). ``plots`` maps a PNG file
    name to a function that draws it at the given path."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model = model.eval().cpu()
        (tmp / ARCH_FILE).write_text(
            arch.to_yaml(space.arch_def(arch), extra={"timm": timm_kwargs(space)}))
        save_weights(model, tmp / WEIGHTS_FILE, arch)
        files = [ARCH_FILE, WEIGHTS_FILE]
        if onnx:
            x = torch.zeros(1, space.in_chans, arch.resolution, arch.resolution)
            export_onnx(model, x, str(tmp / ONNX_FILE), dynamic_batch=True)
            files.append(ONNX_FILE)
        for name, draw in (plots or {}).items():
            try:
                draw(tmp / name)
                files.append(name)
            except Exception as e:  # noqa: BLE001 - a plot must never cost the export
                print(f"warning: plot {name} failed: {e}")
        full = dict(report)
        full["files"] = files + [REPORT_FILE]
        (tmp / REPORT_FILE).write_text(json.dumps(full, indent=2, default=_json_default))
        usual_modes(tmp)  # mkdtemp's folder is 0700 and safetensors writes 0600
        if out_dir.exists():
            prev = out_dir.with_name(out_dir.name + ".prev")
            if prev.exists():
                shutil.rmtree(prev)
            os.replace(out_dir, prev)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _json_default(o):
    if isinstance(o, (torch.Tensor,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, Arch):
        return dict(o.choices)
    return str(o)


def read_arch_file(path: str | os.PathLike) -> tuple[Arch, dict[str, Any]]:
    """The :class:`Arch` of an ``arch.yaml`` (or an export folder) and the file's raw mapping."""
    path = Path(path)
    if path.is_dir():
        path = path / ARCH_FILE
    if not path.exists():
        raise UserError(f"no architecture file at {path}; pass an export folder written by nas-search "
                        f"(it holds {ARCH_FILE}), e.g. arch=outputs/search/<date>/<time>/export")
    try:
        raw = yaml.safe_load(path.read_text())
        return Arch.from_dict(raw), raw
    except (ArchError, yaml.YAMLError) as e:
        raise UserError(f"{path}: {e}") from None


def load_arch(path: str | os.PathLike, space: SearchSpace | None = None) -> Arch:
    arch, _ = read_arch_file(path)
    if space is not None:
        try:
            space.validate(arch)
        except ArchError as e:
            raise UserError(f"{path}: {e}") from None
    return arch


def build_from_arch_file(path: str | os.PathLike) -> tuple[nn.Module, Arch]:
    """A freshly initialised timm EfficientNet for the architecture in ``path``."""
    arch, raw = read_arch_file(path)
    if "arch_def" not in raw or "timm" not in raw:
        raise UserError(f"{path}: lacks 'arch_def' or 'timm'; re-export it with nas-search")
    t = raw["timm"]
    try:
        net = build_timm_net(raw["arch_def"], stem_chs=int(t["stem_size"]), head_chs=int(t["num_features"]),
                             num_classes=arch.num_classes, act=str(t.get("act_layer", "relu6")),
                             in_chans=int(t.get("in_chans", 3)))
    except Exception as e:  # noqa: BLE001 - malformed arch_def from a hand-edited file
        raise UserError(f"{path}: its arch_def cannot be built by timm ({e}); re-export it with nas-search") from None
    return net, arch


def save_weights(model: nn.Module, path: str | os.PathLike, arch: Arch) -> None:
    """``model``'s state as safetensors, tagged with the space and fingerprint of ``arch`` (checked
    on loading: weights beside the ``arch.yaml`` of another export are refused before torch sees them)."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "pt", "space": arch.space, "fingerprint": arch.fingerprint})


def load_weights(net: nn.Module, wpath: str | os.PathLike, arch: Arch, arch_file: str | os.PathLike) -> None:
    """Load ``wpath`` into ``net`` (built from ``arch_file``), refusing with one line a file that is not
    a complete safetensors file, was saved for another space (its fingerprint), or does not fit the net."""
    wpath = Path(wpath)
    if not wpath.is_file():
        raise UserError(f"no weights at {wpath}; pass a complete export folder written by nas-search")
    redo = "copy the export folder again, or re-export it with nas-search"
    try:
        with safe_open(str(wpath), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{wpath} is damaged or not a safetensors file ({e}); {redo}") from None
    saved = meta.get("fingerprint")
    if saved and arch.fingerprint and saved != arch.fingerprint:
        raise UserError(f"{wpath} holds weights of space {meta.get('space', '?')!r} (fingerprint {saved}), but "
                        f"{arch_file} describes space {arch.space!r} (fingerprint {arch.fingerprint}): the two files "
                        f"come from different exports; keep each export's {ARCH_FILE} and {WEIGHTS_FILE} together")
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        what = "; ".join(part for part in (
            f"shapes differ: {', '.join(wrong[:3])}" if wrong else "",
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {unexpected[:3]}" if unexpected else "") if part)
        raise UserError(f"{wpath} does not fit the network of {arch_file} ({what}); the two files come from "
                        f"different exports; {redo}")
    net.load_state_dict(state)


def load_subnet(export_dir: str | os.PathLike) -> nn.Module:
    """The exported network: a plain ``timm.models.EfficientNet`` with the saved weights, in eval mode
    (to train it, put it in ``train()``: :class:`nas.training.RetrainModule` does)."""
    export_dir = Path(export_dir)
    net, arch = build_from_arch_file(export_dir)
    load_weights(net, export_dir / WEIGHTS_FILE, arch, export_dir / ARCH_FILE)
    return net.eval()
