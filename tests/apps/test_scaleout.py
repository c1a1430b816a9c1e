"""Scale-out pieces that need no cluster: SLURM request rendering, stable run folders, resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from nas.apps.common import CONF_DIR


def _launcher_params(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("search", overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_slurm_launcher_renders_two_nodes_by_four_gpus(tmp_path, monkeypatch):
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun on this machine

    params = _launcher_params(["hydra/launcher=slurm", "trainer=ddp", "trainer.accelerator=gpu",
                               "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.partition=gpu",
                               "hydra.launcher.timeout_min=90"])
    assert params["nodes"] == 2 and params["tasks_per_node"] == 4 and params["gpus_per_node"] == 4
    # render the sbatch file with submitit's own machinery, the way the Hydra launcher passes parameters
    ex = submitit.AutoExecutor(folder=str(tmp_path), cluster="slurm")
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name"}
    skip = {"_target_", "submitit_folder", "max_num_timeout"}
    ex.update_parameters(**{(k if k in base else f"slurm_{k}"): v for k, v in params.items()
                            if k not in skip and v is not None})
    text = ex._executor._make_submission_file_text("python -c 'pass'", "%j")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --signal=USR2@120"):
        assert line in text, line


def test_cpu_request_asks_for_no_gpus():
    params = _launcher_params(["hydra/launcher=slurm"])
    assert params["gpus_per_node"] == 0 and params["nodes"] == 1 and params["tasks_per_node"] == 1


def test_run_folder_follows_run_name():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("search", overrides=["run_name=sweep_a"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.job.num = 3
        HydraConfig.instance().set_config(cfg)
    assert cfg.hydra.run.dir.endswith("search/sweep_a")
    assert cfg.hydra.sweep.dir.endswith("search/sweep_a") and cfg.hydra.sweep.subdir == "3"  # the array index


@pytest.mark.slow
def test_sigterm_then_same_command_resumes_and_ends_with_the_same_arch(tmp_path, smoke_search, shared_cache):
    from tests.helpers import TINY_HARDWARE, run_app

    args = ("strategy.epochs=6", "strategy.module.warmup_epochs=1", *TINY_HARDWARE, "progress=none",
            "export.calib_batches=2", "export.onnx=false", "export.measure=false", "seed=3")
    full = run_app("nas.apps.search", *args, f"hydra.run.dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.describe()

    cut_dir = tmp_path / "cut"
    cmd = [sys.executable, "-m", "nas.apps.search", *args, f"hydra.run.dir={cut_dir}"]
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = cut_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert last.exists(), out
    assert not (cut_dir / "export").exists(), "the run finished before it was interrupted: " + out

    again = run_app("nas.apps.search", *args, f"hydra.run.dir={cut_dir}")
    assert again.returncode == 0, again.describe()
    assert "resuming from" in again.stdout
    import json

    r_full = json.loads((tmp_path / "full" / "export" / "report.json").read_text())
    r_cut = json.loads((cut_dir / "export" / "report.json").read_text())
    assert r_cut["search_cost"]["epochs"] == r_full["search_cost"]["epochs"] == 6
    assert r_cut["arch"] == r_full["arch"]
    assert r_cut["val_acc"] == pytest.approx(r_full["val_acc"])


DDP_RUNS = {
    "proxyless": ("strategy.epochs=3",),
    "ddpnas": ("strategy=ddpnas", "strategy.epochs=6", "strategy.module.warmup_epochs=1", "strategy.module.steps=1"),
    # widths in ProxylessNAS: the width logits learn by REINFORCE with a baseline every rank must share
    # (a new space: its quick table is built in the test; its quality is not what this test checks)
    "proxyless_widths": ("strategy.epochs=3", "+space.widths=[0.5,1.0]", "lut.accept_untrusted=true"),
    # slimmable: the sandwich's random widths are rank 0's on every rank; the width search runs on each
    # (on FLOPs: the tiny search's timing options are not keys of hardware=flops, so they are dropped)
    "slimmable": ("strategy=slimmable", "space=mbv2_tiny_slim", "hardware=flops", "strategy.epochs=2",
                  "strategy.targets=[0.5,0.8]", "strategy.module.eval_batches=2"),
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(DDP_RUNS))
def test_ddp_on_two_cpu_processes_ranks_agree(tmp_path, smoke_search, shared_cache, strategy):
    """Two gloo ranks: the search completes, the ranks hold the same alpha / DDPNAS state and derive the
    same architectures (all-gathered at the end), and only rank 0 exports."""
    import json

    import torch

    from tests.helpers import TINY_SEARCH, run_app

    run_dir = tmp_path / "ddp"
    base = [a for a in TINY_SEARCH if "hardware=flops" not in DDP_RUNS[strategy] or not a.startswith("hardware.")]
    run = run_app("nas.apps.search", *base, "trainer=ddp", "trainer.devices=2", *DDP_RUNS[strategy],
                  "export.onnx=false", f"hydra.run.dir={run_dir}")
    assert run.returncode == 0, run.describe()
    reports = [json.loads(p.read_text()) for p in run_dir.rglob("report.json")]
    assert reports
    for report in reports:
        assert report["distributed"] == {"world_size": 2, "ranks_agree": True, "max_alpha_diff": 0.0}
    if strategy.startswith("proxyless"):
        assert len(reports) == 1  # only rank 0 exported
        state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert any(v.abs().sum() > 0 for k, v in state["state_dict"].items() if k.endswith(".alpha"))
    if strategy == "proxyless_widths":  # the width logits moved, and the baseline (compared across ranks) ran
        widths = [v for k, v in state["state_dict"].items() if "width_alpha" in k]
        assert widths and any(v.abs().sum() > 0 for v in widths)
        assert torch.isfinite(state["state_dict"]["width_baseline"])
    if strategy == "slimmable":  # one export per target, all from rank 0
        assert sorted(p.parent.name for p in run_dir.rglob("report.json")) == ["t0.50", "t0.80"]


@pytest.mark.slow
def test_local_submitit_multirun_gives_each_job_its_own_export(tmp_path, smoke_search, shared_cache):
    from tests.helpers import TINY_SEARCH, run_app

    sweep = tmp_path / "sweep"
    run = run_app("nas.apps.search", "-m", "hydra/launcher=local", *TINY_SEARCH, "export.onnx=false",
                  "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert run.returncode == 0, run.describe()
    for job in ("0", "1"):
        assert (sweep / job / "export" / "report.json").exists(), run.describe()
    import json

    seeds = {json.loads((sweep / j / "export" / "report.json").read_text())["seed"] for j in ("0", "1")}
    assert seeds == {0, 1}


def test_last_checkpoint_is_written_after_every_epoch(tmp_path):
    """A preempted job must find last.ckpt from its latest finished epoch, not only after fit ends."""
    import pytorch_lightning as pl
    import torch
    from omegaconf import OmegaConf

    from nas.apps.search import checkpoint_callback

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.lin(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen = []

    class Spy(pl.Callback):
        def on_train_epoch_start(self, trainer, _):
            last = tmp_path / "last.ckpt"
            seen.append(torch.load(last, weights_only=False)["epoch"] if last.exists() else None)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
    ckpt = checkpoint_callback(tmp_path, OmegaConf.create({"every_n_epochs": 1, "every_n_train_steps": None}))
    trainer = pl.Trainer(max_epochs=3, callbacks=[ckpt, Spy()], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(Tiny(), data)
    assert seen == [None, 0, 1]
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt"]
