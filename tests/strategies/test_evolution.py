"""strategy=evolution: sandwich training over every decision, one evolutionary search per target,
exports within their targets, specialising a trained supernet without training."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
import torch

from nas.errors import UserError
from nas.latency.analytic import build_params_model
from nas.strategies.evolution import EvolutionSearch, pareto_front
from supernets.space import SearchSpace
from supernets.supernet import Supernet
from tests.helpers import run_app

REPO = Path(__file__).resolve().parents[2]
TINY_SPACE = REPO / "conf" / "space" / "mbv2_tiny.yaml"
#: a small space with ops and widths: every decision kind the strategy samples and searches
OPS_AND_WIDTHS = {
    "name": "ops_widths", "resolution": 16, "stem": {"channels": 8, "stride": 2}, "first": {"channels": 8, "kernel": 3},
    "stages": [{"channels": 16, "layers": 2, "stride": 2}, {"channels": 24, "layers": 2, "stride": 2}],
    "ops": ["k3_e3", "k5_e6"], "zero": True, "widths": [0.5, 1.0], "head": {"channels": 32}}
#: a search of seconds on the default space and digits: one epoch of 6 batches, 6 candidates per target
TINY_EVOLUTION = ("strategy=evolution", "strategy.epochs=1", "+trainer.limit_train_batches=6", "strategy.module.queries=6",
                  "strategy.module.engine.population=3", "strategy.module.engine.sample=2", "export.calib_batches=2",
                  "strategy.module.calib_batches=2", "progress=none", "hardware.threads=1")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_pareto_front_keeps_what_nothing_beats():
    pts = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (3.0, 0.7), (4.0, 0.9), (0.5, 0.1)]
    assert pareto_front(pts) == [5, 0, 2, 4]
    # equal points do not beat each other: both are on the front, whichever comes first
    tied = [(1.0, 0.5), (2.0, 0.7), (2.0, 0.7), (3.0, 0.6)]
    assert pareto_front(tied) == [0, 1, 2] and set(pareto_front(tied[::-1])) == {3, 2, 1}


def test_sandwich_trains_largest_smallest_and_random_archs_over_every_decision():
    space = SearchSpace.from_dict(OPS_AND_WIDTHS)
    torch.manual_seed(0)
    cost = build_params_model(space, 10)
    module = EvolutionSearch(Supernet(space, 10), cost, targets=[0.5], n_random=2)
    lo, hi = cost.bounds()
    seen = {d: set() for d in space.decisions()}
    for _ in range(60):
        archs = module.sample_archs()
        assert len(archs) == 4
        assert cost.predict(archs[0]) == pytest.approx(hi) and cost.predict(archs[1]) == pytest.approx(lo)
        for a in archs[2:]:
            for d, c in a.choices.items():
                seen[d].add(c)
    assert seen == {d: set(cs) for d, cs in space.decisions().items()}  # ops, zero and widths all drawn
    assert "s1.width" in seen and "zero" in seen["s2.l1"]
    uniform = EvolutionSearch(Supernet(space, 10), cost, targets=[0.5], sampling="uniform")
    assert len(uniform.sample_archs()) == 1


def test_skip_prob_sets_how_often_random_archs_skip_a_layer():
    space = SearchSpace.from_dict(OPS_AND_WIDTHS)
    cost = build_params_model(space, 10)
    skippable = [d for d, cs in space.decisions().items() if "zero" in cs]
    torch.manual_seed(0)
    rates = {}
    for p in (None, 0.8):
        module = EvolutionSearch(Supernet(space, 10), cost, targets=[0.5], skip_prob=p)
        archs = [module.random_arch() for _ in range(1000)]
        rates[p] = sum(a.choices[d] == "zero" for a in archs for d in skippable) / (1000 * len(skippable))
        widths = {a.choices["s1.width"] for a in archs}
        assert widths == set(space.decisions()["s1.width"])  # widths are still drawn uniformly
    n_choices = len(space.decisions()[skippable[0]])
    assert rates[None] == pytest.approx(1 / n_choices, abs=0.03) and rates[0.8] == pytest.approx(0.8, abs=0.03)


@pytest.mark.parametrize("kw,words", [({"sampling": "all"}, "sampling"), ({"skip_prob": 1.0}, "skip_prob"), ({"engine": {"temperature": 1}}, "unknown keys"),
                                      ({"engine": {"method": "annealing"}}, "method is one of"),
                                      ({"min_fraction": 1.5}, "min_fraction"), ({"queries": 0}, "queries"),
                                      ({"predictor": {"kind": "forest"}}, "predictor.kind"),
                                      ({"predictor": {"depth": 2}}, "predictor: unknown keys"),
                                      ({"queries": 5, "predictor": {"fit": 9}}, "predictor.fit")])
def test_bad_options_are_user_errors(kw, words):
    space = SearchSpace.from_dict(OPS_AND_WIDTHS)
    with pytest.raises(UserError, match=words):
        EvolutionSearch(Supernet(space, 10), build_params_model(space, 10), targets=[0.5], **kw)


@pytest.fixture(scope="module")
def evolution_run(tmp_path_factory):
    """ONE tiny `nas-search strategy=evolution` on the default space and digits (FLOPs as the cost)."""
    run_dir = tmp_path_factory.mktemp("evolution") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HWNAS_CACHE", str(run_dir.parent / "cache"))
        mp.setenv("WANDB_MODE", "disabled")
        run = run_app("nas.apps.search", *TINY_EVOLUTION, "hardware=flops", "strategy.targets=[0.4,0.6,0.8]",
                      f"hydra.run.dir={run_dir}")
    assert run.returncode == 0, run.describe()
    return run, run_dir


def test_one_export_per_target_within_its_target_and_the_best_of_its_candidates(evolution_run):
    run, run_dir = evolution_run
    exports = sorted(p.name for p in (run_dir / "export").iterdir() if p.is_dir())
    assert exports == ["t0.40", "t0.60", "t0.80"], run.describe()
    record = json.loads((run_dir / "export" / "t0.40" / "evolution.json").read_text())
    for label in exports:
        d = run_dir / "export" / label
        report = json.loads((d / "report.json").read_text())
        lat, found = report["latency_ms"], record["found"][label]
        # within its target, and in the band [min_fraction * T, T] the search asks for
        assert 0.9 * lat["target"] - 1e-9 <= lat["predicted"] <= lat["target"] + 1e-9
        assert report["strategy"] == "evolution" and report["arch"] == found["arch"]
        # the pick is at least as good as every candidate this target's search scored
        mine = [q for q in record["queries_by_target"] if q["target"] == label]
        assert len(mine) == found["queries"] == 6
        assert all(found["score"] >= q["score"] for q in mine) and any(q["picked"] for q in mine)
        assert all(q["cost"] <= lat["target"] + 1e-9 for q in mine)
        # the export is the scored subnet: same inherited weights, same BN calibration (2 batches both), same split
        assert report["val_acc"] == pytest.approx(found["score"], abs=1e-9)
        assert {"evolution.json", "evolution.csv", "front.png"} <= set(report["files"])
        assert report["search_cost"]["candidates_scored"] == len(record["candidates"])
    # the front: every candidate once, the Pareto flags those that nothing beats
    rows = list(csv.DictReader((run_dir / "export" / "t0.40" / "evolution.csv").open()))
    pts = [(float(r["cost_MFLOPs"]), float(r["score"])) for r in rows]
    assert {i for i, r in enumerate(rows) if r["pareto"] == "1"} == set(pareto_front(pts))
    # params and peak activation memory of every candidate, with their own fronts; the picks' params are
    # those of the exported net
    for key, flag in (("params", "pareto_params"), ("peak_activation_kb", "pareto_memory")):
        pts = [(float(r[key]), float(r["score"])) for r in rows]
        assert {i for i, r in enumerate(rows) if r[flag] == "1"} == set(pareto_front(pts))
    pick = next(r for r in rows if "t0.40" in r["picked_for"])
    state = load_file(run_dir / "export" / "t0.40" / "model.safetensors")
    assert int(pick["params"]) == sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)
    assert (run_dir / "export" / "t0.40" / "front_params_memory.png").stat().st_size > 0
    assert len(rows) == len(record["candidates"]) <= 18
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_specialising_the_trained_supernet_needs_no_training(evolution_run, tmp_path):
    """The supernet of the run above, other targets and another cost model: the weights are the
    checkpoint's, the search runs, every pick is within its new target."""
    from nas.data import DigitsDataModule

    _, run_dir = evolution_run
    space = SearchSpace.from_yaml(TINY_SPACE)
    cost = build_params_model(space, 10)
    module = EvolutionSearch(Supernet(space, 10), cost, targets=[0.5, 0.7], queries=3,
                             engine={"population": 2, "sample": 2}, calib_batches=2, supernet_path=str(run_dir))
    assert module.pretrained and module.pretrained["checkpoint"].endswith("last.ckpt")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    name = next(k for k in ckpt["state_dict"] if k.startswith("supernet.blocks.1.0"))
    assert torch.equal(module.supernet.state_dict()[name[len("supernet."):]], ckpt["state_dict"][name])
    dm = DigitsDataModule(resolution=32, batch_size=64, seed=0)
    dm.prepare_data()
    dm.setup()
    module.train_loaders(dm)
    picks = module.derive_all()
    assert set(picks) == {"t0.50", "t0.70"}
    for label, arch in picks.items():
        assert cost.predict(arch) <= module.targets[label] + 1e-9
    # the same search steered by a predictor: as many supernet scores per target, the rest predicted
    steered = EvolutionSearch(Supernet(space, 10), cost, targets=[0.5], queries=6, calib_batches=2,
                              engine={"population": 2, "sample": 2}, supernet_path=str(run_dir),
                              predictor={"enabled": True, "kind": "ridge", "fit": 3, "rounds": 1, "search_queries": 20})
    steered.train_loaders(dm)
    found = steered.search(log=None)["t0.50"]
    assert found["queries"] == len(steered._scores) == 6 and found["stats"]["predictor_fits"] == 1
    assert cost.predict(found["arch"]) <= steered.targets["t0.50"] + 1e-9
    assert found["score"] == max(steered._scores.values())


def test_another_space_or_classes_checkpoint_is_refused_in_one_line(evolution_run, tmp_path):
    _, run_dir = evolution_run
    other = SearchSpace.from_dict(OPS_AND_WIDTHS)
    with pytest.raises(UserError, match=r"holds a supernet of space 'mbv2_tiny'.*not of space=ops_widths"):
        EvolutionSearch(Supernet(other, 10), build_params_model(other, 10), targets=[0.5], supernet_path=str(run_dir))
    space = SearchSpace.from_yaml(TINY_SPACE)
    with pytest.raises(UserError, match="trained for 10 classes, this data has 4"):
        EvolutionSearch(Supernet(space, 4), build_params_model(space, 4), targets=[0.5], supernet_path=str(run_dir))
    with pytest.raises(UserError, match="no checkpoint there"):
        EvolutionSearch(Supernet(space, 10), build_params_model(space, 10), targets=[0.5],
                        supernet_path=str(tmp_path))
