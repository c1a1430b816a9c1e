"""The apps as a user runs them: ``nas-search`` / ``nas-retrain`` end to end on digits, their answers
to wrong input, and every config option composing.

The end-to-end tests share ONE tiny search (``smoke_search`` in conftest.py). The wrong-input tests
check that each mistake is reported in one clear message, with exit code 2 and no traceback, before
any training (no checkpoint, no export).
"""
from __future__ import annotations

import csv
import inspect
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from nas.apps.common import user_errors
from nas.apps.retrain import run_retrain
from nas.apps.search import run_search
from tests.helpers import REPO, run_app

CONF = REPO / "conf"
EXPORT_FILES = ("arch.yaml", "model.safetensors", "model.onnx", "report.json", "arch_probs.png")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def trainable_tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors (BatchNorm running statistics change in any training step, even at lr=0)."""
    return {k: v.detach().clone() for k, v in net.named_parameters()}


# ============================================================================ end to end
def test_search_writes_a_complete_export(smoke_search):
    export = smoke_search.export
    for name in EXPORT_FILES:
        assert (export / name).is_file(), f"{name} missing in {sorted(p.name for p in export.iterdir())}"
    report = json.loads((export / "report.json").read_text())
    lat = report["latency_ms"]
    assert isinstance(lat["predicted"], float) and lat["predicted"] > 0
    assert isinstance(lat["measured"], float) and lat["measured"] > 0
    assert isinstance(lat["target"], float) and lat["target"] > 0
    assert lat["device"] == "cpu"
    assert isinstance(report["params"], int) and report["params"] > 0
    assert isinstance(report["flops"], int) and report["flops"] > 0
    assert 0.0 <= report["val_acc"] <= 1.0
    assert report["search_seconds"] > 0
    arch = yaml.safe_load((export / "arch.yaml").read_text())
    assert arch["space"] == report["space"] == "mbv2_tiny"
    assert arch["choices"] == report["arch"]
    assert set(EXPORT_FILES) <= set(report["files"])


def test_export_loads_as_timm_efficientnet_matching_onnx(smoke_search):
    import onnxruntime as ort
    import timm

    from nas.export import load_subnet

    net = load_subnet(smoke_search.export)
    assert isinstance(net, timm.models.EfficientNet)
    assert not net.training
    report = json.loads((smoke_search.export / "report.json").read_text())
    assert sum(p.numel() for p in net.parameters()) == report["params"]

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # batch 3: the batch is dynamic
    with torch.no_grad():
        expected = net(x).numpy()
    sess = ort.InferenceSession(str(smoke_search.export / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert got.shape == expected.shape == (3, 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_search_prints_progress_and_a_clear_summary(smoke_search):
    out, err = smoke_search.run.stdout, smoke_search.run.stderr
    assert "building latency table" not in out  # the table nas-lut wrote into the cache was used
    assert "space mbv2_tiny: 9 searchable layers" in out
    assert f"run folder {smoke_search.run_dir}" in out
    assert "hwnas search: done in" in out
    # the export folder and the next command on lines of their own, whatever the terminal width
    assert f"retrain: nas-retrain arch={smoke_search.export}\n" in out
    assert any(line.startswith("export t0.70") and line.endswith(str(smoke_search.export))
               for line in out.splitlines())
    for noise in ("💡 Tip", "litlogger", "litmodels", "LeafSpec", "Traceback"):
        assert noise not in out + err, noise


def test_retrain_from_scratch_writes_report_and_model(smoke_search, tmp_path):
    from timm.models import EfficientNet

    from nas.export import load_subnet

    run_dir = tmp_path / "retrain"
    run = run_app("nas.apps.retrain", f"arch={smoke_search.export}", "epochs=1", "progress=none",
                  f"hydra.run.dir={run_dir}")
    assert run.returncode == 0, run.describe()
    report = json.loads((run_dir / "retrain_report.json").read_text())
    assert 0.0 <= report["test_acc"] <= 1.0 and 0.0 <= report["val_acc"] <= 1.0
    assert report["init"] == "scratch" and report["teacher"] is None and report["epochs"] == 1
    assert report["arch"] == json.loads((smoke_search.export / "report.json").read_text())["arch"]
    assert Path(report["checkpoint"]).is_file()
    for name in ("arch.yaml", "model.safetensors", "model.onnx"):
        assert (run_dir / "model" / name).is_file()
    net = load_subnet(run_dir / "model")
    assert isinstance(net, EfficientNet)
    assert sum(p.numel() for p in net.parameters()) == report["params"]
    assert f"model: {run_dir / 'model'}" in run.stdout
    assert "Traceback" not in run.stderr and "💡" not in run.stdout + run.stderr


def test_retrain_inherited_with_teacher(smoke_search, tmp_path):
    """init=inherited starts from the export's weights (with lr=0 they must come out unchanged) and
    teacher= adds the distillation term (logged as train/kd)."""
    from nas.export import load_subnet

    run_dir = tmp_path / "retrain"
    run = run_app("nas.apps.retrain", f"arch={smoke_search.export}", "init=inherited", f"teacher={smoke_search.export}",
                  "optim.lr=0", "epochs=1", "progress=none", f"hydra.run.dir={run_dir}")
    assert run.returncode == 0, run.describe()
    report = json.loads((run_dir / "retrain_report.json").read_text())
    assert report["init"] == "inherited" and report["teacher"] == str(smoke_search.export)
    assert 0.0 <= report["test_acc"] <= 1.0

    exported = trainable_tensors(load_subnet(smoke_search.export))
    retrained = trainable_tensors(load_subnet(run_dir / "model"))
    assert exported.keys() == retrained.keys()
    for k in exported:
        torch.testing.assert_close(retrained[k], exported[k], rtol=0, atol=0, msg=k)

    (metrics,) = (run_dir / "logs").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert any(r.get("train/kd") not in (None, "") for r in rows), "no distillation loss logged"


# ============================================================================ wrong input
def assert_refused(run, run_dir: Path, *needles: str) -> None:
    """Exit 2, the needles in stderr, no traceback, and nothing trained or exported."""
    assert run.returncode == 2, run.describe()
    assert "Traceback" not in run.stderr + run.stdout, run.describe()
    for needle in needles:
        assert needle in run.stderr, f"{needle!r} not in stderr\n{run.describe()}"
    assert "Epoch" not in run.stdout + run.stderr
    if run_dir.exists():
        assert not (run_dir / "export").exists()
        assert not (run_dir / "model").exists()
        assert not (run_dir / "retrain_report.json").exists()
        assert not list(run_dir.rglob("*.ckpt"))


def assert_refused_in_process(app, cfg, capsys, *needles: str, one_line: bool = True) -> None:
    """The app's logic on a composed config, as its console script wraps it (``user_errors``): exit 2,
    ONE line on stderr starting ``error:`` with the needles (``one_line=False``: a message followed by
    a layout hint), and nothing trained or exported."""
    with pytest.raises(SystemExit) as e:
        user_errors(app)(cfg)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert err.startswith("error:") and (err.count("\n") == 1 or not one_line), err
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert "Epoch" not in out + err
    run_dir = Path(cfg.hydra.runtime.output_dir)
    if run_dir.exists():
        assert not (run_dir / "export").exists() and not (run_dir / "model").exists()
        assert not list(run_dir.rglob("*.ckpt"))


@pytest.mark.parametrize("group", ["space", "strategy", "hardware", "data"])
def test_search_unknown_option_lists_the_available_ones(group, tmp_path):
    run_dir = tmp_path / "run"
    run = run_app("nas.apps.search", f"{group}=nope", f"hydra.run.dir={run_dir}")
    assert_refused(run, run_dir, f"Could not find '{group}/nope'", *options(group))
    assert not run_dir.exists()  # refused before the run folder was made


def test_search_missing_data_folder_names_the_path(tmp_path, compose_cfg, capsys):
    missing = tmp_path / "no-such-dataset"
    cfg = compose_cfg("search", ["data=imagefolder", f"data.root={missing}", "progress=none"])
    assert_refused_in_process(run_search, cfg, capsys, str(missing), one_line=False)


def test_search_data_folder_left_out_is_named(compose_cfg, capsys):
    cfg = compose_cfg("search", ["data=imagefolder", "progress=none"])
    assert_refused_in_process(run_search, cfg, capsys, "error: data.root", one_line=False)


@pytest.mark.parametrize("overrides,message", [
    (("strategy=ddpnas",), "use strategy=slimmable"),
    (("supernet.weight_sharing=separate",), "supernet.weight_sharing must be elastic"),
    (("supernet.weight_sharing=nope",), "choose one of elastic, separate"),
])
def test_search_width_space_combinations_refused(overrides, message, compose_cfg, capsys):
    """Settings that cannot work with a width space stop with one message (FLOPs: no table to build)."""
    cfg = compose_cfg("search", ["space=mbv2_tiny_slim", "hardware=flops", *overrides, "progress=none"])
    assert_refused_in_process(run_search, cfg, capsys, message)


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "true"])
def test_search_calibration_batches_refused_before_training(value, compose_cfg, capsys):
    """export.calib_batches is used at every validation and at the export: a bad value stops at the start
    (it used to raise a traceback from the data module after the whole search)."""
    cfg = compose_cfg("search", ["hardware=flops", f"export.calib_batches={value}", "progress=none"])
    assert_refused_in_process(run_search, cfg, capsys, "export.calib_batches=")


def test_search_unreachable_target(compose_cfg, capsys):
    """0.05 of the largest net's MFLOPs is below the smallest net's (0.2 of it): refused before training."""
    cfg = compose_cfg("search", ["hardware=flops", "strategy.targets=[0.05]", "progress=none"])
    assert_refused_in_process(run_search, cfg, capsys, "smallest reachable")


def test_retrain_arch_folder_missing(tmp_path, compose_cfg, capsys):
    cfg = compose_cfg("retrain", [f"arch={tmp_path / 'nonexistent'}"])
    assert_refused_in_process(run_retrain, cfg, capsys, f"arch={tmp_path / 'nonexistent'} does not exist")


def test_retrain_arch_left_out(tmp_path):
    """A true subprocess: the console script's own path for a value left at ``???``."""
    run_dir = tmp_path / "run"
    run = run_app("nas.apps.retrain", f"hydra.run.dir={run_dir}")
    assert_refused(run, run_dir, "error: arch is required")


def test_retrain_unknown_init_lists_the_allowed(smoke_search, compose_cfg, capsys):
    cfg = compose_cfg("retrain", [f"arch={smoke_search.export}", "init=bogus"])
    assert_refused_in_process(run_retrain, cfg, capsys, "bogus", "scratch", "inherited")


@pytest.fixture
def edited_export(smoke_search, tmp_path):
    """A copy of the smoke export whose arch.yaml the test edits (outside the search's run folder,
    so it is checked against conf/space/<space>.yaml)."""
    dst = tmp_path / "export"
    shutil.copytree(smoke_search.export, dst)

    def edit(change) -> Path:
        path = dst / "arch.yaml"
        d = yaml.safe_load(path.read_text())
        change(d)
        path.write_text(yaml.safe_dump(d, sort_keys=False))
        return dst

    return edit


def test_retrain_unknown_op_names_decision_and_choices(edited_export, compose_cfg, capsys):
    export = edited_export(lambda d: d["choices"].update({"s1.l0": "k9_e9"}))
    cfg = compose_cfg("retrain", [f"arch={export}"])
    assert_refused_in_process(run_retrain, cfg, capsys, "'s1.l0'", "k9_e9", "k3_e3, k3_e6, k5_e3, k5_e6, k7_e3, k7_e6")


def test_retrain_missing_decision_is_named(edited_export, compose_cfg, capsys):
    export = edited_export(lambda d: d["choices"].pop("s2.l1"))
    cfg = compose_cfg("retrain", [f"arch={export}"])
    assert_refused_in_process(run_retrain, cfg, capsys, "missing: s2.l1")


def test_retrain_hand_edited_arch_def_is_refused(edited_export, compose_cfg, capsys):
    def change(d):  # a valid choice, but arch_def left as it was
        d["choices"]["s1.l0"] = "k7_e6" if d["choices"]["s1.l0"] != "k7_e6" else "k3_e3"

    export = edited_export(change)
    cfg = compose_cfg("retrain", [f"arch={export}"])
    assert_refused_in_process(run_retrain, cfg, capsys, "arch_def does not match", "stage 1")


def test_retrain_unknown_space_lists_the_spaces(edited_export, compose_cfg, capsys):
    export = edited_export(lambda d: d.update(space="nope"))
    cfg = compose_cfg("retrain", [f"arch={export}"])
    assert_refused_in_process(run_retrain, cfg, capsys, "'nope'", *options("space"))


# ============================================================================ every config option composes
@pytest.fixture
def compose_cfg(tmp_path):
    """compose(config_name, overrides) -> the config with ``${hydra:...}`` resolvable (as in a job)."""
    def _compose(config_name: str, overrides: list[str]):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")  # set by Hydra when a job starts
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    HydraConfig.instance().cfg = None  # do not leak a Hydra context into other tests


def resolved(cfg) -> dict:
    """The job part of the config, every interpolation resolved (``???`` kept as is)."""
    job = cfg.copy()
    with open_dict(job):
        del job["hydra"]  # ${hydra:...} resolves through HydraConfig, set by compose_cfg
    return OmegaConf.to_container(job, resolve=True)


def missing_keys(d, prefix: str = "") -> set[str]:
    if isinstance(d, dict):
        return set().union(*(missing_keys(v, f"{prefix}{k}.") for k, v in d.items()))
    return {prefix[:-1]} if d == "???" else set()


def accepted_params(cls) -> set[str] | None:
    """Keyword parameters of ``cls(...)`` following ``**kwargs`` up the MRO (``None``: anything)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


SEARCH_GROUPS = ["space", "strategy", "hardware", "data", "trainer", "logger"]


@pytest.mark.parametrize("group,option", [(g, o) for g in SEARCH_GROUPS for o in options(g)])
def test_search_config_option_composes(group, option, compose_cfg):
    if group == "hardware" and option == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = compose_cfg("search", [f"{group}={option}"])
    d = resolved(cfg)
    assert missing_keys(d) == ({"data.root"} if (group, option) == ("data", "imagefolder") else set())
    assert d["export"]["dir"] == str(Path(cfg.hydra.runtime.output_dir) / "export")
    assert d["lut"]["cache_dir"].startswith(os.environ["HWNAS_CACHE"])
    assert d["data"]["resolution"] == d["space"]["resolution"]
    assert d["trainer"]["max_epochs"] == d["strategy"]["epochs"]
    if group in ("space", "strategy", "hardware", "data"):
        assert d[group]["name"] == option  # reports and file names use it

    if group == "space":
        from nas.apps.common import make_space

        space = make_space(cfg.space)
        assert space.name == option and space.size() > 1
    elif group == "strategy":
        from hydra.utils import instantiate

        factory = instantiate(cfg.strategy.module)  # a partial: every key must be a parameter
        inspect.signature(factory.func).bind(supernet=None, cost_model=None, targets=None, **factory.keywords)
    elif group == "hardware":
        from nas.apps.common import make_device

        assert make_device(cfg.hardware).name == option
    elif group == "data":
        from hydra.utils import get_class

        params = accepted_params(get_class(d["data"]["_target_"]))
        assert params is None or set(d["data"]) - {"_target_"} <= params
    elif group == "trainer":
        import pytorch_lightning as pl

        from nas.apps.common import trainer_kwargs

        inspect.signature(pl.Trainer).bind(**trainer_kwargs(cfg))  # hwnas's own keys (channels_last) left out
    elif group == "logger" and "_target_" in d["logger"]:
        assert d["logger"]["save_dir"] == cfg.hydra.runtime.output_dir


@pytest.mark.parametrize("data", options("data"))
def test_retrain_config_composes(data, compose_cfg):
    cfg = compose_cfg("retrain", [f"data={data}", "arch=/some/export", "epochs=3"])
    d = resolved(cfg)
    assert missing_keys(d) == ({"data.root"} if data == "imagefolder" else set())
    assert d["trainer"]["max_epochs"] == 3
    assert d["out_dir"] == cfg.hydra.runtime.output_dir
    assert d["init"] in ("scratch", "inherited")
