"""A pruned model's folder: saved, loaded back without pickle, and its ONNX file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from nas.apps.common import CONF_DIR
from nas.errors import UserError
from nas.export import write_export
from nas.prune.criteria import channel_order, score_channels
from nas.prune.export import PRUNE_FILE, load_pruned, write_pruned
from nas.prune.graph import find_groups, prune, round_keep
from nas.prune.source import load_original, source_spec
from supernets.space import SearchSpace
from supernets.supernet import Supernet
from tests.prune.models import TinyResNet

X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
SPEC = {"kind": "module", "config": {"_target_": "tests.prune.models.TinyResNet", "num_classes": 4}}


def _pruned_folder(tmp_path):
    torch.manual_seed(0)
    net = TinyResNet().eval()
    groups = find_groups(net, X[:1])
    order = channel_order(score_channels(net, X[:1], groups, "l1"))
    plan = {g.name: round_keep(g.channels, g.channels * 0.5, 8) for g in groups}
    pruned, history = prune(net, X[:1], plan, order)
    for m in pruned.modules():  # non-trivial BatchNorm statistics, as after recovery
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    folder = write_pruned(tmp_path / "t0.50", net=pruned, spec=SPEC, input_shape=(3, 16, 16), ignore=[], plan=plan,
                          channels={g.name: g.channels for g in groups}, history=history, report={"label": "t0.50"})
    return pruned, folder, order, plan


def test_save_then_load_gives_the_same_outputs(tmp_path):
    pruned, folder, order, plan = _pruned_folder(tmp_path)
    loaded = load_pruned(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), pruned.eval()(X), atol=0, rtol=0)
    meta = json.loads((folder / PRUNE_FILE).read_text())
    # the kept indices are the criterion's: the highest-ranked channels of each pruned group
    for name, kept in meta["kept"].items():
        assert sorted(kept) == sorted(order[name][len(order[name]) - plan[name]:])
    assert meta["plan"] == plan


def test_onnx_output_matches_torch(tmp_path):
    pruned, folder, _, _ = _pruned_folder(tmp_path)
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = sess.run(None, {"input": X.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, pruned.eval()(X).numpy(), atol=1e-4, rtol=1e-4)


def test_weights_of_another_structure_are_refused_on_loading(tmp_path):
    _, folder, _, _ = _pruned_folder(tmp_path)
    save_file({k: v.contiguous() for k, v in TinyResNet().state_dict().items()}, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match="does not fit the structure"):
        load_pruned(folder)


# ---------------------------------------------------------------------------------------- the model's source
def test_an_unknown_timm_name_lists_close_names():
    with pytest.raises(UserError, match=r"model.name='resnet81' is not a timm model; close names: .*resnet18"):
        source_spec(name="resnet81", export=None, module=None, num_classes=10, in_chans=3)


def test_exactly_one_source_is_required():
    with pytest.raises(UserError, match="exactly one of model.name"):
        source_spec(name="resnet18", export="x", module=None, num_classes=10, in_chans=3)


def test_weights_that_do_not_fit_name_the_first_mismatched_key(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file(TinyResNet(num_classes=7).state_dict(), str(f))
    with pytest.raises(UserError, match=r"fc\.weight is \(7, 32\) in the file and \(4, 32\) in the model"):
        load_original(SPEC, str(f))
    g = tmp_path / "w.pt"
    state = TinyResNet(num_classes=4).state_dict()
    del state["stem.1.running_var"]
    torch.save(state, g)
    with pytest.raises(UserError, match=r"lacks stem\.1\.running_var"):
        load_original(SPEC, str(g))


def test_a_torch_file_is_loaded_with_weights_only_and_a_wrapper_prefix_is_stripped(tmp_path):
    src = TinyResNet().eval()
    f = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, f)
    net = load_original(SPEC, str(f)).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(X), src(X))
    h = tmp_path / "pickled.pt"
    torch.save({"model": src}, h)  # a whole pickled module: refused by weights_only loading
    with pytest.raises(UserError, match="cannot be read as weights"):
        load_original(SPEC, str(h))


def test_an_hwnas_export_as_the_source_rebuilds_from_its_arch_file(tmp_path):
    """A searched net (timm EfficientNet from an export folder) pruned, saved and loaded back."""
    space = SearchSpace.from_yaml(Path(CONF_DIR) / "space" / "mbv2_tiny.yaml")
    arch = space.largest(10)
    src = write_export(tmp_path / "search_export", space=space, arch=arch, model=Supernet(space, 10).extract(arch),
                       report={}, onnx=False)
    spec = source_spec(name=None, export=str(src), module=None, num_classes=10, in_chans=3)
    net = load_original(spec, None).eval()
    x = torch.randn(2, 3, space.resolution, space.resolution)
    groups = find_groups(net, x[:1])
    order = channel_order(score_channels(net, x[:1], groups, "fpgm"))
    plan = {g.name: round_keep(g.channels, g.channels * 0.6, 8) for g in groups}
    pruned, history = prune(net, x[:1], plan, order)
    folder = write_pruned(tmp_path / "t0.60", net=pruned, spec=spec, input_shape=tuple(x.shape[1:]), ignore=[],
                          plan=plan, channels={g.name: g.channels for g in groups}, history=history, report={},
                          onnx=False)
    shutil.rmtree(src)  # the pruned folder holds what it needs: its own copy of the arch file
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(folder)(x), pruned(x))
