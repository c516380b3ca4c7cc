"""Run a script on N processes with torchrun (``python -m torch.distributed.run``), gloo on the CPU.

Tests write a small script into ``tmp_path`` whose ranks save their results with
``torch.save(..., f"{out}/rank{rank}.pt")``, run it with :func:`torchrun`, and compare.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    """The environment of a launched run: one thread per rank, vi_lab importable, tracebacks kept."""
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{e.get('PYTHONPATH', '')}",
             PYTHONWARNINGS="ignore", **extra)
    return e


def launch_args(nproc: int, *args: str) -> list[str]:
    """``torchrun --nproc_per_node=N ARGS``, on a free local port (tests may run side by side)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            f"--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]


def torchrun(nproc: int, *args: str, timeout: float = 240, cwd: Path | None = None, check: bool = True,
             **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node=N ARGS``; with ``check``, fail with both outputs when it fails."""
    proc = subprocess.run(launch_args(nproc, *args), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or ROOT, env=env(**extra_env))
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def rank_results(out: Path, nproc: int) -> list[dict]:
    """What each rank saved as ``out/rank{r}.pt``."""
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]
