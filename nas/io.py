"""Files: atomic writes (temp file + rename, mode 644), JSON of numpy values, and ONNX export."""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn


def json_default(o: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays, tuples, sets, paths."""
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it onto ``path``.

    Readers never see a half-written file, and an interrupted write leaves the old file in place.
    The file gets the usual permissions (0644 under the default umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def usual_modes(path: str | os.PathLike) -> Path:
    """Give ``path`` (a file, or a folder and everything in it) the usual permissions: 0644 files and
    0755 folders under the default umask (``mkdtemp`` makes 0700 folders, safetensors 0600 files)."""
    path = Path(path)
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(data, indent=1, default=json_default) + "\n")




def export_onnx(model: nn.Module, x: torch.Tensor, path: str, *, opset: int | None = None,
                dynamic_batch: bool = False) -> None:
    """Export ``model`` at example input ``x`` to ``path`` (input ``input``, output ``logits``).

    Uses the fast TorchScript exporter (``dynamo=False``) where this torch has it and falls back to
    the default (dynamo) exporter, which needs ``onnxscript``.
    """
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"]}
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            extra = {"dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}} if dynamic_batch else {}
            torch.onnx.export(model, (x,), path, dynamo=False, **kwargs, **extra)
            return
        except Exception:  # noqa: BLE001 - no `dynamo` argument, legacy exporter gone or failed
            pass
        if os.path.exists(path):
            os.remove(path)
        extra = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamic_batch else {}
        torch.onnx.export(model, (x,), path, verbose=False, **kwargs, **extra)
