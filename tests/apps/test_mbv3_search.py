"""End to end on the MobileNetV3-style space: a tiny search on digits with FLOPs as the cost, its export
(SE and h-swish blocks) loaded back as a plain timm net, run by onnxruntime, and accepted by nas-retrain."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from timm.layers import get_act_layer
from timm.models import EfficientNet
from timm.models._efficientnet_blocks import SqueezeExcite

from nas.apps.common import CONF_DIR
from nas.apps.retrain import check_arch_file
from nas.export import load_subnet
from supernets.space import SearchSpace
from tests.helpers import run_app

MBV3 = ("space=mbv3_tiny", "hardware=flops", "hardware.threads=1", "progress=none", "export.calib_batches=2")


def _check_export(d):
    """The export is within its target, a plain timm net, accepted by nas-retrain, and its ONNX file
    computes the same as the loaded net."""
    report = json.loads((d / "report.json").read_text())
    lat = report["latency_ms"]
    assert lat["measured"] == pytest.approx(lat["predicted"], rel=1e-6)  # FLOPs: the additive model is exact
    assert lat["measured"] <= lat["target"] + 1e-9
    net = load_subnet(d)
    assert type(net) is EfficientNet
    check_arch_file(d)  # nas-retrain accepts it (arch_def and timm kwargs, SE layer included, as the space makes them)
    x = torch.randn(2, 3, 32, 32)
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert np.allclose(y, net(x).numpy(), atol=1e-4)
    return report, net


def test_proxyless_search_on_mbv3_tiny_exports_a_timm_net_within_its_flops_target(tmp_path):
    run_dir = tmp_path / "run"
    run = run_app("nas.apps.search", *MBV3, "strategy=proxyless", "strategy.epochs=2",
                  "strategy.module.warmup_epochs=1", "strategy.targets=[0.6]", f"hydra.run.dir={run_dir}")
    assert run.returncode == 0, run.describe()
    report, net = _check_export(run_dir / "export")
    assert report["space"] == "mbv3_tiny"
    # the exported blocks are what the choices say: SE where chosen, each layer's activation
    space = SearchSpace.from_yaml(f"{CONF_DIR}/space/mbv3_tiny.yaml")
    arch = space.make_arch(report["arch"], 10)
    specs = [b for st in space.block_specs(arch)[1:] for b in st]
    blocks = [b for st in list(net.blocks)[1:] for b in st]
    assert len(specs) == len(blocks)
    for spec, block in zip(specs, blocks):
        assert isinstance(block.se, SqueezeExcite) == bool(spec.se)
        assert type(block.bn1.act) is get_act_layer(spec.act)


@pytest.mark.slow
def test_evolution_search_on_mbv3_tiny(tmp_path):
    run_dir = tmp_path / "run"
    run = run_app("nas.apps.search", *MBV3, "strategy=evolution", "strategy.epochs=1", "+trainer.limit_train_batches=6",
                  "strategy.module.queries=6", "strategy.module.engine.population=3", "strategy.module.engine.sample=2",
                  "strategy.module.calib_batches=2", "strategy.targets=[0.5,0.8]", f"hydra.run.dir={run_dir}")
    assert run.returncode == 0, run.describe()
    for label in ("t0.50", "t0.80"):
        _check_export(run_dir / "export" / label)
