"""Cost models: additive costs over a space's layers, for latency tables and analytic counts alike.

Every cost model is a vector of per-candidate costs for every searchable layer plus a fixed part
(stem, first block, head, classifier, and for latency a calibrated per-network overhead):

* ``predict(arch)``   the cost of one architecture;
* ``expected(probs)`` sum_l sum_i p_li cost_li + fixed, differentiable in p (and so in alpha);
* ``bounds()``, ``cheapest()``, ``priciest()`` and ``resolve_target()`` for targets.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from nas.errors import UserError
from supernets.arch import Arch
from supernets.space import ZERO, SearchSpace, width_choice, width_decision


def target_label(target: float | str) -> str:
    """Export folder name of a target: ``0.3`` -> ``t0.30``, ``"2.5ms"`` -> ``t2.5ms``."""
    if isinstance(target, str):
        text = target.strip().lower()
        try:
            target = float(text)
        except ValueError:
            return "t" + text.replace(" ", "")
    t = float(target)
    return f"t{t:.2f}" if t <= 1 else f"t{t:g}"


class CostModel:
    """Additive cost over a space: ``layer_costs[name][i]`` is the cost of candidate i of layer name.

    Spaces with widths: a layer's cost also depends on its input and output channels, which are the
    width choices of its stage and (for a stage's first layer) of the stage before. ``width_costs``
    then holds ``{layer: {(op, in_chs, out_chs): cost}}`` and ``head_delta`` ``{last width: cost of the
    head at that width minus at the widest}``; ``layer_costs`` / ``fixed`` are the costs at the widest
    widths (what :meth:`expected` over op probabilities uses). :meth:`predict` and :meth:`bounds` are
    exact over widths (bounds by dynamic programming along the chain of stages).
    """

    kind = "cost"
    unit = ""

    def __init__(self, space: SearchSpace, layer_costs: Mapping[str, list[float]], fixed: float,
                 meta: Mapping[str, Any] | None = None,
                 width_costs: Mapping[str, Mapping[tuple[str, int, int], float]] | None = None,
                 head_delta: Mapping[int, float] | None = None):
        self.space = space
        self.layer_costs = {k: [float(c) for c in v] for k, v in layer_costs.items()}
        self.fixed = float(fixed)
        self.meta = dict(meta or {})
        for layer in space.layers:
            if len(self.layer_costs.get(layer.name, [])) != len(layer.choices):
                raise ValueError(f"cost model lacks costs for layer {layer.name}")
        self.width_costs = ({k: {tuple(kk): float(vv) for kk, vv in v.items()} for k, v in width_costs.items()}
                            if width_costs is not None else None)
        self.head_delta = {int(k): float(v) for k, v in (head_delta or {}).items()}
        if space.has_widths and self.width_costs is None:
            raise ValueError(f"space {space.name!r} has widths: the cost model needs costs per width")
        self._tensors: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def layer_cost(self, layer, op: str, in_chs: int | None = None, out_chs: int | None = None) -> float:
        """Cost of ``op`` in ``layer`` at the given channels (default: the widest)."""
        if op == ZERO:
            return 0.0
        if self.width_costs is None or in_chs is None:
            return self.layer_costs[layer.name][layer.choices.index(op)]
        return self.width_costs[layer.name][(op, int(in_chs), int(out_chs))]

    def _width_extreme(self, pick) -> tuple[float, dict[str, str]]:
        """Cheapest (``pick=min``) or priciest (``max``) architecture over ops and widths: dynamic
        programming over the stages (a stage's cost depends on its width and the one before it)."""
        sp = self.space
        by_stage: dict[int, list] = {}
        for layer in sp.layers:
            by_stage.setdefault(layer.stage, []).append(layer)

        def stage_cost(si: int, cin: int, cout: int) -> tuple[float, dict[str, str]]:
            total, ops = 0.0, {}
            for layer in by_stage[si]:
                i = cin if layer.index == 0 else cout
                op = pick(layer.choices, key=lambda o: self.layer_cost(layer, o, i, cout))
                ops[layer.name] = op
                total += self.layer_cost(layer, op, i, cout)
            return total, ops

        # best[w] = (cost up to and including this stage with output width w, choices)
        best: dict[int, tuple[float, dict[str, str]]] = {sp.first.out_chs: (0.0, {})}
        for si, ws in enumerate(sp.stage_widths, start=1):
            nxt = {}
            for w in ws:
                options = []
                for wp, (c, ch) in best.items():
                    sc, ops = stage_cost(si, wp, w)
                    options.append((c + sc, {**ch, **ops, width_decision(si): width_choice(w)}))
                nxt[w] = pick(options, key=lambda t: t[0])
            best = nxt
        final = [(c + self.head_delta.get(w, 0.0), ch) for w, (c, ch) in best.items()]
        c, ch = pick(final, key=lambda t: t[0])
        return self.fixed + c, ch

    def _vec(self, name: str, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.device, like.dtype)
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(self.layer_costs[name], device=like.device, dtype=like.dtype)
        return self._tensors[key]

    def predict(self, arch: Arch) -> float:
        self.space.validate(arch)
        total = self.fixed
        if self.width_costs is not None:
            total += self.head_delta.get(self.space.last_width(arch), 0.0)
            for layer, (cin, cout) in zip(self.space.layers, self.space.layer_chs(arch)):
                total += self.layer_cost(layer, arch.choices[layer.name], cin, cout)
            return total
        for layer in self.space.layers:
            total += self.layer_costs[layer.name][layer.choices.index(arch.choices[layer.name])]
        return total

    def expected(self, probs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Expected cost under independent per-decision choice probabilities (differentiable).

        With width decisions in ``probs`` (``s{i}.width``) the expectation is exact over widths too: a
        stage's first layer costs ``sum p(op) p(in width) p(out width) c(op, in, out)`` (its input is
        the previous stage's width), its other layers ``sum p(op) p(w) c(op, w, w)``, and the head
        adds ``sum p(last width) head_delta``. Without them, every stage is at its widest."""
        if self.width_costs is not None and any(d in probs for d in self.space.width_decisions()):
            return self._expected_over_widths(probs)
        total = None
        for layer in self.space.layers:
            p = probs[layer.name]
            term = (p * self._vec(layer.name, p)).sum()
            total = term if total is None else total + term
        return total + self.fixed

    def _width_tensor(self, layer, like: torch.Tensor) -> torch.Tensor:
        """Costs of ``layer`` as ``[op, in width, out width]`` (first layer of a stage) or ``[op, width]``."""
        key = (f"w:{layer.name}", like.device, like.dtype)
        if key not in self._tensors:
            sp = self.space
            outs = sp.stage_widths[layer.stage - 1]
            if layer.index == 0:
                ins = sp.stage_widths[layer.stage - 2] if layer.stage > 1 else (sp.first.out_chs,)
                vals = [[[self.layer_cost(layer, op, i, o) for o in outs] for i in ins] for op in layer.choices]
            else:
                vals = [[self.layer_cost(layer, op, w, w) for w in outs] for op in layer.choices]
            self._tensors[key] = torch.tensor(vals, device=like.device, dtype=like.dtype)
        return self._tensors[key]

    def _expected_over_widths(self, probs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        sp = self.space
        like = next(iter(probs.values()))
        widest = {d: torch.nn.functional.one_hot(torch.tensor(len(ws) - 1), len(ws)).to(like)
                  for d, ws in zip(sp.width_decisions(), sp.stage_widths)}
        pw = [probs.get(d, widest[d]) for d in sp.width_decisions()]
        last = torch.tensor([self.head_delta.get(w, 0.0) for w in sp.stage_widths[-1]], device=like.device,
                            dtype=like.dtype)
        total = self.fixed + (pw[-1] * last).sum()
        for layer in sp.layers:
            c = self._width_tensor(layer, like)
            p_op, p_out = probs[layer.name], pw[layer.stage - 1]
            if layer.index == 0:
                p_in = pw[layer.stage - 2] if layer.stage > 1 else torch.ones(1, device=like.device, dtype=like.dtype)
                total = total + torch.einsum("k,kio,i,o->", p_op, c, p_in, p_out)
            else:
                total = total + torch.einsum("k,kw,w->", p_op, c, p_out)
        return total

    def bounds(self) -> tuple[float, float]:
        """Cost of the cheapest and the most expensive architecture (exact: the model is additive)."""
        if self.width_costs is not None:
            return self._width_extreme(min)[0], self._width_extreme(max)[0]
        lo = self.fixed + sum(min(v) for v in self.layer_costs.values())
        hi = self.fixed + sum(max(v) for v in self.layer_costs.values())
        return lo, hi

    def cheapest(self, num_classes: int) -> Arch:
        if self.width_costs is not None:
            return self.space.make_arch(self._width_extreme(min)[1], num_classes)
        return self.space.make_arch(
            {l.name: l.choices[min(range(len(l.choices)), key=self.layer_costs[l.name].__getitem__)]
             for l in self.space.layers}, num_classes)

    def priciest(self, num_classes: int) -> Arch:
        if self.width_costs is not None:
            return self.space.make_arch(self._width_extreme(max)[1], num_classes)
        return self.space.make_arch(
            {l.name: l.choices[max(range(len(l.choices)), key=self.layer_costs[l.name].__getitem__)]
             for l in self.space.layers}, num_classes)

    def resolve_target(self, target: float | str | None) -> float | None:
        """A target in this model's unit from ``0 < x <= 1`` (fraction of the most expensive
        architecture), a number ``> 1`` or a string like ``"2.5ms"`` (absolute). Targets outside the
        reachable range are refused with the range (below it: blaming the table where it is suspect,
        see :meth:`suspect`)."""
        if target is None or target == "" or (isinstance(target, str) and target.lower() == "none"):
            return None
        lo, hi = self.bounds()
        unit = self.unit
        allowed = (f"a target is a fraction of the largest subnet's {self.kind} (0 < x <= 1, e.g. 0.5) or an "
                   f"absolute value such as '{hi / 2:.3g}{unit}' (a bare number above 1 is read as {unit}); this "
                   f"space reaches {lo:.4g}-{hi:.4g} {unit}")
        if isinstance(target, str):
            t = target.strip().lower()
            try:
                if unit and t.endswith(unit.lower()):
                    value = float(t[: -len(unit)])
                elif t.endswith("x"):
                    value = float(t[:-1]) * hi
                else:
                    value = float(t)
                    value = value * hi if 0 < value <= 1 else value
            except ValueError:
                raise UserError(f"strategy.targets: {target!r} is not a number; {allowed}") from None
        else:
            value = float(target)
            value = value * hi if 0 < value <= 1 else value
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"strategy.targets: {target!r} is not allowed: {allowed}")
        if value > hi * (1 + 1e-9):
            raise UserError(
                f"strategy.targets: {target!r} = {value:.4g} {unit} is above the largest reachable {self.kind} of "
                f"this space ({hi:.4g} {unit}), so it constrains nothing; {allowed}")
        if value < lo:
            suspect = self.suspect()
            if suspect:
                raise UserError(
                    f"target {target!r} = {value:.4g} {unit} is below the smallest reachable {self.kind} of this "
                    f"space according to the latency table ({lo:.4g} {unit}, fraction {lo / hi:.3f} of the largest), "
                    f"but the table itself is suspect: {suspect}. Rebuild it on a quiet machine "
                    f"(`lut.rebuild=true`, nothing else running), then try the target again")
            raise UserError(
                f"target {target!r} = {value:.4g} {unit} is below the smallest reachable {self.kind} of this "
                f"space ({lo:.4g} {unit}, fraction {lo / hi:.3f} of the largest); choose a target >= "
                f"{lo:.4g}{unit} or a fraction >= {lo / hi:.3f}")
        return value

    #: A measured table whose smallest net costs more than this fraction of its largest is suspect: the
    #: smallest nets skip most blocks (``zero``) and run the cheapest ops. Tables measured on a busy
    #: machine came out at 0.935 (mbv2_tiny on 2 loaded cores); ONNX Runtime on a quiet one at 0.37.
    IMPLAUSIBLE_RATIO = 0.9

    def suspect(self) -> str | None:
        """Why this cost model's numbers should not be believed (None for an exact count, or a
        measured table that passed its check and spans a plausible range)."""
        if not self.measured:
            return None
        untrusted = self.meta.get("untrusted")
        if untrusted:
            return f"it was accepted with lut.accept_untrusted although {untrusted}"
        lo, hi = self.bounds()
        if hi > 0 and lo / hi > self.IMPLAUSIBLE_RATIO:
            return (f"it puts the smallest subnet at {lo / hi:.3f} of the largest, which is implausible for subnets "
                    f"that skip most blocks (a table measured while other processes ran looks like this)")
        return None

    #: True for measured costs (a latency table), False for exact counts.
    measured = False

    def resolve_targets(self, targets: Any) -> dict[str, float]:
        """``{label: value}`` for ``strategy.targets`` (a list, or one value), largest first.

        Each target is a fraction of the most expensive architecture (``0 < x <= 1``) or an absolute
        value (``"2.5ms"``, or a bare number above 1 in this model's unit); labels name the export
        folders (:func:`target_label`). Duplicates are refused.
        """
        if targets is None or (isinstance(targets, str) and targets.strip().lower() in ("", "none", "null")):
            return {}
        items = [targets] if isinstance(targets, (str, int, float)) else list(targets)
        out: dict[str, float] = {}
        for t in items:
            label = target_label(t)
            if label in out:
                raise UserError(f"strategy.targets lists {t!r} twice; give each target once")
            out[label] = self.resolve_target(t)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def summary(self) -> dict[str, Any]:
        lo, hi = self.bounds()
        return {"kind": self.kind, "unit": self.unit, "min": lo, "max": hi, **self.meta}


class FlopsModel(CostModel):
    kind = "flops"
    unit = "MFLOPs"


class ParamsModel(CostModel):
    kind = "params"
    unit = "Mparams"



