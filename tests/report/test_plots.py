"""The plots say what they show: derive rule, the export's own point, nothing pruned yet, whole epochs."""
from __future__ import annotations

import re

from matplotlib.figure import Figure
from matplotlib.text import Text

from nas.report.ddpnas_plots import plot_pruning_order
from nas.report.plots import plot_cost_curve
from nas.report.slimmable_plots import plot_width_search


def _texts(monkeypatch):
    """Collect every text a figure holds when it is saved (titles, labels, legends, annotations)."""
    seen: list[str] = []
    save = Figure.savefig

    def spy(fig, *a, **kw):
        seen.extend(t.get_text() for t in fig.findobj(Text))
        return save(fig, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen



def test_width_search_plot_marks_its_own_export(tmp_path, monkeypatch):
    rows = [{"kind": "greedy", "cost": c, "acc": a, "chosen": True} for c, a in ((1.0, 0.5), (2.0, 0.7), (3.0, 0.8))]
    found = {"t0.40": {"target": 1.2, "cost": 1.0, "acc": 0.5}, "t0.70": {"target": 2.1, "cost": 2.0, "acc": 0.7}}
    texts = _texts(monkeypatch)
    plot_width_search(rows, found, tmp_path / "a.png", "ms", this="t0.40")
    assert "t0.40 (this export)" in texts and "t0.70" in texts and "t0.70 (this export)" not in texts
    texts.clear()
    plot_width_search(rows, found, tmp_path / "b.png", "ms", this="t0.70")
    assert "t0.70 (this export)" in texts
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()



def test_pruning_order_before_any_pruning_says_so(tmp_path, monkeypatch):
    choices = {"l0": ["a", "b", "c"], "l1": ["a", "b"]}
    texts = _texts(monkeypatch)
    history = [{"epoch": e, "pruned": []} for e in range(3)]
    plot_pruning_order(history, choices, tmp_path / "p.png", chosen={"l0": "b", "l1": "a"}, first_prune_after=9)
    title = next(t for t in texts if "DDPNAS" in t)
    assert "no candidate pruned in 3 epochs" in title and "after 9 epochs" in title
    assert "pruned after epoch" not in texts and "kept" not in texts  # no colour bar with nothing on it
    texts.clear()
    history[2]["pruned"] = [("l0", "c")]
    plot_pruning_order(history, choices, tmp_path / "q.png")
    assert "pruned after epoch" in texts and "2" in texts and texts.count("left") == 4



def test_cost_curve_names_the_derive_rule_and_whole_epochs(tmp_path, monkeypatch):
    texts = _texts(monkeypatch)
    history = [{"epoch": e, "expected": 3.0 + e / 10, "derived_cost": 3.5} for e in range(3)]
    plot_cost_curve(history, tmp_path / "c.png", 3.8, "ms", derived_label="derived each epoch (budget rule)",
                    exported=3.6)
    assert "derived each epoch (budget rule)" in texts and "this export" in texts
    assert "derived (argmax)" not in texts
    ticks = [t for t in texts if re.fullmatch(r"[\d.−-]+", t or "")]
    assert "1" in ticks and "0.5" not in ticks and "1.5" not in ticks  # whole epochs only



def test_evolution_front_marks_its_own_export(tmp_path, monkeypatch):
    from nas.report.evolution_plots import plot_front

    cands = [{"cost": c, "score": s, "pareto": p} for c, s, p in ((1.0, 0.5, True), (2.0, 0.7, True), (1.5, 0.4, False))]
    found = {"t0.50": {"target": 1.1, "cost": 1.0, "score": 0.5}, "t0.90": {"target": 2.1, "cost": 2.0, "score": 0.7}}
    texts = _texts(monkeypatch)
    plot_front(cands, found, tmp_path / "f.png", "ms", this="t0.90")
    assert "t0.90 (this export)" in texts and "t0.50 (this export)" not in texts


def test_every_strategy_takes_the_export_it_plots_for():
    """nas-search asks each strategy for the plots of one export: ``extra_plots(label, arch)``."""
    import inspect

    import nas.strategies.ddpnas
    import nas.strategies.evolution
    import nas.strategies.proxyless
    import nas.strategies.slimmable
    from nas.strategies.base import SearchStrategy

    classes = {c for m in (nas.strategies.ddpnas, nas.strategies.evolution, nas.strategies.proxyless,
                           nas.strategies.slimmable)
               for _, c in inspect.getmembers(m, inspect.isclass) if issubclass(c, SearchStrategy)}
    assert len(classes) >= 4
    for cls in classes:
        inspect.signature(cls.extra_plots).bind(None, "t0.70", None)
