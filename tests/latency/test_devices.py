"""Tests for nas.latency.devices: fingerprints, runners, the alternating measurement, configs and errors.

No test asserts on absolute timings: the machine is shared and noisy. Only relations that hold by a
wide margin (8 convolutions vs 1) are checked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from nas.errors import UserError
from nas.latency.devices import (
    DEVICE_NAMES,
    REFERENCE_KEY,
    CpuDevice,
    Device,
    OnnxRuntimeDevice,
    build_device,
    reference_module,
)

HARDWARE_CONF = Path(__file__).resolve().parents[2] / "conf" / "hardware"
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")

SHAPE = (16, 24, 24)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """CPU runners set torch's process-global thread count; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def conv_stack(depth: int, channels: int = 16) -> nn.Module:
    """``depth`` identical 3x3 convolutions in sequence (seeded): work grows linearly with depth."""
    torch.manual_seed(depth)
    return nn.Sequential(*[nn.Conv2d(channels, channels, 3, padding=1) for _ in range(depth)])


def fast(name: str, **kwargs) -> Device:
    """A device with few warm-up calls and repeats, to keep the tests quick."""
    return build_device(name, **{"warmup": 2, "repeats": 6, **kwargs})


def check_result(result: dict, names: list[str], repeats: int) -> None:
    assert set(result) == {*names, REFERENCE_KEY}
    for name in names:
        stats = result[name]
        assert set(stats) == {"median_ms", "ratio", "spread", "count"}
        assert math.isfinite(stats["median_ms"]) and stats["median_ms"] > 0
        assert math.isfinite(stats["ratio"]) and stats["ratio"] > 0
        assert math.isfinite(stats["spread"]) and stats["spread"] >= 0
        assert stats["count"] == repeats
        # median_ms is the median ratio expressed in this session's reference milliseconds
        assert stats["median_ms"] == pytest.approx(stats["ratio"] * result[REFERENCE_KEY]["median_ms"])
    ref = result[REFERENCE_KEY]
    assert set(ref) == {"median_ms", "spread", "count"}
    assert math.isfinite(ref["median_ms"]) and ref["median_ms"] > 0
    assert math.isfinite(ref["spread"]) and ref["spread"] >= 0
    # one reference call before the first item, then one after every item call
    assert ref["count"] == 1 + repeats * len(names)
    json.dumps(result)


# --------------------------------------------------------------------------- reference


def test_reference_module_is_deterministic_and_documented_shape():
    (a, shape_a), (b, shape_b) = reference_module(), reference_module()
    assert shape_a == shape_b == (16, 16, 16)
    assert not a.training
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    convs = [m for m in a.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(16, 32), (32, 16)]
    assert sum(isinstance(m, nn.ReLU6) for m in a.modules()) == 2
    with torch.no_grad():
        out = a(torch.randn(1, *shape_a))
    assert out.shape == (1, 16, 16, 16)


def test_reference_module_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    reference_module()
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- fingerprints


@pytest.mark.parametrize("name", ["cpu", "onnxruntime"])
def test_fingerprint_is_json_serialisable_and_stable(name):
    device = build_device(name, threads=2, batch_size=1)
    fp = device.fingerprint()
    assert json.loads(json.dumps(fp, sort_keys=True)) == fp
    for key in ("processor", "machine", "threads", "batch_size", "dtype", "torch"):
        assert key in fp
    assert fp["threads"] == 2 and fp["batch_size"] == 1 and fp["dtype"] == "float32"
    assert fp["torch"] == torch.__version__
    if name == "onnxruntime":
        import onnxruntime

        assert fp["onnxruntime"] == onnxruntime.__version__
    again = build_device(name, threads=2, batch_size=1, warmup=0, repeats=3)
    assert again.fingerprint() == fp  # timing options are not part of the fingerprint
    assert again.fingerprint_id() == device.fingerprint_id()
    assert len(device.fingerprint_id()) == 12
    int(device.fingerprint_id(), 16)


def test_fingerprint_id_tells_settings_and_devices_apart():
    ids = {
        build_device("cpu", threads=1).fingerprint_id(),
        build_device("cpu", threads=2).fingerprint_id(),
        build_device("cpu", batch_size=8).fingerprint_id(),
        build_device("onnxruntime", threads=2).fingerprint_id(),
    }
    assert len(ids) == 4


# --------------------------------------------------------------------------- runners


def test_cpu_runner_runs_without_touching_the_module():
    device = fast("cpu", threads=1)
    module = conv_stack(2).train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    run = device.runner(module, SHAPE)
    assert run() is None
    assert torch.get_num_threads() == 1
    assert module.training  # the runner works on an eval-mode copy
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    torch.set_num_threads(2)
    run()
    assert torch.get_num_threads() == 1  # re-applied when something else changed it


def test_cpu_predict_matches_eager_torch_and_uses_batch_size():
    device = fast("cpu", batch_size=3)
    module = conv_stack(2)
    x = device.example_input(SHAPE)
    assert x.shape == (3, *SHAPE)
    assert torch.equal(x, device.example_input(SHAPE))  # fixed input
    (out,) = device.predict(module, SHAPE)
    with torch.no_grad():
        expected = module.eval()(x).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_onnxruntime_runner_output_equals_torch_output():
    device = fast("onnxruntime", batch_size=2)
    module, shape = reference_module()
    run = device.runner(module, shape)
    assert run() is None
    (out,) = device.predict(module, shape)
    with torch.no_grad():
        expected = module(device.example_input(shape)).numpy()
    assert out.shape == (2, 16, 16, 16)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_onnxruntime_falls_back_to_default_exporter(monkeypatch):
    """If the fast TorchScript exporter (dynamo=False) is unavailable, the default one is used."""
    real_export = torch.onnx.export
    calls = []

    def export(*args, **kwargs):
        calls.append(kwargs.get("dynamo", "default"))
        if kwargs.get("dynamo") is False:
            raise RuntimeError("legacy exporter removed")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    device = fast("onnxruntime")
    module = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    (out,) = device.predict(module, (4, 8, 8))
    with torch.no_grad():
        expected = module.eval()(device.example_input((4, 8, 8))).numpy()
    assert calls == [False, "default"]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- measure


@pytest.mark.parametrize("name", ["cpu", "onnxruntime"])
def test_measure_returns_all_items_and_the_reference(name):
    device = fast(name, repeats=5)
    items = {"one": (conv_stack(1), SHAPE), "two": (conv_stack(2), SHAPE), "ref": reference_module()}
    result = device.measure(items)
    check_result(result, list(items), repeats=5)


def test_measure_with_progress_bar_and_custom_reference():
    device = fast("cpu", repeats=4)
    result = device.measure(
        {"a": (conv_stack(1), SHAPE)}, reference=(conv_stack(1), SHAPE), progress=True, desc="test"
    )
    check_result(result, ["a"], repeats=4)


def test_measure_without_items_still_times_the_reference():
    result = fast("cpu", repeats=5).measure({})
    assert set(result) == {REFERENCE_KEY}
    assert result[REFERENCE_KEY]["count"] == 1 + 5
    assert result[REFERENCE_KEY]["median_ms"] > 0


def test_measure_rejects_the_reserved_name():
    with pytest.raises(ValueError, match=REFERENCE_KEY):
        fast("cpu").measure({REFERENCE_KEY: reference_module()})


@pytest.mark.parametrize("name", ["cpu", "onnxruntime"])
def test_more_work_gives_a_larger_ratio(name):
    """8 identical convolutions in sequence must come out well above 1 of them, even when noisy."""
    device = fast(name, warmup=3, repeats=15)
    result = device.measure({"x1": (conv_stack(1), SHAPE), "x8": (conv_stack(8), SHAPE)})
    assert result["x8"]["ratio"] > 2.0 * result["x1"]["ratio"]
    assert result["x8"]["median_ms"] > result["x1"]["median_ms"]


# --------------------------------------------------------------------------- configs and errors


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_hardware_configs_are_plain_device_kwargs(name):
    cfg = yaml.safe_load((HARDWARE_CONF / f"{name}.yaml").read_text())
    assert cfg["name"] == name
    assert set(cfg) == {"_target_", "name", "threads", "batch_size", "warmup", "repeats", "dtype"}
    cfg.pop("_target_")
    assert cfg["batch_size"] == 1 and cfg["dtype"] == "float32"
    assert cfg["warmup"] == (20 if name == "cuda" else 10)
    if name == "cuda" and not CUDA:
        with pytest.raises(UserError, match="hardware=cpu"):
            build_device(**cfg)
        return
    device = build_device(**cfg)
    assert device.name == name
    assert (device.threads, device.batch_size, device.warmup, device.repeats, device.dtype) == (
        cfg["threads"], cfg["batch_size"], cfg["warmup"], cfg["repeats"], cfg["dtype"]
    )


def test_build_device_returns_the_right_classes():
    assert isinstance(build_device("cpu"), CpuDevice)
    assert isinstance(build_device("onnxruntime"), OnnxRuntimeDevice)
    assert build_device("cpu").name == "cpu"


def test_unknown_device_name_lists_the_choices():
    with pytest.raises(UserError) as info:
        build_device("tpu")
    message = str(info.value)
    assert message == "unknown hardware 'tpu'; choose one of: cpu, onnxruntime, cuda (conf/hardware/)"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threads": 0}, "threads"),
        ({"batch_size": -1}, "batch_size"),
        ({"repeats": 0}, "repeats"),
        ({"warmup": 1.5}, "warmup"),
        ({"dtype": "float64"}, "dtype"),
        ({"thread": 2}, "unknown option"),
    ],
)
def test_invalid_options_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        build_device("cpu", **kwargs)


def test_onnxruntime_is_float32_only():
    with pytest.raises(UserError, match="float32"):
        build_device("onnxruntime", dtype="float16")


@pytest.mark.skipif(CUDA, reason="a CUDA device is available")
def test_cuda_without_gpu_is_a_user_error():
    with pytest.raises(UserError) as info:
        build_device("cuda")
    assert "no CUDA device" in str(info.value)
    assert "hardware=cpu" in str(info.value) and "onnxruntime" in str(info.value)


# --------------------------------------------------------------------------- cuda


@needs_cuda
def test_cuda_fingerprint_and_runner():
    device = fast("cuda")
    fp = device.fingerprint()
    assert fp["cuda_device"] == torch.cuda.get_device_name(device.device)
    json.dumps(fp)
    module = conv_stack(2).train()
    run = device.runner(module, SHAPE)
    assert run() is None
    assert module.training and next(module.parameters()).device.type == "cpu"


@needs_cuda
def test_cuda_predict_matches_cpu_torch():
    device = fast("cuda")
    module = conv_stack(2)
    (out,) = device.predict(module, SHAPE)
    with torch.no_grad():
        expected = module.eval()(device.example_input(SHAPE)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3)


@needs_cuda
def test_cuda_measure_uses_events_and_orders_work():
    device = fast("cuda", warmup=5, repeats=15)
    result = device.measure({"x1": (conv_stack(1, 64), (64, 64, 64)), "x8": (conv_stack(8, 64), (64, 64, 64))})
    check_result(result, ["x1", "x8"], repeats=15)
    assert result["x8"]["ratio"] > result["x1"]["ratio"]
