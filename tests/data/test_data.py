"""Tests of nas.data: fast, offline (digits ship with sklearn; CIFAR/image folders are faked in tmp)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from PIL import Image
from torchvision import transforms as T

from nas.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    split_train_arch,
)
from nas.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "data"
N_DIGITS = 1797


# --------------------------------------------------------------------------------------------------
# fixtures: fake datasets on disk
# --------------------------------------------------------------------------------------------------


def write_fake_cifar(root: Path, dataset_cls, per_file: int) -> None:
    """Write a tiny copy of CIFAR in torchvision's pickle format (file names/keys from the class)."""
    folder = root / dataset_cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    is_cifar100 = dataset_cls.meta["key"] == "fine_label_names"
    n_classes = 100 if is_cifar100 else 10
    label_key = "fine_labels" if is_cifar100 else "labels"
    for file_name, _md5 in dataset_cls.train_list + dataset_cls.test_list:
        entry = {
            "data": rng.integers(0, 256, size=(per_file, 3 * 32 * 32), dtype=np.uint8),
            label_key: rng.integers(0, n_classes, size=per_file).tolist(),
        }
        with open(folder / file_name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / dataset_cls.meta["filename"], "wb") as f:
        pickle.dump({dataset_cls.meta["key"]: [f"class{i}" for i in range(n_classes)]}, f)


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """Let torchvision's integrity check accept our fake files: it still requires every file to
    exist, only the md5 comparison against the real archive is skipped (test-only patch)."""
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )


def write_image_folder(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    """Write random PNG/JPEG images: ``splits = {"train": {"cat": 4, ...}, "val": {...}}``."""
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for cls, count in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
                if i == 0:  # a grayscale PNG must still come out with 3 channels
                    pixels = rng.integers(0, 256, size=size, dtype=np.uint8)
                    Image.fromarray(pixels).save(d / f"{i}.png")
                else:
                    pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(d / f"{i}.jpg")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(
        tmp_path / "imgs",
        {"train": {"cat": 4, "dog": 4}, "val": {"cat": 2, "dog": 2}},
    )


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(resolution=16, batch_size=32, seed=0)
    dm.setup()
    return dm


def stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.as_tensor(ys)


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


def test_digits_batches_have_contract_shapes_and_dtypes(digits):
    assert digits.num_classes == 10 and digits.in_chans == 3
    for loader in (digits.train_dataloader(), digits.arch_dataloader(), digits.val_dataloader(),
                   digits.test_dataloader(), digits.calib_dataloader(1)):
        x, y = next(iter(loader))
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (3, 16, 16) and x.shape[0] == y.shape[0]
        assert x.is_contiguous()
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # gray -> 3 channels
        assert 0 <= y.min() and y.max() <= 9


def test_digits_resolution_follows_argument():
    dm = DigitsDataModule(resolution=40, batch_size=8)
    x, _ = next(iter(dm.train_dataloader()))  # setup is lazy
    assert x.shape == (8, 3, 40, 40)


def test_digits_normalized_with_train_statistics(digits):
    x_train, _ = stack(digits.train_set)
    assert abs(x_train.mean().item()) < 1e-4
    assert abs(x_train.std().item() - 1.0) < 1e-3
    # the other splits use the same (train) statistics, so they are close to but not exactly N(0, 1)
    x_test, _ = stack(digits.test_set)
    assert abs(x_test.mean().item()) < 0.1 and abs(x_test.std().item() - 1.0) < 0.1
    assert x_test.mean().item() != pytest.approx(0.0, abs=1e-6)


def test_digits_splits_disjoint_cover_everything_and_sizes_add_up(digits):
    ids = digits.source_indices
    train, arch, test = (set(ids[k].tolist()) for k in ("train", "arch", "test"))
    assert not (train & arch) and not (train & test) and not (arch & test)
    assert train | arch | test == set(range(N_DIGITS))
    info = digits.describe()
    assert info == {"name": "digits", "train": len(train), "arch": len(arch), "test": len(test),
                    "classes": 10, "resolution": 16}
    assert info["test"] == 360  # stratified 20 % of 1797 (sklearn rounds the test size up)
    assert info["arch"] == round(0.2 * (N_DIGITS - 360))  # arch is carved from the training part
    assert info["train"] + info["arch"] + info["test"] == N_DIGITS


def test_digits_test_split_is_stratified(digits):
    from sklearn.datasets import load_digits

    target = load_digits().target
    counts = np.bincount(target[digits.source_indices["test"]], minlength=10)
    expected = np.bincount(target, minlength=10) * 0.2
    assert np.all(np.abs(counts - expected) <= 1)


def test_digits_splits_are_deterministic_given_seed(digits):
    again = DigitsDataModule(resolution=16, batch_size=32, seed=0)
    again.setup()
    other = DigitsDataModule(resolution=16, batch_size=32, seed=1)
    other.setup()
    for k in ("train", "arch", "test"):
        assert np.array_equal(again.source_indices[k], digits.source_indices[k])
    assert not np.array_equal(other.source_indices["arch"], digits.source_indices["arch"])
    assert torch.equal(stack(again.arch_set)[0], stack(digits.arch_set)[0])


def test_arch_fraction_takes_from_train_and_never_from_test():
    small = DigitsDataModule(resolution=8, arch_fraction=0.1, seed=3)
    large = DigitsDataModule(resolution=8, arch_fraction=0.5, seed=3)
    small.setup(), large.setup()
    assert np.array_equal(small.source_indices["test"], large.source_indices["test"])
    pool_small = np.union1d(small.source_indices["train"], small.source_indices["arch"])
    pool_large = np.union1d(large.source_indices["train"], large.source_indices["arch"])
    assert np.array_equal(pool_small, pool_large)
    assert len(large.arch_set) > len(small.arch_set)
    assert len(large.train_set) < len(small.train_set)


def test_setup_is_idempotent(digits):
    train_set = digits.train_set
    digits.setup("fit")
    digits.setup("test")
    assert digits.train_set is train_set


def test_loader_batching_and_order(digits):
    n_train = len(digits.train_set)
    train = digits.train_dataloader()
    assert train.drop_last and len(train) == n_train // 32
    assert all(x.shape[0] == 32 for x, _ in train)

    val = digits.val_dataloader()
    assert val.batch_size == 64 and not val.drop_last  # eval batch size defaults to 2 * batch_size
    first = torch.cat([y for _, y in val])
    second = torch.cat([y for _, y in digits.val_dataloader()])
    assert torch.equal(first, second) and len(first) == len(digits.arch_set)  # fixed order, complete
    assert torch.equal(first, stack(digits.arch_set)[1])

    shuffled = torch.cat([y for _, y in digits.arch_dataloader()])
    assert not torch.equal(shuffled, first[: len(shuffled)])

    test_labels = torch.cat([y for _, y in digits.test_dataloader()])
    assert len(test_labels) == len(digits.test_set)


def test_small_train_set_keeps_last_batch():
    dm = DigitsDataModule(resolution=8, batch_size=5000, eval_batch_size=7)
    assert not dm.train_dataloader().drop_last
    assert len(dm.train_dataloader()) == 1
    assert dm.test_dataloader().batch_size == 7


def test_calib_dataloader_yields_exactly_n_fixed_batches(digits):
    assert len(list(digits.calib_dataloader(3))) == 3
    available = -(-len(digits.train_set) // 32)  # ceil
    assert len(list(digits.calib_dataloader(10_000))) == available
    a = torch.cat([x for x, _ in digits.calib_dataloader(2)])
    b = torch.cat([x for x, _ in digits.calib_dataloader(2)])
    assert torch.equal(a, b)  # same samples every call
    train_x, _ = stack(digits.train_set)
    assert not torch.equal(a, train_x[: len(a)])  # ... but a shuffled subset, not the first ones
    with pytest.raises(ValueError):
        digits.calib_dataloader(0)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"arch_fraction": 0.0}, "arch_fraction"), ({"arch_fraction": 1.0}, "arch_fraction"),
     ({"batch_size": 0}, "batch_size"), ({"resolution": 0}, "resolution"),
     ({"test_fraction": 1.5}, "test_fraction")],
)
def test_invalid_arguments_raise_user_error(kwargs, key):
    with pytest.raises(UserError, match=key):
        DigitsDataModule(**kwargs)


def test_split_train_arch_helper():
    train, arch = split_train_arch(10, 0.3, seed=5)
    assert len(arch) == 3 and sorted(train + arch) == list(range(10))
    assert (train, arch) == split_train_arch(10, 0.3, seed=5)
    assert len(split_train_arch(10, 0.01, seed=0)[1]) == 1  # never empty
    with pytest.raises(UserError):
        split_train_arch(1, 0.5, seed=0)


# --------------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module_cls, per_file", [(CIFAR10DataModule, 8), (CIFAR100DataModule, 40)])
def test_tiny_cifar_loads_in_torchvision_format(tmp_path, skip_cifar_md5, module_cls, per_file):
    write_fake_cifar(tmp_path, module_cls.dataset_cls, per_file)
    dm = module_cls(root=str(tmp_path), resolution=32, batch_size=4, arch_fraction=0.25, seed=0)
    n_train = per_file * len(module_cls.dataset_cls.train_list)
    info = dm.describe()
    assert info["name"] == module_cls.default_name
    assert info["classes"] == dm.num_classes == (10 if module_cls is CIFAR10DataModule else 100)
    assert info["train"] + info["arch"] == n_train and info["arch"] == n_train // 4
    assert info["test"] == per_file

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape[1:] == (3, 32, 32)

    # train and arch are disjoint index sets over the same underlying training data
    assert dm.train_set.dataset.base is dm.arch_set.dataset.base
    assert not set(dm.train_set.indices) & set(dm.arch_set.indices)


def test_cifar_arch_split_is_not_augmented(tmp_path, skip_cifar_md5):
    write_fake_cifar(tmp_path, CIFAR10DataModule.dataset_cls, 8)
    dm = CIFAR10DataModule(root=str(tmp_path), resolution=32, batch_size=4, arch_fraction=0.25)
    dm.setup()
    raw = dm.arch_set.dataset.base
    plain = T.Compose([T.ToTensor(), T.Normalize(CIFAR10DataModule.mean, CIFAR10DataModule.std)])
    for i, source in enumerate(dm.arch_set.indices):
        image, label = dm.arch_set[i]
        assert torch.equal(image, plain(raw[source][0])) and label == raw[source][1]
    # the train split is augmented: over a few draws, some sample differs from its plain version
    idx = dm.train_set.indices[0]
    assert any(not torch.equal(dm.train_set[0][0], plain(raw[idx][0])) for _ in range(20))


def test_cifar_resizes_to_resolution(tmp_path, skip_cifar_md5):
    write_fake_cifar(tmp_path, CIFAR10DataModule.dataset_cls, 8)
    dm = CIFAR10DataModule(root=str(tmp_path), resolution=20, batch_size=4)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, _ = next(iter(loader))
        assert x.shape[1:] == (3, 20, 20)


def test_missing_cifar_without_download_raises_user_error(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(UserError) as info:
        CIFAR10DataModule(root=str(root), download=False)
    message = str(info.value)
    assert "data.download=true" in message and "nas-search data=cifar10" in message
    assert str(root / "cifar-10-batches-py") in message  # the folder that was looked in
    assert "torchvision" in message and "data.root=" in message


def test_corrupted_cifar_is_reported_with_the_real_md5_check(tmp_path):
    write_fake_cifar(tmp_path, CIFAR100DataModule.dataset_cls, 4)  # wrong md5s, no patch here
    with pytest.raises(UserError, match="corrupted") as info:
        CIFAR100DataModule(root=str(tmp_path))
    assert "nas-search data=cifar100 data.download=true" in str(info.value)


# --------------------------------------------------------------------------------------------------
# image folder
# --------------------------------------------------------------------------------------------------


def test_tiny_image_folder_loads(image_folder):
    dm = ImageFolderDataModule(root=str(image_folder), resolution=24, batch_size=2, arch_fraction=0.25)
    assert Image.open(image_folder / "train" / "cat" / "0.png").mode == "L"  # delivered as RGB below
    assert dm.num_classes == 2 and dm.classes == ["cat", "dog"]  # known before setup
    assert dm.train_set is None
    assert dm.describe() == {"name": "imagefolder", "train": 6, "arch": 2, "test": 4,
                             "classes": 2, "resolution": 24}
    for loader in (dm.train_dataloader(), dm.arch_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for x, y in loader:
            assert x.shape[1:] == (3, 24, 24) and x.dtype == torch.float32
            assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    labels = torch.cat([y for _, y in dm.test_dataloader()])
    assert labels.tolist() == [0, 0, 1, 1]
    # eval transform is deterministic
    assert torch.equal(dm.arch_set[0][0], dm.arch_set[0][0])


def test_image_folder_missing_root_names_the_path(tmp_path):
    root = tmp_path / "does-not-exist"
    with pytest.raises(UserError, match="does not exist") as info:
        ImageFolderDataModule(root=str(root), resolution=16)
    assert str(root) in str(info.value) and "data.root=" in str(info.value)


def test_image_folder_missing_train_dir(tmp_path):
    write_image_folder(tmp_path, {"val": {"a": 1}})
    with pytest.raises(UserError, match="no 'train' split folder") as info:
        ImageFolderDataModule(root=str(tmp_path), resolution=16)
    assert "['val']" in str(info.value)


def test_image_folder_without_images(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    write_image_folder(tmp_path, {"val": {"a": 1}})
    with pytest.raises(UserError, match="No images found") as info:
        ImageFolderDataModule(root=str(tmp_path), resolution=16)
    assert ".jpg" in str(info.value)


def test_image_folder_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "loose.png")
    write_image_folder(tmp_path, {"val": {"a": 1}})
    with pytest.raises(UserError, match="No class folders"):
        ImageFolderDataModule(root=str(tmp_path), resolution=16)


def test_image_folder_class_mismatch(tmp_path):
    write_image_folder(tmp_path, {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "fox": 1}})
    with pytest.raises(UserError) as info:
        ImageFolderDataModule(root=str(tmp_path), resolution=16)
    message = str(info.value)
    assert "missing in val: dog" in message and "only in val: fox" in message


# --------------------------------------------------------------------------------------------------
# Hydra configs
# --------------------------------------------------------------------------------------------------


def compose(name: str, **overrides):
    cfg = OmegaConf.create({"seed": 7, "space": {"resolution": 24}})
    cfg.data = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    for key, value in overrides.items():
        cfg.data[key] = value
    return cfg


def test_digits_config_instantiates():
    dm = hydra.utils.instantiate(compose("digits").data)
    assert isinstance(dm, DigitsDataModule)
    assert (dm.resolution, dm.seed, dm.batch_size, dm.arch_fraction, dm.name) == (24, 7, 64, 0.2, "digits")
    assert dm.eval_batch_size == 128


@pytest.mark.parametrize(
    "name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_cifar_configs_use_hwnas_data_and_fail_clearly(tmp_path, monkeypatch, name, folder):
    monkeypatch.setenv("HWNAS_DATA", str(tmp_path))
    cfg = compose(name)
    assert cfg.data.root == f"{tmp_path}/{name}" and cfg.data.download is False
    # Hydra wraps exceptions raised by the target in InstantiationException; the UserError is the
    # cause (entry points must unwrap it to print the clean message).
    with pytest.raises(InstantiationException) as info:
        hydra.utils.instantiate(cfg.data)
    cause = info.value.__cause__
    assert isinstance(cause, UserError) and "data.download=true" in str(cause)
    assert str(tmp_path / name / folder) in str(cause)


def test_cifar_config_instantiates_with_data(tmp_path, monkeypatch, skip_cifar_md5):
    monkeypatch.setenv("HWNAS_DATA", str(tmp_path))
    write_fake_cifar(tmp_path / "cifar10", CIFAR10DataModule.dataset_cls, 4)
    dm = hydra.utils.instantiate(compose("cifar10").data)
    assert isinstance(dm, CIFAR10DataModule) and dm.resolution == 24 and dm.name == "cifar10"


def test_imagefolder_config_requires_root(image_folder):
    with pytest.raises(MissingMandatoryValue):
        hydra.utils.instantiate(compose("imagefolder").data)
    dm = hydra.utils.instantiate(compose("imagefolder", root=str(image_folder)).data)
    assert isinstance(dm, ImageFolderDataModule) and dm.num_classes == 2 and dm.name == "imagefolder"
