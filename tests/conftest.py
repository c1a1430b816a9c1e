"""Shared fixtures: an isolated environment for every test, and one tiny end-to-end search per session.

Every test runs with ``HWNAS_CACHE`` / ``HWNAS_OUTPUTS`` in its own temporary folders and W&B
disabled, so nothing reads or writes ``~/.cache/hwnas``, ``outputs/`` or the network. Tests that run
the apps ask for ``shared_cache`` instead, a session-wide latency-table cache: ``smoke_search`` first
builds a quick table into it with ``nas-lut`` (fixed 5 repeats instead of the adaptive measurement,
which takes minutes on a loaded machine), and every later search reuses it (timing options such as
``hardware.repeats`` are not part of a table's device fingerprint).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def _isolate(mp: pytest.MonkeyPatch, cache: Path, outputs: Path) -> None:
    mp.setenv("HWNAS_CACHE", str(cache))
    mp.setenv("HWNAS_OUTPUTS", str(outputs))
    for var in [v for v in os.environ if v.startswith("WANDB_")]:
        mp.delenv(var)
    mp.setenv("WANDB_MODE", "disabled")
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("HYDRA_FULL_ERROR", raising=False)  # error tests look at Hydra's short reports


@pytest.fixture(autouse=True)
def hwnas_env(monkeypatch, tmp_path_factory):
    """Every test: its own latency-table cache and outputs root, W&B disabled."""
    _isolate(monkeypatch, tmp_path_factory.mktemp("hwnas-cache"), tmp_path_factory.mktemp("hwnas-outputs"))


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hwnas-shared-cache")


@pytest.fixture
def shared_cache(monkeypatch, shared_cache_dir) -> Path:
    """Point ``HWNAS_CACHE`` at the session's latency-table cache (filled by ``smoke_search``)."""
    monkeypatch.setenv("HWNAS_CACHE", str(shared_cache_dir))
    return shared_cache_dir


@dataclass
class SmokeSearch:
    run: AppRun
    run_dir: Path
    export: Path


@pytest.fixture(scope="session")
def smoke_search(tmp_path_factory, shared_cache_dir) -> SmokeSearch:
    """ONE tiny ``nas-search`` on digits (ProxylessNAS, CPU latency) for the whole session; tests
    reuse its export folder and must not modify it (copy it first)."""
    root = tmp_path_factory.mktemp("smoke")
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, shared_cache_dir, root / "outputs")
        lut = run_app("nas.apps.lut", *TINY_LUT, f"hydra.run.dir={root / 'lut'}")
        assert lut.returncode == 0, lut.describe()
        run_dir = root / "search"
        run = run_app("nas.apps.search", *TINY_SEARCH, f"hydra.run.dir={run_dir}")
    assert run.returncode == 0, run.describe()
    export = run_dir / "export"
    assert export.is_dir(), run.describe()
    return SmokeSearch(run=run, run_dir=run_dir, export=export)
