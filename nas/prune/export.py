"""A pruned model's folder, and loading it back without pickle.

Folder layout::

    prune.json          schema_version, the source model (timm name + kwargs, an export's arch file, or a
                        _target_ config), input shape, ignored layers, the plan (channels kept per group),
                        the kept channel indices per pruned layer, and Torch-Pruning's pruning history
    source_arch.yaml    (an hwnas export as the source) the unpruned architecture
    model.safetensors   the pruned weights
    model.onnx          the same net, batch dimension dynamic
    report.json         latency predicted (by the search) and measured against the target, params, FLOPs,
                        accuracy before and after, kept channels per layer

:func:`load_pruned` rebuilds the original structure from ``prune.json``, redoes the pruning history on it
and loads the safetensors: plain JSON and tensors, nothing unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from nas.errors import UserError
from nas.io import export_onnx, json_default, usual_modes, write_json
from nas.prune.graph import replay
from nas.prune.source import SOURCE_ARCH_FILE, build, copy_source_files

PRUNE_FILE = "prune.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
REPORT_FILE = "report.json"
SCHEMA_VERSION = 1


def kept_indices(history: Sequence[Sequence[Any]], channels: Mapping[str, int]) -> dict[str, list[int]]:
    """``{root layer: indices (of the original's channels) it keeps}`` from a pruning history."""
    kept = {}
    for name, out, idxs in history:
        if out and name in channels:
            gone = set(int(i) for i in idxs)
            kept[name] = [i for i in range(channels[name]) if i not in gone]
    return kept


def write_pruned(out_dir: str | os.PathLike, *, net: nn.Module, spec: Mapping[str, Any],
                 input_shape: Sequence[int], ignore: Sequence[str], plan: Mapping[str, int],
                 channels: Mapping[str, int], history: list, report: Mapping[str, Any], onnx: bool = True) -> Path:
    """Write one pruned model's folder atomically (temp sibling + rename; an old one is replaced).
    ``channels``: every group's channel count in the unpruned model; ``plan``: how many it keeps."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        net = net.eval().cpu()
        source = copy_source_files(spec, tmp)
        meta = {"schema_version": SCHEMA_VERSION, "source": source, "input_shape": [int(s) for s in input_shape],
                "ignore": list(ignore), "plan": {k: int(v) for k, v in plan.items()},
                "channels": {k: int(v) for k, v in channels.items()},
                "kept": kept_indices(history, channels), "history": history}
        (tmp / PRUNE_FILE).write_text(json.dumps(meta, indent=1, default=json_default) + "\n")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        if onnx:
            export_onnx(net, torch.zeros(1, *input_shape), str(tmp / ONNX_FILE), dynamic_batch=True)
        write_json(tmp / REPORT_FILE, report)
        usual_modes(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def pruned_structure(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The pruned structure of ``folder`` (fresh weights) and its ``prune.json``."""
    folder = Path(folder)
    file = folder / PRUNE_FILE
    if not file.is_file():
        raise UserError(f"{folder} is not a pruned model's folder (no {PRUNE_FILE}); pass a folder written by "
                        f"nas-prune, <run>/export/<label>")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON ({e}); copy the folder again") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{file} has schema_version {meta.get('schema_version')!r}; this hwnas reads "
                        f"{SCHEMA_VERSION}")
    src = meta["source"]
    net = build(src, arch_file=folder / src["arch_file"]) if src["kind"] == "export" else build(src)
    replay(net, torch.zeros(1, *meta["input_shape"]), meta["history"], meta.get("ignore", ()))
    return net, meta


def load_pruned(folder: str | os.PathLike) -> nn.Module:
    """The pruned model of a ``nas-prune`` export folder, weights loaded, in eval mode."""
    folder = Path(folder)
    net, _ = pruned_structure(folder)
    state = load_file(str(folder / WEIGHTS_FILE))
    own = net.state_dict()
    bad = [k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
    if bad or len(state) != len(own):
        k = bad[0] if bad else next(k for k in state if k not in own)
        raise UserError(f"{folder / WEIGHTS_FILE} does not fit the structure of {folder / PRUNE_FILE} (first: {k}); "
                        f"keep a pruned folder's files together")
    net.load_state_dict(state)
    return net.eval()


__all__ = ["PRUNE_FILE", "SOURCE_ARCH_FILE", "kept_indices", "load_pruned", "pruned_structure", "write_pruned"]
