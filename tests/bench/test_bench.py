"""``nas-bench`` on tiny settings: each suite runs end to end and reports what it claims to.

Numbers are never judged here (no timing in unit tests); the suites' real settings run in
``nas-bench`` itself. The procedurally generated dataset is checked for determinism and balance.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from nas.data.synth import SHAPES, TexShapesDataModule, generate_texshapes
from nas.errors import UserError
from nas.latency.table import LatencyTable
from supernets.space import SearchSpace
from supernets.supernet import Supernet
from tests.helpers import TINY

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace.from_dict(TINY)


def _bench_cfg(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("bench", list(overrides), return_hydra_config=False)


# ---------------------------------------------------------------------- dataset
def test_texshapes_is_deterministic_balanced_and_seeded():
    x1, y1 = generate_texshapes(60, size=16, seed=3)
    x2, y2 = generate_texshapes(60, size=16, seed=3)
    x3, _ = generate_texshapes(60, size=16, seed=4)
    assert x1.shape == (60, 3, 16, 16) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert torch.bincount(y1, minlength=len(SHAPES)).tolist() == [6] * len(SHAPES)


def test_texshapes_datamodule_splits_and_config(monkeypatch):
    cfg = _bench_cfg(["space=mbv2_tiny", "data=texshapes", "preset=none"])
    assert cfg.data._target_ == "nas.data.TexShapesDataModule" and cfg.data.resolution == 32
    from hydra.utils import instantiate

    with open_dict(cfg):
        cfg.data.n_train, cfg.data.n_test = 50, 20
    dm = instantiate(cfg.data)
    d = dm.describe()
    assert (d["train"], d["arch"], d["test"], d["classes"], d["resolution"]) == (40, 10, 20, 10, 32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
    with pytest.raises(UserError, match="classes"):
        TexShapesDataModule(classes=11)


# ---------------------------------------------------------------------- memory
def test_forced_path_runs_exactly_the_standalone_net(space):
    """The memory suite's fairness claim: the one-gate weight step computes the sampled path's net."""
    from nas.bench.memory import force_path

    path = space.sample(5, random.Random(2))
    net = Supernet(space, 5, gate="one").eval()
    net.set_phase("weight")
    net.sample("probs")
    force_path(net, path)
    assert not any(m.fixed for m in net.mixed_ops())
    x = torch.randn(2, 3, space.resolution, space.resolution)
    with torch.no_grad():
        assert torch.allclose(net(x), net.extract(path).eval()(x), atol=1e-5)


def test_memory_suite_smoke(space):
    from nas.bench import memory as bm

    res = bm.run_memory_suite(space, num_classes=5, batch_size=4, gates=["one"], phases=["weight"],
                              sharings=["elastic"], repeats=1, warmup=0, steps=1, time_warmup=1, time_rounds=2,
                              threads=1, parallel=3, log=lambda m: None)
    rows = {r["config"]: r for r in res["rows"]}
    assert set(rows) == {"one/weight/elastic", "standalone/largest", "standalone/sampled"}
    for r in rows.values():
        assert r["total_mb"] >= 0 and r["step_ms"] > 0 and r["params"] > 0
    assert rows["standalone/sampled"]["time_vs_sampled"] == pytest.approx(1.0)
    assert "elastic" in res["verdict"] or res["verdict"] == {}
    assert "one/weight/elastic" in bm.markdown(res)


# ---------------------------------------------------------------------- lut
def test_lut_suite_through_the_app(tmp_path, space):
    from nas.apps.bench import run_bench

    cfg = _bench_cfg(["suite=lut", f"out={tmp_path}", "lut.devices=[cpu,cuda]", "lut.samples=2", "lut.retest=false",
                      "lut.measure.rel_ci=null", "lut.measure.calib_nets=3", f"lut.cache_dir={tmp_path / 'cache'}",
                      "lut.device_overrides={repeats: 3, warmup: 1, threads: 1}"])
    with open_dict(cfg):
        cfg.space = OmegaConf.create(TINY)
    run_bench(cfg)
    res = json.loads((tmp_path / "bench.json").read_text())
    cpu = res["lut"]["devices"]["cpu"]
    assert cpu["available"] and cpu["summary"]["n"] == 4 and (tmp_path / cpu["plot"]).is_file()
    if not torch.cuda.is_available():
        assert res["lut"]["devices"]["cuda"]["available"] is False
    assert "| cpu |" in (tmp_path / "bench.md").read_text()


def test_unknown_suite_is_refused():
    from nas.apps.bench import _suites

    assert _suites("all") == ["memory", "lut", "search", "tabular"]  # tabular is skipped without tabular.path
    assert _suites("memory,lut") == ["memory", "lut"] and _suites("slimmable") == ["slimmable"]
    assert _suites("speed") == ["speed"]
    with pytest.raises(UserError, match="memory, lut, search, tabular, slimmable, speed, all"):
        _suites("sped")


# ---------------------------------------------------------------------- search
def test_search_suite_smoke(tmp_path, space):
    """Every part of the protocol on tiny data: the discrimination check, the searches, the three
    baselines, 2 seeds in 2 worker processes, paired intervals, the ranking, the files."""
    from nas.bench import search as bs
    from nas.latency.devices import build_device

    rng = random.Random(0)
    costs = {l.name: [0.0 if op == "zero" else rng.uniform(0.1, 1.0) for op in l.choices] for l in space.layers}
    table = LatencyTable(space, costs, 0.5, {"reference_ms": None})
    dm = TexShapesDataModule(resolution=space.resolution, n_train=120, n_test=40, batch_size=32)
    dm.setup()
    device = build_device("cpu", threads=1, warmup=1, repeats=3)
    strategies = {"proxyless": {"epochs": 2, "module": {"warmup_epochs": 1}},
                  "ddpnas": {"epochs": 2, "module": {"warmup_epochs": 0}},
                  "evolution": {"epochs": 1, "module": {"queries": 6, "calib_batches": 1}},
                  "nosuch": {}}
    proxy = TexShapesDataModule(resolution=space.resolution, n_train=60, n_test=40, batch_size=32)
    proxy.setup()
    res = bs.run_search_suite(space=space, datamodule=dm, device=device, cost_model=table, conf_dir=CONF,
                              targets=[0.6, 0.9], k=2, band=0.5, epochs=1, seeds=[0, 1], strategies=strategies,
                              random_search={"candidates": 4, "calib_batches": 1}, disc={"stop": False},
                              jobs=2, search_datamodule=proxy, log=lambda m: None)
    assert res["search_data"]["train"] == proxy.describe()["train"] < dm.describe()["train"]
    g = res["discrimination"]
    assert len(g["smallest_accs"]) == len(g["largest_accs"]) == 2
    assert g["gap_points"] == pytest.approx(100 * (sum(g["largest_accs"]) - sum(g["smallest_accs"])) / 2)
    methods = {(e["method"], e["budget"]) for e in res["entries"]}
    for b in ("t0.60", "t0.90"):
        for m in ("uniform", "random", "random_search", "proxyless"):
            assert (m, b) in methods
        v = res["verdict"][b]
        p = v["strategies"]["proxyless"]
        for base in ("uniform", "random", "random_search"):
            d = p["vs"][base]
            per_seed = [100 * (x - y) for x, y in zip(v["methods"]["proxyless"]["per_seed"],
                                                     v["methods"][base]["per_seed"])]
            assert d["per_seed"] == pytest.approx(per_seed) and d["ci95"][0] <= d["diff"] <= d["ci95"][1]
            assert d["verdict"] in ("wins", "level", "loses")
        rand = [e for e in res["entries"] if e["budget"] == b and e["method"] == "random"]
        assert len(rand) == 2 and v["methods"]["random"]["k"] == 2
        assert v["methods"]["random"]["per_seed"][1] == pytest.approx((rand[0]["test_accs"][1] + rand[1]["test_accs"][1]) / 2)
        rs = next(e for e in res["entries"] if e["budget"] == b and e["method"] == "random_search")
        assert rs["candidates"] == 4 and rs["supernet_acc"] is not None
        for e in res["entries"]:
            if e["budget"] == b and e["method"] in ("random", "uniform", "random_search"):
                assert e["predicted_ms"] <= res["budgets"][b] + 1e-9
    assert "nosuch" in res["skipped_strategies"]
    assert ("ddpnas", "t0.60") in methods or "ddpnas" in res["skipped_strategies"]
    for b in ("t0.60", "t0.90"):  # train once, one search per target: every export within its target
        evo = next(e for e in res["entries"] if e["budget"] == b and e["method"] == "evolution")
        assert evo["predicted_ms"] <= res["budgets"][b] + 1e-9 and evo["shared_search"]
    rk = res["ranking"]
    distinct = {tuple(sorted(e["choices"].items())) for e in res["entries"]}
    assert rk["n"] == len(distinct) and -1.0 <= rk["kendall_tau"] <= 1.0
    for e in res["entries"]:
        assert len(e["test_accs"]) == 2 and 0.0 <= e["test_acc"] <= 1.0 and e["measured_ms"] > 0
        assert e["supernet_acc"] is not None
    md = bs.markdown(res)
    assert "Kendall tau" in md and "vs random search" in md and "Discrimination check" in md and "proxy subset" in md
    bs.plot(res, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 0
    # a cache of retrainings: the second run with the same recipe retrains nothing and reads the same numbers
    cache = tmp_path / "runs.jsonl"
    kw = dict(space=space, datamodule=dm, device=device, cost_model=table, conf_dir=CONF, targets=[0.6], k=1,
              epochs=1, seeds=[0, 1], strategies={}, disc={"min_gap": 101.0}, retrain_cache=cache, log=lambda m: None)
    first = bs.run_search_suite(**kw)
    assert len(cache.read_text().splitlines()) == 4 and first["retrainings_reused"] == 0
    with cache.open("a") as f:
        f.write('{"recipe": "cut sh')  # a line cut short by a stop is skipped
    again = bs.run_search_suite(**kw)
    assert again["retrainings_reused"] == 4 and again["retrain_seconds"] == 0
    assert again["discrimination"]["largest_accs"] == first["discrimination"]["largest_accs"]
    other = bs.run_search_suite(**dict(kw, epochs=2))  # another recipe: nothing reused
    assert other["retrainings_reused"] == 0
    # a task that does not tell the smallest from the largest net stops after the check
    stopped = bs.run_search_suite(space=space, datamodule=dm, device=device, cost_model=table, conf_dir=CONF,
                                  targets=[0.6], k=1, epochs=1, seeds=[0, 1], strategies={},
                                  disc={"min_gap": 101.0}, log=lambda m: None)
    assert "stopped" in stopped and stopped["entries"] == [] and "Stopped" in bs.markdown(stopped)


def test_search_statistics():
    from nas.bench.search import kendall_tau, paired, t975

    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    p = paired([0.80, 0.82, 0.84], [0.79, 0.80, 0.81])  # differences 1, 2, 3 points
    assert p["diff"] == pytest.approx(2.0) and p["std"] == pytest.approx(1.0)
    assert p["ci95"] == pytest.approx([2.0 - 4.303 / 3 ** 0.5, 2.0 + 4.303 / 3 ** 0.5])
    assert t975(2) == 4.303 and t975(11) == 2.228


def test_retest_tau_is_the_mean_tau_between_seeds_of_the_stand_alone_accuracies():
    from nas.bench.search import ranking_report, retest_tau

    # 3 nets x 3 seeds: seed 0 vs 1 same order (+1), 0 vs 2 one swap (1/3), 1 vs 2 (1/3): mean 5/9
    accs = [[0.80, 0.81, 0.82], [0.82, 0.83, 0.80], [0.84, 0.85, 0.86]]
    assert retest_tau(accs) == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    assert math.isnan(retest_tau([[0.8], [0.9]])) and math.isnan(retest_tau([[0.8, 0.9]]))
    entries = [{"method": "m", "budget": None, "supernet_acc": 0.5 + i / 10, "test_acc": sum(a) / 3, "test_accs": a,
                "predicted_ms": 1.0 + i, "choices": {"l": str(i)}} for i, a in enumerate(accs)]
    rk = ranking_report(entries)
    assert rk["retest_tau"] == pytest.approx(5 / 9) and rk["kendall_tau"] == pytest.approx(1.0)


def test_verdict_reports_the_latency_a_level_net_leaves_unspent():
    """E13's case by hand: a strategy's net level in accuracy with each baseline but cheaper. Each
    comparison carries the strategy's predicted latency over the baseline's (random: mean of its k)."""
    from nas.bench.search import verdict

    def entry(method, ms, accs):
        return {"method": method, "budget": "t", "predicted_ms": ms, "measured_ms": ms, "test_accs": accs,
                "test_acc": sum(accs) / len(accs), "test_std": 0.0}

    res = {"seeds": [0, 1, 2], "budgets": {"t": 1.0},
           "entries": [entry("proxyless", 0.6, [0.880, 0.875, 0.890]), entry("uniform", 0.9, [0.870, 0.880, 0.880]),
                       entry("random_search", 1.0, [0.880, 0.870, 0.885]), entry("random", 0.8, [0.86, 0.87, 0.88]),
                       entry("random", 1.0, [0.88, 0.87, 0.86])]}
    vs = verdict(res)["t"]["strategies"]["proxyless"]["vs"]
    assert vs["uniform"]["latency_ratio"] == pytest.approx(0.6 / 0.9)
    assert vs["random_search"]["latency_ratio"] == pytest.approx(0.6)
    assert vs["random"]["latency_ratio"] == pytest.approx(0.6 / 0.9)  # the mean of 0.8 and 1.0
    assert vs["uniform"]["per_seed"] == pytest.approx([1.0, -0.5, 1.0])
    assert vs["random"]["per_seed"] == pytest.approx([1.0, 0.5, 2.0])


@pytest.mark.parametrize("space,words", [("mbv3_tiny", "no op of space=mbv3_tiny is a choice of every layer"),
                                         ("mbv2_tiny_slim", "does not handle width decisions")])
def test_search_suite_refuses_spaces_it_cannot_compare_in_one_line(space, words):
    from nas.apps.bench import run_search

    with pytest.raises(UserError, match=words):
        run_search(_bench_cfg([f"space={space}"]), Path("."))


@pytest.mark.parametrize("size,words", [("10", "must be an integer >= 20"), ("100", "has none")])
def test_search_proxy_subset_mistakes_stop_in_one_line(size, words):
    from nas.apps.bench import run_search

    cfg = _bench_cfg(["data=texshapes", "preset=none", f"search.search_train_size={size}"])
    with pytest.raises(UserError, match=words):
        run_search(cfg, Path("."))


def test_search_config_presets_and_renamed_key():
    from nas.apps.common import renamed_key_error

    cfg = _bench_cfg([])
    assert cfg.data._target_ == "nas.data.FashionMNISTDataModule" and cfg.hardware.name == "onnxruntime"
    assert cfg.hardware.threads == 1 and cfg.search.preset == "default" and len(cfg.search.targets) == 3
    assert len(cfg.search.seeds) == 3 and cfg.data.train_size == 2000
    full = _bench_cfg(["preset=full"])
    assert full.data.train_size is None and full.search.epochs > cfg.search.epochs
    assert "search.targets=[0.5,0.7]" in renamed_key_error(["search.budgets=[0.5,0.7]"])


def test_uniform_baseline_is_the_priciest_uniform_net_within_budget(space):
    from nas.bench.search import uniform_arch

    costs = {l.name: [{"k3_e3": 1.0, "k5_e3": 2.0, "k3_e6": 3.0, "zero": 0.0}[op] for op in l.choices]
             for l in space.layers}
    table = LatencyTable(space, costs, 1.0, {})
    n = len(space.layers)
    arch, desc = uniform_arch(space, table, 1.0 + 2.0 * n, 5)
    assert desc == "k5_e3" and set(arch.choices.values()) == {"k5_e3"}
    arch, desc = uniform_arch(space, table, 1.0 + 2.0 * n - 0.5, 5)
    assert table.predict(arch) <= 1.0 + 2.0 * n - 0.5


# ---------------------------------------------------------------------- slimmable bench (issue 4)
@pytest.mark.slow  # seven slimmable runs (~90 s quiet); the Hydra suite test below covers the default path
def test_slimmable_bench_smoke(tmp_path):
    """One epoch, two seeds: the width table (slimmable vs alone, averaged over the seeds), the width
    search beside the uniform curve at the same cost, and the files; then the interpolation itself."""
    from nas.bench.slimmable import interpolate, run

    opts = {"data": "digits", "space": "mbv2_tiny_slim", "hardware": "flops", "epochs": "1", "seeds": "0,1",
            "jobs": "1", "bn": "switchable", "n_random": "1", "distill": "true", "out": str(tmp_path),
            "threads": "1", "targets": "0.5,0.8"}
    res = run(opts, ["export.calib_batches=2"])
    widths = res["summary"]["widths"]
    assert [w["multiplier"] for w in widths] == [0.25, 0.5, 0.75, 1.0]
    for i, w in enumerate(widths):
        slim = [100 * s["rows"][i]["slimmable_acc"] for s in res["per_seed"]]
        alone = [100 * s["rows"][i]["alone_acc"] for s in res["per_seed"]]
        assert w["slimmable"][0] == pytest.approx(sum(slim) / 2) and w["alone"][0] == pytest.approx(sum(alone) / 2)
        assert w["diff"][0] == pytest.approx(w["slimmable"][0] - w["alone"][0])
    searched = res["summary"]["searched"]
    assert sorted((f["seed"], f["label"]) for f in searched) == [(0, "t0.50"), (0, "t0.80"), (1, "t0.50"), (1, "t0.80")]
    for f in searched:
        assert f["cost"] <= f["target"] + 1e-9 and f["measured_ms"] is None  # flops: nothing to time
        assert f["uniform_slimmable_at_same"] is not None  # inside the uniform range
    assert {"slimmable_bench.json", "slimmable_bench.md", "slimmable_bench.png"} <= {p.name for p in tmp_path.iterdir()}
    assert "| x0.25 |" in (tmp_path / "slimmable_bench.md").read_text()
    # alone=<that json>: the baselines are reused, not retrained (other slimmable options, one seed)
    again = run({**opts, "seeds": "1,2", "n_random": "0", "alone": str(tmp_path / "slimmable_bench.json"),
                 "out": str(tmp_path / "again")}, ["export.calib_batches=2"])
    assert [r["alone_acc"] for r in again["per_seed"][0]["rows"]] == [r["alone_acc"] for r in res["per_seed"][1]["rows"]]
    assert all(r["alone_acc"] is not None for r in again["per_seed"][1]["rows"])  # seed 2 was not there: trained
    with pytest.raises(UserError, match="other settings"):
        run({**opts, "epochs": "2", "alone": str(tmp_path / "slimmable_bench.json")}, ["export.calib_batches=2"])
    skip = run({**opts, "seeds": "0", "n_random": "0", "alone": "skip", "out": str(tmp_path / "skip")},
               ["export.calib_batches=2"])
    assert all(w["alone"] is None and w["diff"] is None for w in skip["summary"]["widths"])
    assert "— (alone=skip)" in (tmp_path / "skip" / "slimmable_bench.md").read_text()
    # retrain=true (AutoSlim's protocol): every export trained from scratch, against the widths trained alone
    with pytest.raises(UserError, match="slimmable.alone=train"):
        run({**opts, "alone": "skip", "retrain": "true"})
    re = run({**opts, "seeds": "0", "uniform_check": "false", "retrain": "true",
              "alone": str(tmp_path / "slimmable_bench.json"), "out": str(tmp_path / "re")}, ["export.calib_batches=2"])
    assert re["opts"]["uniform_check"] == "false"
    for f in re["summary"]["searched"]:
        assert f["source"] == "greedy" and 0 <= f["retrained_acc"] <= 100
        assert f["retrained_vs_alone"] == pytest.approx(f["retrained_acc"] - f["uniform_alone_at_same"])
    assert "retrained alone vs uniform widths trained alone" in (tmp_path / "re" / "slimmable_bench.md").read_text()
    assert interpolate(1.5, [1.0, 2.0], [10.0, 20.0]) == pytest.approx(15.0)
    assert interpolate(2.0, [2.0, 1.0], [20.0, 10.0]) == pytest.approx(20.0)
    assert interpolate(3.0, [1.0, 2.0], [10.0, 20.0]) is None


def test_slimmable_suite_is_a_nas_bench_suite(tmp_path):
    """``nas-bench suite=slimmable``: Hydra options (no parser of its own) -> bench.json and bench.md."""
    from nas.apps.bench import run_bench
    from nas.bench.slimmable import options

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("bench", overrides=[
            "suite=slimmable", f"out={tmp_path}", "slimmable.epochs=1", "slimmable.alone=skip",
            "slimmable.targets=[0.6]", "slimmable.module.n_random=0", "slimmable.module.fill=false",
            "slimmable.overrides=['export.calib_batches=2']"], return_hydra_config=False)
    opts, extra = options(cfg.slimmable)
    assert opts["targets"] == "0.6" and opts["n_random"] == "0" and opts["fill"] == "false"
    assert "bn" not in opts  # unset: the strategy's own default
    assert extra == ["export.calib_batches=2"]
    with pytest.raises(UserError, match="slimmable.epoch is unknown"):
        options({**cfg.slimmable, "epoch": 3})
    with pytest.raises(UserError, match="slimmable.module.gate is not an option"):
        options({**cfg.slimmable, "module": {"gate": "one"}})
    run_bench(cfg)
    results = json.loads((tmp_path / "bench.json").read_text())
    searched = results["slimmable"]["summary"]["searched"]
    assert [f["label"] for f in searched] == ["t0.60"] and searched[0]["cost"] <= searched[0]["target"] + 1e-9
    assert "`nas-bench suite=slimmable " in results["markdown_slimmable"]
    assert "| x0.25 |" in (tmp_path / "bench.md").read_text()


# ---------------------------------------------------------------------- speed
def test_speed_suite_times_every_option_and_each_step_trains(tmp_path):
    """nas-bench suite=speed on the tiny space: every (net, option) timed in the same rounds, fp32 is
    1.0x of itself, and each option's step really trains (its loss falls over a few steps on one batch)."""
    import math

    from nas.apps.bench import run_bench
    from nas.bench import speed as bsp
    from nas.bench.memory import make_batch
    from supernets.space import SearchSpace

    space = SearchSpace.from_yaml(REPO / "conf" / "space" / "mbv2_tiny.yaml")
    batch = make_batch(space, 10, 16, 0)
    path = space.largest(10)
    for net in bsp.NETS:
        for option in ("fp32", "bf16", "channels_last"):
            step = bsp.build_train_step(net, option, space, 10, path, batch)
            losses = [step() for _ in range(6)]
            assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], (net, option, losses)
    cfg = _bench_cfg(["suite=speed", f"out={tmp_path}", "speed.batch_size=8", "speed.rounds=2", "speed.warmup=1",
                      "speed.threads=1", "speed.options=[fp32,bf16]"])
    run_bench(cfg)
    res = json.loads((tmp_path / "bench.json").read_text())["speed"]
    assert {(r["net"], r["option"]) for r in res["rows"]} == {(n, o) for n in bsp.NETS for o in ("fp32", "bf16")}
    for r in res["rows"]:
        assert r["samples_per_s"] > 0 and r["samples_per_s"] == pytest.approx(8 / (r["median_ms"] / 1e3))
        if r["option"] == "fp32":
            assert r["speedup_vs_fp32"] == pytest.approx(1.0)
    assert set(res["fastest"]) == set(bsp.NETS) and "samples/s" in (tmp_path / "bench.md").read_text()
    with pytest.raises(UserError, match="unknown options"):
        run_bench(_bench_cfg(["suite=speed", f"out={tmp_path}", "speed.options=[fp8]"]))


def test_search_suite_bad_skip_prob_stops_before_any_work():
    from nas.apps.bench import run_search

    cfg = _bench_cfg(["data=texshapes", "preset=none", "search.random_search.skip_prob=1.5"])
    with pytest.raises(UserError, match=r"search.random_search.skip_prob=1.5 must be null .* \[0, 1\)"):
        run_search(cfg, Path("/nonexistent/never-written"))


def test_search_suite_checks_every_strategy_option_before_training(space):
    """A bad option of one strategy (its constructor refuses it) stops the suite up front, named by its
    path in the suite's config; good options build the untrained modules without error."""
    from nas.apps.common import CONF_DIR
    from nas.bench.search import check_strategies

    costs = {l.name: [0.0 if op == "zero" else 1.0 for op in l.choices] for l in space.layers}
    table = LatencyTable(space, costs, 1.0, {})
    budgets = {"t0.50": 0.5 * table.bounds()[1], "t0.80": 0.8 * table.bounds()[1]}  # proxyless: one at a time
    good = {"proxyless": {"module": {"skip_prob": 0.5}}, "evolution": {"module": {"skip_prob": 0.5}}}
    check_strategies(CONF_DIR, {**good, "nosuch": {}}, space=space, num_classes=5, cost_model=table,
                     budgets=budgets, weight_sharing="elastic")  # an unavailable one is the suite's to skip
    for name in ("proxyless", "ddpnas", "evolution"):
        with pytest.raises(UserError, match=rf"^search.strategies.{name}: strategy.module.skip_prob=2"):
            check_strategies(CONF_DIR, {name: {"module": {"skip_prob": 2}}}, space=space, num_classes=5,
                             cost_model=table, budgets=budgets, weight_sharing="elastic")
