"""ONNX export shared by the onnxruntime device and the export folder."""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn as nn


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
