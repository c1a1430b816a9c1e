"""Latency-table items of the mbv3 space: keys that name SE and the activation, tables and analytic
models built without timing, and costs that follow the new ops."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from nas.apps.common import CONF_DIR
from nas.errors import UserError
from nas.latency.analytic import AnalyticDevice, build_flops_model, build_params_model, count_flops, count_params
from nas.latency.items import arch_net, entry_key, fixed_keys, table_items
from nas.latency.table import LatencyTable
from supernets.space import SearchSpace


def _space(name: str) -> SearchSpace:
    return SearchSpace.from_yaml(Path(CONF_DIR) / "space" / f"{name}.yaml")


@pytest.fixture(scope="module")
def mbv3() -> SearchSpace:
    return _space("mbv3_tiny")


def test_keys_name_se_and_act_and_never_meet_mbv2_keys(mbv3):
    items = table_items(mbv3, 10)
    blocks = {k: v for k, v in items.items() if v["role"] == "block"}
    specs = {layer.spec(op) for layer in mbv3.layers for op in layer.choices if op != "zero"}
    assert len(blocks) == len(specs)  # one entry per distinct block: SE / act variants are not merged
    for k, v in blocks.items():
        f = v["fields"]
        assert f"act={f['act']}" in k
        assert ("se=0.25" in k) == ("se" in f)
    s1 = mbv3.layer("s1.l0")
    assert entry_key(s1.spec("k5_e3_se")) == "ir:in16x16x8:out16:k5:e3:s2:skip0:se=0.25:act=relu"
    assert entry_key(s1.spec("k3_e4")).endswith(":act=relu")
    assert entry_key(s1.spec("k3_e4_hs")).endswith(":act=hard_swish")
    # the same shapes in mbv2_tiny (relu6, no SE) have other keys: no item is ever taken for the other
    assert not set(items) & set(table_items(_space("mbv2_tiny"), 10))
    assert all(k.endswith(":act=hard_swish") for k in fixed_keys(items).values())


@pytest.mark.parametrize("kind", ["flops", "params"])
def test_analytic_models_are_exact_and_se_costs_more(mbv3, kind):
    build, count = {"flops": (build_flops_model, count_flops), "params": (build_params_model, count_params)}[kind]
    model = build(mbv3, 10)
    rng = random.Random(0)
    for arch in [mbv3.largest(10), mbv3.smallest(10)] + [mbv3.sample(10, rng) for _ in range(4)]:
        net, shape = arch_net(mbv3, arch)
        whole = count(net, shape) if kind == "flops" else count(net)
        assert model.predict(arch) == pytest.approx(whole / 1e6, rel=1e-9)  # additive model == whole net
    base = mbv3.smallest(10).replace(**{"s2.l1": "k5_e4"})
    with_se = base.replace(**{"s2.l1": "k5_e4_se"})
    assert model.predict(with_se) > model.predict(base)
    # the device interface counts the same
    dev = AnalyticDevice(kind)
    assert dev.measure_nets(mbv3, [with_se])[0] == pytest.approx(model.predict(with_se), rel=1e-9)


def test_a_table_of_the_new_space_builds_from_untimed_measurements(mbv3):
    """The table file path (entries keyed by block, fixed parts, additive prediction) with counts as
    'times': hardware=flops measures every item, no clock involved."""
    items = table_items(mbv3, 10)
    dev = AnalyticDevice("flops")
    res = dev.measure_modules({k: (v["module"], v["input_shape"]) for k, v in items.items()})
    entries = {k: {"median_ms": res[k], "ratio": res[k], "spread": 0.0, "count": 1, "role": v["role"],
                   "fields": v["fields"]} for k, v in items.items()}
    table = LatencyTable.from_entries(mbv3, entries, fixed_keys(items),
                                      {"model": "scale_offset", "scale": 1.0, "per_block_ms": 0.0, "offset_ms": 0.0},
                                      {"device": "flops", "device_fingerprint": "aaaaaaaaaaaa", "num_classes": 10,
                                       "reference_ms": 1.0})
    flops = build_flops_model(mbv3, 10)
    rng = random.Random(1)
    for arch in [mbv3.sample(10, rng) for _ in range(5)]:
        assert table.predict(arch) == pytest.approx(flops.predict(arch), rel=1e-9)
    # a table of mbv2_tiny does not serve mbv3_tiny: its entries lack every mbv3 key
    other = table_items(_space("mbv2_tiny"), 10)
    with pytest.raises(UserError, match=r"latency table lacks \d+ entries of space 'mbv3_tiny'"):
        LatencyTable.from_entries(mbv3, {k: entries[k] if k in entries else {"median_ms": 1.0} for k in other},
                                  fixed_keys(other), {"model": "scale_offset", "scale": 1.0, "per_block_ms": 0.0,
                                                      "offset_ms": 0.0},
                                  {"device": "flops", "device_fingerprint": "aaaaaaaaaaaa", "num_classes": 10})
