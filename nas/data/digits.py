"""`data=digits`: the 8x8 handwritten digits that ship with scikit-learn (the embedded default)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset, TensorDataset

from nas.data.base import (
    ImageDataModule,
    split_train_arch,
)
from nas.errors import UserError


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), shipped with sklearn.

    Pixels (0..16) are scaled to [0, 1], bilinearly upsampled to ``resolution``, normalized with
    the mean/std of the weight-training split and repeated to 3 channels. All tensors are computed
    once in :meth:`setup`. The train/test split is stratified and seeded; the arch split is then
    carved from the training part.

    ``source_indices`` maps each split name to the row indices into ``load_digits()`` it holds.
    """

    default_name = "digits"

    def __init__(self, resolution: int = 32, test_fraction: float = 0.2, **common: Any) -> None:
        super().__init__(resolution=resolution, **common)
        if not 0.0 < float(test_fraction) < 1.0:
            raise UserError(
                f"data.test_fraction={test_fraction} is out of range: it must be strictly between "
                "0 and 1, e.g. data.test_fraction=0.2"
            )
        self.test_fraction = float(test_fraction)
        self.num_classes = 10
        self.source_indices: dict[str, np.ndarray] = {}

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        digits = load_digits()
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        pool_ids, test_ids = train_test_split(
            np.arange(len(labels)),
            test_size=self.test_fraction,
            stratify=digits.target,
            random_state=self.seed,
        )
        pool_ids, test_ids = np.sort(pool_ids), np.sort(test_ids)
        train_idx, arch_idx = split_train_arch(len(pool_ids), self.arch_fraction, self.seed)
        self.source_indices = {
            "train": pool_ids[train_idx],
            "arch": pool_ids[arch_idx],
            "test": test_ids,
        }

        images = torch.as_tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
        if self.resolution != images.shape[-1]:
            images = F.interpolate(
                images, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False
            )
        fit = images[torch.as_tensor(self.source_indices["train"])]
        images = (images - fit.mean()) / fit.std().clamp_min(1e-6)

        def tensors(ids: np.ndarray) -> TensorDataset:
            index = torch.as_tensor(ids)
            # expand (not repeat): the three identical channels share memory until collated
            return TensorDataset(images[index].expand(-1, 3, -1, -1), labels[index])

        pool = tensors(pool_ids)
        return Subset(pool, train_idx), Subset(pool, arch_idx), tensors(test_ids)


# --------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision format)
# --------------------------------------------------------------------------------------------------


