"""``data=fashion_mnist`` over tiny IDX files written here (the real Debian package is used only by the
last test, which is skipped where the package is not installed)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from nas.data import FashionMNISTDataModule
from nas.data import fashion_mnist as fm
from nas.errors import UserError

CONF = Path(__file__).resolve().parents[2] / "conf"


def _idx(magic: int, array: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(folder: Path, n_train: int = 50, n_test: int = 20, *, gz: bool = True) -> Path:
    """Tiny Fashion-MNIST lookalike: image i of class c has value 10 * c + 5 in every pixel of its
    centre 8x8 square (0 elsewhere) and pixel (0, 0) = i % 256, so a pairing of images and labels is
    checkable after any shuffling."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 10:18, 10:18] = (10 * labels + 5)[:, None, None]
        images[:, 0, 0] = np.arange(n) % 256
        img_name, lab_name = fm.FILES[split]
        for name, data in ((img_name, _idx(fm.IMAGES_MAGIC, images)), (lab_name, _idx(fm.LABELS_MAGIC, labels))):
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(data)
            else:
                (folder / name).write_bytes(data)
    return folder


@pytest.fixture(autouse=True)
def _no_real_sources(monkeypatch, tmp_path):
    """No test here sees the real package or the user's environment unless it puts them there."""
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian-package")


def _centre_and_label(dm: FashionMNISTDataModule, loader) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = dm.norm
    xs, ys = zip(*loader)
    x = torch.cat(xs) * std + mean  # back to [0, 1]
    return torch.round(x[:, 0, 16, 16] * 255), torch.cat(ys)


def test_reads_root_pads_to_32_repeats_channels_and_keeps_labels(tmp_path):
    root = write_fashion(tmp_path / "fm")
    dm = FashionMNISTDataModule(root=str(root), batch_size=8, arch_fraction=0.2)
    d = dm.describe()
    assert (d["train"], d["arch"], d["test"], d["classes"], d["resolution"]) == (40, 10, 20, 10, 32)
    assert d["source"] == "data.root" and d["folder"] == str(root)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    mean, std = dm.norm
    border = x[:, :, :2, :] * std + mean  # 2 rows of padding on top: black
    assert torch.allclose(border, torch.zeros_like(border), atol=1e-5)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        centre, labels = _centre_and_label(dm, loader)
        assert torch.equal(centre, (10 * labels + 5).float())
    # train and arch splits are disjoint and together the whole (sub)set
    tr, ar = set(dm.source_indices["train"].tolist()), set(dm.source_indices["arch"].tolist())
    assert not tr & ar and tr | ar == set(range(50))


def test_train_and_test_subsets_are_balanced_and_seeded(tmp_path):
    root = write_fashion(tmp_path / "fm", n_train=200, n_test=100, gz=False)  # uncompressed files work too
    dm = FashionMNISTDataModule(root=str(root), train_size=50, test_size=30, seed=3)
    dm.setup()
    again = FashionMNISTDataModule(root=str(root), train_size=50, test_size=30, seed=3)
    again.setup()
    other = FashionMNISTDataModule(root=str(root), train_size=50, test_size=30, seed=4)
    other.setup()
    pool = np.concatenate([dm.source_indices["train"], dm.source_indices["arch"]])
    assert len(pool) == 50 and len(set(pool.tolist())) == 50
    assert np.bincount(pool % 10, minlength=10).tolist() == [5] * 10
    assert np.bincount(dm.source_indices["test"] % 10, minlength=10).tolist() == [3] * 10
    for split in ("train", "arch", "test"):
        assert np.array_equal(dm.source_indices[split], again.source_indices[split])
    assert not np.array_equal(np.sort(pool), np.sort(np.concatenate([other.source_indices["train"],
                                                                       other.source_indices["arch"]])))
    assert fm.balanced_subset(np.arange(7) % 3, None, 0).tolist() == list(range(7))


def test_augment_shifts_and_flips_the_training_split_only(tmp_path):
    """Each augmented training image is its original moved by at most ``shift`` pixels each way (and maybe
    mirrored), the uncovered border black; over many draws every shift and both flips occur; the arch and
    test splits are exactly those of the module without augmentation."""
    root = write_fashion(tmp_path / "fm", n_train=50, n_test=20)
    plain = FashionMNISTDataModule(root=str(root), batch_size=8)
    aug = FashionMNISTDataModule(root=str(root), batch_size=8, augment=True, shift=2)
    plain.setup()
    aug.setup()
    assert aug.describe()["augment"] is True and plain.describe()["augment"] is False
    mean, std = aug.norm
    seen_shifts, flips = set(), set()
    torch.manual_seed(0)
    for i in range(len(aug.train_set)):
        for _ in range(8):
            x, y = aug.train_set[i]
            x0, y0 = plain.train_set[i]
            assert y == y0 and x.shape == x0.shape
            raw = torch.round((x[0] * std + mean) * 255)
            orig = torch.round((x0[0] * std + mean) * 255)
            matches = [(dx, dy, f) for f in (False, True) for dx in range(-2, 3) for dy in range(-2, 3)
                       if torch.equal(raw, _moved(orig.flip(-1) if f else orig, dx, dy))]
            assert matches, "an augmented image is not a shifted/flipped copy of its original"
            seen_shifts.update((dx, dy) for dx, dy, _ in matches)
            flips.update(f for _, _, f in matches)
    assert len(seen_shifts) == 25 and flips == {False, True}
    for a, b in ((aug.arch_set, plain.arch_set), (aug.test_set, plain.test_set)):
        assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(b)))
    with pytest.raises(UserError, match="data.shift"):
        FashionMNISTDataModule(root=str(root), augment=True, shift=-1)


def _moved(img: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``img`` (H, W) with its content moved by (dx, dy) pixels into a black (0) frame."""
    out = torch.zeros_like(img)
    h, w = img.shape
    out[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = img[max(0, dy):h - max(0, -dy),
                                                                      max(0, dx):w - max(0, -dx)]
    return out


def test_lookup_order_root_then_env_then_debian(tmp_path, monkeypatch):
    env_dir = write_fashion(tmp_path / "env", n_train=30)
    deb_dir = write_fashion(tmp_path / "deb", n_train=60)
    root_dir = write_fashion(tmp_path / "root", n_train=20)
    monkeypatch.setattr(fm, "DEBIAN_DIR", deb_dir)
    assert FashionMNISTDataModule().describe()["source"] == "the Debian package dataset-fashion-mnist"
    monkeypatch.setenv(fm.ENV_VAR, str(env_dir))
    d = FashionMNISTDataModule().describe()
    assert d["source"] == f"${fm.ENV_VAR}" and d["train"] + d["arch"] == 30
    d = FashionMNISTDataModule(root=str(root_dir)).describe()
    assert d["source"] == "data.root" and d["train"] + d["arch"] == 20
    # torchvision's layout inside a root works as well
    tv = write_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", n_train=40)
    assert FashionMNISTDataModule(root=str(tmp_path / "tv")).describe()["folder"] == str(tmp_path / "tv")
    assert tv.is_dir()


def _one_line_naming_every_way(message: str) -> None:
    assert "\n" not in message
    for way in ("data.root=", fm.ENV_VAR, "apt-get install dataset-fashion-mnist", "data.download=true"):
        assert way in message


def test_nothing_found_is_one_line_naming_every_way(tmp_path):
    with pytest.raises(UserError) as e:
        FashionMNISTDataModule()
    _one_line_naming_every_way(str(e.value))
    with pytest.raises(UserError, match="not found in") as e:
        FashionMNISTDataModule(root=str(tmp_path / "empty"))
    _one_line_naming_every_way(str(e.value))


@pytest.mark.parametrize("damage, expected", [
    ("magic", "magic number 0x00000801"),
    ("truncated", "truncated"),
    ("count", "but"),
    ("missing", "t10k-labels-idx1-ubyte.gz not found"),
    ("not_gzip", "cannot be read"),
    ("size", "not 28x28"),
])
def test_damaged_files_give_one_clear_line(tmp_path, damage, expected):
    root = write_fashion(tmp_path / "fm")
    train_img = root / "train-images-idx3-ubyte.gz"
    if damage == "magic":  # a labels file where the images should be
        train_img.write_bytes((root / "train-labels-idx1-ubyte.gz").read_bytes())
    elif damage == "truncated":
        with gzip.open(train_img, "rb") as f:
            data = f.read()
        with gzip.open(train_img, "wb") as f:
            f.write(data[:-100])
    elif damage == "count":
        labels = np.arange(49) % 10
        with gzip.open(root / "train-labels-idx1-ubyte.gz", "wb") as f:
            f.write(_idx(fm.LABELS_MAGIC, labels))
    elif damage == "missing":
        (root / "t10k-labels-idx1-ubyte.gz").unlink()
    elif damage == "not_gzip":
        train_img.write_bytes(b"this is not gzip data")
    elif damage == "size":
        with gzip.open(train_img, "wb") as f:
            f.write(_idx(fm.IMAGES_MAGIC, np.zeros((50, 32, 32), np.uint8)))
    with pytest.raises(UserError, match=expected) as e:
        FashionMNISTDataModule(root=str(root))
    _one_line_naming_every_way(str(e.value))


def test_download_only_when_asked(tmp_path, monkeypatch):
    """data.download=true calls torchvision's FashionMNIST download (faked here: no network), and only
    when no folder has the files."""
    import torchvision.datasets

    calls = []

    class FakeFashionMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            write_fashion(Path(root) / "FashionMNIST" / "raw", n_train=30)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    with pytest.raises(UserError):
        FashionMNISTDataModule(download_root=str(tmp_path / "dl"))
    assert calls == []
    dm = FashionMNISTDataModule(download=True, download_root=str(tmp_path / "dl"))
    dm.prepare_data()
    d = dm.describe()
    assert d["source"] == "data.download=true" and d["train"] + d["arch"] == 30
    assert calls and all(c[2] for c in calls)
    calls.clear()
    root = write_fashion(tmp_path / "have")
    assert FashionMNISTDataModule(root=str(root), download=True).describe()["source"] == "data.root"
    assert calls == []


def test_config_composes_and_learns(tmp_path):
    """conf/data/fashion_mnist.yaml builds the module for the default space; a small net learns the
    tiny set (the labels are carried by the images)."""
    root = write_fashion(tmp_path / "fm", n_train=200, n_test=50)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("search", ["data=fashion_mnist", f"data.root={root}", "data.batch_size=20"])
    dm = instantiate(cfg.data)
    assert dm.resolution == cfg.space.resolution and dm.in_chans == cfg.space.in_chans == 3
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(30):
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    from nas.export import evaluate

    assert evaluate(net, dm.test_dataloader()) >= 0.8


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_debian_package(monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", Path("/usr/share/datasets/fashion-mnist"))
    dm = FashionMNISTDataModule(train_size=1000, test_size=500)
    d = dm.describe()
    assert d["source"] == "the Debian package dataset-fashion-mnist"
    assert (d["train"] + d["arch"], d["test"]) == (1000, 500)
    train = fm.load_split(fm.DEBIAN_DIR, "train")[1]
    assert len(train) == 60000 and np.bincount(train).tolist() == [6000] * 10
    assert os.environ.get(fm.ENV_VAR) is None
