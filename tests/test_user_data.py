"""Tests for your own data in vi_lab.data.load_dataset: .npy/.npz/.pt files, folders of
images, torchvision classes; splits, labels, values, errors, and training on it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import vi_lab
from vi_lab import data
from vi_lab.data import Dataset, held_out_split, load_dataset


def _uint8_images(n: int, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w), dtype=np.uint8)


def _write_pngs(folder: Path, n: int, size: tuple[int, int] = (8, 8), seed: int = 0) -> list[Path]:
    """``n`` random grayscale PNGs of ``size`` (height, width) in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(_uint8_images(n, *size, seed=seed)):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(pixels, mode="L").save(path)
        paths.append(path)
    return paths


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty user cache and no VI_LAB_DATA, so nothing outside tmp_path is read or written."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "vi_lab"


# ------------------------------------------------------------------- arrays


def test_npy_uint8_images_scaled_flattened_and_split_deterministically(tmp_path, device):
    raw = _uint8_images(50)
    raw[0, 0, 0], raw[1, 0, 0] = 0, 255
    path = tmp_path / "my.npy"
    np.save(path, raw)
    train = load_dataset(path, "train", device=device)
    test = load_dataset(str(path), "test", device=device)
    assert (len(train), len(test)) == (45, 5)  # max(1, round(0.1 * 50)) held out
    for ds in (train, test):
        assert ds.images.shape[1] == 64 and ds.images.dtype == torch.float32
        assert ds.images.device.type == device.type
        assert ds.labels.dtype == torch.int64 and not ds.labels.any()  # no labels: all 0
        assert ds.image_shape == (8, 8)
        assert "held-out" in ds.source and "seed-0" in ds.source and str(path) in ds.source
    assert train.value_range == (0.0, 1.0)
    # the split is the documented one: rows picked by held_out_split, pixels / 255
    train_idx, test_idx = held_out_split(50)
    expected = torch.from_numpy(raw.reshape(50, 64)).float() / 255
    assert torch.allclose(train.images.cpu(), expected[train_idx])
    assert torch.allclose(test.images.cpu(), expected[test_idx])
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    # deterministic: the same again, whatever the global RNG did
    torch.rand(3)
    assert torch.equal(load_dataset(path, "test", device=device).images, test.images)
    assert train.describe() == f"{path} train: 45 x 64 (8x8 images), float32 values in [0, 1]"


@pytest.mark.parametrize("n, n_test", [(2, 1), (9, 1), (25, 2), (1000, 100)])
def test_held_out_split_sizes(n, n_test):
    train, test = held_out_split(n)
    assert (len(train), len(test)) == (n - n_test, n_test)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(n))
    assert torch.equal(held_out_split(n)[1], test)


def test_fewer_than_two_rows_refused(tmp_path):
    np.save(tmp_path / "one.npy", _uint8_images(1))
    with pytest.raises(ValueError, match="at least 2"):
        load_dataset(tmp_path / "one.npy")


@pytest.mark.parametrize("layout", ["nhw1", "n1hw"])
def test_npy_single_channel_layouts(tmp_path, layout):
    raw = _uint8_images(20, 4, 6)
    array = raw[..., None] if layout == "nhw1" else raw[:, None]
    np.save(tmp_path / "c.npy", array)
    ds = load_dataset(tmp_path / "c.npy")
    assert ds.image_shape == (4, 6) and ds.images.shape == (18, 24)


def test_npz_with_train_test_and_train_labels_only(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "s.npz"
    np.savez(path, x_train=rng.random((30, 6, 6)), x_test=rng.random((7, 6, 6)),
             y_train=np.arange(30) % 4)
    train, test = load_dataset(path, "train"), load_dataset(path, "test")
    assert (len(train), len(test)) == (30, 7)  # the file's split, nothing held out
    assert train.image_shape == test.image_shape == (6, 6) and train.images.shape == (30, 36)
    assert torch.equal(train.labels, torch.arange(30) % 4)
    assert not test.labels.any() and "no labels" in test.source
    assert "x_test" in test.source and "held-out" not in test.source
    assert torch.allclose(train.images, torch.from_numpy(np.load(path)["x_train"]).float().reshape(30, 36))


def test_npz_whole_array_keys(tmp_path):
    x = np.random.default_rng(2).normal(size=(40, 5)).astype(np.float32) * 3  # outside [0, 1]: kept
    np.savez(tmp_path / "v.npz", images=x, labels=np.arange(40) % 2)
    train, test = load_dataset(tmp_path / "v.npz", "train"), load_dataset(tmp_path / "v.npz", "test")
    train_idx, test_idx = held_out_split(40)
    assert torch.equal(train.images, torch.from_numpy(x)[train_idx])
    assert torch.equal(test.labels, (torch.arange(40) % 2)[test_idx])
    lo, hi = train.value_range
    assert lo < 0 and hi > 1


def test_vectors_have_no_image_shape(tmp_path):
    np.save(tmp_path / "v.npy", np.random.default_rng(3).random((30, 5)).astype(np.float32))
    ds = load_dataset(tmp_path / "v.npy")
    assert ds.image_shape is None and ds.images.shape == (27, 5)
    assert "(vectors)" in ds.describe() and ds.describe().startswith(f"{tmp_path / 'v.npy'} train: 27 x 5")


def test_pt_tensor_dict_and_tuple(tmp_path):
    x = torch.rand(20, 1, 5, 5)
    torch.save(x, tmp_path / "t.pt")
    ds = load_dataset(tmp_path / "t.pt", "train")
    assert ds.image_shape == (5, 5) and ds.images.shape == (18, 25)
    assert torch.equal(ds.images, x.reshape(20, 25)[held_out_split(20)[0]])

    torch.save({"x_train": (x * 255).to(torch.uint8), "x_test": (x[:3] * 255).to(torch.uint8),
                "y_train": torch.arange(20), "y_test": torch.tensor([7, 8, 9])}, tmp_path / "d.pt")
    test = load_dataset(tmp_path / "d.pt", "test")
    assert torch.equal(test.labels, torch.tensor([7, 8, 9])) and float(test.images.max()) <= 1.0

    torch.save((x, torch.arange(20) % 3), tmp_path / "p.pt")
    pair = load_dataset(tmp_path / "p.pt", "test")
    assert torch.equal(pair.labels, (torch.arange(20) % 3)[held_out_split(20)[1]])


def test_cached_parse_is_not_poisoned_and_rewritten_file_is_reread(tmp_path):
    path = tmp_path / "f.npy"
    np.save(path, np.full((10, 3), 0.5, dtype=np.float32))
    first = load_dataset(path)
    first.images.zero_()
    first.labels.fill_(9)
    again = load_dataset(path)
    assert float(again.images.min()) == 0.5 and not again.labels.any()
    np.save(path, np.full((12, 3), 0.25, dtype=np.float32))
    assert float(load_dataset(path).images.max()) == 0.25


def test_subset_to_and_describe_keep_image_shape(tmp_path, device):
    np.save(tmp_path / "s.npy", _uint8_images(30, 4, 4))
    ds = load_dataset(tmp_path / "s.npy")
    small = ds.subset(5)
    assert small.image_shape == (4, 4) and len(small) == 5 and small.source == ds.source
    moved = ds.to(device)
    assert moved.image_shape == (4, 4) and moved.images.device.type == device.type
    assert "0 x 16 (4x4 images), float32, no values" in ds.subset(0).describe()


def test_builtin_datasets_keep_28x28(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    images = torch.from_numpy(_uint8_images(5, 28, 28))
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", torch.arange(5, dtype=torch.uint8))
    ds = load_dataset("mnist", "test", data_dir=tmp_path)
    assert ds.image_shape == (28, 28) and ds.name == "mnist"
    assert ds.describe() == "mnist test: 5 x 784 (28x28 images), float32 values in [0, 1]"
    assert Dataset("x", "train", torch.zeros(2, 784), torch.zeros(2, dtype=torch.int64), "s").image_shape == (28, 28)


# ------------------------------------------------------------------- refused


def test_nan_and_inf_refused_naming_file_and_count(tmp_path):
    x = np.random.default_rng(4).random((20, 6)).astype(np.float32)
    x[3, 1] = x[5, 2] = np.nan
    x[7, 0] = np.inf
    path = tmp_path / "bad.npy"
    np.save(path, x)
    with pytest.raises(ValueError, match="2 NaN and 1 infinite") as err:
        load_dataset(path)
    assert str(path) in str(err.value)


def test_five_dimensional_array_refused_with_accepted_shapes(tmp_path):
    np.save(tmp_path / "five.npy", np.zeros((4, 2, 3, 5, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(4, 2, 3, 5, 5\).*accepted shapes: \(N, D\).*\(N, H, W\)"):
        load_dataset(tmp_path / "five.npy")
    np.save(tmp_path / "one.npy", np.zeros(10, dtype=np.uint8))
    with pytest.raises(ValueError, match="accepted shapes"):
        load_dataset(tmp_path / "one.npy")
    np.save(tmp_path / "rgb.npy", np.zeros((4, 5, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="grayscale"):
        load_dataset(tmp_path / "rgb.npy")


def test_integers_outside_0_255_and_bad_labels_refused(tmp_path):
    np.save(tmp_path / "wide.npy", np.arange(40, dtype=np.int32).reshape(10, 4) * 10)
    with pytest.raises(ValueError, match=r"\[0, 390\].*0\.\.255"):
        load_dataset(tmp_path / "wide.npy")
    np.savez(tmp_path / "y.npz", x=np.zeros((10, 4), np.float32), y=np.arange(9))
    with pytest.raises(ValueError, match=r"labels of shape \(9,\), expected \(10,\)"):
        load_dataset(tmp_path / "y.npz")
    np.savez(tmp_path / "half.npz", x_train=np.zeros((10, 4), np.float32))
    with pytest.raises(ValueError, match="no 'x_test'"):
        load_dataset(tmp_path / "half.npz")


def test_unknown_name_lists_every_option(tmp_path):
    with pytest.raises(ValueError) as err:
        load_dataset("cifar")
    msg = str(err.value)
    for option in ("'mnist'", "'fashion-mnist'", ".npy", ".npz", ".pt", "folder of images", "torchvision:<Class>"):
        assert option in msg
    with pytest.raises(FileNotFoundError, match="no such file.*torchvision:<Class>"):
        load_dataset(tmp_path / "missing.npy")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"\.txt not accepted.*\.npy"):
        load_dataset(tmp_path / "notes.txt")


# ------------------------------------------------------------------- folders


def test_folder_of_pngs_without_classes(tmp_path):
    _write_pngs(tmp_path / "imgs", 20, size=(6, 7))
    (tmp_path / "imgs" / "README.txt").write_text("not an image: ignored")
    train, test = load_dataset(tmp_path / "imgs", "train"), load_dataset(tmp_path / "imgs", "test")
    assert (len(train), len(test)) == (18, 2)
    assert train.image_shape == (6, 7) and train.images.shape == (18, 42)
    assert not train.labels.any() and "no labels" in train.source and "held-out" in train.source
    raw = torch.from_numpy(_uint8_images(20, 6, 7)).reshape(20, 42).float() / 255  # files in sorted order
    assert torch.allclose(test.images, raw[held_out_split(20)[1]])


def test_folder_with_class_subfolders(tmp_path):
    for k, name in enumerate(["zebra", "ant", "cat"]):
        _write_pngs(tmp_path / "c" / name, 4, seed=k)
    ds = load_dataset(tmp_path / "c", "train")
    whole = torch.cat([ds.labels, load_dataset(tmp_path / "c", "test").labels])
    assert torch.equal(torch.bincount(whole), torch.tensor([4, 4, 4]))  # ant 0, cat 1, zebra 2
    assert "3 classes from subfolders: ant, cat, zebra" in ds.source
    ant = torch.from_numpy(_uint8_images(4, seed=1)).reshape(4, 64).float() / 255
    assert all(any(torch.allclose(row, a) for a in ant) for row in ds.images[ds.labels == 0])


def test_folder_with_train_and_test_subfolders(tmp_path):
    root = tmp_path / "tt"
    _write_pngs(root / "train" / "a", 5, seed=1)
    _write_pngs(root / "train" / "b", 3, seed=2)
    _write_pngs(root / "test" / "b", 2, seed=3)  # class b is 1 in both splits: names of both splits count
    train, test = load_dataset(root, "train"), load_dataset(root, "test")
    assert (len(train), len(test)) == (8, 2)
    assert train.labels.tolist() == [0] * 5 + [1] * 3 and test.labels.tolist() == [1, 1]
    assert str(root / "test") in test.source and "held-out" not in test.source

    flat = tmp_path / "flat"
    _write_pngs(flat / "train", 4)
    _write_pngs(flat / "test", 3, seed=5)
    assert len(load_dataset(flat, "test")) == 3 and not load_dataset(flat, "train").labels.any()


def test_folder_images_of_different_sizes_name_the_files(tmp_path):
    first = _write_pngs(tmp_path / "mixed", 3, size=(8, 8))[0]
    from PIL import Image

    odd = tmp_path / "mixed" / "zz_odd.png"
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(odd)
    with pytest.raises(ValueError, match="differ in size") as err:
        load_dataset(tmp_path / "mixed")
    msg = str(err.value)
    assert str(first) in msg and str(odd) in msg and "8x8" in msg and "8x9" in msg


def test_folder_mixing_loose_images_and_classes_or_empty_refused(tmp_path):
    _write_pngs(tmp_path / "m", 2)
    _write_pngs(tmp_path / "m" / "cls", 2)
    with pytest.raises(ValueError, match="both images"):
        load_dataset(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_dataset(tmp_path / "empty")


# ------------------------------------------------------------------ torchvision


def test_torchvision_unknown_class_lists_choices(offline_cache):
    with pytest.raises(ValueError, match="no dataset class 'NoSuchClass'.*KMNIST.*MNIST"):
        load_dataset("torchvision:NoSuchClass")
    with pytest.raises(ValueError, match="did you mean KMNIST"):
        load_dataset("torchvision:kmnist")


def test_torchvision_without_internet_lists_what_was_tried(offline_cache, monkeypatch):
    import torchvision.datasets

    def no_network(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: network is unreachable")

    monkeypatch.setattr(torchvision.datasets.KMNIST, "download", no_network)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("torchvision:KMNIST", "test")
    msg = str(err.value)
    assert "torchvision:KMNIST test is not available" in msg
    assert f"{offline_cache} (user cache" in msg and "network is unreachable" in msg
    with pytest.raises(FileNotFoundError, match=r"download \(skipped: download=False\)"):
        load_dataset("torchvision:KMNIST", "test", download=False)


def test_torchvision_class_read_from_its_files(offline_cache, monkeypatch):
    """A torchvision class whose files are present: read from the cache, no download."""
    import torchvision.datasets

    class Tiny(torchvision.datasets.VisionDataset):
        def __init__(self, root, train=True, download=False):
            super().__init__(root)
            n = 12 if train else 4
            self.data = torch.arange(n * 9, dtype=torch.uint8).reshape(n, 3, 3)
            self.targets = torch.arange(n) % 2

        def __len__(self):
            return len(self.data)

    monkeypatch.setattr(torchvision.datasets, "Tiny", Tiny, raising=False)
    ds = load_dataset("torchvision:Tiny", "test")
    assert ds.images.shape == (4, 9) and ds.image_shape == (3, 3)
    assert torch.equal(ds.labels, torch.tensor([0, 1, 0, 1]))
    assert "user cache" in ds.source and ds.name == "torchvision:Tiny"


# ------------------------------------------------------------------- training


def _train_two_epochs(ds: Dataset) -> vi_lab.FitResult:
    x_dim = ds.images.shape[1]
    model = vi_lab.VAE(latent_dim=2, hidden=[16], x_dim=x_dim).to(ds.device)
    guide = vi_lab.make_guide("mean_field", latent_dim=2, hidden=[16], x_dim=x_dim).to(ds.device)
    return vi_lab.fit(model, guide, ds.images, epochs=2, batch_size=16, binarize="dynamic", progress=False)


def test_fit_on_a_uint8_npy(tmp_path, device):
    np.save(tmp_path / "train_me.npy", _uint8_images(60))
    ds = load_dataset(tmp_path / "train_me.npy", "train", device=device)
    assert ds.images.shape == (54, 64)
    result = _train_two_epochs(ds)
    assert len(result.history) == 2 and math.isfinite(result.train_elbo)


def test_fit_on_a_folder_of_pngs(tmp_path, device):
    _write_pngs(tmp_path / "pngs" / "train" / "x", 30)
    _write_pngs(tmp_path / "pngs" / "test" / "x", 5, seed=9)
    ds = load_dataset(tmp_path / "pngs", "train", device=device)
    assert ds.images.shape == (30, 64)
    result = _train_two_epochs(ds)
    assert len(result.history) == 2 and math.isfinite(result.train_elbo)
