"""A latency table that failed its own check is never used without the user's say.

Fast tests run :func:`trust_problems` and :func:`load_or_build_table` on hand-made tables (the build
replaced by a function that returns one); the slow test builds a real table while two busy-loop
processes, started and stopped by the test, load the machine.
"""
from __future__ import annotations

import math
import random
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from nas.apps.common import CONF_DIR, user_errors
from nas.apps.search import run_search
from nas.errors import UserError
from nas.latency import build as build_mod
from nas.latency.build import (
    load_or_build_table,
    rejected_path,
    table_path,
    trust_problems,
)
from nas.latency.devices import build_device
from nas.latency.items import table_items
from nas.latency.table import LatencyTable
from supernets.space import SearchSpace

TINY = {
    "name": "tiny", "resolution": 16, "in_chans": 3, "act": "relu6",
    "stem": {"channels": 8, "stride": 2}, "first": {"channels": 8, "kernel": 3},
    "stages": [{"channels": 16, "layers": 2, "stride": 2}],
    "ops": ["k3_e3", "k5_e3"], "zero": True, "head": {"channels": 32},
}
BAR = {"within_10pct": 0.95, "spearman": 0.95}


def hand_table(space: SearchSpace, num_classes: int = 10, **meta) -> LatencyTable:
    """Made-up entries (entry ms grows with its position); ``meta`` as a build would leave it."""
    items = table_items(space, num_classes)
    entries = {k: {"median_ms": 0.1 * (i + 1), "ratio": 0.5 * (i + 1), "spread": 0.01, "count": 5,
                   "role": v["role"], "fields": v["fields"]} for i, (k, v) in enumerate(items.items())}
    fixed = {v["role"]: k for k, v in items.items() if v["role"] != "block"}
    base = {"device": "cpu", "device_fingerprint": "aaaaaaaaaaaa", "num_classes": num_classes, "reference_ms": 0.2,
            "build_seconds": 0.0}
    return LatencyTable.from_entries(space, entries, fixed, {"model": "scale_offset", "scale": 1.0,
                                                             "per_block_ms": 0.0, "offset_ms": 0.05},
                                     {**base, **meta})


def validation(within: float, spearman: float, n: int = 22) -> dict:
    return {"n": n, "within_10pct": within, "spearman": spearman, "rmse_pct": 5.0}


# --------------------------------------------------------------------------- trust_problems
def test_a_table_meeting_its_bar_has_no_problems():
    t = hand_table(SearchSpace.from_dict(TINY), validation=validation(0.97, 0.99),
                   method={"clean_fraction": 0.93})
    assert trust_problems(t, BAR) == []


def test_validation_below_the_bar_is_a_problem_naming_the_numbers():
    t = hand_table(SearchSpace.from_dict(TINY), validation=validation(0.32, 0.153))
    (problem,) = trust_problems(t, BAR)
    assert "22 subnets" in problem and "32% within +-10%" in problem and "Spearman 0.15" in problem
    assert "(95%, 0.95)" in problem
    # either number alone fails it
    assert trust_problems(hand_table(SearchSpace.from_dict(TINY), validation=validation(0.97, 0.5)), BAR)
    assert trust_problems(hand_table(SearchSpace.from_dict(TINY), validation=validation(0.5, 0.99)), BAR)


def test_a_validation_that_cannot_rank_fails():
    t = hand_table(SearchSpace.from_dict(TINY), validation=validation(1.0, math.nan))
    assert len(trust_problems(t, BAR)) == 1


def test_mostly_interrupted_measurement_fails_whatever_the_bar():
    t = hand_table(SearchSpace.from_dict(TINY), method={"clean_fraction": 0.3})
    (problem,) = trust_problems(t, None)
    assert "interrupted 70% of its timed calls" in problem
    assert trust_problems(hand_table(SearchSpace.from_dict(TINY), method={"clean_fraction": 0.6}), None) == []


def test_an_exact_count_or_an_unvalidated_table_has_no_bar_to_fail():
    assert trust_problems(hand_table(SearchSpace.from_dict(TINY)), BAR) == []
    assert trust_problems(hand_table(SearchSpace.from_dict(TINY), validation=validation(0.1, 0.1)), None) == []


# --------------------------------------------------------------------------- the stop (a faked build)
@pytest.fixture
def fake_build(monkeypatch):
    """``build_latency_table`` returns a hand-made table below the cpu bar and counts its calls."""
    calls = []

    def build(space, device, num_classes, **kw):
        calls.append(space.name)
        return hand_table(space, num_classes, validation=validation(0.14, 0.21))

    monkeypatch.setattr(build_mod, "build_latency_table", build)
    return calls


def test_untrusted_build_stops_with_one_line_and_is_not_cached(fake_build, tmp_path):
    space, device = SearchSpace.from_dict(TINY), build_device("cpu", threads=1)
    logged = []
    with pytest.raises(UserError) as err:
        load_or_build_table(space, device, 10, tmp_path, validate_samples=0, progress=False, log=logged.append)
    msg = str(err.value)
    assert "\n" not in msg and "not trustworthy" in msg and "14% within +-10%" in msg
    assert "`lut.rebuild=true`" in msg and "`lut.accept_untrusted=true`" in msg
    path = table_path(tmp_path, space, device, 10)
    assert not path.exists(), "an untrusted table was cached"
    assert rejected_path(path).exists() and str(rejected_path(path)) in msg

    # accepted: the table just built is used (not built again), with a warning, and cached
    table = load_or_build_table(space, device, 10, tmp_path, validate_samples=0, progress=False,
                                log=logged.append, accept_untrusted=True)
    assert fake_build == ["tiny"]
    assert any(m.startswith("warning: using latency table") and "lut.accept_untrusted=true" in m for m in logged)
    assert table.meta["untrusted"] and path.exists() and not rejected_path(path).exists()
    # ... and a later run that does not accept it stops again
    with pytest.raises(UserError, match="lut.accept_untrusted=true"):
        load_or_build_table(space, device, 10, tmp_path, validate_samples=0, progress=False, log=logged.append)


def test_an_untrusted_table_given_as_lut_path_stops(tmp_path):
    space, device = SearchSpace.from_dict(TINY), build_device("cpu", threads=1)
    file = hand_table(space, validation=validation(0.14, 0.21),
                      device_fingerprint=device.fingerprint_id()).save(tmp_path / "t.json")
    with pytest.raises(UserError, match="lut.rebuild=true.*lut.accept_untrusted=true"):
        device.cost_model(space, 10, path=str(file), progress=False, log=lambda m: None)
    logged = []
    device.cost_model(space, 10, path=str(file), progress=False, log=logged.append, accept_untrusted=True)
    assert any("warning: using latency table" in m for m in logged)


def test_ctrl_c_during_a_build_caches_nothing_and_prints_one_line(monkeypatch, tmp_path, capsys):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "build_latency_table", interrupted)
    space, device = SearchSpace.from_dict(TINY), build_device("cpu", threads=1)

    @user_errors
    def app(cfg):
        return load_or_build_table(space, device, 10, tmp_path, progress=False, log=print)

    with pytest.raises(SystemExit) as exit_:
        app(None)
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted (Ctrl-C) while building the latency table")
    assert "nothing was cached" in err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


# --------------------------------------------------------------------------- a real build under load
def _search_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("search", overrides=[
            "hardware=cpu", "hardware.threads=1", "hardware.warmup=2", "hardware.repeats=5", "progress=none",
            "logger=none", "strategy.epochs=1", "strategy.module.warmup_epochs=0", "export.calib_batches=1",
            "export.onnx=false", "resume=never", "strategy.targets=[0.95]", f"lut.cache_dir={tmp_path / 'cache'}",
            f"export.dir={tmp_path / 'run' / 'export'}", *overrides])
    with open_dict(cfg):
        cfg.space = OmegaConf.create(TINY)
    return cfg


@pytest.mark.slow
def test_a_table_built_under_load_stops_the_search(tmp_path, capsys):
    """Two busy loops per core run while the table is built and validated; the search stops before
    training with one line, caches nothing; with lut.accept_untrusted=true it proceeds with a warning."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    try:
        time.sleep(1.0)
        with pytest.raises(SystemExit) as exit_:
            user_errors(run_search)(_search_cfg(tmp_path))
    finally:
        for p in busy:
            p.kill()
            p.wait()
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, out + err
    assert err.count("\n") == 1 and err.startswith("error: the latency table just built"), err
    assert "`lut.rebuild=true`" in err and "`lut.accept_untrusted=true`" in err
    cached = [p for p in (tmp_path / "cache").rglob("*.json")]
    assert [p.name.endswith(".rejected.json") for p in cached] == [True], cached
    assert not (tmp_path / "run" / "export").exists()

    value = run_search(_search_cfg(tmp_path, "lut.accept_untrusted=true"))
    out = capsys.readouterr().out
    assert "warning: using latency table" in out and "building latency table" not in out
    assert (tmp_path / "run" / "export" / "report.json").exists() and 0.0 <= value <= 1.0


def test_a_table_predicting_a_non_positive_latency_is_untrusted():
    """Seen under load: an overhead fit with a large negative offset made the smallest net -1.8 ms, and
    every target then looked reachable."""
    space = SearchSpace.from_dict(TINY)
    ok = hand_table(space)
    assert ok.bounds()[0] > 0 and trust_problems(ok, None) == []
    broken = ok.with_overhead({"model": "scale_offset", "scale": 1.0, "per_block_ms": 0.0, "offset_ms": -50.0})
    lo = broken.bounds()[0]
    assert lo < 0
    (problem,) = trust_problems(broken, None)
    assert "for the smallest subnet" in problem and f"{lo:.3g}" in problem


def test_ctrl_c_while_nas_search_builds_its_table(tmp_path):
    """A real SIGINT to ``nas-search`` once it announces the table build: one line, exit 130, no table
    (nor a temporary file) left in the cache."""
    repo = Path(__file__).resolve().parents[2]
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HWNAS_CACHE": str(cache)}
    # a suite started in the background (`make test &`) inherits SIGINT ignored, and Python then installs no
    # Ctrl-C handler: the child gets the default disposition, as a user's terminal gives it
    proc = subprocess.Popen([sys.executable, "-m", "nas.apps.search", "hardware.threads=1", "progress=none",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:
            if line.startswith("building latency table"):
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    assert err.count("\n") == 1 and err.startswith("interrupted (Ctrl-C) while building the latency table"), err
    assert "nothing was cached" in err
    assert not [p for p in cache.rglob("*") if p.is_file()]


# --------------------------------------------------------------------------- speed states
def test_groups_in_two_speed_states_are_detected_and_refused():
    """The failure seen here: within each group of 8 nets the ratio to the prediction is constant, but
    groups alternate between ~1.0x and ~2.0x. Spearman inside groups stays high, so only the group
    medians show it; a steady measurement with 5 % noise is not flagged."""
    from nas.latency.validate import STATE_SPLIT_MAX, state_split, validate_measured

    rng = np.random.default_rng(0)
    space = SearchSpace.from_dict(TINY)
    t = hand_table(space)
    archs = [("random", space.sample(10, random.Random(i))) for i in range(32)]
    predicted = np.array([t.predict(a) for _, a in archs])
    states = np.repeat([1.0, 2.05, 0.98, 2.1], 8)  # group by group
    split_meas = predicted * states * rng.uniform(0.97, 1.03, 32)
    steady = predicted * rng.uniform(0.95, 1.05, 32)
    sp = state_split(predicted, split_meas)
    assert sp["split"] and sp["spread"] > 2.0 and len(sp["group_medians"]) == 4
    ok = state_split(predicted, steady)
    assert not ok["split"] and ok["spread"] < STATE_SPLIT_MAX
    assert state_split(predicted[:5], split_meas[:5]) is None  # one group: nothing to compare
    # validation records it, the trust check refuses the table naming the groups' range
    report = validate_measured(t, archs, list(split_meas), list(steady), update_meta=True)
    s = report["summary"]
    assert s["state_split"]["vs_table"]["split"] and s["state_split"]["retest"]["split"]
    problems = trust_problems(t, None)
    assert len(problems) == 2 and "different speed states" in problems[0] and "hardware.threads=1" in problems[0]
    validate_measured(t, archs, list(steady), list(steady * rng.uniform(0.98, 1.02, 32)), update_meta=True)
    assert trust_problems(t, None) == []
