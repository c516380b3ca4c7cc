"""Checkpoints written atomically: a crash mid-write never damages the last good one."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

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


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.

    The rename is atomic on POSIX, so readers see either the old file or the new one.

    :param obj: anything ``torch.save`` accepts.
    :param path: destination.

    Example::

        save_atomic({"epoch": 3}, "runs/x/last.pt")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
    # weights_only=False: the file holds RNG states (Python tuples, NumPy arrays) written by us
    return torch.load(path, map_location=map_location, weights_only=False)
