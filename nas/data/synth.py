"""``data=texshapes``: a procedurally generated image task that separates architectures.

Digits is too easy to tell architectures apart (the smallest and largest ``mbv2_tiny`` nets both
reach ~99.5 %). ``texshapes`` is generated from a seed in a few seconds, needs no download, and is
hard in the way that makes capacity and receptive field matter:

* 10 classes, one shape each (disk, square, triangle, plus, ring, crescent, star, bar, L, T), at a
  random position, scale and rotation, 32x32 RGB.
* The shape is drawn **only by texture**: figure and background are both sinusoidal gratings with
  their own random orientation, frequency, phase and pair of colours. Figure and background have
  the same mean brightness distribution, so no single pixel says "inside": a net must detect the
  texture boundary with oriented filters and then integrate it into a shape over most of the image.
* Gaussian pixel noise on top (``noise``), and a fraction of images whose figure/background
  orientations differ only slightly (``hard_fraction``), for a spread of difficulty.

Images are generated once per data module (vectorised torch, seeded by ``data_seed``), so the
dataset is identical across runs and machines; ``seed`` only chooses the train/arch split, as for
every other data module. The arch split is carved from the training images, the test images are
generated separately (disjoint random parameters from the same distribution).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from nas.data.base import ImageDataModule, _require_int, split_train_arch
from nas.errors import UserError

SHAPES = ("disk", "square", "triangle", "plus", "ring", "crescent", "star", "bar", "L", "T")


def _shape_mask(kind: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean mask of shape ``kind`` in normalised, rotated coordinates (radius ~1)."""
    r = torch.sqrt(u * u + v * v)
    au, av = u.abs(), v.abs()
    name = SHAPES[kind]
    if name == "disk":
        return r <= 1.0
    if name == "square":
        return torch.maximum(au, av) <= 0.8
    if name == "triangle":  # equilateral, centroid at 0
        return (v >= -0.5) & (v <= 1.0 - 1.732 * au)
    if name == "plus":
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if name == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if name == "crescent":
        return (r <= 1.0) & (torch.sqrt((u - 0.45) ** 2 + v * v) >= 0.8)
    if name == "star":  # five points
        theta = torch.atan2(v, u)
        rad = 0.5 + 0.5 * torch.cos(5 * theta).clamp_min(0) ** 2
        return r <= rad * 1.05
    if name == "bar":
        return (au <= 1.0) & (av <= 0.3)
    if name == "L":
        return ((u >= -0.9) & (u <= -0.4) & (av <= 1.0)) | ((v >= -1.0) & (v <= -0.5) & (u >= -0.9) & (u <= 0.8))
    if name == "T":
        return ((v >= 0.55) & (v <= 1.0) & (au <= 1.0)) | ((au <= 0.25) & (v <= 1.0) & (v >= -1.0))
    raise ValueError(kind)


def _gratings(n: int, size: int, g: torch.Generator, orient: torch.Tensor, yy: torch.Tensor,
              xx: torch.Tensor) -> torch.Tensor:
    """``n`` colour gratings ``[n, 3, size, size]`` in [0, 1] with the given orientations."""
    freq = 2 * math.pi / (2.5 + 3.0 * torch.rand(n, generator=g))  # period 2.5 .. 5.5 px
    phase = 2 * math.pi * torch.rand(n, generator=g)
    proj = xx[None] * torch.cos(orient)[:, None, None] + yy[None] * torch.sin(orient)[:, None, None]
    wave = 0.5 + 0.5 * torch.sin(freq[:, None, None] * proj + phase[:, None, None])  # [n, H, W]
    c1 = torch.rand(n, 3, generator=g)
    c2 = torch.rand(n, 3, generator=g)
    return c1[:, :, None, None] * wave[:, None] + c2[:, :, None, None] * (1 - wave[:, None])


def generate_texshapes(n: int, *, size: int = 32, seed: int = 0, noise: float = 0.1,
                       hard_fraction: float = 0.3, classes: int = 10, contrast: float = 0.0,
                       rotation: float = 360.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[n, 3, size, size]`` (float32, [0, 1] plus noise) and labels ``[n]``, balanced
    over ``classes`` (<= 10), from ``seed`` alone."""
    if not 2 <= classes <= len(SHAPES):
        raise UserError(f"texshapes has 2..{len(SHAPES)} classes, got data.classes={classes}")
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=g)]
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    # texture orientations: background random, figure rotated away by 45..90 deg (hard: 20..45 deg)
    ob = math.pi * torch.rand(n, generator=g)
    hard = torch.rand(n, generator=g) < hard_fraction
    delta = torch.where(hard, 20 + 25 * torch.rand(n, generator=g), 45 + 45 * torch.rand(n, generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    of = ob + sign * delta * math.pi / 180
    bg = _gratings(n, size, g, ob, yy, xx)
    fg = _gratings(n, size, g, of, yy, xx)
    # shape placement: centre jitter, scale (radius in px), rotation
    scale = size * (0.24 + 0.12 * torch.rand(n, generator=g))
    cx = (torch.rand(n, generator=g) - 0.5) * size * 0.3
    cy = (torch.rand(n, generator=g) - 0.5) * size * 0.3
    rot = (torch.rand(n, generator=g) - 0.5) * rotation * math.pi / 180
    dx = (xx[None] - cx[:, None, None]) / scale[:, None, None]
    dy = (yy[None] - cy[:, None, None]) / scale[:, None, None]
    c, s = torch.cos(rot)[:, None, None], torch.sin(rot)[:, None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    for k in range(classes):
        sel = labels == k
        if sel.any():
            mask[sel] = _shape_mask(k, u[sel], v[sel])
    # luminance cue of random strength (0 .. contrast), random sign
    lum = contrast * torch.rand(n, generator=g) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    img = torch.where(mask[:, None], fg + lum[:, None, None, None], bg)
    img = img + noise * torch.randn(img.shape, generator=g)
    return img.float(), labels.long()


class TexShapesDataModule(ImageDataModule):
    """Texture-defined shapes (see the module docstring): ``n_train`` training images (the arch split
    is carved from them) and ``n_test`` test images, generated in memory from ``data_seed``."""

    default_name = "texshapes"

    def __init__(self, resolution: int = 32, n_train: int = 5000, n_test: int = 2000, noise: float = 0.1,
                 hard_fraction: float = 0.3, contrast: float = 0.0, rotation: float = 360.0, classes: int = 10,
                 data_seed: int = 0, **common: Any) -> None:
        super().__init__(resolution=resolution, **common)
        _require_int("data.n_train", n_train, minimum=2)
        _require_int("data.n_test", n_test, minimum=1)
        _require_int("data.classes", classes, minimum=2)
        if classes > len(SHAPES):
            raise UserError(f"data.classes={classes}: texshapes has at most {len(SHAPES)} classes ({', '.join(SHAPES)})")
        if noise < 0 or not 0.0 <= hard_fraction <= 1.0:
            raise UserError(f"data.noise must be >= 0 and data.hard_fraction in [0, 1]; got {noise}, {hard_fraction}")
        self.n_train, self.n_test = int(n_train), int(n_test)
        self.noise, self.hard_fraction = float(noise), float(hard_fraction)
        self.contrast, self.rotation = float(contrast), float(rotation)
        self.num_classes = int(classes)
        self.data_seed = int(data_seed)

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        kw = dict(size=self.resolution, noise=self.noise, hard_fraction=self.hard_fraction, classes=self.num_classes,
                  contrast=self.contrast, rotation=self.rotation)
        x_pool, y_pool = generate_texshapes(self.n_train, seed=self.data_seed, **kw)
        # test images from a different stream of the same distribution
        x_test, y_test = generate_texshapes(self.n_test, seed=self.data_seed + 1_000_003, **kw)
        train_idx, arch_idx = split_train_arch(self.n_train, self.arch_fraction, self.seed)
        fit = x_pool[torch.as_tensor(train_idx)]
        mean = fit.mean(dim=(0, 2, 3), keepdim=True)
        std = fit.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        pool = TensorDataset((x_pool - mean) / std, y_pool)
        return Subset(pool, train_idx), Subset(pool, arch_idx), TensorDataset((x_test - mean) / std, y_test)

