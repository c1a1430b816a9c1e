"""Train once, specialise many times: a supernet trained over every decision, then an evolutionary
search per target (SPOS, Guo et al. 2020; Once-for-All, Cai et al. 2020).

Training (one optimizer step per batch): ``sampling=sandwich`` (default; BigNAS / OFA) runs the
largest architecture (the cost model's priciest: every op and width at its largest), the smallest
(its cheapest) and ``n_random`` uniformly random architectures on every batch, gradients
accumulated; with in-place distillation (default) every net but the largest learns from the
largest's detached soft predictions mixed with the labels (``distill_weight``). ``sampling=uniform``
(SPOS) trains one uniformly random architecture per batch. Random choices cover every decision of
the space, ops and (spaces with widths) stage widths, drawn with torch's RNG (saved in checkpoints).

Search (:meth:`EvolutionSearch.derive_all`): for every target ``T`` in ``strategy.targets``,
:func:`nas.strategies.engine.evolve` looks for the architecture with the best accuracy on the arch
split whose predicted cost lies in ``[min_fraction * T, T]`` (an export uses its budget; without any
architecture in that band, under ``T``). A candidate is scored as a static subnet holding the
supernet's weights, with BatchNorm statistics recomputed over ``calib_batches`` fixed training
batches (SPOS: the statistics of the shared weights do not fit any one subnet). Scores are cached
across targets: a candidate already scored for another target costs nothing. Every export carries
``evolution.json`` / ``evolution.csv`` (every candidate scored: target, choices, predicted cost,
score) and ``front.png`` (score against predicted cost, the Pareto front marked).

``strategy.supernet=<run folder>`` specialises the supernet of an earlier ``strategy=evolution`` run
on the same space and data classes (its ``checkpoints/last.ckpt``) for this run's hardware and
targets, without training: ``nas-search`` then skips ``fit`` (:attr:`EvolutionSearch.pretrained`).
"""
from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nas.errors import UserError, check_skip_prob
from nas.latency.analytic import count_params, peak_activation_bytes
from nas.report.evolution_plots import plot_front, plot_size_fronts
from nas.strategies.base import SearchStrategy
from nas.strategies.engine import CONSTRAINTS, METHODS, evolve
from nas.strategies.predictor import KINDS, evolve_with_predictor
from supernets.arch import Arch
from supernets.blocks import space_timm_net
from supernets.bn import calibrate_bn
from supernets.mixed import uniform_index
from supernets.slimmable import BN_MODES
from supernets.space import SearchSpace
from supernets.supernet import Supernet

SAMPLING = ("sandwich", "uniform")
PREDICTOR_KEYS = ("enabled", "kind", "fit", "rounds", "search_queries")
ENGINE_KEYS = ("method", "population", "sample", "parents", "mutation_prob", "crossover_prob", "constraint",
               "max_tries")
CHECKPOINT = "last.ckpt"


def soft_cross_entropy(logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` against the teacher's soft predictions."""
    return -(teacher_probs * F.log_softmax(logits, dim=1)).sum(1).mean()


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(cost, score)`` no other point beats (cost no higher and score no lower,
    one of them strictly), by increasing cost. Equal points do not beat each other: all of them are on
    the front or none (so the front does not depend on the order the points come in)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best or (front and tuple(points[i]) == tuple(points[front[-1]])):
            front.append(i)
            best = max(best, points[i][1])
    return front


def find_checkpoint(path: str | Path) -> Path:
    """``last.ckpt`` of a run folder (``<run>/checkpoints/last.ckpt``), or the file itself."""
    p = Path(str(path)).expanduser()
    for cand in (p, p / "checkpoints" / CHECKPOINT, p / CHECKPOINT):
        if cand.is_file():
            return cand
    raise UserError(f"strategy.supernet={path}: no checkpoint there (looked for {p / 'checkpoints' / CHECKPOINT}); "
                    f"give the run folder of an earlier `nas-search strategy=evolution` run, or its .ckpt file")


def load_supernet_state(path: str | Path, space: SearchSpace, num_classes: int,
                        expected: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The supernet weights of a ``strategy=evolution`` checkpoint, checked against this space, its
    classes and the supernet's own parameter names and shapes (one line naming what differs)."""
    ckpt_path = find_checkpoint(path)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a file a user hands in: one line, no traceback
        raise UserError(f"strategy.supernet: {ckpt_path} is not a readable hwnas checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    info = (ckpt.get("hwnas") or {}).get("supernet") if isinstance(ckpt, dict) else None
    if not info:
        raise UserError(f"strategy.supernet: {ckpt_path} is not the checkpoint of a strategy=evolution run (it "
                        f"records no supernet); train one with `nas-search strategy=evolution space={space.name}`")
    if info.get("space") != space.name or info.get("fingerprint") != space.fingerprint:
        raise UserError(f"strategy.supernet: {ckpt_path} holds a supernet of space {info.get('space')!r} "
                        f"(fingerprint {info.get('fingerprint')}), not of space={space.name} ({space.fingerprint}); "
                        f"run with space={info.get('space')} or train a supernet of {space.name}")
    if int(info.get("classes", -1)) != int(num_classes):
        raise UserError(f"strategy.supernet: {ckpt_path} was trained for {info.get('classes')} classes, this data "
                        f"has {num_classes}; use the data it was trained on (it recorded {info.get('data')!r})")
    state = {k[len("supernet."):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("supernet.")}
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or wrong:
        raise UserError(f"strategy.supernet: {ckpt_path} does not fit this supernet ({len(missing)} weights missing, "
                        f"{len(wrong)} of another shape, e.g. {(missing + wrong)[0]}); check supernet.weight_sharing "
                        f"and strategy.module.bn against the run that trained it ({info.get('weight_sharing')}, "
                        f"{info.get('bn')})")
    return state, info


class EvolutionSearch(SearchStrategy):
    name = "evolution"

    def __init__(self, supernet, cost_model, targets=(0.4, 0.6, 0.8), *, sampling: str = "sandwich",
                 n_random: int = 2, distill: bool = True, distill_weight: float = 0.5, warmup_epochs: int = 0,
                 weight_lr: float = 0.05, weight_momentum: float = 0.9, weight_decay: float = 4e-5,
                 nesterov: bool = True, label_smoothing: float = 0.0, grad_clip: float = 5.0, bn: str = "switchable",
                 calib_batches: int = 20, eval_batches: int | None = None, queries: int = 100,
                 min_fraction: float | None = 0.95, engine: Mapping[str, Any] | None = None, seed: int | None = None,
                 supernet_path: str | None = None, predictor: Mapping[str, Any] | None = None,
                 skip_prob: float | None = None):
        space: SearchSpace = supernet.space
        skip_prob = check_skip_prob("strategy.module.skip_prob", skip_prob)
        if sampling not in SAMPLING:
            raise UserError(f"strategy.module.sampling={sampling!r} is unknown; choose one of: {', '.join(SAMPLING)}")
        if bn not in BN_MODES:
            raise UserError(f"strategy.module.bn={bn!r} is unknown; choose one of: {', '.join(BN_MODES)}")
        if not isinstance(distill, bool):
            raise UserError(f"strategy.module.distill={distill!r} must be true or false")
        for key, v, lo in (("n_random", n_random, 0), ("warmup_epochs", warmup_epochs, 0), ("queries", queries, 1),
                           ("calib_batches", calib_batches, 1), ("eval_batches", eval_batches or 1, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise UserError(f"strategy.module.{key}={v!r} must be an integer >= {lo}")
        if not 0.0 < float(distill_weight) <= 1.0:
            raise UserError(f"strategy.module.distill_weight={distill_weight} must be in (0, 1]")
        if min_fraction is not None and (isinstance(min_fraction, bool) or not 0.0 < float(min_fraction) <= 1.0):
            raise UserError(f"strategy.module.min_fraction={min_fraction!r} must be in (0, 1] (exports cost within "
                            f"[min_fraction, 1] x their target), or null")
        engine = dict(engine or {})
        bad = sorted(set(engine) - set(ENGINE_KEYS))
        if bad:
            raise UserError(f"strategy.module.engine: unknown keys {bad}; allowed: {', '.join(ENGINE_KEYS)}")
        if engine.get("method", "aging") not in METHODS or engine.get("constraint", "rejection") not in CONSTRAINTS:
            raise UserError(f"strategy.module.engine: method is one of {', '.join(METHODS)}, constraint one of "
                            f"{', '.join(CONSTRAINTS)}")
        predictor = dict(predictor or {})
        bad = sorted(set(predictor) - set(PREDICTOR_KEYS))
        if bad or predictor.get("kind", "ridge") not in KINDS:
            raise UserError(f"strategy.module.predictor: unknown keys {bad}; allowed: {', '.join(PREDICTOR_KEYS)}"
                            if bad else f"strategy.module.predictor.kind={predictor['kind']!r} is unknown; choose one "
                            f"of {', '.join(KINDS)}")
        if predictor.get("fit") is not None and not 2 <= int(predictor["fit"]) <= int(queries):
            raise UserError(f"strategy.module.predictor.fit={predictor['fit']} must be in [2, queries={queries}]")
        if supernet.bn_mode != bn:  # a fresh supernet with the other BatchNorm kind (before any training)

            supernet = Supernet(space, supernet.num_classes, weight_sharing=supernet.weight_sharing, bn=bn)
        super().__init__(supernet, cost_model, targets)
        if not self.targets:
            raise UserError("strategy.targets is empty; give one or more targets, e.g. strategy.targets=[0.4,0.6,0.8] "
                            "(fractions of the largest net) or ['2.5ms']")
        self.automatic_optimization = False
        self.sampling = sampling
        self.skip_prob = skip_prob
        self.n_random = int(n_random)
        self.distill = distill
        self.distill_weight = float(distill_weight)
        self.warmup_epochs = int(warmup_epochs)
        self.weight_opt_args = {"lr": weight_lr, "momentum": weight_momentum, "weight_decay": weight_decay,
                                "nesterov": nesterov}
        self.label_smoothing = float(label_smoothing)
        self.grad_clip = grad_clip
        self.bn = bn
        self.calib_batches = int(calib_batches)
        self.eval_batches = int(eval_batches) if eval_batches else None
        self.queries = int(queries)
        self.min_fraction = None if min_fraction is None else float(min_fraction)
        self.engine = engine
        self.predictor = predictor if predictor.pop("enabled", bool(predictor)) else None
        self.seed = seed
        self.decisions = space.decisions()
        n = self.supernet.num_classes
        self.largest = cost_model.priciest(n)
        self.smallest = cost_model.cheapest(n)
        self.supernet.set_active(self.largest)
        self.pretrained: dict[str, Any] | None = None  # the checkpoint's record when specialising without training
        if supernet_path:
            state, info = load_supernet_state(supernet_path, space, n, self.supernet.state_dict())
            self.supernet.load_state_dict(state, strict=True)
            self.pretrained = {**info, "checkpoint": str(find_checkpoint(supernet_path))}
        self._datamodule = None
        self._scores: dict[Arch, float] = {}
        self._sizes: dict[Arch, tuple[int, int]] = {}  # params, peak activation bytes
        self._found: dict[str, dict[str, Any]] | None = None
        self._rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ data and optimizers
    def train_loaders(self, datamodule):
        self._datamodule = datamodule  # BatchNorm calibration and the candidates' scores read its splits
        return datamodule.train_dataloader()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.supernet.weight_parameters(), **self.weight_opt_args)
        epochs = max(1, self.trainer.max_epochs or 1)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)]

    # ------------------------------------------------------------------ training
    def random_arch(self) -> Arch:
        """Every decision (ops and widths) uniformly at random, from torch's RNG; a layer that can be
        skipped is skipped with probability ``skip_prob`` when it is set."""
        return self.supernet.space.make_arch(
            {d: cs[uniform_index(cs, None, self.skip_prob)] for d, cs in self.decisions.items()},
            self.supernet.num_classes)

    def sample_archs(self) -> list[Arch]:
        """The architectures trained on this batch, the teacher (largest) first under ``sandwich``."""
        if self.current_epoch < self.warmup_epochs:
            return [self.largest]
        if self.sampling == "uniform":
            return [self.random_arch()]
        return [self.largest, self.smallest] + [self.random_arch() for _ in range(self.n_random)]

    def _sync(self, archs: list[Arch]) -> list[Arch]:
        """Every rank trains rank 0's architectures."""
        if not self.distributed:
            return archs
        names = list(self.decisions)
        rows = [[self.decisions[d].index(a.choices[d]) for d in names] for a in archs]
        rows = self.trainer.strategy.broadcast(torch.tensor(rows, dtype=torch.long), src=0).tolist()
        space = self.supernet.space
        return [space.make_arch({d: self.decisions[d][i] for d, i in zip(names, r)}, self.supernet.num_classes)
                for r in rows]

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        net = self.supernet
        x, y = batch
        archs = self._sync(self.sample_archs())
        teach = self.sampling == "sandwich" and self.distill and len(archs) > 1
        opt.zero_grad(set_to_none=True)
        teacher, losses = None, []
        for k, arch in enumerate(archs):
            net.set_active(arch)
            logits = net(x)
            ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
            if k > 0 and teach:
                w = self.distill_weight
                loss = w * soft_cross_entropy(logits, teacher) + (1 - w) * ce
            else:
                loss = ce
            if k == 0 and teach:
                teacher = F.softmax(logits.detach(), dim=1)
            self.manual_backward(loss)  # the sandwich's gradients add up (as in slimmable networks)
            losses.append(float(loss.detach()))
        opt.step()
        net.set_active(self.largest)
        self.count_images(len(y))
        self.log("train/loss", losses[0], prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        if len(losses) > 1:
            self.log("train/loss_smallest", losses[1], on_step=False, on_epoch=True, batch_size=len(y))

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()

    def derive(self) -> Arch:
        """The first target's pick once searched; before, the largest architecture (what validation shows)."""
        if self._found:
            return self._found[next(iter(self.targets))]["arch"]
        return self.largest

    # ------------------------------------------------------------------ scoring candidates
    def _batches(self) -> tuple[list, list]:
        dm = self._datamodule
        if dm is None:
            raise RuntimeError("the search needs the data: call train_loaders(datamodule) first (trainer.fit does)")
        calib = list(dm.calib_dataloader(self.calib_batches))
        arch = []
        for i, b in enumerate(dm.val_dataloader()):  # the arch split, fixed order
            if self.eval_batches and i >= self.eval_batches:
                break
            arch.append(b)
        return calib, arch

    @torch.no_grad()
    def score(self, arch: Arch, calib: list, batches: list) -> float:
        """Arch-split accuracy of ``arch`` with inherited weights, BatchNorm recalibrated (cached)."""
        if arch not in self._scores:
            sub = self.supernet.extract(arch).cpu()
            calibrate_bn(sub, calib)
            sub.eval()
            correct = total = 0
            for x, y in batches:
                correct += int((sub(x).argmax(1) == y).sum())
                total += len(y)
            self._scores[arch] = correct / max(1, total)
        return self._scores[arch]

    def search(self, log: Callable[[str], Any] | None = print) -> dict[str, dict[str, Any]]:
        """One evolutionary search per target (once; later calls return the same picks)."""
        if self._found is not None:
            return self._found
        t0 = time.perf_counter()
        space, n = self.supernet.space, self.supernet.num_classes
        calib, batches = self._batches()
        was_training = self.supernet.training
        self.supernet.eval()
        seed = int(self.seed if self.seed is not None else torch.initial_seed() % 2 ** 31)

        def cost(choices: Mapping[str, str]) -> float:
            return float(self.cost_model.predict(space.make_arch(choices, n)))

        def score(choices: Mapping[str, str]) -> float:
            return self.score(space.make_arch(choices, n), calib, batches)

        found: dict[str, dict[str, Any]] = {}
        unit = self.cost_model.unit
        for label, t in self.targets.items():
            before, t1 = len(self._scores), time.perf_counter()
            floor = None if self.min_fraction is None else self.min_fraction * t
            res = self._evolve(score, cost, t, floor, seed)
            if res.best is None and floor is not None:
                if log:
                    log(f"evolution {label}: no architecture found in [{self.min_fraction:g}, 1] x the target; "
                        f"searching under the target")
                res = self._evolve(score, cost, t, None, seed)
            if res.best is None:  # targets are checked against the cheapest architecture up front
                raise RuntimeError(f"evolution {label}: no architecture within {t:.4g} {unit} was found")
            arch = space.make_arch(res.best, n)
            found[label] = {"arch": arch, "score": res.best_score, "cost": res.best_cost, "target": t,
                            "floor": floor, "queries": len(res.history), "new_scores": len(self._scores) - before,
                            "stats": dict(res.stats), "seconds": round(time.perf_counter() - t1, 2)}
            self._rows += [{"target": label, "query": q.index, "origin": q.origin, "cost": q.cost, "score": q.score,
                            "arch": dict(q.arch), "picked": q.arch == res.best} for q in res.history]
            if log:
                log(f"evolution {label}: {len(res.history)} candidates ({len(self._scores) - before} newly scored) in "
                    f"{time.perf_counter() - t1:.0f} s; best {100 * res.best_score:.2f}% at {res.best_cost:.4g} {unit} "
                    f"(target {t:.4g})")
        self.supernet.train(was_training)
        self.supernet.set_active(self.largest)
        seconds = time.perf_counter() - t0
        self.search_cost["seconds"] += seconds
        self.search_cost["evolution_seconds"] = round(seconds, 1)
        self.search_cost["candidates_scored"] = len(self._scores)
        if self.pretrained:
            self.search_cost["supernet"] = {"checkpoint": self.pretrained["checkpoint"],
                                            "training": self.pretrained.get("search_cost")}
        self._found = found
        return found

    def _evolve(self, score, cost, target: float, floor: float | None, seed: int):
        """The engine, or with ``predictor`` set, the engine steered by an accuracy predictor fitted on
        the supernet scores (the same number of candidates scored on the supernet)."""
        if self.predictor is None:
            return evolve(self.decisions, score, cost, target, floor=floor, queries=self.queries, seed=seed,
                          **self.engine)
        return evolve_with_predictor(self.decisions, score, cost, target, floor=floor, queries=self.queries,
                                     seed=seed, **self.predictor, **self.engine)

    def derive_all(self) -> dict[str, Arch]:
        found = self.search()
        return {label: found[label]["arch"] for label in self.targets}

    def search_state(self) -> Any:
        return {"targets": self.targets, "sampling": self.sampling}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        space = self.supernet.space
        dm = self._datamodule
        checkpoint["hwnas"]["supernet"] = {
            "space": space.name, "fingerprint": space.fingerprint, "classes": self.supernet.num_classes,
            "weight_sharing": self.supernet.weight_sharing, "bn": self.bn, "sampling": self.sampling,
            "data": getattr(dm, "name", None) or (type(dm).__name__ if dm is not None else None),
            "search_cost": dict(self.search_cost)}

    # ------------------------------------------------------------------ files beside every export
    def candidates(self) -> list[dict[str, Any]]:
        """Every candidate scored (any target), once: choices, predicted cost, score, the targets that
        picked it, and whether it is on the Pareto front of score against predicted cost."""
        picked: dict[Arch, list[str]] = {}
        for label, f in (self._found or {}).items():
            picked.setdefault(f["arch"], []).append(label)
        space = self.supernet.space
        shape = (space.in_chans, space.resolution, space.resolution)
        rows = []
        for a, s in self._scores.items():
            if a not in self._sizes:  # params and peak activation memory of the static net (once per candidate)
                net = space_timm_net(space, a, self.supernet.num_classes)
                self._sizes[a] = (count_params(net), peak_activation_bytes(net, shape))
            params, peak = self._sizes[a]
            rows.append({"arch": dict(a.choices), "cost": float(self.cost_model.predict(a)), "score": s,
                         "params": params, "peak_activation_kb": round(peak / 1024, 2),
                         "picked_for": picked.get(a, [])})
        for key, flag in (("cost", "pareto"), ("params", "pareto_params"), ("peak_activation_kb", "pareto_memory")):
            front = set(pareto_front([(r[key], r["score"]) for r in rows]))
            for i, r in enumerate(rows):
                r[flag] = i in front
        return rows

    def extra_plots(self, label: str | None = None, arch: Arch | None = None) -> dict[str, Callable]:
        if self._found is None:
            return {}
        unit = self.cost_model.unit
        cands = self.candidates()
        found = {label: {**{k: v for k, v in f.items() if k != "arch"}, "arch": dict(f["arch"].choices)}
                 for label, f in self._found.items()}

        def write_json(path: Path) -> None:
            path.write_text(json.dumps({"kind": self.cost_model.kind, "unit": unit, "targets": self.targets,
                                        "queries": self.queries, "engine": self.engine, "predictor": self.predictor,
                                        "min_fraction": self.min_fraction,
                                        "found": found, "candidates": cands, "queries_by_target": self._rows},
                                       indent=1))

        def write_csv(path: Path) -> None:
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow([f"cost_{unit or 'units'}", "score", "pareto", "params", "peak_activation_kb", "pareto_params",
                        "pareto_memory", "picked_for", *self.decisions])
            for r in sorted(cands, key=lambda r: r["cost"]):
                w.writerow([f"{r['cost']:.6g}", f"{r['score']:.6f}", int(r["pareto"]), r["params"],
                            f"{r['peak_activation_kb']:.2f}", int(r["pareto_params"]), int(r["pareto_memory"]),
                            " ".join(r["picked_for"]), *(r["arch"][d] for d in self.decisions)])
            path.write_text(buf.getvalue())

        def plot(path: Path) -> None:
            plot_front(cands, found, path, unit, self.cost_model.kind, this=label)

        def plot_sizes(path: Path) -> None:
            plot_size_fronts(cands, path, this=label)

        return {"evolution.json": write_json, "evolution.csv": write_csv, "front.png": plot,
                "front_params_memory.png": plot_sizes}
