"""Lightning progress callbacks of the apps (``progress=auto|rich|plain|tqdm|none``).

Classes at module level, so that a Trainer's callbacks pickle (``trainer=ddp_spawn``).
"""
from __future__ import annotations

import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from nas.console import PLAIN_EVERY, eta, fmt_seconds, log_only, resolve_progress


def _without_version(metrics: dict) -> dict:
    metrics.pop("v_num", None)  # the logger's version number, not a metric
    return metrics


def _fmt(v: Any) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{v:.4g}"


def epoch_metrics(metrics: dict) -> dict[str, Any]:
    """The metrics worth a line at an epoch's end: ``*_epoch`` under their plain name, no ``*_step``."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if k == "v_num" or k.endswith("_step"):
            continue
        out[k[: -len("_epoch")] if k.endswith("_epoch") else k] = v
    return out


def epoch_line(trainer: pl.Trainer, metrics: dict, elapsed: float, epochs_done: int) -> str:
    """``epoch 3/12  train/loss 2.31  val/acc 0.412  | 1 min 02 s, about 3 min 10 s left``."""
    total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    head = f"epoch {trainer.current_epoch + 1}" + (f"/{total}" if total else "")
    body = "  ".join(f"{k} {_fmt(v)}" for k, v in epoch_metrics(metrics).items())
    tail = fmt_seconds(elapsed)
    if total:
        tail += ", " + (eta(epochs_done, total, elapsed) if epochs_done < total else "done")
    return f"{head}  {body}  | {tail}" if body else f"{head}  | {tail}"


class QuietRichProgressBar(RichProgressBar):
    """Lightning's rich bar without the logger's version number; each epoch's metrics also go to the
    run log as one plain line (the bar itself is a live display a log file cannot hold)."""

    def get_metrics(self, trainer, pl_module):
        return _without_version(super().get_metrics(trainer, pl_module))

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._fit_start = time.perf_counter()
        self._first_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.is_global_zero:
            done = trainer.current_epoch + 1 - self._first_epoch
            log_only(epoch_line(trainer, self.get_metrics(trainer, pl_module), time.perf_counter() - self._fit_start,
                                done))


class QuietTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar without the logger's version number."""

    def get_metrics(self, trainer, pl_module):
        return _without_version(super().get_metrics(trainer, pl_module))


class PlainProgressBar(ProgressBar):
    """Plain lines for a pipe, a file or a cluster log: one per epoch (epoch, metrics, elapsed,
    estimate), and inside a long epoch one every ``every`` seconds (step / steps)."""

    def __init__(self, every: float = PLAIN_EVERY) -> None:
        super().__init__()
        self.every = float(every)
        self._enabled = True
        self._fit_start = 0.0
        self._last = 0.0
        self._first_epoch = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, line: str) -> None:
        print(line, file=sys.stdout, flush=True)
        self._last = time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self._fit_start = self._last = time.perf_counter()
        self._first_epoch = trainer.current_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not (self._enabled and trainer.is_global_zero) or time.perf_counter() - self._last < self.every:
            return
        steps = self.total_train_batches
        of = f"/{steps}" if isinstance(steps, int) else ""
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        body = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        self._print(f"epoch {trainer.current_epoch + 1} step {batch_idx + 1}{of}  {body}  | "
                    f"{fmt_seconds(time.perf_counter() - self._fit_start)}")

    def on_train_epoch_end(self, trainer, pl_module):
        if not (self._enabled and trainer.is_global_zero):
            return
        done = trainer.current_epoch + 1 - self._first_epoch
        self._print(epoch_line(trainer, self.get_metrics(trainer, pl_module), time.perf_counter() - self._fit_start,
                               done))


def progress_callbacks(kind: str) -> list:
    """The progress callback for ``kind`` (``auto`` resolved here: rich on a terminal, else plain)."""
    kind = resolve_progress(kind)
    if kind == "rich":
        return [QuietRichProgressBar(leave=True)]
    if kind == "tqdm":
        return [QuietTQDMProgressBar()]
    if kind == "plain":
        return [PlainProgressBar()]
    return []
