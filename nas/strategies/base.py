"""What every search strategy shares: the supernet, the cost model, evaluation and search cost."""
from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import CombinedLoader

from supernets.arch import Arch
from supernets.supernet import Supernet

from ..cost import CostModel


class SearchStrategy(pl.LightningModule):
    """A LightningModule over one :class:`Supernet` and one :class:`CostModel`.

    Subclasses implement ``training_step`` and :meth:`derive`. Validation evaluates the currently
    derived architecture on the arch split (held out from weight training). ``search_cost`` counts
    wall seconds, epochs and images seen, and is saved in checkpoints.
    """

    name = "base"

    def __init__(self, supernet: Supernet, cost_model: CostModel, target: float | None = None):
        super().__init__()
        self.supernet = supernet
        self.cost_model = cost_model
        self.target = target
        self.history: list[dict[str, Any]] = []  # one row per epoch: probabilities, derived arch, costs
        self.search_cost = {"seconds": 0.0, "epochs": 0, "images": 0}
        self._t_epoch = None

    # ------------------------------------------------------------------ data
    def train_loaders(self, datamodule) -> Any:
        """The loaders ``trainer.fit`` takes; default: the weight split only."""
        return datamodule.train_dataloader()

    @staticmethod
    def paired_loaders(datamodule) -> CombinedLoader:
        """Weight batches paired with (cycled) arch batches: ``batch["train"]``, ``batch["arch"]``."""
        return CombinedLoader({"train": datamodule.train_dataloader(), "arch": datamodule.arch_dataloader()},
                              mode="max_size_cycle")

    # ------------------------------------------------------------------ the result
    def derive(self) -> Arch:
        raise NotImplementedError

    def derive_all(self) -> dict[str, Arch]:
        """Every architecture this strategy exports, by label (default: the one from :meth:`derive`)."""
        return {"best": self.derive()}

    # ------------------------------------------------------------------ shared steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.supernet(x)

    def on_train_epoch_start(self) -> None:
        self._t_epoch = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        if self._t_epoch is not None:
            self.search_cost["seconds"] += time.perf_counter() - self._t_epoch
        self.search_cost["epochs"] += 1

    def count_images(self, n: int) -> None:
        self.search_cost["images"] += int(n)

    def on_validation_epoch_start(self) -> None:
        self.supernet.set_active(self.derive())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.supernet(x)
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
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state()}


def _set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
