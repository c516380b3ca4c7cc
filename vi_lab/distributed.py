"""Data parallelism over ``torch.distributed``: one model trained and evaluated by N processes.

Launch any vi_lab script with ``torchrun`` and it runs on N processes (ranks)::

    torchrun --nproc_per_node=2 examples/vae_mnist.py --epochs 10
    torchrun --nproc_per_node=2 -m vi_lab train --epochs 10

:func:`setup` starts the process group from the variables torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): ``gloo`` on a CPU,
``nccl`` on a GPU (each rank on ``cuda:LOCAL_RANK``). :func:`vi_lab.fit` and the
evaluators call it themselves, so a user's own script under torchrun needs nothing more.
Without torchrun (``WORLD_SIZE`` unset or 1) everything here is a no-op and a run is the
single-process run it always was.

What the pieces do (``vi_lab.infer`` and ``vi_lab.evaluate`` use them):

* every rank draws nothing for the epoch's order: rank 0 draws the permutation and
  :func:`broadcast_` shares it; each global batch is cut into contiguous shards, one per
  rank (:func:`shard_bounds`);
* :class:`GradientAverager` sums ``n_rank / n_batch`` times each rank's gradients in one
  all-reduce, so the step is the one a single process takes on the whole batch;
* evaluators take rank ``r``'s rows and :func:`gather_rows` puts the per-datapoint
  results back in order on every rank;
* a collective that fails because another rank died raises :class:`PeerLost`; a rank
  that torchrun stops (SIGTERM, sent when another rank failed) raises :class:`Stopped`.
  Both say that the last checkpoint is intact and how to resume.

This module is on the ground floor (DESIGN.md): it imports nothing from vi_lab.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

#: seconds a collective waits for the other ranks before failing (``VI_LAB_DIST_TIMEOUT`` overrides)
DEFAULT_TIMEOUT = 600.0

#: Pyro's decaying-average REINFORCE baselines (``pyro.param`` sites holding one value per batch
#: position, replaced every step, never optimized): each rank holds its own positions' values
PER_POSITION_PREFIX = "__baseline_avg_"


class PeerLost(RuntimeError):
    """A collective failed: another process of the run died, was killed or cannot be reached."""


class Stopped(SystemExit):
    """This rank was told to stop (SIGTERM), as torchrun does to every rank when one of them fails."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, on ``backend``.

    A plain run is ``World()``: rank 0 of 1, no backend.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Whether this rank writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number; launch with "
                         f"torchrun --nproc_per_node=N") from None


_ALONE = [0]  # depth of alone() blocks


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside this block the rank works by itself: :func:`world` is rank 0 of 1, nothing is sharded.

    For work already split across ranks, e.g. the gap analysis of one rank's datapoints,
    whose evaluators must not split those again.
    """
    _ALONE[0] += 1
    try:
        yield
    finally:
        _ALONE[0] -= 1


def world() -> World:
    """The run's :class:`World` (rank 0 of 1 unless a process group is up, or inside :func:`alone`)."""
    if _ALONE[0] or not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())


def timeout_seconds() -> float:
    """How long a collective waits for the others: ``VI_LAB_DIST_TIMEOUT`` or :data:`DEFAULT_TIMEOUT`."""
    value = os.environ.get("VI_LAB_DIST_TIMEOUT")
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"VI_LAB_DIST_TIMEOUT={value!r} must be a positive number of seconds, e.g. 600")
    return seconds


def setup(device: torch.device | str | None = None) -> World:
    """Join the run's process group when launched by torchrun (once; later calls return the world).

    :param device: the device the run asked for; a CUDA device selects ``nccl`` and this
        rank's GPU (``cuda:LOCAL_RANK``), anything else ``gloo``. ``VI_LAB_DIST_BACKEND``
        overrides the backend.
    :returns: the :class:`World`; ``World()`` when not launched.
    :raises ValueError: when torchrun's variables are incomplete or there are fewer GPUs than
        processes on this node.

    Example::

        world = vi_lab.distributed.setup("cuda")  # rank 1 of 2 on cuda:1 under torchrun
    """
    if not launched() or not dist.is_available():
        return World()
    if dist.is_initialized():
        return world()
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: launch with "
                         f"torchrun --nproc_per_node=N (it sets them all)")
    cuda = device is not None and torch.device(device).type == "cuda"
    backend = os.environ.get("VI_LAB_DIST_BACKEND") or ("nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no GPU: this node sees {torch.cuda.device_count()} "
                             f"GPU(s); launch at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_seconds())
    dist.init_process_group(backend, timeout=timeout)
    _stop_on_sigterm()
    return world()


def local_device(device: torch.device, w: World | None = None) -> torch.device:
    """This rank's device: under data parallelism any CUDA device (``cuda``, or ``cuda:0`` where
    data was put before the process group existed) becomes ``cuda:LOCAL_RANK``."""
    w = w or world()
    if w.parallel and device.type == "cuda":
        return torch.device("cuda", w.local_rank)
    return device


def _stop_on_sigterm() -> None:
    """SIGTERM (torchrun stopping the survivors of a failed rank) becomes :class:`Stopped`, a clear message."""
    rank = dist.get_rank()

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Stopped(f"error: rank {rank} was stopped (SIGTERM): torchrun stops every process of the run when "
                      f"one of them fails or is killed; its report names that rank. A checkpoint written before "
                      f"is intact: continue with --resume (resume=True) on any number of processes.")

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, stop)


def _collective(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a collective; a failure because another rank is gone becomes :class:`PeerLost`."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as err:  # gloo: "Connection closed by peer", nccl: DistBackendError
        w = world()
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise PeerLost(f"rank {w.rank} of {w.size}: {what} failed because another process of this run stopped or "
                       f"cannot be reached, or the processes disagree ({first})") from err


def broadcast_(tensor: torch.Tensor, what: str = "broadcast") -> torch.Tensor:
    """Rank 0's ``tensor`` copied into every rank's ``tensor`` (in place; returned)."""
    if world().parallel:
        _collective(what, dist.broadcast, tensor, src=0)
    return tensor


def broadcast_object(obj: Any, what: str = "broadcast") -> Any:
    """Rank 0's picklable ``obj`` on every rank."""
    if not world().parallel:
        return obj
    box = [obj]
    _collective(what, dist.broadcast_object_list, box, src=0)
    return box[0]


def all_gather_object(obj: Any, what: str = "gather") -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    w = world()
    if not w.parallel:
        return [obj]
    out: list[Any] = [None] * w.size
    _collective(what, dist.all_gather_object, out, obj)
    return out


def all_reduce_sum_(tensor: torch.Tensor, what: str = "all-reduce") -> torch.Tensor:
    """The sum over ranks of ``tensor``, in place on every rank (returned)."""
    if world().parallel:
        _collective(what, dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
    return tensor


def main_decides(fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on rank 0 only and give every rank its result, or raise its error on every rank.

    For what must happen once and be agreed on: claiming a run directory, reading a
    checkpoint, refusing to overwrite an earlier run. An error on rank 0 is raised on every
    rank with the same type and message, so no rank waits for a partner that gave up.
    """
    w = world()
    if not w.parallel:
        return fn()
    outcome: tuple[str, Any]
    if w.main:
        try:
            outcome = ("ok", fn())
        except (Exception, SystemExit) as err:  # noqa: BLE001 - passed on to every rank, then raised
            outcome = ("error", err)
    else:
        outcome = ("pending", None)
    outcome = broadcast_object(outcome, what)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def main_first(fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` on rank 0, then on the other ranks (e.g. a download into a shared cache: once)."""
    w = world()
    if not w.parallel:
        return fn()
    if w.main:
        result = fn()
        barrier(what)
        return result
    barrier(what)
    return fn()


def barrier(what: str = "barrier") -> None:
    """Wait until every rank gets here."""
    if world().parallel:
        _collective(what, dist.barrier)


def shard_sizes(n: int, size: int) -> list[int]:
    """Rows each of ``size`` ranks takes from ``n``: sizes differing by at most one, the larger
    first (as ``torch.tensor_split`` cuts them)."""
    base, extra = divmod(n, size)
    return [base + (1 if r < extra else 0) for r in range(size)]


def shard_bounds(n: int, w: World | None = None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that this rank takes: its contiguous share (:func:`shard_sizes`), rank 0 first."""
    w = w or world()
    sizes = shard_sizes(n, w.size)
    lo = sum(sizes[: w.rank])
    return lo, lo + sizes[w.rank]


def gather_rows(local: torch.Tensor, n: int, what: str = "gather of per-datapoint results") -> torch.Tensor:
    """Per-datapoint results of every rank's shard joined in data order: ``(..., n_rank)`` -> ``(..., n)``.

    The datapoints are on the last dimension (as every evaluator returns them); rank ``r``
    holds rows :func:`shard_bounds` of ``n``. Every rank gets the whole result, on ``local``'s
    device (nccl moves GPU memory only: a CPU tensor travels through this rank's GPU).
    """
    w = world()
    if not w.parallel:
        return local
    if w.backend == "nccl" and local.device.type != "cuda":
        here = torch.device("cuda", torch.cuda.current_device())
        return gather_rows(local.to(here), n, what).to(local.device)
    sizes = shard_sizes(n, w.size)
    if local.shape[-1] != sizes[w.rank]:
        raise ValueError(f"rank {w.rank} holds {local.shape[-1]} results but its shard of {n} has {sizes[w.rank]}")
    most = max(sizes)
    rows = local.movedim(-1, 0).contiguous()
    padded = rows.new_zeros((most, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(w.size)]
    _collective(what, dist.all_gather, parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).movedim(0, -1)


def shard_args(x: torch.Tensor, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple, dict]:
    """This rank's rows of ``x`` and of the tensor arguments with ``x``'s first dimension (labels, ...)."""
    n = x.shape[0]
    lo, hi = shard_bounds(n)

    def cut(a: Any) -> Any:
        return a[lo:hi] if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == n else a

    return x[lo:hi], tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


class GradientAverager:
    """Make each rank's gradients those of the whole global batch, in one all-reduce.

    A step's loss is a per-datapoint mean over the rank's ``n_rank`` rows; the global
    batch's mean gradient is ``sum_r (n_rank / n_batch) * grad_r``. Parameters are taken
    in the order of their names (the same on every rank); a parameter no rank computed a
    gradient for keeps ``grad = None`` (the optimizer skips it, as in one process). The
    loss and the loss's monitored numbers (``terms``) are averaged alongside.
    """

    def __init__(self) -> None:
        self.weight = 1.0  # n_rank / n_batch of the current step, set by the training loop

    def __call__(self, named: list[tuple[str, torch.Tensor]], loss: torch.Tensor,
                 terms: dict[str, float] | None = None) -> torch.Tensor:
        # per-position baselines are each rank's own (and differ in size when shares do)
        params = [p for name, p in sorted(named, key=lambda kv: kv[0]) if not name.startswith(PER_POSITION_PREFIX)]
        keys = sorted(terms) if terms else []
        # where the gradients are (a loss read back by Pyro's own estimators is a CPU number,
        # and nccl reduces GPU memory only)
        device = params[0].device if params else loss.device
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        sizes = [p.numel() for p in params]
        flat = torch.cat([
            *((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, dtype) for p in params),
            loss.detach().reshape(1).to(device, dtype),
            torch.tensor([terms[k] for k in keys], dtype=dtype, device=device),
        ]).mul_(self.weight)
        flags = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
        flat = all_reduce_sum_(torch.cat([flat, flags]), "the gradient all-reduce")
        total = sum(sizes)
        had = (flat[total + 1 + len(keys):] > 0).tolist()  # one read: which parameters any rank moved
        for p, piece, moved in zip(params, flat[:total].split(sizes), had):
            p.grad = piece.view_as(p).to(p.device, p.dtype) if moved else None
        for j, k in enumerate(keys):
            terms[k] = float(flat[total + 1 + j])
        return flat[total].to(loss.device, loss.dtype)


__all__ = ["World", "PeerLost", "Stopped", "setup", "world", "launched", "local_device", "broadcast_",
           "broadcast_object", "all_gather_object", "all_reduce_sum_", "main_decides", "barrier", "shard_bounds",
           "shard_sizes", "gather_rows", "shard_args", "GradientAverager", "timeout_seconds", "alone", "main_first", "PER_POSITION_PREFIX"]
