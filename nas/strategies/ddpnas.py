"""DDPNAS (Zheng et al., "Dynamic Distribution Pruning for Efficient Network Architecture Search").

Every searchable layer holds a score ``theta`` over its candidates (uniform at the start) and a set
of *survivors* (all candidates at the start).

Schedule (optionally after ``warmup_epochs`` of weight training on uniformly random paths, one per
batch, which are not scored):

* **Epoch.** Every layer draws one candidate without replacement from its *pool* of survivors not
  yet tried in this round; an empty pool is refilled with all survivors. The supernet trains that
  single path for the whole epoch (SGD), Lightning's validation loop evaluates it on the arch split,
  and the accuracy is recorded for every (layer, candidate) of the path.
* **Round.** A round lasts ``R = max_l |survivors_l|`` epochs and every pool is refilled at its
  start, so every survivor of a layer with ``R`` survivors is tried exactly once per round; a layer
  with fewer survivors cycles through them (every survivor at least once, no candidate more than
  once more than another). A candidate's round accuracy is the mean of its epochs in the round.
* **Update.** After ``steps`` rounds, per layer over its survivors:
  ``E = mean_rounds softmax(temperature * acc)`` and ``theta <- E + momentum_weight * theta``
  (``update="additive"``, the published rule with 0.5) or ``theta <- m * theta + (1 - m) * E``
  (``update="ema"``, the momentum variant, m = 0.8). Then every layer with more than one survivor
  prunes its lowest-theta survivor (ties: the more expensive one under the cost model).
* **End.** When every layer has one survivor the trainer is stopped; with fewer epochs than that,
  ``derive()`` takes the argmax of theta over the survivors.

Latency awareness. With ``latency_weight = w > 0`` the recorded accuracy of a path is multiplied
by ``(target / predicted_latency(path)) ** w`` (the MnasNet / ProxylessNAS soft constraint; MnasNet
uses w = 0.07). ``budgets`` export one architecture per cost budget (fraction of the largest
subnet's cost or an absolute value such as ``"2.5ms"``; default: the latency target): per layer one
candidate maximising ``sum log score`` under ``fixed + sum layer_cost <= budget``, an exact group
knapsack (:func:`nas.strategies.knapsack.group_knapsack`), among the architectures costing at least
``budget_floor`` (0.95 in conf/strategy/ddpnas.yaml) of the budget when any does, so that an export uses its budget.

The knapsack chooses among **all** candidates, not only the survivors: a finished search has one
survivor per layer, so a budget below that network would otherwise be infeasible. A pruned
candidate's score is the theta it had when it was pruned, capped just below every candidate that
outlived it, so scores follow the pruning order (survivors by theta > last pruned > ... > first
pruned) and an unconstrained budget returns exactly the argmax architecture. With log scores the
objective is the log-probability of the architecture under the per-layer distributions, so layers
are comparable whatever their number of candidates.

All search state (theta, survivors, pools, the round's accuracies, the finished rounds, counters,
the pruning log, the seed) is saved in the checkpoint; paths are drawn from a generator seeded by
(seed, epoch), so a resumed search continues exactly where it stopped. The state is plain Python
data, loadable with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from nas.errors import UserError, check_choice, check_skip_prob
from nas.report.ddpnas_plots import plot_pruning_order
from nas.strategies.base import SearchStrategy
from nas.strategies.knapsack import group_knapsack
from supernets.arch import Arch

UPDATE_RULES = ("additive", "ema")
BUDGET_VALUES = ("log", "theta")
STATE_VERSION = 1
_CAP = 1.0 - 1e-3  # a pruned candidate scores at most this fraction of any candidate that outlived it


def theta_update(theta: Sequence[float], expected: Sequence[float], rule: str, weight: float) -> list[float]:
    """One theta update over a layer's survivors: ``additive``: E + w * theta; ``ema``: w * theta + (1-w) * E."""
    if rule == "additive":
        return [e + weight * t for t, e in zip(theta, expected)]
    if rule == "ema":
        return [weight * t + (1.0 - weight) * e for t, e in zip(theta, expected)]
    raise ValueError(f"theta update rule {rule!r} unknown; choose one of {', '.join(UPDATE_RULES)}")


def softmax(xs: Sequence[float], temperature: float) -> list[float]:
    z = [temperature * x for x in xs]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = math.fsum(e)
    return [v / s for v in e]


class PruningState:
    """The search state of DDPNAS over layers with ``sizes[l]`` candidates each (pure Python).

    Candidates are indices; ``alive[l][i]`` marks survivors. :meth:`draw` gives the next path,
    :meth:`record` books its accuracy and, at the end of every ``steps``-th round, updates theta and
    prunes. ``tiebreak[l][i]`` (e.g. the candidate's cost) decides equal thetas: the larger is pruned.
    """

    def __init__(self, sizes: Sequence[int], *, steps: int = 3, temperature: float = 100.0,
                 update: str = "additive", momentum_weight: float = 0.5, seed: int = 0,
                 tiebreak: Sequence[Sequence[float]] | None = None):
        if update not in UPDATE_RULES:
            raise ValueError(f"theta update rule {update!r} unknown; choose one of {', '.join(UPDATE_RULES)}")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if any(int(k) < 1 for k in sizes):
            raise ValueError("every layer needs at least one candidate")
        self.sizes = [int(k) for k in sizes]
        self.steps = int(steps)
        self.temperature = float(temperature)
        self.update_rule = update
        self.momentum_weight = float(momentum_weight)
        self.seed = int(seed)
        self.tiebreak = [list(map(float, t)) for t in tiebreak] if tiebreak is not None else \
            [[0.0] * k for k in self.sizes]
        self.theta = [[1.0 / k] * k for k in self.sizes]
        self.alive = [[True] * k for k in self.sizes]
        self.pools: list[list[int]] = [[] for _ in self.sizes]
        self.round_len = 0  # epochs of the current round (0: no round started)
        self.round_pos = 0  # epochs of the current round already recorded
        self.round_acc: list[list[list[float]]] = [[[] for _ in range(k)] for k in self.sizes]
        self.rounds: list[list[list[float | None]]] = []  # finished rounds since the last update
        self.rounds_done = 0
        self.updates = 0
        self.draws = 0
        self.pruned: list[tuple[int, int, float, int]] = []  # (layer, candidate, theta when pruned, update)

    # ------------------------------------------------------------------ queries
    def survivors(self, layer: int) -> list[int]:
        return [i for i, a in enumerate(self.alive[layer]) if a]

    @property
    def done(self) -> bool:
        return all(sum(a) == 1 for a in self.alive)

    def probs(self) -> list[list[float]]:
        """theta normalised per layer over all candidates, 0 for pruned ones."""
        out = []
        for t, a in zip(self.theta, self.alive):
            s = math.fsum(x for x, ok in zip(t, a) if ok)
            out.append([x / s if ok else 0.0 for x, ok in zip(t, a)])
        return out

    def argmax(self) -> list[int]:
        """Per layer the survivor with the highest theta (ties: the cheaper one, then the lower index)."""
        return [max(self.survivors(l), key=lambda i: (self.theta[l][i], -self.tiebreak[l][i], -i))
                for l in range(len(self.sizes))]

    def export_scores(self) -> list[list[float]]:
        """Scores of all candidates for budgeted export: survivors keep theta; a pruned candidate
        keeps its theta at pruning time, capped at ``_CAP`` x the lowest score of every candidate that
        outlived it (so scores follow the pruning order)."""
        out = []
        for l in range(len(self.sizes)):
            score = [0.0] * self.sizes[l]
            surv = self.survivors(l)
            for i in surv:
                score[i] = self.theta[l][i]
            cap = min(score[i] for i in surv)
            for layer, i, t, _ in reversed(self.pruned):  # last pruned first
                if layer != l:
                    continue
                score[i] = min(t, _CAP * cap)
                cap = score[i]
            out.append(score)
        return out

    def planned_epochs(self) -> int:
        """Epochs until one survivor is left in every layer, from the current state."""
        counts = [sum(a) for a in self.alive]
        total = 0
        if self.round_len:
            rest = self.steps - len(self.rounds)  # the running round and those left before the update
            total += rest * self.round_len - self.round_pos
            if max(counts) > 1:
                counts = [c - 1 if c > 1 else c for c in counts]
        while max(counts) > 1:
            total += self.steps * max(counts)
            counts = [c - 1 if c > 1 else c for c in counts]
        return total

    # ------------------------------------------------------------------ the schedule
    def draw(self, epoch: int) -> list[int]:
        """The path of the next epoch: one candidate per layer, without replacement from its pool.

        Deterministic in (seed, epoch) and the state, so a resumed search draws the same paths."""
        if self.round_pos == 0:  # a new round: refill every pool
            self.round_len = max(sum(a) for a in self.alive)
            self.pools = [self.survivors(l) for l in range(len(self.sizes))]
            self.round_acc = [[[] for _ in range(k)] for k in self.sizes]
        rng = random.Random(f"ddpnas/{self.seed}/{int(epoch)}")
        path = []
        for l in range(len(self.sizes)):
            if not self.pools[l]:
                self.pools[l] = self.survivors(l)
            pick = self.pools[l].pop(rng.randrange(len(self.pools[l])))
            path.append(pick)
        self.draws += 1
        return path

    def record(self, path: Sequence[int], acc: float) -> list[tuple[int, int]]:
        """Book the (possibly latency-weighted) accuracy of the path drawn last; returns the
        (layer, candidate) pairs pruned by it (empty unless this epoch ends an update block)."""
        if not self.round_len:
            raise RuntimeError("record() before draw()")
        for l, i in enumerate(path):
            if not self.alive[l][i]:
                raise ValueError(f"layer {l}: candidate {i} was pruned")
            self.round_acc[l][i].append(float(acc))
        self.round_pos += 1
        if self.round_pos < self.round_len:
            return []
        self.rounds.append([[math.fsum(a) / len(a) if a else None for a in layer] for layer in self.round_acc])
        self.rounds_done += 1
        self.round_pos = 0
        self.round_len = 0
        if len(self.rounds) < self.steps:
            return []
        return self.update_and_prune()

    def expected_scores(self, layer: int) -> list[float]:
        """E over the survivors of ``layer``: the mean over the finished rounds of softmax(T * acc)."""
        surv = self.survivors(layer)
        total = [0.0] * len(surv)
        for rnd in self.rounds:
            accs = [rnd[layer][i] for i in surv]
            if any(a is None for a in accs):
                raise RuntimeError(f"layer {layer}: a survivor was not tried in a round")
            for k, p in enumerate(softmax(accs, self.temperature)):
                total[k] += p
        return [t / len(self.rounds) for t in total]

    def update_and_prune(self) -> list[tuple[int, int]]:
        pruned = []
        for l in range(len(self.sizes)):
            surv = self.survivors(l)
            new = theta_update([self.theta[l][i] for i in surv], self.expected_scores(l),
                               self.update_rule, self.momentum_weight)
            for i, t in zip(surv, new):
                self.theta[l][i] = t
            if len(surv) > 1:
                worst = min(surv, key=lambda i: (self.theta[l][i], -self.tiebreak[l][i], -i))
                self.alive[l][worst] = False
                self.pruned.append((l, worst, self.theta[l][worst], self.updates))
                pruned.append((l, worst))
        self.updates += 1
        self.rounds = []
        return pruned

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "sizes": list(self.sizes),
            "seed": self.seed,
            "theta": [list(t) for t in self.theta],
            "alive": [list(a) for a in self.alive],
            "pools": [list(p) for p in self.pools],
            "round_len": self.round_len,
            "round_pos": self.round_pos,
            "round_acc": [[list(a) for a in layer] for layer in self.round_acc],
            "rounds": [[list(layer) for layer in r] for r in self.rounds],
            "rounds_done": self.rounds_done,
            "updates": self.updates,
            "draws": self.draws,
            "pruned": [tuple(p) for p in self.pruned],
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"DDPNAS state version {d.get('version')} is not {STATE_VERSION}")
        if list(d["sizes"]) != self.sizes:
            raise ValueError(f"checkpoint has layers with {list(d['sizes'])} candidates, this space {self.sizes}")
        self.seed = int(d["seed"])
        self.theta = [[float(x) for x in t] for t in d["theta"]]
        self.alive = [[bool(x) for x in a] for a in d["alive"]]
        self.pools = [[int(x) for x in p] for p in d["pools"]]
        self.round_len = int(d["round_len"])
        self.round_pos = int(d["round_pos"])
        self.round_acc = [[[float(x) for x in a] for a in layer] for layer in d["round_acc"]]
        self.rounds = [[[None if x is None else float(x) for x in layer] for layer in r] for r in d["rounds"]]
        self.rounds_done = int(d["rounds_done"])
        self.updates = int(d["updates"])
        self.draws = int(d["draws"])
        self.pruned = [(int(l), int(i), float(t), int(u)) for l, i, t, u in d["pruned"]]


class DDPNASSearch(SearchStrategy):
    name = "ddpnas"

    def __init__(self, supernet, cost_model, targets=None, *, steps: int = 3,
                 temperature: float = 100.0, update: str = "additive", momentum_weight: float = 0.5,
                 warmup_epochs: int = 0, latency_weight: float = 0.0,
                 budget_value: str = "log",
                 budget_bins: int = 2000, budget_floor: float = 0.95, weight_lr: float = 0.05, weight_momentum: float = 0.9,
                 weight_decay: float = 4e-5, nesterov: bool = True, label_smoothing: float = 0.0,
                 grad_clip: float = 5.0, seed: int | None = None, skip_prob: float | None = None):
        super().__init__(supernet, cost_model, targets)
        self.skip_prob = check_skip_prob("strategy.module.skip_prob", skip_prob)
        if supernet.space.has_widths:
            raise UserError(f"strategy=ddpnas searches op choices only, and space={supernet.space.name} has width "
                            f"decisions; use strategy=slimmable (strategy.module.ops=search searches ops too) or "
                            f"a space without widths such as space=mbv2_tiny")
        check_choice("strategy.module.update", update, UPDATE_RULES)
        check_choice("strategy.module.budget_value", budget_value, BUDGET_VALUES)
        if int(steps) < 1:
            raise UserError(f"strategy.module.steps={steps} must be >= 1 (rounds between two pruning steps)")
        if float(latency_weight) < 0:
            raise UserError(f"strategy.module.latency_weight={latency_weight} must be >= 0 "
                            f"(accuracy x (target / latency) ** w; MnasNet uses 0.07)")
        if float(latency_weight) > 0 and self.target is None:
            raise UserError("strategy.module.latency_weight > 0 needs a latency target: set "
                            "strategy.targets (e.g. strategy.targets=[0.5]) or latency_weight=0")
        self.automatic_optimization = False
        self.supernet.set_gate("one")
        self.space = supernet.space
        self.layer_names = [l.name for l in self.space.layers]
        self.choices = [tuple(l.choices) for l in self.space.layers]
        costs = [list(cost_model.layer_costs[n]) for n in self.layer_names]
        if seed is None:
            seed = torch.initial_seed() % (2 ** 31)
        self.state = PruningState([len(c) for c in self.choices], steps=steps, temperature=temperature,
                                  update=update, momentum_weight=momentum_weight, seed=int(seed), tiebreak=costs)
        self.warmup_epochs = int(warmup_epochs)
        self.latency_weight = float(latency_weight)
        self.budget_value = budget_value
        self.budget_bins = int(budget_bins)
        if not 0.0 <= float(budget_floor) <= 1.0:
            raise UserError(f"strategy.module.budget_floor={budget_floor} must be in [0, 1] (a fraction of each "
                            f"budget an export should at least cost; 0 = no floor)")
        self.budget_floor = float(budget_floor)
        self.weight_opt_args = dict(lr=weight_lr, momentum=weight_momentum, weight_decay=weight_decay,
                                    nesterov=nesterov)
        self.label_smoothing = float(label_smoothing)
        self.grad_clip = grad_clip
        self._path: list[int] | None = None  # the current epoch's path (None: warm-up / not drawn)
        self._path_epoch = -1  # the epoch the path was drawn for
        self._recorded_epoch = -1  # the last epoch whose accuracy was booked
        self._val = torch.zeros(2, dtype=torch.float64)  # correct, seen (this validation epoch)
        self._gen: torch.Generator | None = None

    # ------------------------------------------------------------------ helpers
    def arch_of(self, path: Sequence[int]) -> Arch:
        return self.space.make_arch({n: c[i] for n, c, i in zip(self.layer_names, self.choices, path)},
                                    self.supernet.num_classes)

    def path_cost(self, path: Sequence[int]) -> float:
        return self.cost_model.fixed + math.fsum(
            self.cost_model.layer_costs[n][i] for n, i in zip(self.layer_names, path))

    def score(self, acc: float, path: Sequence[int]) -> float:
        """The recorded value of a path: accuracy x (target / predicted cost) ** latency_weight."""
        if self.latency_weight == 0 or self.target is None:
            return float(acc)
        return float(acc) * (self.target / self.path_cost(path)) ** self.latency_weight

    def probs(self) -> dict[str, list[float]]:
        return dict(zip(self.layer_names, self.state.probs()))

    @property
    def in_warmup(self) -> bool:
        return self.current_epoch < self.warmup_epochs

    def planned_epochs(self) -> int:
        """Epochs of the whole search from the current point (warm-up left included)."""
        return max(0, self.warmup_epochs - self.current_epoch) + self.state.planned_epochs()

    # ------------------------------------------------------------------ the result
    def derive(self) -> Arch:
        return self.arch_of(self.state.argmax())

    def derive_budget(self, budget: float) -> Arch | None:
        """The architecture maximising sum(log score) (or sum(score)) under ``cost <= budget``, among
        those costing at least ``budget_floor * budget`` when any does (an export should use its
        budget, not land far under it because a cheap architecture scores well)."""
        scores = self.state.export_scores()
        if self.budget_value == "log":
            values = [[math.log(s) if s > 0 else -math.inf for s in layer] for layer in scores]
        else:
            values = [[s / math.fsum(layer) for s in layer] for layer in scores]
        costs = [self.cost_model.layer_costs[n] for n in self.layer_names]
        floor = self.budget_floor * budget - self.cost_model.fixed if self.budget_floor > 0 else None
        pick = group_knapsack(values, costs, budget - self.cost_model.fixed, bins=self.budget_bins, min_cost=floor)
        return None if pick is None else self.arch_of(pick)

    def derive_all(self) -> dict[str, Arch]:
        out = {"argmax": self.derive()}
        for label, ms in self.targets.items():
            arch = self.derive_budget(ms)
            if arch is None:  # resolve_target keeps budgets reachable; only float noise could land here
                print(f"warning: no architecture fits the budget {label} = {ms:.4g} {self.cost_model.unit}")
                continue
            out[label] = arch
        return out

    def extra_plots(self, label: str | None = None, arch: Arch | None = None) -> dict[str, Callable[[Path], None]]:
        choices = dict(zip(self.layer_names, self.choices))
        chosen = dict(arch.choices) if arch is not None else None
        first = self.state.steps * max(self.state.sizes)  # epochs before the first pruning
        return {"pruning_order.png": lambda p: plot_pruning_order(self.history, choices, p, chosen=chosen,
                                                                  first_prune_after=first)}

    # ------------------------------------------------------------------ training
    def configure_optimizers(self):
        return torch.optim.SGD(self.supernet.weight_parameters(), **self.weight_opt_args)

    def on_fit_start(self) -> None:
        t = self.trainer
        problems = []
        if t.check_val_every_n_epoch not in (1, None):
            problems.append(f"check_val_every_n_epoch={t.check_val_every_n_epoch} (needs 1)")
        if isinstance(t.val_check_interval, float) and t.val_check_interval != 1.0:
            problems.append(f"val_check_interval={t.val_check_interval} (needs 1.0)")
        if isinstance(t.val_check_interval, int) and not isinstance(t.val_check_interval, bool):
            problems.append(f"val_check_interval={t.val_check_interval} (needs 1.0)")
        if t.limit_val_batches == 0:
            problems.append("limit_val_batches=0")
        if problems:
            raise UserError("ddpnas scores every epoch's path on the arch split, so validation must run once at "
                            "the end of every epoch; trainer settings: " + ", ".join(problems))
        # every rank draws the same paths
        self.state.seed = int(t.strategy.broadcast(self.state.seed, src=0))

    def _lr(self, epoch: int) -> float:
        """Cosine from weight_lr to 0 over the planned search (stateless, so resuming is exact)."""
        total = self._planned_total
        base = self.weight_opt_args["lr"]
        return 0.5 * base * (1.0 + math.cos(math.pi * min(epoch, total) / max(1, total)))

    @property
    def _planned_total(self) -> int:
        planned = self.warmup_epochs + PruningState(self.state.sizes, steps=self.state.steps).planned_epochs()
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs not in (None, -1) else planned
        return max(1, min(int(max_epochs), planned))

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        epoch = int(self.current_epoch)
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = self._lr(epoch)
        self.supernet.set_phase("weight")
        if self.in_warmup:
            self._path = None
            self._gen = torch.Generator().manual_seed(self.state.seed * 100_003 + epoch)
        elif self.state.done:
            self._path = self.state.argmax()
        elif self._path_epoch != epoch:  # not drawn yet (a resume mid-epoch keeps the drawn path)
            self._path = self.state.draw(epoch)
            self._path_epoch = epoch
        if self._path is not None:
            self.supernet.set_active(self.arch_of(self._path))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        if self._path is None:  # warm-up: a uniformly random path per batch
            self.supernet.sample("uniform", generator=self._gen, skip_prob=self.skip_prob)
            self.sync_path()  # the generators agree across ranks already; rank 0's path is the contract
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.supernet(x), y, label_smoothing=self.label_smoothing)
        self.manual_backward(loss)
        opt.step()
        self.count_images(len(y))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    # ------------------------------------------------------------------ validation = scoring the path
    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(2, dtype=torch.float64)
        if self._path is not None and not self.trainer.sanity_checking:
            self.supernet.set_active(self.arch_of(self._path))
        else:  # the currently derived architecture, in the supernet (its scores are of paths in the supernet)
            self.supernet.set_active(self.derive())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.supernet(x)
        correct = (logits.argmax(1) == y).sum()
        self._val += torch.tensor([float(correct), float(len(y))], dtype=torch.float64)
        self.log("val/acc", correct.float() / len(y), prog_bar=True, on_epoch=True, batch_size=len(y),
                 sync_dist=True)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        """Book the epoch's path accuracy (before any on_train_epoch_end, where checkpoints are saved)."""
        if self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return
        epoch = int(self.current_epoch)
        if self._recorded_epoch == epoch:
            return
        counts = self.trainer.strategy.reduce(self._val.to(self.device), reduce_op="sum").cpu()
        acc = float(counts[0] / counts[1].clamp_min(1))
        row: dict[str, Any] = {"epoch": epoch, "phase": "warmup" if self._path is None else "search",
                               "val_acc": acc, "pruned": []}
        if self._path is not None and not self.state.done:
            path = list(self._path)
            score = self.score(acc, path)
            pruned = self.state.record(path, score)
            row.update(path={n: c[i] for n, c, i in zip(self.layer_names, self.choices, path)},
                       path_cost=self.path_cost(path), score=score, round=self.state.rounds_done,
                       pruned=[(self.layer_names[l], self.choices[l][i]) for l, i in pruned])
            if self.state.done:
                self.trainer.should_stop = True
        self._recorded_epoch = epoch
        probs = self.state.probs()
        derived = self.state.argmax()
        row.update(
            probs=dict(zip(self.layer_names, probs)),
            expected=self.cost_model.fixed + math.fsum(
                p * c for n, layer in zip(self.layer_names, probs)
                for p, c in zip(layer, self.cost_model.layer_costs[n])),
            derived={n: c[i] for n, c, i in zip(self.layer_names, self.choices, derived)},
            derived_cost=self.path_cost(derived),
            survivors=[sum(a) for a in self.state.alive],
        )
        self.history.append(row)
        self.log("ddp/path_acc", acc, prog_bar=True)
        self.log("ddp/survivors", float(sum(row["survivors"])) / max(1, len(self.layer_names)))
        self.log("arch/derived_cost", row["derived_cost"], prog_bar=True)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self._recorded_epoch != int(self.current_epoch):
            raise RuntimeError(f"ddpnas: epoch {self.current_epoch} ended without a validation pass to score its "
                               "path; validation must run at the end of every epoch")

    # ------------------------------------------------------------------ checkpoint
    def search_state(self) -> Any:
        """theta, pools and pruning record: compared across DDP ranks at the end of the search."""
        return self.state.state_dict()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["hwnas"]["ddpnas"] = {
            "state": self.state.state_dict(),
            "layers": list(self.layer_names),
            "choices": [list(c) for c in self.choices],
            "path": None if self._path is None else list(self._path),
            "path_epoch": self._path_epoch,
            "recorded_epoch": self._recorded_epoch,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        d = checkpoint.get("hwnas", {}).get("ddpnas")
        if d is None:
            raise UserError("this checkpoint holds no DDPNAS search state (it was written by another strategy); "
                            "resume it with the strategy that wrote it or start a new search")
        if list(d["layers"]) != self.layer_names or [tuple(c) for c in d["choices"]] != self.choices:
            raise UserError("this DDPNAS checkpoint was written for another search space (its layers or "
                            "candidates differ); resume with the space it was searched on")
        self.state.load_state_dict(d["state"])
        self._path = None if d["path"] is None else [int(i) for i in d["path"]]
        self._path_epoch = int(d["path_epoch"])
        self._recorded_epoch = int(d["recorded_epoch"])
