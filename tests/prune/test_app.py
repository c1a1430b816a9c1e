"""``nas-prune`` end to end on tiny models, and the mistakes that stop it with one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from nas.apps.common import CONF_DIR, user_errors
from nas.apps.prune import resolve_targets, run_prune
from nas.data import DigitsDataModule
from nas.errors import UserError
from nas.export import evaluate
from nas.prune import load_pruned
from nas.prune.table import markdown, rows
from tests.helpers import run_app
from tests.prune.models import TinyResNet

MODULE = "model.module={_target_:tests.prune.models.TinyResNet,num_classes:10}"
TINY = ("hardware.threads=1", "space.resolution=16", "progress=none")


def _report(run_dir: Path, label: str) -> dict:
    return json.loads((run_dir / "export" / label / "report.json").read_text())


def test_prune_by_flops_end_to_end(tmp_path):
    """Train a tiny residual net on digits, prune it to 0.6 of its FLOPs, distil: the export is within its
    target, loads back to the reported accuracy, and the distillation recovers what pruning lost."""
    run_dir = tmp_path / "run"
    args = (MODULE, "hardware=flops", *TINY, "model.train_epochs=3", "recovery.epochs=2", "strategy.targets=[0.6]",
            "strategy.criterion=l1", "recovery.mode=[distill,scratch]", f"hydra.run.dir={run_dir}")
    run = run_app("nas.apps.prune", *args)
    assert run.returncode == 0, run.describe()
    r = _report(run_dir, "t0.60")
    lat = r["latency_ms"]
    assert lat["measured"] <= lat["target"] == pytest.approx(0.6 * lat["unpruned"])
    assert lat["measured"] == pytest.approx(r["flops"] / 1e6)  # hardware=flops counts the exported net
    net = load_pruned(run_dir / "export" / "t0.60")
    assert sum(p.numel() for p in net.parameters()) == r["params"] < r["params_unpruned"]
    assert {k: net.get_submodule(k).out_channels for k in r["channels_kept"]} == r["channels_kept"]
    data = DigitsDataModule(resolution=16, seed=0)
    assert evaluate(net, data.test_dataloader()) == pytest.approx(r["test_acc"])
    assert r["test_acc_unpruned"] > 0.6  # the unpruned model learnt
    assert r["test_acc"] > r["test_acc_pruned"] and r["test_acc"] > 0.6, r
    assert (run_dir / "original" / "model.safetensors").is_file()
    # the "rethinking" control: the same shape, trained from a fresh initialisation
    scratch = _report(run_dir, "t0.60-scratch")
    assert scratch["recovery"]["mode"] == "scratch" and scratch["channels_kept"] == r["channels_kept"]
    assert scratch["params"] == r["params"] and scratch["test_acc_pruned"] == r["test_acc_pruned"]
    # the table across runs: one row per pruned model, both recoveries
    table = markdown(rows([run_dir]))
    assert table.count("| l1 | uniform | flops |") == 2 and "| scratch |" in table and "| yes |" in table
    assert not list(run_dir.rglob("*.ckpt"))  # checkpoints go once their model is saved
    # the same run again (a restarted job): nothing is trained or searched again
    again = run_app("nas.apps.prune", *args)
    assert again.returncode == 0, again.describe()
    for what in ("the trained original", "the search's plans", "t0.60 was exported", "t0.60-scratch was exported"):
        assert f"resuming: {what}" in again.stdout, again.stdout
    assert "recovery (" not in again.stdout and _report(run_dir, "t0.60") == r


def test_prune_on_a_timed_device(tmp_path):
    """ONNX Runtime: the unpruned and candidate nets are measured; the search's choice is under its target
    in the search's own measurement, and the export is measured again (noise: not asserted tight here)."""
    run_dir = tmp_path / "run"
    run = run_app("nas.apps.prune", "model.module={_target_:tests.prune.models.TinyResNet,num_classes:10,width:32}",
                  "hardware=onnxruntime", "hardware.threads=1", "hardware.repeats=10", "hardware.warmup=2",
                  "space.resolution=32", "progress=none", "recovery.mode=none", "strategy.targets=[0.7]",
                  "strategy.search=global", "strategy.measure.rel_ci=null", f"hydra.run.dir={run_dir}")
    assert run.returncode == 0, run.describe()
    r = _report(run_dir, "t0.70")
    assert r["search_cost"]["found"] <= r["search_cost"]["target"]
    assert r["latency_ms"]["measured"] > 0 and r["latency_ms"]["unit"] == "ms"
    assert r["test_acc"] == r["test_acc_pruned"]  # recovery=none
    assert (run_dir / "export" / "t0.70" / "model.onnx").is_file()


# ---------------------------------------------------------------------------------------- bad input
def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("prune", overrides=list(overrides))


def _one_line(capsys, cfg) -> str:
    with pytest.raises(SystemExit) as exit_:
        user_errors(run_prune)(cfg)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, out + err
    assert err.count("\n") == 1 and "Traceback" not in out + err, err
    return err


def test_an_unreachable_target_names_the_smallest_reachable(capsys):
    err = _one_line(capsys, _cfg(MODULE, "hardware=flops", *TINY, "strategy.targets=[0.05]"))
    assert "unreachable" in err and "choose a target >= 0.1" in err


def test_weights_that_do_not_fit_stop_before_any_work(tmp_path, capsys):
    f = tmp_path / "w.safetensors"
    save_file(TinyResNet(num_classes=4).state_dict(), str(f))
    err = _one_line(capsys, _cfg(MODULE, f"model.weights={f}", "hardware=flops", *TINY))
    assert "fc.weight is (4, 32) in the file and (10, 32) in the model" in err


def test_options_are_checked(capsys):
    assert "strategy.criterion='l3' is unknown" in _one_line(capsys, _cfg(MODULE, "hardware=flops", *TINY,
                                                                          "strategy.criterion=l3"))
    assert "exactly one of model.name" in _one_line(capsys, _cfg("hardware=flops", *TINY))
    assert "sparsity.l1=0" in _one_line(capsys, _cfg(MODULE, "hardware=flops", *TINY, "sparsity.epochs=1",
                                                     "sparsity.l1=0"))
    assert "strategy.cost=flops searches FLOPs" in _one_line(
        capsys, _cfg(MODULE, "hardware=onnxruntime", "hardware.repeats=3", "hardware.warmup=1", *TINY,
                     "strategy.cost=flops", "strategy.targets=[0.01ms]"))


def test_an_unknown_timm_model_names_close_ones(capsys):
    err = _one_line(capsys, _cfg("model.name=mobilenetv2_10", "hardware=flops", *TINY))
    assert "model.name='mobilenetv2_10' is not a timm model; close names:" in err and "mobilenetv2_100" in err


def test_targets_read_as_fractions_or_absolute():
    got = resolve_targets([0.7, "1.5ms"], 4.0, 1.0, "ms")
    assert got == {"t0.70": pytest.approx(2.8), "t1.5ms": 1.5}
    with pytest.raises(UserError, match="above the unpruned model"):
        resolve_targets(["5ms"], 4.0, 1.0, "ms")
    with pytest.raises(UserError, match="twice"):
        resolve_targets([0.5, 0.5], 4.0, 1.0, "ms")
