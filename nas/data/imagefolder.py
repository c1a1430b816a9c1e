"""`data=imagefolder`: a user's own images in `<root>/train/<class>/*` and `<root>/val/<class>/*`.

Every image file is checked when the data module is made, before any work: a file that is not an
image (a text file named ``.jpg``) or is cut short (a JPEG without its end marker, a PNG without its
``IEND`` chunk) is skipped, and one warning names the skipped files and their count. The check reads
each file's header and its last bytes only (no decoding), so it stays quick for large folders.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from nas.data.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataModule,
    TransformedDataset,
    _resolve_path,
    split_train_arch,
)
from nas.errors import UserError


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
        self.skipped = self._check_images()

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
        if len(train_classes) < 2:
            raise UserError(
                f"{self.train_dir} has {len(train_classes)} class folder ({_preview(train_classes)}); a classifier "
                f"needs at least 2 classes, each in a subfolder of its own.\n{self._layout_hint()}"
            )
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

    def _check_images(self) -> dict[str, str]:
        """``{path: problem}`` of the image files that cannot be read (skipped by the loaders), with one
        warning naming them; a class left without a readable image is refused."""
        skipped: dict[str, str] = {}
        for split_dir in (self.train_dir, self.test_dir):
            for name in self.classes:
                files = [os.path.join(d, f) for d, _, fs in os.walk(split_dir / name, followlinks=True)
                         for f in sorted(fs) if has_file_allowed_extension(f, IMG_EXTENSIONS)]
                bad = {f: p for f in files if (p := image_problem(f))}
                if len(bad) == len(files):
                    raise UserError(f"none of the {len(files)} image file(s) in {split_dir / name} can be read "
                                    f"(e.g. {next(iter(bad))}: {next(iter(bad.values()))}); replace them")
                skipped.update(bad)
        if skipped:
            shown = "; ".join(f"{f} ({p})" for f, p in list(skipped.items())[:5])
            more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            print(f"warning: skipping {len(skipped)} unreadable image file(s) of {self.root}: {shown}{more}")
        return skipped

    def _readable(self, path: str) -> bool:
        return has_file_allowed_extension(path, IMG_EXTENSIONS) and path not in self.skipped

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        try:
            raw_train = datasets.ImageFolder(str(self.train_dir), is_valid_file=self._readable)
            raw_test = datasets.ImageFolder(str(self.test_dir), is_valid_file=self._readable)
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


def image_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the image file ``path`` cannot be used (None when it can): not an image, or cut short.
    Reads the header and the last 2 KB only."""
    try:
        with Image.open(path) as im:
            fmt = im.format
    except UnidentifiedImageError:
        return "not an image"
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2048))
            tail = f.read()
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end marker)"
    if fmt == "PNG" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def _has_image(directory: Path) -> bool:
    """True as soon as one file with an image extension is found below ``directory``."""
    for _, _, files in os.walk(directory, followlinks=True):
        if any(has_file_allowed_extension(name, IMG_EXTENSIONS) for name in files):
            return True
    return False


def _preview(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")
