"""``nas-bench suite=tabular``: the engine against a table of true accuracies (a made-up table by
default; NAS-Bench-Macro itself when the file is on this machine)."""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from nas.apps.bench import run_bench
from nas.bench.tabular import Table, run_tabular
from nas.errors import UserError

REPO = Path(__file__).resolve().parents[2]
MACRO = Path("/work/shared/data/nas-bench-macro/nas-bench-macro_cifar10.json")


def made_up_table(n: int = 7, seed: int = 0) -> dict[str, dict[str, float]]:
    """NAS-Bench-Macro's shape: ``n`` layers of 0 (identity), 1 (small block), 2 (large block);
    accuracy grows with capacity with diminishing returns and depends on neighbouring layers;
    FLOPs are additive (later layers cheaper, as after a stride)."""
    rng = random.Random(seed)
    flops = {(i, c): [1e6, 6e6, 14e6][int(c)] * (1.6 - i / n) for i in range(n) for c in "012"}
    gain = {(i, c): [0.0, 1.0, 1.5][int(c)] * rng.uniform(0.6, 1.4) for i in range(n) for c in "012"}
    pair = {(i, a, b): rng.gauss(0, 0.3) for i in range(n - 1) for a in "012" for b in "012"}
    table = {}
    for key in map("".join, itertools.product("012", repeat=n)):
        acc = 80 + 2 * sum(gain[i, c] for i, c in enumerate(key)) ** 0.8 + sum(
            pair[i, key[i], key[i + 1]] for i in range(n - 1))
        table[key] = {"mean_acc": round(acc, 2), "flops": sum(flops[i, c] for i, c in enumerate(key)), "params": 1}
    return table


def test_table_decisions_oracle_and_missing_architectures():
    t = Table(made_up_table(n=4))
    assert list(t.decisions) == ["d0", "d1", "d2", "d3"] and t.decisions["d0"] == ("0", "1", "2")
    budget = t.budget_at(50)
    key, acc = t.oracle(budget)
    assert t.cost[key] <= budget and acc == max(s for k, s in t.score.items() if t.cost[k] <= budget)
    arch = dict(zip(t.decisions, key))
    assert t.score_of(arch) == acc and t.cost_of(arch) == t.cost[key]
    partial = Table({"01": {"mean_acc": 1, "flops": 2}, "10": {"mean_acc": 3, "flops": 4}})
    assert partial.cost_of({"d0": "1", "d1": "1"}) == float("inf")  # not in the table: never in a budget


@pytest.mark.parametrize("entries,words", [
    ({}, "non-empty"),
    ({"01": {"mean_acc": 1, "flops": 2}, "012": {"mean_acc": 1, "flops": 2}}, "one character per decision"),
    ({"01": {"acc": 1, "flops": 2}}, "lacks 'mean_acc'"),
    ({"01": {"mean_acc": "high", "flops": 2}}, "must be numbers"),
])
def test_malformed_tables_are_user_errors(entries, words):
    with pytest.raises(UserError, match=words):
        Table(entries)


def test_engine_regret_below_random_search_on_a_made_up_table():
    """2,187 architectures, budgets at the quartiles, 8 seeds, 120 queries: regrets are >= 0, never grow
    with more queries, and the engine's median ends lower than random search's at every budget."""
    t = Table(made_up_table())
    res = run_tabular(t, [25, 50, 75], range(8), 120, [30, 60], {"method": "aging"})
    assert res["checkpoints"] == [30, 60, 120]
    for b in res["budgets"]:
        key, acc = t.oracle(b["budget"])
        assert b["oracle"] == {"arch": key, "score": acc, "cost": t.cost[key]}
        for name in ("engine", "random"):
            meds = [b[name]["regret"][str(n)]["median"] for n in res["checkpoints"]]
            assert min(meds) >= 0 and meds == sorted(meds, reverse=True)
            assert all(t.cost[k] <= b["budget"] for k in b[name]["found"])
        assert b["engine"]["regret"]["120"]["median"] < b["random"]["regret"]["120"]["median"]
        assert b["engine"]["regret"]["120"]["mean"] < b["random"]["regret"]["120"]["mean"]


def _bench(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("bench", overrides)


def test_nas_bench_tabular_writes_per_budget_oracle_engine_and_random(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(made_up_table(n=6)))
    cfg = _bench(["suite=tabular", f"tabular.path={path}", f"out={tmp_path / 'out'}", "tabular.seeds=4",
                  "tabular.queries=60", "tabular.checkpoints=[20,40]", "tabular.predictor.queries=30",
                  "tabular.predictor.fit=10", "tabular.predictor.search_queries=100", "tabular.predictor.kind=ridge",
                  "tabular.predictor_quality.fits=[20]", "tabular.predictor_quality.seeds=2",
                  "tabular.predictor_quality.held_out=200"])
    metric = run_bench(cfg)
    res = json.loads((tmp_path / "out" / "bench.json").read_text())["tabular"]
    assert [b["percentile"] for b in res["budgets"]] == [25, 50, 75] and res["seeds"] == [0, 1, 2, 3]
    for b in res["budgets"]:
        assert set(b["engine"]["regret"]) == set(b["random"]["regret"]) == {"20", "30", "40", "60"}
        assert set(b["predictor"]["regret"]) == {"20", "30"}  # it spends 30 true scores, no more
        assert b["predictor"]["queries_used_median"] == 30
        assert b["oracle"]["score"] == Table.load(path).oracle(b["budget"])[1]
    q = res["predictor_quality"]
    assert set(q["kinds"]) == {"ridge", "gbt", "mlp"} and q["held_out"] == 200
    assert all(-1 <= row["20"]["median"] <= 1 for row in q["kinds"].values())
    assert q["kinds"]["ridge"]["20"]["median"] > 0.3  # the made-up table is mostly additive
    v = res["verdict"]
    assert set(v) == {"p25", "p50", "p75"} and metric == pytest.approx(sum(x["engine"] for x in v.values()) / 3)
    assert "| p25 <=" in (tmp_path / "out" / "bench.md").read_text()


@pytest.mark.parametrize("overrides,words", [
    ([], "suite=tabular needs a table"),
    (["tabular.path=/nonexistent/table.json"], "no such file"),
    (["tabular.path=TABLE", "+tabular.engine.temperature=2"], "unknown engine keys"),
    (["tabular.path=TABLE", "tabular.engine.method=annealing"], "method 'annealing' is unknown"),
    (["tabular.path=TABLE", "tabular.predictor.kind=forest"], "tabular.predictor.kind='forest' is unknown"),
    (["tabular.path=TABLE", "+tabular.predictor.depth=3"], "tabular.predictor: unknown keys"),
])
def test_tabular_mistakes_are_one_line_user_errors(tmp_path, overrides, words):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(made_up_table(n=3)))
    cfg = _bench(["suite=tabular", f"out={tmp_path / 'out'}", *[o.replace("TABLE", str(path)) for o in overrides]])
    with pytest.raises(UserError, match=words):
        run_bench(cfg)


@pytest.mark.skipif(not MACRO.is_file(), reason=f"NAS-Bench-Macro is not at {MACRO}")
def test_nas_bench_macro_engine_within_a_tenth_of_a_point_and_below_random():
    """The real table, the hardest of the three budgets (75th percentile), 10 seeds, 300 queries."""
    t = Table.load(MACRO)
    assert len(t.score) == 6561 and t.oracle(t.budget_at(75)) == ("22211200", pytest.approx(92.83, abs=0.005))
    res = run_tabular(t, [75], range(10), 300, [100], {"method": "aging"})
    b = res["budgets"][0]
    assert b["engine"]["regret"]["300"]["median"] <= 0.1
    assert b["engine"]["regret"]["300"]["median"] < b["random"]["regret"]["300"]["median"] - 0.1
