"""ProxylessNAS (Cai, Zhu, Han; ICLR 2019): binarized paths with the expected latency in the loss.

Schedule: ``warmup_epochs`` of weight training on uniformly random paths; then every batch one
weight step on the training split (one sampled path, SGD) and, every ``arch_every`` batches, one
architecture step on a batch of the arch split (Adam on alpha, betas (0, 0.999), its own optimizer).
The architecture loss is the cross-entropy combined with the expected latency E[lat] under
p = softmax(alpha) (see :func:`latency_loss`).

``derive()``: with ``derive="argmax"`` (the published rule) the most probable candidate per layer.
The loss steers the *expected* latency, and the argmax of spread-out probabilities can land far from
it (the zero ops can win the argmax in every skippable layer). ``derive="budget"`` (default when there is a latency target) takes
the most probable architecture, sum_l log p_l, among those whose predicted latency lies in
``[budget_floor * T, T]`` (an exact group knapsack, :func:`nas.strategies.knapsack.group_knapsack`), falling
back to the argmax when none does.

Widths (spaces with ``s{i}.width`` decisions) are searched with the ops: every sampled path also
draws one width per stage from p = softmax of the stage's width logits (uniformly in the warm-up),
and the supernet runs that slice of the shared weights. A width is a discrete slice, so the gate
gradient of the ops has no counterpart for it; its logits learn from REINFORCE (the ProxylessNAS
paper's alternative for non-differentiable choices): the architecture loss adds
``(L - b) * log p(sampled widths)`` with ``L`` the (detached) architecture loss and ``b`` its moving
average (``width_baseline_decay``), and the expected latency is exact over widths
(:meth:`nas.latency.cost.CostModel.expected`, from the table's entries per width), so the latency term
reaches the width logits directly. ``derive="budget"`` then maximises sum log p over ops *and*
widths: one knapsack over the ops per combination of stage widths (the ``max_width_combos`` most
probable combinations).
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F

from nas.errors import UserError, check_choice, check_skip_prob
from nas.strategies.base import SearchStrategy
from nas.strategies.knapsack import group_knapsack
from supernets.arch import Arch
from supernets.mixed import GATE_MODES
from supernets.space import width_choice

LOSS_FORMS = ("mul_log", "add", "abs", "none")
DERIVE_RULES = ("budget", "argmax")


def latency_loss(ce: torch.Tensor, expected: torch.Tensor, target: float | None, form: str = "mul_log",
                 a: float = 0.2, b: float = 0.3, lam: float = 0.1) -> torch.Tensor:
    """Cross-entropy combined with the expected latency ``expected`` (ms) and target ``target`` (ms).

    * ``mul_log`` (ProxylessNAS): ``ce * a * (log E / log T) ** b``. Logs are taken of microseconds,
      so that sub-millisecond latencies keep the ratio meaningful (log of ms < 1 is negative).
    * ``add`` (ProxylessNAS): ``ce + lam * (E - T) / T``: pushes latency down at a constant rate.
    * ``abs``: ``ce + lam * |E - T| / T``: pulls the expected latency onto the target from either side.
    * ``none``: cross-entropy only.
    """
    if form == "none" or target is None:
        return ce
    if form == "mul_log":
        ratio = torch.log(expected * 1000.0) / math.log(target * 1000.0)
        return ce * a * ratio.clamp_min(1e-6) ** b
    if form == "add":
        return ce + lam * (expected - target) / target
    if form == "abs":
        return ce + lam * (expected - target).abs() / target
    raise ValueError(f"latency loss form {form!r} unknown; choose one of {', '.join(LOSS_FORMS)}")


class ProxylessSearch(SearchStrategy):
    name = "proxyless"
    one_target_per_search = True

    def __init__(self, supernet, cost_model, targets=None, *, gate: str = "one",
                 warmup_epochs: int = 2, weight_lr: float = 0.05, weight_momentum: float = 0.9,
                 weight_decay: float = 4e-5, nesterov: bool = True, arch_lr: float = 0.006,
                 arch_betas: tuple[float, float] = (0.0, 0.999), arch_every: int = 1,
                 loss_form: str = "mul_log", loss_a: float = 0.2, loss_b: float = 0.3,
                 loss_lambda: float = 0.1, label_smoothing: float = 0.0, grad_clip: float = 5.0,
                 derive: str = "argmax", budget_floor: float = 0.95, width_baseline_decay: float = 0.9,
                 max_width_combos: int = 2048, skip_prob: float | None = None):
        super().__init__(supernet, cost_model, targets)
        self.skip_prob = check_skip_prob("strategy.module.skip_prob", skip_prob)
        if not 0.0 <= float(width_baseline_decay) < 1.0:
            raise UserError(f"strategy.module.width_baseline_decay={width_baseline_decay} must be in [0, 1)")
        self.width_baseline_decay = float(width_baseline_decay)
        self.max_width_combos = max(1, int(max_width_combos))
        self.search_widths = self.supernet.space.has_widths
        # moving average of the architecture loss: the REINFORCE baseline of the width logits (NaN: none yet)
        self.register_buffer("width_baseline", torch.tensor(float("nan")))
        check_choice("strategy.module.derive", derive, DERIVE_RULES)
        if not 0.0 <= float(budget_floor) <= 1.0:
            raise UserError(f"strategy.module.budget_floor={budget_floor} must be in [0, 1]")
        self.derive_rule = derive
        self.budget_floor = float(budget_floor)
        check_choice("strategy.module.loss_form", loss_form, LOSS_FORMS)
        check_choice("strategy.module.gate", gate, GATE_MODES)
        self.automatic_optimization = False
        self.supernet.set_gate(gate)
        self.gate = gate
        self.warmup_epochs = int(warmup_epochs)
        self.weight_opt_args = dict(lr=weight_lr, momentum=weight_momentum, weight_decay=weight_decay,
                                    nesterov=nesterov)
        self.arch_opt_args = dict(lr=arch_lr, betas=tuple(arch_betas), weight_decay=0.0)
        self.arch_every = max(1, int(arch_every))
        self.loss_args = dict(form=loss_form, a=loss_a, b=loss_b, lam=loss_lambda)
        self.label_smoothing = label_smoothing
        self.grad_clip = grad_clip

    def train_loaders(self, datamodule):
        return self.paired_loaders(datamodule)

    def configure_optimizers(self):
        w = torch.optim.SGD(self.supernet.weight_parameters(), **self.weight_opt_args)
        a = torch.optim.Adam(self.supernet.arch_parameters(), **self.arch_opt_args)
        epochs = max(1, self.trainer.max_epochs or 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(w, T_max=epochs)
        return [w, a], [sched]

    @property
    def in_warmup(self) -> bool:
        return self.current_epoch < self.warmup_epochs

    def expected_latency(self) -> torch.Tensor:
        """E[lat] under p = softmax(alpha), in fp32 (alpha is fp32; an autocast region would run the
        cost model's einsum in bf16/fp16)."""
        with torch.autocast(self.supernet.arch_parameters()[0].device.type, enabled=False):
            return self.cost_model.expected({k: v.float() for k, v in self.supernet.probs().items()})

    def training_step(self, batch, batch_idx):
        opt_w, opt_a = self.optimizers()
        net = self.supernet
        x, y = batch["train"]
        # ---- weight step: one sampled path (uniform during warm-up)
        net.set_phase("weight")
        net.sample("uniform" if self.in_warmup else "probs", skip_prob=self.skip_prob)
        self.sync_path()
        opt_w.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y, label_smoothing=self.label_smoothing)
        self.manual_backward(loss)
        opt_w.step()
        self.count_images(len(y))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        # ---- architecture step on the arch split
        if not self.in_warmup and batch_idx % self.arch_every == 0:
            xa, ya = batch["arch"]
            net.set_phase("arch")
            net.sample("probs")
            self.sync_path()
            opt_a.zero_grad(set_to_none=True)
            # weights take no gradient in the architecture step (and DDP's weight buckets stay untouched)
            weights = [p for p in net.weight_parameters() if p.requires_grad]
            for p in weights:
                p.requires_grad_(False)
            try:
                logits = net(xa)
                # the latency term and the loss on alpha in fp32 whatever trainer.precision autocasts
                # (bf16 keeps ~3 digits: too few for E[lat] against its target)
                with torch.autocast(xa.device.type, enabled=False):
                    ce = F.cross_entropy(logits.float(), ya)
                    exp_lat = self.expected_latency()
                    arch_loss = latency_loss(ce, exp_lat, self.target, **self.loss_args)
                    if self.search_widths:
                        arch_loss = arch_loss + self.width_reinforce(arch_loss.detach())
                # alpha is outside DDP: a plain backward, reduced below; under 16-mixed scaled as the
                # weight step's loss is, since opt_a.step() unscales (and skips a step with inf gradients)
                scaler = self.grad_scaler()
                (scaler.scale(arch_loss) if scaler is not None else arch_loss).backward()
            finally:
                for p in weights:
                    p.requires_grad_(True)
            self.mean_arch_grads()
            opt_a.step()
            net.rescale_pairs()
            opt_w.zero_grad(set_to_none=True)  # the arch step's stem/head gradients are not a weight step
            net.set_phase("weight")
            self.count_images(len(ya))
            self.log("arch/loss", arch_loss, on_step=False, on_epoch=True, batch_size=len(ya))
            self.log("arch/expected_ms", exp_lat.detach(), prog_bar=True, on_step=False, on_epoch=True,
                     batch_size=len(ya))
        return loss

    def width_reinforce(self, reward: torch.Tensor) -> torch.Tensor:
        """The REINFORCE term of the width logits for the sampled widths: ``(L - b) * log p(widths)``
        (its value is not a loss to read; its gradient is the estimator). ``b`` is the moving average
        of ``L`` before this step (the first step has no baseline, so it adds nothing); under DDP the
        ranks' mean ``L`` is used, so every rank keeps the same baseline."""
        reward = reward.float()
        if self.distributed:
            reward = self.trainer.strategy.reduce(reward, reduce_op="mean")
        b = self.width_baseline
        advantage = torch.zeros_like(reward) if torch.isnan(b) else reward - b
        d = self.width_baseline_decay
        self.width_baseline.copy_(reward if torch.isnan(b) else d * b + (1 - d) * reward)
        return advantage.to(reward.device) * self.supernet.width_log_prob()

    def search_state(self) -> Any:
        """The width REINFORCE baseline (None before its first step): every DDP rank must hold the same."""
        if not self.search_widths:
            return None
        b = float(self.width_baseline)
        return {"width_baseline": None if math.isnan(b) else b}

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            probs = {k: v.detach().cpu().tolist() for k, v in self.supernet.probs().items()}
            derived = self.derive()
            row = {
                "epoch": int(self.current_epoch),
                "probs": probs,
                "expected": float(self.expected_latency()),
                "derived": dict(derived.choices),
                "derived_cost": float(self.cost_model.predict(derived)),
            }
        self.history.append(row)
        ent = sum(-(torch.tensor(p) * torch.tensor(p).clamp_min(1e-12).log()).sum().item() for p in probs.values())
        self.log("arch/entropy", ent / max(1, len(probs)))
        self.log("arch/derived_cost", row["derived_cost"], prog_bar=True)
        for name, p in probs.items():
            self.log(f"arch_p/{name}", max(p))

    def derive(self) -> Arch:
        net = self.supernet
        layer_costs = getattr(self.cost_model, "layer_costs", None)
        if self.derive_rule != "budget" or self.target is None or layer_costs is None:
            return net.argmax_arch()
        sp = net.space
        probs = {k: [math.log(max(float(p), 1e-30)) for p in v.detach().cpu().tolist()] for k, v in net.probs().items()}
        values = [probs[layer.name] for layer in sp.layers]
        target = float(self.target)
        floor = self.budget_floor * target if self.budget_floor else None
        if not sp.has_widths:
            fixed = float(self.cost_model.fixed)
            pick = group_knapsack(values, [layer_costs[layer.name] for layer in sp.layers], target - fixed,
                                  min_cost=None if floor is None else floor - fixed)
            return net.argmax_arch() if pick is None else self._arch(pick, {})
        # widths: one knapsack over the ops per combination of stage widths, the most probable combinations first
        wlogp = [probs[d] for d in sp.width_decisions()]
        combos = sorted(itertools.product(*[range(len(ws)) for ws in sp.stage_widths]),
                        key=lambda c: -sum(lp[i] for lp, i in zip(wlogp, c)))[: self.max_width_combos]
        best = None  # ((in band, value), arch)
        for combo in combos:
            widths = {d: width_choice(ws[i]) for d, ws, i in zip(sp.width_decisions(), sp.stage_widths, combo)}
            probe = sp.make_arch({**{layer.name: layer.choices[0] for layer in sp.layers}, **widths}, net.num_classes)
            chs = sp.layer_chs(probe)
            fixed = float(self.cost_model.fixed) + self.cost_model.head_delta.get(sp.last_width(probe), 0.0)
            costs = [[self.cost_model.layer_cost(layer, op, ci, co) for op in layer.choices]
                     for layer, (ci, co) in zip(sp.layers, chs)]
            pick = group_knapsack(values, costs, target - fixed, min_cost=None if floor is None else floor - fixed)
            if pick is None:
                continue
            cost = fixed + sum(c[j] for c, j in zip(costs, pick))
            value = sum(v[j] for v, j in zip(values, pick)) + sum(lp[i] for lp, i in zip(wlogp, combo))
            key = (floor is None or cost >= floor * (1 - 1e-9), value)
            if best is None or key > best[0]:
                best = (key, self._arch(pick, widths))
        return net.argmax_arch() if best is None else best[1]

    def _arch(self, pick, widths) -> Arch:
        sp = self.supernet.space
        return sp.make_arch({**{layer.name: layer.choices[j] for layer, j in zip(sp.layers, pick)}, **widths},
                            self.supernet.num_classes)
