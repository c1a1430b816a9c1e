"""`data=fashion_mnist`: Zalando's Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey, 10 classes).

Real data that is available offline: Debian's ``dataset-fashion-mnist`` package puts the four
original IDX files in ``/usr/share/datasets/fashion-mnist``. The files are read here directly
(gzip + numpy, no copy of the data is made on disk). Where the files come from, in this order:

1. ``data.root`` (a folder holding the four files, or torchvision's ``<root>/FashionMNIST/raw``),
2. the environment variable ``HWNAS_FASHION_MNIST`` (a folder, as for ``data.root``),
3. the Debian package's folder ``/usr/share/datasets/fashion-mnist``,
4. ``data.download=true``: torchvision's ``FashionMNIST`` download into ``download_root``
   (only then does anything reach the network).

A file that is missing, has the wrong magic number, the wrong image size, a count that disagrees
with its partner file, or is truncated stops construction with one :class:`UserError` line that
names every way to provide the data.

**Grey 28x28 images in 3-channel 32x32 spaces.** The images are padded with the background value
(0, black) to ``resolution`` (2 pixels each side for 32) and their one channel is repeated to
``in_chans`` channels. Why this and not 1-channel spaces: every search space, latency table and
export here assumes ``in_chans=3`` and a resolution whose stride-16 grid divides evenly (32 -> 2x2);
a 1-channel or 28x28 variant would need its own latency tables and would change the stem's entry,
while repeating costs only the stem convolution's three input channels (a negligible share of the
net's latency) and keeps the data pixel-exact. Padding rather than resizing keeps every pixel as
recorded (no interpolation blur of 1-pixel garment details), as LeNet did with MNIST. For
``resolution < 28`` the images are bilinearly resized instead.

Normalisation uses the mean and std of the weight-training split (after padding). ``train_size``
takes a class-balanced, seeded subset of the 60,000 training images (the arch split is then carved
from it), ``test_size`` a class-balanced subset of the test images; both ``null`` = all.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from nas.data.base import ImageDataModule, _require_int, _resolve_path, split_train_arch
from nas.errors import UserError

#: The environment variable naming a folder with the four IDX files.
ENV_VAR = "HWNAS_FASHION_MNIST"
#: Where Debian's ``dataset-fashion-mnist`` installs them.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: ``{split: (images file, labels file)}`` (the original names; ``.gz`` or uncompressed).
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
SIDE = 28
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")


class ShiftFlip(Dataset):
    """Training augmentation for centred grey images: a random shift of up to ``shift`` pixels each way
    (the vacated border filled with the background value) and a horizontal flip with probability 1/2.

    This is the usual Fashion-MNIST recipe (garments are left-right symmetric; the padding to 32 leaves
    room for a 2-pixel shift without cutting the object). Applied to the weight-training split only;
    the arch and test splits stay exact. Draws come from torch's global generator, which Lightning's
    ``seed_everything`` seeds, so a retraining with a given seed sees the same augmented stream.
    """

    def __init__(self, base: Dataset, shift: int, *, background: float):
        self.base, self.shift, self.background = base, int(shift), float(background)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        x, y = self.base[index]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        s = self.shift
        if s:
            dx, dy = (int(v) for v in torch.randint(-s, s + 1, (2,)))
            if dx or dy:
                x = F.pad(x, (s, s, s, s), value=self.background)
                h, w = x.shape[-2] - 2 * s, x.shape[-1] - 2 * s
                x = x[..., s + dy:s + dy + h, s + dx:s + dx + w]
        return x, y


class IdxError(Exception):
    """A damaged or missing IDX file (turned into a :class:`UserError` naming every way to get the data)."""


def how_to_provide() -> str:
    """Every way to provide the data, for the one-line error."""
    names = ", ".join(f"{n}.gz" for pair in FILES.values() for n in pair)
    return (f"provide the four Fashion-MNIST IDX files ({names}) by data.root=<folder>, or the environment "
            f"variable {ENV_VAR}=<folder>, or `apt-get install dataset-fashion-mnist` (installs them in "
            f"{DEBIAN_DIR}), or data.download=true (torchvision downloads them)")


def _find_file(folder: Path, name: str) -> Path | None:
    for sub in (folder, folder / "FashionMNIST" / "raw"):
        for candidate in (sub / f"{name}.gz", sub / name):
            if candidate.is_file():
                return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise IdxError(f"{path} cannot be read ({e})") from None


def read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """The uint8 array of an IDX file, after checking its magic number and its length."""
    data = _read_bytes(path)
    header = 4 + 4 * dims
    if len(data) < header:
        raise IdxError(f"{path} is truncated ({len(data)} bytes, not even an IDX header)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise IdxError(f"{path} has magic number 0x{found:08x}, not 0x{magic:08x} (not a Fashion-MNIST "
                       f"{'images' if dims == 3 else 'labels'} file)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    need = int(np.prod(shape))
    if len(data) - header != need:
        raise IdxError(f"{path} holds {len(data) - header} bytes of data where its header {shape} needs {need} "
                       f"({'truncated' if len(data) - header < need else 'trailing bytes'})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 28, 28] uint8, labels [N] int64)`` of ``split`` from ``folder``, checked."""
    img_name, lab_name = FILES[split]
    paths = {n: _find_file(folder, n) for n in (img_name, lab_name)}
    missing = [n for n, p in paths.items() if p is None]
    if missing:
        raise IdxError(f"{', '.join(f'{n}.gz' for n in missing)} not found in {folder}")
    images = read_idx(paths[img_name], IMAGES_MAGIC, 3)
    labels = read_idx(paths[lab_name], LABELS_MAGIC, 1)
    if images.shape[1:] != (SIDE, SIDE):
        raise IdxError(f"{paths[img_name]} holds {images.shape[1]}x{images.shape[2]} images, not {SIDE}x{SIDE}")
    if len(images) != len(labels):
        raise IdxError(f"{paths[img_name]} has {len(images)} images but {paths[lab_name]} has {len(labels)} labels")
    if len(labels) == 0:
        raise IdxError(f"{paths[lab_name]} holds no images")
    if int(labels.max()) >= len(CLASSES):
        raise IdxError(f"{paths[lab_name]} has label {int(labels.max())}; Fashion-MNIST labels are 0-9")
    return images, labels.astype(np.int64)


def balanced_subset(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of ``size`` items whose class counts differ by at most one
    where the classes allow (all indices when ``size`` is None or not smaller than ``len(labels)``)."""
    n = len(labels)
    if size is None or size >= n:
        return np.arange(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).numpy()
    lab = labels[perm]
    rank = np.zeros(n, dtype=np.int64)  # position of each permuted item within its class
    for c in np.unique(lab):
        where = np.flatnonzero(lab == c)
        rank[where] = np.arange(len(where))
    order = np.lexsort((np.arange(n), rank))  # round-robin over the classes, in permutation order
    return np.sort(perm[order[:size]])


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST from its four IDX files (see the module docstring for where they are looked for).

    Args:
        root: folder with the four files (``.gz`` or uncompressed; torchvision's ``FashionMNIST/raw``
            inside it works too); None: ``$HWNAS_FASHION_MNIST``, then the Debian package's folder.
        download: when no folder has the files, download them with torchvision into ``download_root``.
        download_root: where a download goes (torchvision adds ``FashionMNIST/raw``).
        train_size: class-balanced seeded subset of the 60,000 training images (None: all); the arch
            split (``arch_fraction``) is carved from it.
        test_size: class-balanced seeded subset of the 10,000 test images (None: all).
        resolution: side of the delivered images (28 -> padded with black to it; < 28: resized).
        in_chans: channels delivered (the grey channel repeated).
    """

    default_name = "fashion_mnist"

    def __init__(self, root: str | os.PathLike[str] | None = None, download: bool = False,
                 download_root: str | os.PathLike[str] = "data/fashion_mnist", train_size: int | None = None,
                 test_size: int | None = None, resolution: int = 32, in_chans: int = 3, augment: bool = False,
                 shift: int = 2, **common: Any) -> None:
        super().__init__(resolution=resolution, **common)
        _require_int("data.shift", shift, minimum=0)
        for key, value in (("data.train_size", train_size), ("data.test_size", test_size)):
            if value is not None:
                _require_int(key, value, minimum=2 if key == "data.train_size" else 1)
        _require_int("data.in_chans", in_chans, minimum=1)
        self.train_size = train_size
        self.test_size = test_size
        self.in_chans = int(in_chans)
        self.num_classes = len(CLASSES)
        self.augment = bool(augment)
        self.shift = int(shift)
        self.download = bool(download)
        self.download_root = _resolve_path(download_root)
        self.root = _resolve_path(root) if root not in (None, "") else None
        self.folder: Path | None = None
        self.source = ""
        self.source_indices: dict[str, np.ndarray] = {}
        self._raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if not self.download:
            self._locate()  # fail fast: before any training, and before any other work

    # -- finding the files ------------------------------------------------------------------------
    def _candidates(self) -> list[tuple[str, Path, bool]]:
        """``(source, folder, explicit)``: an explicit source that fails is an error, not a fall-through."""
        if self.root is not None:
            return [("data.root", self.root, True)]
        env = os.environ.get(ENV_VAR)
        if env:
            return [(f"${ENV_VAR}", _resolve_path(env), True)]
        return [("the Debian package dataset-fashion-mnist", DEBIAN_DIR, False)]

    def _try(self, source: str, folder: Path) -> None:
        raw = {split: load_split(folder, split) for split in FILES}
        self._raw, self.folder, self.source = raw, folder, source

    def _locate(self) -> None:
        if self._raw or self._is_setup:
            return
        problems = []
        for source, folder, explicit in self._candidates():
            try:
                self._try(source, folder)
                return
            except IdxError as e:
                if explicit or folder.exists():
                    raise UserError(f"Fashion-MNIST from {source}: {e}; {how_to_provide()}") from None
                problems.append(f"{folder} does not exist")
        if self.download:
            self._download()
            return
        raise UserError(f"Fashion-MNIST not found ({'; '.join(problems)}); {how_to_provide()}")

    def _download(self) -> None:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(self.download_root), train=True, download=True)
            FashionMNIST(str(self.download_root), train=False, download=True)
        except (RuntimeError, OSError) as e:  # URLError is an OSError
            raise UserError(f"Fashion-MNIST download into {self.download_root} failed ({e}); "
                            f"{how_to_provide()}") from None
        try:
            self._try("data.download=true", self.download_root)
        except IdxError as e:
            raise UserError(f"Fashion-MNIST downloaded into {self.download_root}: {e}; {how_to_provide()}") from None

    def prepare_data(self) -> None:
        """Find (and with ``download=true``, fetch) the files."""
        self._locate()

    # -- tensors ----------------------------------------------------------------------------------
    def _tensor(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)
        r = self.resolution
        if r >= SIDE:
            lo = (r - SIDE) // 2
            x = F.pad(x, (lo, r - SIDE - lo, lo, r - SIDE - lo), value=0.0)
        else:
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
        return x

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        self._locate()
        (tr_x, tr_y), (te_x, te_y) = self._raw["train"], self._raw["test"]
        pool = balanced_subset(tr_y, self.train_size, self.seed)
        test = balanced_subset(te_y, self.test_size, self.seed + 1)
        train_idx, arch_idx = split_train_arch(len(pool), self.arch_fraction, self.seed)
        self.source_indices = {"train": pool[train_idx], "arch": pool[arch_idx], "test": test}
        x_pool = self._tensor(tr_x[pool])
        x_test = self._tensor(te_x[test])
        fit = x_pool[torch.as_tensor(train_idx)]
        mean, std = fit.mean(), fit.std().clamp_min(1e-6)
        x_pool = (x_pool - mean) / std
        x_test = (x_test - mean) / std
        self.norm = (float(mean), float(std))
        self._raw = {}  # the uint8 arrays are no longer needed

        def tensors(x: torch.Tensor, y: np.ndarray) -> TensorDataset:
            # expand (not repeat): the identical channels share memory until collated
            return TensorDataset(x.expand(-1, self.in_chans, -1, -1), torch.as_tensor(y))

        pool_set = tensors(x_pool, tr_y[pool])
        train = Subset(pool_set, train_idx)
        if self.augment:
            train = ShiftFlip(train, self.shift, background=float((0.0 - mean) / std))
        return train, Subset(pool_set, arch_idx), tensors(x_test, te_y[test])

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(augment=self.augment, shift=self.shift if self.augment else 0)
        d.update(source=self.source, folder=str(self.folder) if self.folder else None)
        return d


__all__ = ["FashionMNISTDataModule", "ENV_VAR", "DEBIAN_DIR", "FILES", "CLASSES", "balanced_subset", "read_idx",
           "load_split", "how_to_provide"]
