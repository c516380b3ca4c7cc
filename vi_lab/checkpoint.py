"""Checkpoints written atomically and verified on load: a crash mid-write never damages the last good one.

``torch.save`` writes a zip archive whose records carry CRC-32 checksums; :func:`load`
verifies them before unpickling, so a file whose bytes changed on disk is reported as
damaged instead of loading quietly (torch itself does not check them).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every random state training touches: torch (CPU and CUDA), Python, NumPy.

    torch's generator states are kept as NumPy byte arrays, which ``torch.load`` leaves
    where they are whatever its ``map_location``: a checkpoint written on a GPU resumes on
    a CPU and the other way round. CUDA states are taken only when CUDA is in use (asking
    for them would start CUDA on every visible GPU).
    """
    state = {"torch": torch.get_rng_state().numpy(), "random": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy() for s in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(state: Any) -> torch.Tensor:
    # a NumPy array (this module's format) or a tensor on any device (older checkpoints)
    return state.detach().to("cpu") if torch.is_tensor(state) else torch.from_numpy(np.array(state, dtype=np.uint8))


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured, wherever the checkpoint was written or loaded.

    torch wants CPU byte tensors; they are rebuilt from what was saved. CUDA states are
    restored for as many GPUs as both machines have. A checkpoint written without CUDA
    states (on a CPU) seeds the CUDA generators from its CPU state, so resuming it on a
    GPU is repeatable too.
    """
    cpu = _byte_tensor(state["torch"])
    torch.set_rng_state(cpu)
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return  # CUDA unused here: nothing to restore (and asking would start it)
    if "cuda" in state:
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_byte_tensor(cuda_state), index)
    else:
        digest = hashlib.sha256(cpu.numpy().tobytes()).digest()
        torch.cuda.manual_seed_all(int.from_bytes(digest[:8], "little") % 2**63)


class CheckpointError(Exception):
    """A checkpoint could not be written, or the one on disk is damaged."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing failed (disk full, read-only directory, ...); the previous file is intact."""


class CheckpointDamaged(CheckpointError, ValueError):
    """The file's bytes do not match its checksums, or it is not a checkpoint at all."""


def describe_os_error(err: BaseException) -> str:
    """The OS's own words for a failure (``No space left on device (errno 28)``), found in the exception chain.

    torch reports a failed write as a RuntimeError about zip positions and chains the
    OSError that says why; this digs the OSError out.
    """
    for seen in _chain(err):
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.strerror} (errno {seen.errno})"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or during, innermost last."""
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def remove_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files :func:`save_atomic` left beside ``path`` when its process was killed.

    :returns: what was removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f"{path.name}.*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _write_atomic(path: Path, write: Any, what: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from the user's group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, Exception) and any(isinstance(e, OSError) for e in _chain(err)):
            kept = "the previous one is intact" if path.exists() else "there was no previous one"
            raise CheckpointWriteError(f"could not write {what} {path}: {describe_os_error(err)}; {kept}") from err
        raise
    return path


def write_text_atomic(path: str | Path, text: str, what: str = "file") -> Path:
    """Replace a text file atomically (a crash leaves the old or the new file, never half of one).

    :param what: the file's role in an error message.
    """
    return _write_atomic(Path(path), lambda f: f.write(text.encode()), what)


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.

    The rename is atomic on POSIX, so readers see either the old file or the new one.

    :param obj: anything ``torch.save`` accepts.
    :param path: destination.
    :raises CheckpointWriteError: in one line naming the path and the OS's reason (no space,
        read-only, ...); the previous file at ``path`` is left as it was.

    Example::

        save_atomic({"epoch": 3}, "runs/x/last.pt")
    """
    return _write_atomic(Path(path), lambda f: torch.save(obj, f), "checkpoint")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic`, with a clear error if it is missing.

    :param path: the checkpoint file.
    :param map_location: device to load tensors onto (RNG states, kept as NumPy arrays by
        :func:`rng_state`, stay on the CPU whatever it is).

    Example::

        state = load("runs/x/last.pt")
        set_rng_state(state["rng"])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train without resume first, or pass the right path")
    verify(path)
    try:
        # weights_only=False: the file holds RNG states (Python tuples, NumPy arrays) written by us
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, UnicodeDecodeError, ValueError, KeyError, AttributeError, ImportError,
            pickle.UnpicklingError) as err:
        raise CheckpointDamaged(f"checkpoint {path} cannot be read ({type(err).__name__}: "
                                f"{str(err).splitlines()[0][:200] if str(err) else ''}); {_DAMAGED_ADVICE}") from err


_DAMAGED_ADVICE = "it cannot be resumed: restore it from a copy, or start a new run"


def verify(path: str | Path) -> None:
    """Check every record of a checkpoint against the CRC-32 written with it.

    :raises CheckpointDamaged: naming the file and the first damaged record.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, ValueError, EOFError) as err:
        raise CheckpointDamaged(f"checkpoint {path} is damaged or not a checkpoint ({type(err).__name__}: {err}); "
                                f"{_DAMAGED_ADVICE}") from err
    if bad is not None:
        raise CheckpointDamaged(f"checkpoint {path} is damaged: record {bad!r} does not match the checksum written "
                                f"with it (the file changed on disk after it was saved); {_DAMAGED_ADVICE}")
