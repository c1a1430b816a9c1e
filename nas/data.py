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
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import to_absolute_path
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from nas.errors import UserError

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "TransformedDataset",
    "split_train_arch",
]

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
            pin_memory=torch.cuda.is_available(),
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
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

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


class ImageFolderDataModule(ImageDataModule):
    """Images in ``<root>/<train_dir>/<class>/*`` and ``<root>/<test_dir>/<class>/*``.

    Labels are the positions of the class folder names in sorted order (torchvision's
    ``ImageFolder`` convention), so both splits must contain the same class folders. The layout is
    checked at construction; ``num_classes`` and ``classes`` are known right away.

    Train split: RandomResizedCrop(scale=(0.35, 1)) + horizontal flip. Arch and test splits:
    resize to ``1.14 * resolution`` + center crop. ImageNet mean/std normalization.
    """

    default_name = "imagefolder"

    def __init__(self, root: str | os.PathLike[str], train_dir: str = "train", test_dir: str = "val",
                 resolution: int = 224, **common: Any) -> None:
        super().__init__(resolution=resolution, **common)
        self.root = _resolve_path(root)
        self.train_dir = self.root / train_dir
        self.test_dir = self.root / test_dir
        self.classes = self._check_layout()
        self.num_classes = len(self.classes)

    def _layout_hint(self) -> str:
        return (
            "Expected layout:\n"
            f"  {self.train_dir}/<class name>/<image files>\n"
            f"  {self.test_dir}/<class name>/<image files>\n"
            f"with image files ending in {', '.join(IMG_EXTENSIONS)}.\n"
            "Run e.g.:  nas-search data=imagefolder data.root=/path/to/dataset "
            "[data.train_dir=train data.test_dir=val]"
        )

    def _check_layout(self) -> list[str]:
        """Validate the folder layout and return the sorted class names."""
        if not self.root.is_dir():
            raise UserError(f"Image folder data.root={self.root} does not exist.\n{self._layout_hint()}")
        found: dict[str, list[str]] = {}
        for key, split_dir in (("data.train_dir", self.train_dir), ("data.test_dir", self.test_dir)):
            if not split_dir.is_dir():
                present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
                raise UserError(
                    f"Image folder {self.root} has no '{split_dir.name}' split folder "
                    f"({key}={split_dir.name}); subfolders present: {present or 'none'}.\n"
                    f"{self._layout_hint()}"
                )
            classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
            if not classes:
                raise UserError(
                    f"No class folders in {split_dir}: images must sit in one subfolder per class.\n"
                    f"{self._layout_hint()}"
                )
            empty = [name for name in classes if not _has_image(split_dir / name)]
            if empty:
                raise UserError(
                    f"No images found in {len(empty)} class folder(s) of {split_dir}: "
                    f"{_preview(empty)}.\nEvery class folder needs at least one image.\n"
                    f"{self._layout_hint()}"
                )
            found[key] = classes
        train_classes, test_classes = found["data.train_dir"], found["data.test_dir"]
        if train_classes != test_classes:
            missing = sorted(set(train_classes) - set(test_classes))
            extra = sorted(set(test_classes) - set(train_classes))
            raise UserError(
                f"The class folders of {self.test_dir} differ from those of {self.train_dir}: "
                f"missing in {self.test_dir.name}: {_preview(missing) or 'none'}; "
                f"only in {self.test_dir.name}: {_preview(extra) or 'none'}.\n"
                "Both splits must contain exactly the same class folder names (labels are "
                "assigned by sorted folder name). Add or remove class folders so they match."
            )
        return train_classes

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        try:
            raw_train = datasets.ImageFolder(str(self.train_dir))
            raw_test = datasets.ImageFolder(str(self.test_dir))
        except FileNotFoundError as err:  # the folders changed since construction
            raise UserError(
                f"Could not read the image folder {self.root}: {err}\n{self._layout_hint()}"
            ) from err
        train_idx, arch_idx = split_train_arch(len(raw_train), self.arch_fraction, self.seed)
        r = self.resolution
        normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_tf = T.Compose(
            [T.RandomResizedCrop(r, scale=(0.35, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
        )
        eval_tf = T.Compose([T.Resize(int(r * 1.14)), T.CenterCrop(r), T.ToTensor(), normalize])
        return (
            Subset(TransformedDataset(raw_train, train_tf), train_idx),
            Subset(TransformedDataset(raw_train, eval_tf), arch_idx),
            TransformedDataset(raw_test, eval_tf),
        )


def _has_image(directory: Path) -> bool:
    """True as soon as one file with an image extension is found below ``directory``."""
    for _, _, files in os.walk(directory, followlinks=True):
        if any(has_file_allowed_extension(name, IMG_EXTENSIONS) for name in files):
            return True
    return False


def _preview(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")
