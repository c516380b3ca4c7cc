"""Checkpoints written atomically: a crash mid-write never damages the last good one."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every random state training touches: torch (CPU and CUDA), Python, NumPy."""
    state = {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured, wherever the checkpoint was written or loaded.

    torch wants its generator states as CPU byte tensors, so states that travelled to a
    GPU (``torch.load(map_location="cuda")``) are brought back first. CUDA states are
    restored for as many GPUs as both machines have; a checkpoint written on a CPU
    leaves the GPU generators as they are, one written on a GPU resumes on a CPU.
    """
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


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

    Tensors go to ``map_location`` except the random-number-generator states under
    ``"rng"``, which stay the CPU byte tensors torch restores them from: a checkpoint
    written on a GPU resumes on a CPU and the other way round.

    :param path: the checkpoint file.
    :param map_location: device to load tensors onto.

    Example::

        state = load("runs/x/last.pt", map_location="cuda")
        set_rng_state(state["rng"])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train without resume first, or pass the right path")
    # weights_only=False: the file holds RNG states (Python tuples, NumPy arrays) written by us
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        return state
    device = torch.device(map_location)
    return {k: (v if k == "rng" else _to_device(v, device)) for k, v in state.items()}


def _to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside dicts, lists and tuples moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return type(obj)((k, _to_device(v, device)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj
