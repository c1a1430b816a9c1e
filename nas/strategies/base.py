"""What every search strategy shares: the supernet, the cost model, evaluation and search cost."""
from __future__ import annotations

import random
import time
from typing import Any, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.utilities import CombinedLoader

from nas.latency.cost import CostModel
from supernets.arch import Arch
from supernets.bn import calibrate_bn
from supernets.supernet import Supernet


class SearchStrategy(pl.LightningModule):
    """A LightningModule over one :class:`Supernet` and one :class:`CostModel`.

    Subclasses implement ``training_step`` and :meth:`derive`. Validation evaluates the currently
    derived architecture on the arch split (held out from weight training). ``search_cost`` counts
    wall seconds, epochs and images seen, and is saved in checkpoints.
    """

    name = "base"
    #: True where one search serves one target (ProxylessNAS: the latency term pulls towards it);
    #: ``nas-search`` then runs one search per target. False: one search exports every target.
    one_target_per_search = False

    def __init__(self, supernet: Supernet, cost_model: CostModel,
                 targets: Mapping[str, float] | Sequence[float | str] | float | str | None = None):
        """``targets``: ``{export label: value in the cost model's unit}`` as
        :meth:`CostModel.resolve_targets` gives, or the raw ``strategy.targets`` list to resolve."""
        super().__init__()
        self.supernet = supernet
        self.cost_model = cost_model
        if targets is not None and not isinstance(targets, Mapping):
            targets = cost_model.resolve_targets(targets)
        self.targets: dict[str, float] = {str(k): float(v) for k, v in (targets or {}).items()}
        if self.one_target_per_search and len(self.targets) > 1:
            raise ValueError(f"{type(self).__name__} searches for one target at a time, got {len(self.targets)}")
        #: the largest target (the one target of a one-target strategy); None without targets
        self.target: float | None = max(self.targets.values()) if self.targets else None
        # architecture parameters stay out of DDP's gradient buckets: strategies reduce them themselves
        # (op logits ``*.alpha`` and width logits ``width_alpha.*``: every parameter arch_parameters() returns)
        arch = {id(a) for a in supernet.arch_parameters()}
        self._ddp_params_and_buffers_to_ignore = [f"supernet.{n}" for n, p in supernet.named_parameters()
                                                  if id(p) in arch]
        self.history: list[dict[str, Any]] = []  # one row per epoch: probabilities, derived arch, costs
        self.search_cost = {"seconds": 0.0, "epochs": 0, "images": 0}
        self.dist_check: dict[str, Any] = {"world_size": 1}
        self._t_epoch = None
        self._datamodule = None
        #: BatchNorm recalibration batches before each validation (0: the supernet's running statistics)
        self.val_calib_batches = 0
        self._eval_net: torch.nn.Module | None = None

    # ------------------------------------------------------------------ data
    def train_loaders(self, datamodule) -> Any:
        """The loaders ``trainer.fit`` takes; default: the weight split only."""
        return datamodule.train_dataloader()

    def recalibrate_validation(self, datamodule, batches: int) -> None:
        """Validate the derived architecture as it will be exported: extracted from the supernet, with
        BatchNorm statistics recomputed over ``batches`` batches of ``datamodule.calib_dataloader``.

        Without this, validation runs the derived path inside the supernet on running statistics that
        every sampled path has moved, and its accuracy can fall while the export's rises."""
        self._datamodule = datamodule
        self.val_calib_batches = int(batches)

    @staticmethod
    def paired_loaders(datamodule) -> CombinedLoader:
        """Weight batches paired with (cycled) arch batches: ``batch["train"]``, ``batch["arch"]``."""
        return CombinedLoader({"train": datamodule.train_dataloader(), "arch": datamodule.arch_dataloader()},
                              mode="max_size_cycle")

    # ------------------------------------------------------------------ the result
    def derive(self) -> Arch:
        raise NotImplementedError

    def derive_all(self) -> dict[str, Arch]:
        """Every architecture this strategy exports, by label (default: the one from :meth:`derive`,
        labelled by its target)."""
        return {next(iter(self.targets), "best"): self.derive()}

    def export_target(self, label: str) -> float | None:
        """The target (in the cost model's unit) the export ``label`` stands for."""
        return self.targets.get(label, self.target)

    def extra_plots(self, label: str | None = None, arch: Arch | None = None) -> dict[str, Any]:
        """``{file name: function(path)}`` of plots beside the export ``label`` of ``arch`` (none by default)."""
        return {}

    # ------------------------------------------------------------------ distributed
    @property
    def distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def sync_path(self) -> None:
        """Every rank runs rank 0's sampled path (the same weights are trained everywhere)."""
        if self.distributed:
            state = self.trainer.strategy.broadcast(self.supernet.path_state(), src=0)
            self.supernet.load_path_state(state)

    def mean_arch_grads(self) -> None:
        """Average the architecture gradients over ranks, so every rank takes the same step."""
        if self.distributed:
            for a in self.supernet.arch_parameters():
                if a.grad is not None:
                    a.grad = self.trainer.strategy.reduce(a.grad, reduce_op="mean")

    def on_fit_end(self) -> None:
        """Under DDP, check the contract that every rank holds the same architecture state and derives
        the same architecture; the result goes into every export's report."""
        if not self.distributed:
            self.dist_check = {"world_size": 1}
            return
        alphas = [a.detach().flatten().cpu() for a in self.supernet.arch_parameters()]
        mine = {"alpha": torch.cat(alphas).tolist() if alphas else [],
                "derived": {k: dict(a.choices) for k, a in self.derive_all().items()},
                "state": self.search_state()}
        everyone: list = [None] * self.trainer.world_size
        dist.all_gather_object(everyone, mine)
        diff = max((max((abs(x - y) for x, y in zip(o["alpha"], mine["alpha"])), default=0.0) for o in everyone),
                   default=0.0)
        agree = all(o == everyone[0] for o in everyone)
        self.dist_check = {"world_size": self.trainer.world_size, "ranks_agree": agree, "max_alpha_diff": diff}
        if not agree:
            raise RuntimeError(f"ranks hold different architecture states after the search (max alpha difference "
                               f"{diff:.3g}); please report this with the config")

    def search_state(self) -> Any:
        """Strategy state beyond alpha that every rank must hold identically (plain data)."""
        return None

    # ------------------------------------------------------------------ shared steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.supernet(x)

    def on_train_epoch_start(self) -> None:
        self._t_epoch = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        if self._t_epoch is not None:
            self.search_cost["seconds"] += time.perf_counter() - self._t_epoch
        self.search_cost["epochs"] += 1

    # ------------------------------------------------------------------ mixed precision
    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip the weight gradients (``grad_clip``, a norm) right before the weight optimizer steps.

        Lightning calls this after a ``16-mixed`` gradient scaler has unscaled the gradients (clipping in
        ``training_step`` would clip the scaled ones), for every precision alike; the architecture
        optimizer's step is left alone."""
        clip = getattr(self, "grad_clip", None)
        if not clip:
            return
        arch = {id(a) for a in self.supernet.arch_parameters()}
        if any(id(p) in arch for group in optimizer.param_groups for p in group["params"]):
            return
        torch.nn.utils.clip_grad_norm_(self.supernet.weight_parameters(), clip)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The ``16-mixed`` loss scaler of the trainer (None for fp32 and bf16-mixed, and outside fit).
        A backward that does not go through ``manual_backward`` must scale its loss with it, because the
        optimizer's step unscales the gradients."""
        if self._trainer is None:
            return None
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def count_images(self, n: int) -> None:
        self.search_cost["images"] += int(n)

    def on_validation_epoch_start(self) -> None:
        arch = self.derive()
        self.supernet.set_active(arch)
        self._eval_net = self.calibrated_net(arch) if self.val_calib_batches and self._datamodule else None

    def calibrated_net(self, arch: Arch) -> torch.nn.Module:
        """The static net of ``arch`` with the supernet's weights and BatchNorm recalibrated, as
        ``nas-search`` exports it. The supernet is not touched, nor is any RNG: a search validated this
        way samples the same paths as one validated without it."""
        # building the static net initialises its layers, and iterating a DataLoader draws a seed: both
        # from the global generator, which must give the training the paths and batches it gives without
        with torch.random.fork_rng(devices=[]):
            sub = self.supernet.extract(arch).to(self.device)
            calibrate_bn(sub, self._datamodule.calib_dataloader(self.val_calib_batches), device=self.device)
        return sub.eval()

    def on_validation_epoch_end(self) -> None:
        self._eval_net = None

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = (self.supernet if self._eval_net is None else self._eval_net)(x)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, on_epoch=True,
                 batch_size=len(y), sync_dist=True)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y), sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hwnas"] = {"history": self.history, "search_cost": self.search_cost, "rng": _rng_states()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("hwnas", {})
        self.history = list(state.get("history", []))
        self.search_cost = dict(state.get("search_cost", self.search_cost))
        if "rng" in state:  # paths sampled and data order after a resume are those of an uninterrupted run
            _set_rng_states(state["rng"])


def _rng_states() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain data (loadable with ``weights_only=True``)."""


    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state()}


def _set_rng_states(states: dict[str, Any]) -> None:


    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
