"""Image classification data for search and retraining.

Every data module delivers batches ``(images, labels)`` with ``images`` a normalized float32 tensor
``[B, 3, R, R]`` (``R`` = ``resolution``) and ``labels`` an int64 tensor ``[B]``, and exposes three
splits:

* ``train``: weight training (augmented where the dataset has augmentation),
* ``arch``: a fraction of the *training* set carved off for architecture updates and validation
  (never augmented, never taken from the test set),
* ``test``: the dataset's own held-out split, used only for final reporting.

The train/arch split is a seeded permutation, so it is identical across runs, processes and
machines for the same ``seed``. Problems a user can fix (missing data, bad layout, bad arguments)
raise :class:`nas.errors.UserError` with a message that says what to run.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, Callable, ClassVar

import pytorch_lightning as pl
import torch
from hydra.utils import to_absolute_path
from torch.utils.data import DataLoader, Dataset, Subset

from nas.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def split_train_arch(n: int, arch_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into sorted, disjoint (train, arch) index lists.

    ``round(n * arch_fraction)`` indices (at least one, and leaving at least one for training) go
    to the arch split. The permutation comes from a ``torch.Generator`` seeded with ``seed``, so
    the result depends only on ``(n, arch_fraction, seed)``.
    """
    if n < 2:
        raise UserError(
            f"The training set has {n} image(s); at least 2 are needed to carve off an arch split. "
            "Point data.root at a larger dataset."
        )
    n_arch = min(max(int(round(n * arch_fraction)), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(perm[n_arch:]), sorted(perm[:n_arch])


def _resolve_path(path: str | os.PathLike[str]) -> Path:
    """Absolute path; relative paths are taken from the directory the command was started in.

    Under Hydra this is the original working directory, even if Hydra changed into a run dir.
    """
    return Path(to_absolute_path(str(Path(path).expanduser())))


class TransformedDataset(Dataset):
    """A view of ``base`` (yielding ``(PIL image, label)``) with ``transform`` applied to images.

    Two views of the same base dataset share its storage, which lets the train split be augmented
    while the arch split, carved from the same underlying dataset, is not.
    """

    def __init__(self, base: Dataset, transform: Callable[[Any], torch.Tensor]):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), label


# --------------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------------


class ImageDataModule(pl.LightningDataModule, abc.ABC):
    """Common machinery: argument checks, lazy idempotent setup, the five data loaders.

    Subclasses set ``num_classes`` in ``__init__`` and implement :meth:`_build_splits`.

    Args:
        resolution: side of the square images that are delivered.
        batch_size: batch size of the train and arch loaders (and of the calibration loader).
        arch_fraction: fraction of the training set carved off as the arch split, in (0, 1).
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: seed of the dataset splits and of the calibration subset.
        eval_batch_size: batch size of the val/test loaders; defaults to ``2 * batch_size``.
        name: name used in reports; defaults to the dataset's config name (e.g. ``"cifar10"``).
    """

    #: Name used in reports when the caller passes none (the Hydra config name).
    default_name: ClassVar[str] = "images"

    num_classes: int
    in_chans: int = 3

    def __init__(
        self,
        resolution: int,
        batch_size: int = 64,
        arch_fraction: float = 0.2,
        num_workers: int = 0,
        seed: int = 0,
        eval_batch_size: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        _require_int("data.resolution", resolution, minimum=1)
        _require_int("data.batch_size", batch_size, minimum=1)
        _require_int("data.num_workers", num_workers, minimum=0)
        if eval_batch_size is not None:
            _require_int("data.eval_batch_size", eval_batch_size, minimum=1)
        if not 0.0 < float(arch_fraction) < 1.0:
            raise UserError(
                f"data.arch_fraction={arch_fraction} is out of range: it is the fraction of the "
                "training set used for architecture updates and validation and must be strictly "
                "between 0 and 1, e.g. data.arch_fraction=0.2"
            )
        self.resolution = int(resolution)
        self.batch_size = int(batch_size)
        self.arch_fraction = float(arch_fraction)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else 2 * self.batch_size
        self.name = name if name is not None else self.default_name
        #: page-locked batches for fast copies to a GPU; the apps set it when the trainer uses one
        #: (``nas.apps.common.make_datamodule``): pinning for a CPU run only costs time and memory
        self.pin_memory = False

        self.train_set: Dataset | None = None
        self.arch_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._is_setup = False

    # -- setup --------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        """Load the data and return the ``(train, arch, test)`` datasets."""

    def setup(self, stage: str | None = None) -> None:
        """Build ``train_set``, ``arch_set`` and ``test_set`` (all stages at once; idempotent)."""
        if self._is_setup:
            return
        self.train_set, self.arch_set, self.test_set = self._build_splits()
        self._is_setup = True

    def _ensure_setup(self) -> None:
        if not self._is_setup:
            self.prepare_data()
            self.setup()

    # -- loaders ------------------------------------------------------------------------------------

    def _loader(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool = False,
        persistent: bool = True,
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=persistent and self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        """Weight-training split, shuffled; incomplete last batch dropped when a full one exists."""
        self._ensure_setup()
        assert self.train_set is not None
        n = len(self.train_set)  # type: ignore[arg-type]
        return self._loader(self.train_set, self.batch_size, shuffle=True, drop_last=n >= self.batch_size)

    def arch_dataloader(self) -> DataLoader:
        """Arch split, shuffled, for architecture-parameter steps (same batching as training)."""
        self._ensure_setup()
        assert self.arch_set is not None
        n = len(self.arch_set)  # type: ignore[arg-type]
        return self._loader(self.arch_set, self.batch_size, shuffle=True, drop_last=n >= self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """Arch split in fixed order, for validation."""
        self._ensure_setup()
        assert self.arch_set is not None
        return self._loader(self.arch_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test split in fixed order."""
        self._ensure_setup()
        assert self.test_set is not None
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def calib_dataloader(self, batches: int) -> DataLoader:
        """``min(batches, available)`` batches of the train split, for BatchNorm re-calibration.

        The samples are a fixed, seeded random subset of the train split, so every call (and every
        candidate architecture calibrated with it) sees the same images in the same order.
        """
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ValueError(f"calib_dataloader needs a positive number of batches, got {batches!r}")
        self._ensure_setup()
        assert self.train_set is not None
        n = len(self.train_set)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(n, generator=generator)[: batches * self.batch_size].tolist()
        return self._loader(Subset(self.train_set, chosen), self.batch_size, shuffle=False, persistent=False)

    # -- reporting ----------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Split sizes and shape information, for logs and reports."""
        self._ensure_setup()
        return {
            "name": self.name,
            "train": len(self.train_set),  # type: ignore[arg-type]
            "arch": len(self.arch_set),  # type: ignore[arg-type]
            "test": len(self.test_set),  # type: ignore[arg-type]
            "classes": self.num_classes,
            "resolution": self.resolution,
        }


def _require_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{key}={value!r} is invalid: it must be an integer >= {minimum}.")


# --------------------------------------------------------------------------------------------------
# sklearn digits (offline, tiny: smoke tests and CI)
# --------------------------------------------------------------------------------------------------


