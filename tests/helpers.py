"""What several test modules share: the tiny space, a tiny in-memory data module, the apps as subprocesses."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from nas.latency.table import LatencyTable

REPO = Path(__file__).resolve().parents[1]

#: Hardware timing small enough for tests (the table's device fingerprint does not depend on it), and
#: one thread: on a shared 2-core machine two spinning OpenMP threads per process slow everything down.
TINY_HARDWARE = ("hardware.repeats=5", "hardware.warmup=2", "hardware.threads=1")
#: ``nas-lut``: a quick table for the tiny search, written into the cache nas-search reads.
TINY_LUT = (*TINY_HARDWARE, "measure.rel_ci=null", "measure.calib_nets=6", "validate=false", "progress=none")
#: A search of a few seconds on digits: 2 epochs (1 warm-up), 2 BatchNorm calibration batches.
TINY_SEARCH = ("strategy.epochs=2", "strategy.module.warmup_epochs=1", *TINY_HARDWARE, "progress=none",
               "export.calib_batches=2")


@dataclass
class AppRun:
    """One finished run of an app in a subprocess."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        return (f"$ {' '.join(self.args)}\nexit {self.returncode} after {self.seconds:.1f} s\n"
                f"--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}")


def run_app(module: str, *overrides: str, timeout: float = 600) -> AppRun:
    """``python -m <module> <overrides...>`` (``nas.apps.search`` / ``nas.apps.retrain``) from the repository,
    with the current process's environment (so the isolation fixtures apply). Torch's default thread
    count is 1 there (as ``hardware.threads`` in TINY_HARDWARE; retraining has no such option)."""
    args = [sys.executable, "-m", module, *overrides]
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return AppRun(args, proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)


#: A tiny space (16x16 input, 4 searchable layers) for fast supernet and strategy tests.
TINY = {
    "name": "tiny",
    "resolution": 16,
    "stem": {"channels": 8, "stride": 2},
    "first": {"channels": 8, "kernel": 3},
    "stages": [{"channels": 16, "layers": 2, "stride": 2}, {"channels": 16, "layers": 2, "stride": 1}],
    "ops": ["k3_e3", "k5_e3", "k3_e6"],
    "zero": True,
    "head": {"channels": 32},
}


class TinyData:
    """A tiny in-memory data module with the interface strategies use."""

    def __init__(self, n=48, classes=4, res=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, res, res, generator=g)
        self.y = torch.randint(classes, (n,), generator=g)
        self.num_classes = classes

    def _dl(self, shuffle):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16, shuffle=shuffle)

    def train_dataloader(self):
        return self._dl(True)

    def arch_dataloader(self):
        return self._dl(True)

    def val_dataloader(self):
        return self._dl(False)

    def calib_dataloader(self, batches):
        n = min(batches * 16, len(self.y))  # the first images, in order, like the data modules' fixed subset
        return DataLoader(TensorDataset(self.x[:n], self.y[:n]), batch_size=16, shuffle=False)


def random_table(space, seed: int = 0, low: float = 0.1, fixed: float = 0.5):
    """A latency table of made-up per-candidate costs in ``[low, 1]`` ms (``zero`` costs nothing)."""
    rng = random.Random(seed)
    costs = {l.name: [0.0 if op == "zero" else rng.uniform(low, 1.0) for op in l.choices] for l in space.layers}
    return LatencyTable(space, costs, fixed, {"reference_ms": 1.0})
