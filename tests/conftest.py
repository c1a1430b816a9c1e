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
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig

from tests.helpers import TINY_LUT, TINY_SEARCH, AppRun, run_app


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


@pytest.fixture(autouse=True)
def no_hydra_context_leak():
    """A test that sets Hydra's job context (``HydraConfig.instance().set_config``) must not hand it to the
    next: the apps take their run folder from it (a later nas-lut test wrote into another test's folder)."""
    yield
    HydraConfig.instance().cfg = None


@pytest.fixture(scope="module")
def one_thread():
    """Torch in this process on one thread (tiny nets on a shared 2-core machine: two spinning OpenMP
    threads are several times slower than one), for a whole module (its module-scoped fixtures included);
    the count is restored afterwards. Test modules ask for it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
