"""The GPU check (``launch/gpu_check.sh``, ``nas.bench.gpu_check``) on a machine without a GPU: its
failure handling and summary, the steps that run in-process, and (slow) the whole dry run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from nas.apps.common import CONF_DIR, command_line_error
from nas.bench import gpu_check as gc
from nas.export import WEIGHTS_FILE, write_export
from supernets.blocks import space_timm_net
from supernets.space import SearchSpace
from tests.helpers import REPO, TINY


def _check(tmp_path, dry_run: bool = True) -> gc.Check:
    return gc.Check(out=tmp_path / "check", settings=gc.Settings.make(dry_run, bf16=False))


def _ok(value):
    return lambda check: {"value": value}


def _fail(check):
    raise gc.CheckFailed("the table is empty")


def _crash(check):
    raise RuntimeError("CUDA error: an illegal memory access\nmore lines\nof detail")


def test_first_failure_stops_with_one_line_and_keeps_what_passed(tmp_path):
    check, lines, ran = _check(tmp_path), [], []
    plan = [gc.Step("first", "passes", _ok(1)), gc.Step("second", "fails", _fail),
            gc.Step("third", "never runs", lambda c: ran.append(1) or {})]
    assert gc.run_check(check, plan, log=lines.append) == gc.EXIT_FAILED
    assert not ran
    assert "gpu check FAILED at step second: the table is empty" in lines
    data = json.loads((check.out / "gpu_check.json").read_text())
    assert data["status"] == "FAILED" and data["reason"] == "gpu check FAILED at step second: the table is empty"
    assert [(s["step"], s["status"]) for s in data["steps"]] == [("first", "passed"), ("second", "FAILED")]
    assert data["results"] == {"first": {"value": 1}}
    md = (check.out / "gpu_check.md").read_text()
    assert "| first | passed |" in md and "| second | FAILED |" in md and "third" not in md.split("On a GPU")[0]


def test_a_crash_inside_a_step_is_reported_in_one_line(tmp_path):
    check, lines = _check(tmp_path), []
    assert gc.run_check(check, [gc.Step("weight_step", "crashes", _crash)], log=lines.append) == gc.EXIT_FAILED
    assert lines[-2] == "gpu check FAILED at step weight_step: RuntimeError: CUDA error: an illegal memory access"


def test_unmet_goal_runs_every_step_and_exits_3(tmp_path):
    check, lines = _check(tmp_path, dry_run=False), []
    plan = [gc.Step("lut_b1", "slow table", lambda c: {"goal": {"what": "within +-10% >= 80%", "met": False}}),
            gc.Step("retrain", "fine", lambda c: {"goal": {"what": "learns", "met": True}})]
    assert gc.run_check(check, plan, log=lines.append) == gc.EXIT_GOALS
    data = json.loads((check.out / "gpu_check.json").read_text())
    assert data["status"] == "passed, goals NOT met: lut_b1"
    assert "NOT met: within +-10% >= 80%" in (check.out / "gpu_check.md").read_text()


def test_the_app_error_line_is_the_reason():
    assert gc.last_error_line("building\nerror: no latency table at /x; build one\n") == \
        "error: no latency table at /x; build one"
    trace = ('Traceback (most recent call last):\n  File "a.py", line 1, in <module>\n    f()\n'
             "    ^^^\nRuntimeError: CUDA out of memory\n")
    assert gc.last_error_line("log line\n" + trace) == "RuntimeError: CUDA out of memory"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_the_real_check_stops_at_the_environment_step(tmp_path):
    with pytest.raises(gc.CheckFailed, match="no CUDA device is visible .* or use --dry-run"):
        gc.step_environment(_check(tmp_path, dry_run=False))


def test_dry_run_lists_every_cuda_measurement(tmp_path):
    check, lines = _check(tmp_path), []
    plan = [gc.Step(s.name, s.what, _ok(0), s.on_gpu) for s in gc.steps()]
    assert gc.run_check(check, plan, log=lines.append) == gc.EXIT_OK
    said = "\n".join(lines)
    for needle in ("torch.cuda.max_memory_allocated", "CUDA events", "16-mixed", "batch 32", "bfloat16"):
        assert needle in said
    assert [s.name for s in gc.steps()] == ["environment", "lut_b1", "lut_b32", "search", "retrain", "strategies",
                                           "weight_step"]


def test_weight_step_runs_every_configuration_on_the_cpu(tmp_path):
    torch.set_num_threads(1)
    res = gc.step_weight(_check(tmp_path))
    for precision in ("fp32", "amp"):
        assert set(res[precision]) == set(gc.STEP_CONFIGS)
        assert all(math.isfinite(r["loss"]) for r in res[precision].values())
    assert res["amp_dtype"] == "torch.bfloat16" and "goal" not in res  # nothing timed in a dry run


def test_export_is_compared_with_its_onnx_and_a_mismatch_fails(tmp_path):
    space = SearchSpace.from_dict(TINY)
    arch = space.largest(4)
    net = space_timm_net(space, arch, 4).eval()
    out = write_export(tmp_path / "export", space=space, arch=arch, model=net, report={})
    res = gc.compare_with_onnx(out, _check(tmp_path))
    assert res["weights_dtype"] == "float32" and res["onnx_max_abs_diff"] < 1e-4
    weights = load_file(str(out / WEIGHTS_FILE))
    key = next(k for k, v in weights.items() if v.dim() == 4)
    weights[key] = weights[key] + 1.0
    save_file(weights, str(out / WEIGHTS_FILE))
    with pytest.raises(gc.CheckFailed, match="model.onnx and model.safetensors disagree"):
        gc.compare_with_onnx(out, _check(tmp_path))


@pytest.mark.slow
def test_full_dry_run_of_the_script_passes_and_writes_the_summary(tmp_path):
    """Every step on the CPU through launch/gpu_check.sh (minutes on a loaded 2-core machine)."""
    out = tmp_path / "dry"
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "HWNAS_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    assert [s["status"] for s in data["steps"]] == ["passed"] * 7
    r = data["results"]
    assert r["search"]["training"]["precision"] == r["retrain"]["training"]["precision"] == "bf16-mixed"
    assert all(math.isfinite(v) for v in r["search"]["train_loss"] + r["retrain"]["train_loss"])
    assert r["search"]["onnx_max_abs_diff"] < 1e-3 and r["retrain"]["onnx_max_abs_diff"] < 1e-3
    assert set(r["strategies"]) == {"ddpnas", "slimmable", "evolution"}
    assert all(math.isfinite(v["train_loss"]) and v["exports_mflops"] for v in r["strategies"].values())
    assert "on a GPU this measures: peak memory (torch.cuda.max_memory_allocated)" in proc.stdout


@pytest.mark.parametrize("dry_run", [False, True])
def test_every_command_line_of_the_check_names_only_existing_keys(dry_run, tmp_path):
    """The GPU run's overrides (never run here) compose into the apps' configs: a misspelt key would
    cost the GPU run its first app step."""
    s = gc.Settings.make(dry_run, bf16=True)
    table = tmp_path / "t.json"
    lines = {"lut": [gc.lut_overrides(s, 32, table)], "search": [gc.search_overrides(s, table)],
             "retrain": [gc.retrain_overrides(s, tmp_path / "export")]}
    lines["search"] += [gc.strategy_overrides(s, *run) for run in gc.STRATEGY_RUNS]
    for app, commands in lines.items():
        for overrides in commands:
            assert command_line_error(app, overrides) is None, (app, overrides)
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                compose(app, overrides=overrides)  # groups and options exist (hardware=cuda, data=texshapes, ...)
