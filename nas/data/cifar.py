"""`data=cifar10`, `data=cifar100`: torchvision's CIFAR readers over a local folder, or a download on request."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision import transforms as T

from nas.data.base import (
    ImageDataModule,
    TransformedDataset,
    _resolve_path,
    split_train_arch,
)
from nas.errors import UserError


class _CIFARDataModule(ImageDataModule):
    """Shared code of the CIFAR data modules (torchvision's on-disk format and integrity check)."""

    dataset_cls: ClassVar[type[datasets.CIFAR10]]
    title: ClassVar[str]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]

    def __init__(self, root: str | os.PathLike[str], download: bool = False, resolution: int = 32,
                 **common: Any) -> None:
        super().__init__(resolution=resolution, **common)
        self.root = _resolve_path(root)
        self.download = bool(download)
        self._raw_test: datasets.CIFAR10 | None = None
        if not self.download:
            # fail fast, before any training: runs torchvision's md5 check over all files
            self._raw_test = self._open(train=False)

    @property
    def folder(self) -> Path:
        """The directory torchvision reads (``<root>/cifar-10-batches-py`` or similar)."""
        return self.root / self.dataset_cls.base_folder

    def prepare_data(self) -> None:
        """Download the archive if ``download=True`` and the data is not there yet."""
        if self.download:
            self._open(train=False)

    def _open(self, train: bool) -> datasets.CIFAR10:
        """Load one split (as PIL images), downloading first if allowed; errors become UserError."""
        try:
            return self.dataset_cls(str(self.root), train=train, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            if not self.download:
                raise UserError(self._missing_message()) from err
        try:
            return self.dataset_cls(str(self.root), train=train, download=True)
        except (RuntimeError, OSError) as err:  # URLError is an OSError
            raise UserError(
                f"Could not download {self.title} into {self.root}: {err}\n"
                f"Check network access, or fetch {self.dataset_cls.url} yourself, extract it so "
                f"that {self.folder} exists, and run with data.download=false."
            ) from err

    def _missing_message(self) -> str:
        expected = [name for name, _ in self.dataset_cls.train_list + self.dataset_cls.test_list]
        expected.append(self.dataset_cls.meta["filename"])
        if self.folder.is_dir():
            problem = (
                f"{self.title} in {self.folder} is incomplete or corrupted "
                "(torchvision's md5 check failed)."
            )
        else:
            problem = f"{self.title} not found: looked in {self.folder} (data.root={self.root})."
        return (
            f"{problem}\n"
            f"hwnas expects {self.title} in torchvision's format: the folder "
            f"{self.dataset_cls.base_folder}/ with {', '.join(expected)}, inside data.root.\n"
            f"To download it, run:  nas-search data={self.default_name} data.download=true\n"
            f"or use an existing copy:  nas-search data={self.default_name} "
            f"data.root=<dir containing {self.dataset_cls.base_folder}>\n"
            f"(the default data.root is $HWNAS_DATA/{self.default_name}, "
            f"or data/{self.default_name} when HWNAS_DATA is unset)"
        )

    def _train_transform(self) -> Callable[[Any], torch.Tensor]:
        steps: list[Callable[[Any], Any]] = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        if self.resolution != 32:
            steps.append(T.Resize((self.resolution, self.resolution)))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def _eval_transform(self) -> Callable[[Any], torch.Tensor]:
        steps: list[Callable[[Any], Any]] = []
        if self.resolution != 32:
            steps.append(T.Resize((self.resolution, self.resolution)))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        raw_train = self._open(train=True)
        raw_test = self._raw_test if self._raw_test is not None else self._open(train=False)
        self._raw_test = None
        train_idx, arch_idx = split_train_arch(len(raw_train), self.arch_fraction, self.seed)
        eval_tf = self._eval_transform()
        return (
            Subset(TransformedDataset(raw_train, self._train_transform()), train_idx),
            Subset(TransformedDataset(raw_train, eval_tf), arch_idx),
            TransformedDataset(raw_test, eval_tf),
        )


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (50k train / 10k test, 10 classes) from ``<root>/cifar-10-batches-py``.

    Train split: random crop (padding 4) + horizontal flip (+ resize if ``resolution != 32``).
    Arch and test splits: resize only. With ``download=False`` a missing or corrupted copy raises
    :class:`UserError` at construction.
    """

    default_name = "cifar10"
    dataset_cls = datasets.CIFAR10
    title = "CIFAR-10"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    num_classes = 10

    def __init__(self, root: str | os.PathLike[str] = "data/cifar10", download: bool = False,
                 **common: Any) -> None:
        super().__init__(root=root, download=download, **common)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (50k train / 10k test, 100 fine classes) from ``<root>/cifar-100-python``.

    Same transforms and error behaviour as :class:`CIFAR10DataModule`.
    """

    default_name = "cifar100"
    dataset_cls = datasets.CIFAR100
    title = "CIFAR-100"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    num_classes = 100

    def __init__(self, root: str | os.PathLike[str] = "data/cifar100", download: bool = False,
                 **common: Any) -> None:
        super().__init__(root=root, download=download, **common)


# --------------------------------------------------------------------------------------------------
# generic image folder (ImageNet layout)
# --------------------------------------------------------------------------------------------------


