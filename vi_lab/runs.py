"""Plumbing shared by the examples and the CLI: common flags, data preparation, output.

Every example accepts the same data, size and device flags (:func:`add_common_args`)
and prepares data the same way (:func:`load_data`), so each runs in seconds with tiny
settings and in minutes with the defaults.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from vi_lab import distributed
from vi_lab.checkpoint import CheckpointError
from vi_lab.contract import ContractError
from vi_lab.data import DATASETS, binarize, load_dataset
from vi_lab.device import pick_device
from vi_lab.infer import TrainingDiverged, heldout_binarized
from vi_lab.reporting import format_table, mean_sem, write_json  # noqa: F401 (runs.format_table, runs.mean_sem)


@dataclass(frozen=True)
class RunData:
    """Data of one run, on the training device.

    ``x_train`` is binarized already for ``static``/``threshold`` and raw for
    ``dynamic`` (fit() draws a fresh sample per batch); ``x_test`` is fixed: a static
    binarization with its own seed for the dynamic mode, as in Burda et al. (2016).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    binarization: str
    source: str
    fallback: bool = False  # the small embedded copy, not the real dataset
    name: str = "mnist"  # the dataset's name, or the user's file or folder
    image_shape: tuple[int, int] | None = (28, 28)  # None: plain vectors

    @property
    def drawable(self) -> bool:
        """Whether datapoints are square grey images, the pictures the viz module draws."""
        return self.image_shape is not None and self.image_shape[0] == self.image_shape[1]

    @property
    def fit_binarize(self) -> str:
        """What to pass to ``fit(binarize=...)``."""
        return "dynamic" if self.binarization == "dynamic" else "none"


@dataclass(frozen=True)
class CommonConfig:
    """The fields behind :func:`add_common_args`, shared by every example's ``Config``.

    An example subclasses it (``class Config(runs.CommonConfig)``), adds its own fields
    and re-declares a field to change its default (``eval_samples: int = 5000``).
    """

    epochs: int = 10
    dataset: str = "mnist"
    data: str | None = None  # the user's own data: a file, a folder of images or torchvision:<Class>
    data_dir: str | None = None
    device: str | None = None
    seed: int = 0
    train_size: int | None = None
    eval_size: int = 1000
    eval_samples: int = 1000
    out: str | None = None
    threads: int | None = None
    progress: bool = True
    overwrite: bool = False


def parser(doc: str, prog: str | None) -> argparse.ArgumentParser:
    """A command's parser, described by the first paragraph of its module docstring (without markup).

    :param doc: the command module's ``__doc__``.
    :param prog: the name in usage lines (``vi-lab train``, ``python examples/vae_mnist.py``).
    """
    first = doc.split("\n\n")[0].replace("``", "")
    return argparse.ArgumentParser(prog=prog, description=first, formatter_class=argparse.RawDescriptionHelpFormatter)


def data_argument(value: str) -> str:
    """``--data``: an existing path becomes absolute (so ``vi-lab eval`` and ``--resume`` find it from
    anywhere); other values (``torchvision:<Class>``, a path that does not exist) pass as given."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def add_common_args(p: argparse.ArgumentParser, *, epochs: int = 10, eval_size: int = 1000,
                    eval_samples: int = 1000) -> None:
    """Add ``--epochs --dataset --data --data-dir --device --seed --train-size --eval-size
    --eval-samples --out --overwrite --threads --no-progress`` to a parser.

    :param p: the example's parser.
    :param epochs: the example's default epochs.
    :param eval_size: default number of test images evaluated.
    :param eval_samples: default K importance samples.
    """
    p.add_argument("--epochs", type=int, default=epochs, help="training epochs (default %(default)s)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    which.add_argument("--data", default=None, metavar="PATH", type=data_argument,
                   help="your own data instead of --dataset: a .npy/.npz/.pt array of images (N, H, W) or vectors "
                        "(N, D), a folder of image files (train/ and test/ subfolders optional), or "
                        "torchvision:<Class>; the model's input size follows it")
    p.add_argument("--data-dir", default=None, help="directory with the IDX files (else VI_LAB_DATA, ./data, ...)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=None, help="use the first N training images")
    p.add_argument("--eval-size", type=int, default=eval_size, help="evaluate on the first N test images (default %(default)s)")
    p.add_argument("--eval-samples", type=int, default=eval_samples,
                   help="K importance samples for log p(x) (default %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default runs/<timestamp>); one that holds "
                   "files already is refused unless --overwrite (or --resume where the script has it)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing the earlier run there (its checkpoint and logs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide progress bars (one line per epoch stays)")


def setup(threads: int | None = None, device: str | None = None) -> torch.device:
    """Threads, logging and the device, once per script.

    Under torchrun the default threads are this node's cores shared among its processes.
    """
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, per_node)))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return pick_device(device)


def setup_world(device: torch.device) -> tuple[distributed.World, torch.device]:
    """Join the run's processes when launched by torchrun; returns the world and this rank's device.

    Ranks other than 0 print nothing (their standard output goes to ``os.devnull``, their log
    shows warnings only; errors still reach standard error): rank 0 speaks and writes for the run. Without torchrun:
    ``World()`` and ``device`` unchanged.
    """
    world = distributed.setup(device)
    if not world.main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 says where the data came from
    return world, distributed.local_device(device, world)


#: the commands that run under torchrun (data parallelism); the others refuse it
PARALLEL_COMMANDS = ("train", "eval", "gaps")


def one_process(command: str) -> None:
    """Refuse a launch on several processes for a command that runs in one (``SystemExit``, one line)."""
    if distributed.launched():
        raise SystemExit(f"error: vi-lab {command} runs in one process, but torchrun started "
                         f"{os.environ['WORLD_SIZE']}; launch it without torchrun (under torchrun: vi-lab "
                         f"{', '.join(PARALLEL_COMMANDS)} and examples/vae_mnist.py)")


def claim_out_dir(out: str | None, resume: str | None = None, *, overwrite: bool = False,
                  reuse: bool = False) -> Path:
    """:func:`out_dir`, claimed by rank 0 alone; every rank gets its path (or its refusal)."""
    return distributed.main_decides(lambda: out_dir(out, resume, overwrite=overwrite, reuse=reuse),
                                    "claiming the run directory")


#: the run's options, written at its start (see :func:`record_config`)
CONFIG_NAME = "config.json"

#: what a run leaves that a second run must not silently replace (deleted by --overwrite)
RUN_FILES = ("last.pt", "metrics.jsonl", "metrics.json", CONFIG_NAME)

#: options a resumed run may change; any other that differs from the run's config.json is refused
RESUMABLE = frozenset({"epochs", "lr", "resume", "out", "overwrite", "progress", "threads", "device", "capture",
                       "eval_size", "eval_samples", "data_dir"})


def resumed_dir(resume: str | None) -> Path | None:
    """The directory of the run ``--resume`` names (a directory, or its ``last.pt``)."""
    if not resume:
        return None
    r = Path(resume)
    return r.parent if r.is_file() else r


def out_dir(out: str | None, resume: str | None = None, *, overwrite: bool = False, reuse: bool = False) -> Path:
    """``--out``, else the resumed run's directory, else ``runs/<timestamp>``; created.

    A directory that already holds a run (any file but a ``config.json`` left by a run that
    failed before its first epoch) is refused (``SystemExit`` with the reason, nothing
    touched) unless the run resumes it in place, ``overwrite`` is set (the earlier run's
    :data:`RUN_FILES` are deleted, other files are replaced when written again), or the
    script reuses what it finds there by design (``reuse``). Resuming a run into another
    ``--out`` branches it: that directory is a new run's and must be empty too.
    """
    source = resumed_dir(resume)
    if source is not None and not source.is_dir():
        raise SystemExit(f"error: nothing to resume at {resume}: no such run directory (or last.pt)")
    path = Path(out) if out else source if source is not None else \
        Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    in_place = source is not None and path.resolve() == source.resolve()
    if in_place and overwrite:
        raise SystemExit("error: --resume continues a run and --overwrite replaces it; pass one of them")
    if path.exists() and not path.is_dir():
        raise SystemExit(f"error: --out {path} is a file, not a directory")
    if path.is_dir() and (path / LOCK_NAME).is_file():
        _lock(path)  # refuses while another live process writes there (a stale lock is taken over)
    held = sorted(p.name for p in path.iterdir() if p.name not in (CONFIG_NAME, LOCK_NAME)) if path.is_dir() else []
    if held and not (in_place or reuse):
        if not overwrite:
            shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
            raise SystemExit(f"error: {path} already holds files ({shown}); nothing was changed. Pass --resume "
                             f"{path} to continue the run there (where the script has --resume), --overwrite to "
                             f"replace it, or another --out.")
        for name in RUN_FILES:
            (path / name).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    _lock(path)
    return path


#: held by the process writing into a run directory (its pid), removed when it exits
LOCK_NAME = ".vi_lab.lock"


def _lock(path: Path) -> None:
    """Claim ``path`` for this process, so two runs never write into one directory at once.

    The lock file holds the owner's pid; one left by a process that died (kill -9) is stale
    and taken over. Removed at exit. (One machine: a pid means nothing on another host.)
    """
    lock = path / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner == os.getpid():
                return  # ours already
            if owner and _alive(owner):
                raise SystemExit(f"error: another run (pid {owner}) is writing into {path}; wait for it to "
                                 f"finish or choose another --out") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(lambda: lock.unlink(missing_ok=True) if lock.is_file() and
                        lock.read_text().strip() == str(os.getpid()) else None)
        return
    raise SystemExit(f"error: could not claim {path} for this run (lock file {lock})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def record_config(out: Path, cfg: Any, resume: str | None = None) -> None:
    """Write the run's config to ``out/config.json``; on resume, first refuse changed options.

    A resumed run continues the one it resumes: options outside :data:`RESUMABLE` (the
    model, the guide, the data, the objective, ...) must be as they were in that run's
    ``config.json``, and a difference is an error naming the flag, before anything is
    loaded or trained.

    :param out: the run directory.
    :param cfg: the script's frozen config dataclass.
    :param resume: ``--resume`` (the run continued, in ``out`` or elsewhere), if any.
    """
    now = _plain(dataclasses.asdict(cfg))
    source = resumed_dir(resume)
    earlier = source / CONFIG_NAME if source is not None else None
    if earlier is not None and earlier.is_file():
        try:
            then = json.loads(earlier.read_text())["config"]
        except (ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"error: cannot resume {source}: its {CONFIG_NAME} is not readable ({err}); restore it "
                             f"or start a new run") from None
        changed = [k for k in now if k not in RESUMABLE and k in then and then[k] != now[k]]
        if changed:
            what = "; ".join(f"{_flag(k)} was {then[k]!r}, now {now[k]!r}" for k in changed)
            may = ", ".join(_flag(k) for k in sorted(RESUMABLE - {"out", "resume", "overwrite"}))
            raise SystemExit(f"error: cannot resume {source}: {what}. These cannot change on resume (only {may} "
                             f"can); resume with the earlier values, or start a new run with another --out.")
        if (out / CONFIG_NAME).resolve() == earlier.resolve():
            return  # continued in place: the run's options stay what they were
    write_json(out / CONFIG_NAME, {"config": now, "command": command_line(),
                                   "date": _dt.datetime.now().isoformat(timespec="seconds")})


def fit_progress(progress: bool) -> bool | str:
    """What ``--no-progress`` means for :func:`vi_lab.fit`: no bars, one line per epoch still."""
    return True if progress else "epochs"


def fallback_banner(data: RunData) -> str | None:
    """A loud line when the data is the embedded fallback copy (None for the real dataset)."""
    if not data.fallback:
        return None
    return (f"WARNING: trained and evaluated on the embedded fallback data ({data.source}), not the full "
            f"dataset: the numbers are not comparable with published ones. Put the IDX files in a directory and "
            f"pass --data-dir or set VI_LAB_DATA.")


def print_fallback_banner(data: RunData) -> None:
    """Print :func:`fallback_banner` when there is one (:func:`load_data` prints it first, scripts print it last)."""
    banner = fallback_banner(data)
    if banner:
        print(banner, flush=True)


def data_record(data: RunData) -> dict[str, Any]:
    """Which data a run used, for its JSON output: name, where it came from, whether it was the fallback."""
    return {"dataset": data.name, "data_source": data.source, "data_fallback": data.fallback}


def report_end(data: RunData, out: Path, files: list[str], *, pictures: str | None = "pictures",
               extra: str = "") -> None:
    """The last lines every command prints: the data's source, the files written, and warnings.

    :param files: names written into ``out``.
    :param pictures: what was not drawn when the data are not square grey images (None: the
        command draws no images).
    :param extra: appended to the first line (e.g. the time taken).
    """
    print(f"\ndata: {data.source}; wrote {out}/ ({', '.join(files)}){extra}")
    if pictures and not data.drawable:
        print(f"no {pictures}: the data are not square grey images ({data.name})")
    print_fallback_banner(data)  # last, where it cannot be missed


def default_binarization(likelihood: str) -> str:
    """Dynamic binarization for the Bernoulli likelihood, grey levels for the others."""
    return "dynamic" if likelihood == "bernoulli" else "none"


def load_data(dataset: str = "mnist", *, data_dir: str | None = None, device: torch.device | str = "cpu",
              train_size: int | None = None, eval_size: int | None = None, binarization: str = "dynamic",
              seed: int = 0) -> RunData:
    """Load train and test splits, cut them to size, binarize them.

    :param dataset: a key of :data:`vi_lab.data.DATASETS`, or the user's data (a path, or
        ``torchvision:<Class>``; see :func:`vi_lab.data.load_dataset`).
    :param train_size: first N training images (all when None).
    :param eval_size: first N test images (all when None).
    :param binarization: ``dynamic``, ``static``, ``threshold`` or ``none``.
    :param seed: the run's seed; static draws use it (training) and ``seed + 1`` (held out).

    Example::

        d = load_data("mnist", train_size=1000, eval_size=100)
        fit(model, guide, d.x_train, binarize=d.fit_binarize, eval_data=d.x_test)
    """
    for name, n in (("train_size", train_size), ("eval_size", eval_size)):
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    train = load_dataset(dataset, "train", data_dir=data_dir, device=device)
    test = load_dataset(dataset, "test", data_dir=data_dir, device=device)
    train = train.subset(min(train_size or len(train), len(train)))
    test = test.subset(min(eval_size or len(test), len(test)))
    x_train = train.images
    if binarization in ("static", "threshold"):
        x_train = binarize(x_train, binarization, seed=seed)
    data = RunData(x_train, train.labels, heldout_binarized(test.images, binarization, seed), test.labels,
                   binarization, train.source, train.fallback or test.fallback, train.name,
                   getattr(train, "image_shape", (28, 28)))
    print_fallback_banner(data)  # first, before any training output
    if dataset not in DATASETS:
        print(f"data: {train.describe()}; test: {len(test)} rows", flush=True)
    return data


#: errors a user causes and can fix from the message alone: printed as one line, no traceback
USER_ERRORS: tuple[type[BaseException], ...] = (TrainingDiverged, ContractError, CheckpointError, ValueError,
                                                OSError, distributed.PeerLost)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn :data:`USER_ERRORS` into ``error: <message>`` and exit status 1 (VI_LAB_TRACEBACK=1 raises them).

    vi_lab's ValueErrors say what is wrong and what would be right; OSErrors (a full disk
    while writing pictures, a missing file) name the path and the OS's reason.
    """
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("VI_LAB_TRACEBACK") or not _ours(err):
            raise
        raise SystemExit(f"error: {err}") from None


def _ours(err: BaseException) -> bool:
    """Whether vi_lab (or an example) raised ``err`` itself; a ValueError from inside torch or
    Pyro is more likely a bug than bad input, and keeps its traceback."""
    if not isinstance(err, ValueError) or isinstance(err, (ContractError, CheckpointError)):
        return True
    tb = err.__traceback__
    last = None
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return last is not None and (last.startswith(str(Path(__file__).parent)) or "examples" in Path(last).parts)


def command_line() -> str:
    """The command that started this process, for provenance in JSON outputs."""
    if not sys.argv or not sys.argv[0]:
        return ""
    first = Path(sys.argv[0]).name
    if first == "vi-lab":
        return " ".join(["vi-lab", *sys.argv[1:]])
    if first == "__main__.py" and Path(sys.argv[0]).parent.name == "vi_lab":
        return " ".join(["python -m vi_lab", *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def provenance(cfg: Any) -> dict[str, Any]:
    """When, by which command and with which options an output was made: the block every JSON output ends with.

    :param cfg: the command's frozen config dataclass.
    """
    return {"date": _dt.datetime.now().isoformat(timespec="seconds"), "command": command_line(),
            "config": dataclasses.asdict(cfg)}


def run_command(parse_args: Any, main: Any, argv: list[str] | None, prog: str | None) -> Any:
    """Parse ``argv`` and run a command, with :func:`user_errors` (the ``run`` of every command module)."""
    with user_errors():
        return main(parse_args(argv, prog))
