"""Per-datapoint ELBO and importance-sampled log-likelihood for any model/guide pair.

Everything here rests on one quantity, the log importance weight of a draw
``z ~ q(z | x)``::

    log w = log p(x, z) - log q(z | x)

computed from Pyro traces (guide traced, model replayed against it) with K draws
vectorized in an outer ``pyro.plate`` left of the model's own plates. Because the
contract of DESIGN.md puts the data batch in the rightmost batch dimension of every
site, summing each site's log-density over the dimensions between the particle
dimension and the batch dimension gives a ``(K, B)`` tensor of log weights. Then

* ``elbo`` is the mean of log w over K draws (one per draw: ``E_q[log w]``);
* ``log_likelihood`` is ``logsumexp_k log w_k - log K`` per datapoint, a lower bound
  on log p(x) in expectation that tightens as K grows (Burda et al., 2016).

Site scales (e.g. beta of a beta-VAE) are ignored: evaluators report the true ELBO and
log p(x) in nats per datapoint. Pyro's ``RenyiELBO`` is deliberately not used: it
averages weights across the batch, which is wrong for per-datapoint latents.

Under ``torchrun`` (:mod:`vi_lab.distributed`) the datapoints are split across the
processes (:func:`split_datapoints`): each evaluates its contiguous share and every
process gets the whole result, in data order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import re
from typing import Any, Callable, Iterator, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm
from pyro.poutine.util import prune_subsample_sites
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vi_lab import distributed
from vi_lab.contract import check_data, check_pair, check_row_shape, check_support, site_log_prob
from vi_lab.device import check_modules_on
from vi_lab.guides.local_base import LocalGuide

#: environment variable that sets the evaluators' working-memory budget (bytes, or e.g. ``"2GiB"``)
MEMORY_ENV = "VI_LAB_EVAL_MEMORY"
#: budget off a GPU (then bounded by half the available RAM): on a CPU larger chunks are no faster but slower
#: (64 MiB was 1.8-2.2x faster than 1 GiB for a 784-400-20 VAE at K = 100 and 5000 on 2 cores, 2026-11)
CPU_MEMORY = 64 * 2**20
#: share of a GPU's free memory the evaluators may use
GPU_FRACTION = 0.5
#: datapoints the contract check traces when the budget decides the chunks (a user's batch, not a probe's)
CHECK_POINTS = 1000
#: datapoints the cost probe traces when any batch will do (an amortized guide)
PROBE_POINTS = 4
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class LogWeightTerms(NamedTuple):
    """Pieces of the log importance weight, each shaped ``(K, B)``."""

    log_lik: torch.Tensor  # sum of observed sites' log p(x | z)
    log_prior: torch.Tensor  # sum of latent sites' log p(z)
    log_q: torch.Tensor  # sum of guide sites' log q(z | x)

    @property
    def log_weight(self) -> torch.Tensor:
        return self.log_lik + self.log_prior - self.log_q


def max_plate_nesting(model: Callable, guide: Callable, x: torch.Tensor, *args, **kwargs) -> int:
    """How many plate dimensions the pair uses (so particles can go left of them).

    Checks the pair's contract on the way (:func:`vi_lab.contract.check_pair`).

    :param model: Pyro model.
    :param guide: Pyro guide with the model's arguments.
    :param x: a batch of data.
    """
    return check_pair(model, guide, x, *args, **kwargs).nesting


def log_weight_terms(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *args,
    num_samples: int = 1,
    nesting: int | None = None,
    **kwargs,
) -> LogWeightTerms:
    """Draw ``num_samples`` z per datapoint from the guide and score them under both sides.

    Differentiable (no ``no_grad``, no chunking): the building block for the evaluators
    below and for local optimization in :mod:`vi_lab.gaps`.

    :param model: Pyro model ``model(x, *args, **kwargs)``.
    :param guide: Pyro guide with the same arguments.
    :param x: batch of data, shape ``(B, ...)``.
    :param num_samples: K draws per datapoint, vectorized.
    :param nesting: the pair's plate nesting if known (found by a trace otherwise).
    :returns: :class:`LogWeightTerms` of ``(K, B)`` tensors.

    Example::

        terms = log_weight_terms(model, guide, x, num_samples=10)
        terms.log_weight.shape  # torch.Size([10, B])
    """
    if nesting is None:
        nesting = max_plate_nesting(model, guide, x, *args, **kwargs)
    guide_trace, model_trace = particle_traces(model, guide, x, *args, num_samples=num_samples, nesting=nesting,
                                               **kwargs)
    return LogWeightTerms(*latent_sums(model_trace, guide_trace, nesting, x.new_zeros(num_samples, x.shape[0])))


def particle_traces(model: Callable, guide: Callable, x: torch.Tensor, *args, num_samples: int, nesting: int,
                    replay_with: Callable[[poutine.Trace], poutine.Trace] | None = None,
                    expose_params: bool = False, **kwargs) -> tuple[poutine.Trace, poutine.Trace]:
    """``(guide_trace, model_trace)``: K draws per datapoint from the guide, the model replayed against them.

    The particle plate sits left of the pair's ``nesting`` plates; subsample sites are pruned.

    :param replay_with: ``guide_trace -> trace`` the model is replayed against instead of the
        guide's own (the DReG objective hands the model hooked copies of the draws).
    :param expose_params: see :func:`particle_plate`.
    """
    with particle_plate(num_samples, nesting, expose_params):
        guide_trace = poutine.trace(guide).get_trace(x, *args, **kwargs)
        replayed = guide_trace if replay_with is None else replay_with(guide_trace)
        model_trace = poutine.trace(poutine.replay(model, trace=replayed)).get_trace(x, *args, **kwargs)
    # a plate's subsample site is bookkeeping, not a latent: Pyro's ELBOs prune it too (its
    # zero log-density is a CPU tensor, which would pull the weights off a GPU)
    return prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)


@contextlib.contextmanager
def particle_plate(num_samples: int, nesting: int, expose_params: bool = False) -> Iterator[None]:
    """K draws per datapoint: a particle plate left of the pair's ``nesting`` plates, its sites hidden from outer handlers.

    :param expose_params: let the parameter sites through (a training step finds the parameters
        it updates by tracing them).
    """
    # block outermost: the particle plate must see (and broadcast) every site inside it
    with (poutine.block(expose_types=["param"]) if expose_params else poutine.block()), \
            pyro.plate("_vi_lab_particles", num_samples, dim=-(nesting + 1)):
        yield


def latent_sums(model_trace: poutine.Trace, guide_trace: poutine.Trace, nesting: int, zero: torch.Tensor,
                weight: Callable[[str], float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log_lik, log_prior, log_q)`` of :func:`particle_traces`' traces, each ``(K, B)``.

    Sites' own scales are left out (the evaluators report true log-densities).

    :param zero: a ``(K, B)`` zero tensor on the data's device.
    :param weight: ``site name -> factor`` on each latent site's log p(z) and log q(z) (a training
        objective's beta and KL warm-up weight); None: 1.
    """
    log_lik, log_prior, log_q = zero, zero, zero
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if not site["is_observed"] and name not in guide_trace.nodes:
            # drawn from the prior inside the model: the prior is its proposal, and
            # log p(z) - log q(z) cancels, so neither term enters the weight (check_pair has
            # refused latents marked for enumeration, which are not drawn)
            continue
        lp = site_log_prob(site, nesting + 1)
        if site["is_observed"]:
            log_lik = log_lik + lp
        else:
            log_prior = log_prior + (lp if weight is None else weight(name) * lp)
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            lq = site_log_prob(site, nesting + 1)
            log_q = log_q + (lq if weight is None else weight(name) * lq)
    return log_lik, log_prior, log_q


def _slice_args(args: tuple, kwargs: dict, n: int, idx: slice) -> tuple[tuple, dict]:
    """Slice every tensor argument whose first dimension is the batch."""

    def cut(a):
        return a[idx] if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == n else a

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _check_inputs(x: torch.Tensor, num_samples: int, batch_size: int | None) -> None:
    check_data(x)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None (the memory budget decides), "
                         f"got {batch_size!r}")


def parse_memory(value: int | str, what: str = "memory_budget") -> int:
    """Bytes from ``value``: an integer, or a number with a unit (``"2GiB"``, ``"512 MB"``, ``"1e9"``).

    :param value: bytes, or a string of a positive number and an optional unit among B, KB, MB,
        GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024), case-insensitive.
    :param what: the setting's name, for the error.
    :returns: a positive number of bytes.

    Example::

        parse_memory("2GiB")  # 2147483648
    """
    hint = ("give a positive number of bytes (e.g. 2147483648) or a number with a unit B, KB, MB, GB, TB, "
            "KiB, MiB, GiB or TiB (e.g. 2GiB)")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what}={value!r} is not a memory size: {hint}")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{what}={value!r} is not a memory size: {hint}")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size < 1:
        raise ValueError(f"{what}={value!r} is not a memory size: {hint}")
    return size


def _available_ram() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else free physical pages, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def chunk_budget(device: torch.device | str = "cpu", override: int | str | None = None) -> int:
    """Bytes of working memory the evaluators may use for one chunk of draws on ``device``.

    In order: ``override`` (the evaluators' ``memory_budget=``); the environment variable
    ``VI_LAB_EVAL_MEMORY`` when set and not empty; on CUDA, half of the device's free memory (what the driver reports
    plus what PyTorch's allocator holds unused); elsewhere 64 MiB (:data:`CPU_MEMORY`), or
    half the available RAM when that is less.

    :param device: where the evaluation runs (the data's device).
    :param override: a budget in bytes or with a unit (``"2GiB"``), or None.
    :returns: the budget in bytes.

    Example::

        vi_lab.evaluate.chunk_budget(x.device)  # e.g. 67108864 on a CPU
    """
    if override is not None:
        return parse_memory(override, "memory_budget")
    env = os.environ.get(MEMORY_ENV, "")
    if env.strip():  # set and not empty
        return parse_memory(env, MEMORY_ENV)
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(1, int(GPU_FRACTION * (free + cached)))
    ram = _available_ram()
    return CPU_MEMORY if ram is None else max(1, min(CPU_MEMORY, ram // 2))


class _AllocatedBytes(TorchDispatchMode):
    """Sums the bytes of every tensor an operator creates (outputs that alias an input are skipped).

    The sum over a computation bounds its peak memory from above on any device, whatever
    the order in which its intermediates are freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        values = (out,) if len(returns) == 1 else out if isinstance(out, (tuple, list)) else ()  # () for none
        for value, ret in zip(values, returns):
            if ret.alias_info is None:  # views and in-place results allocate nothing new
                self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves(value) if torch.is_tensor(t))
        return out


class ChunkPlan(NamedTuple):
    """How an evaluation is cut: ``points`` datapoints x ``samples`` draws per chunk, and why."""

    points: int  # datapoints per chunk
    samples: int  # draws per datapoint per chunk (K when all of a datapoint's draws fit)
    pair_bytes: int  # measured working memory per (draw, datapoint) pair
    point_bytes: int  # measured working memory per datapoint, whatever the draws (e.g. an encoder pass)
    budget: int  # bytes allowed per chunk


def _probe(model, guide, xb, a, kw, nesting: int) -> tuple[int, int]:
    """Bytes per (draw, datapoint) pair and per datapoint, measured on 1 and 2 draws of ``xb``.

    The two runs separate what grows with the draws (the decoder's output, the weights) from
    what a datapoint costs once (the encoder). Random draws are forked off: the probe
    leaves the caller's random stream, and so the estimates, as they were.
    """
    counts = []
    with torch.random.fork_rng(devices=[xb.device] if xb.device.type == "cuda" else []):
        for k in (1, 2):
            with _AllocatedBytes() as counter:
                log_weight_terms(model, guide, xb, *a, num_samples=k, nesting=nesting, **kw)
            counts.append(counter.bytes)
    b = xb.shape[0]
    pair = (counts[1] - counts[0]) // b
    if pair <= 0:  # nothing grew with the draws (e.g. a data-free guide): charge it all to the pairs
        pair = counts[1] // (2 * b)
    point = max(0, counts[0] - pair * b) // b
    return max(1, pair), point


def plan_chunks(num_points: int, num_samples: int, pair_bytes: int, point_bytes: int, budget: int,
                batch_size: int | None = None, whole_batch: bool = False) -> ChunkPlan:
    """Datapoints and draws per chunk so that one chunk's measured working memory stays within ``budget``.

    All K draws of a datapoint go in one chunk when they fit (the encoder runs once per
    datapoint); otherwise one datapoint a chunk and K cut into as large pieces as fit. Never
    less than one draw of one datapoint, whatever the budget.

    :param num_points: N, datapoints to evaluate.
    :param num_samples: K, draws per datapoint.
    :param pair_bytes: working memory per (draw, datapoint) pair.
    :param point_bytes: working memory per datapoint (paid once per chunk it is in).
    :param budget: bytes allowed per chunk.
    :param batch_size: datapoints per chunk fixed by the caller (None: the budget decides).
    :param whole_batch: all N datapoints in every chunk (a local guide's parameters cover all of them).
    :returns: :class:`ChunkPlan`.

    Example::

        plan_chunks(10000, 5000, pair_bytes=15000, point_bytes=6000, budget=2**30)[:2]  # (14, 5000)
    """
    if whole_batch or batch_size is not None:
        points = num_points if whole_batch else min(batch_size, num_points)
    else:
        points = min(num_points, budget // (num_samples * pair_bytes + point_bytes))
    points = max(1, points)
    samples = max(1, min(num_samples, (budget - points * point_bytes) // (points * pair_bytes)))
    if not (whole_batch or batch_size is not None):
        points = _even(num_points, points)
    return ChunkPlan(points, _even(num_samples, samples), pair_bytes, point_bytes, budget)


def _even(total: int, most: int) -> int:
    """The piece size that cuts ``total`` into as few pieces of at most ``most`` as possible, all near equal."""
    return -(-total // -(-total // most))  # no short last piece: 5000 by 4502 is 2 x 2500, not 4502 + 498


@torch.no_grad()
def _prepare(model, guide, x, args, kwargs, num_samples, batch_size, memory_budget) -> tuple[ChunkPlan, int]:
    """Check the inputs and the pair's contract, measure a chunk's cost, plan the chunks: ``(plan, nesting)``."""
    _check_inputs(x, num_samples, batch_size)
    check_modules_on(x, model, guide)
    check_row_shape(model, guide, x)  # on all of x: cut into chunks, a missing batch dimension would hide
    n = x.shape[0]
    budget = chunk_budget(x.device, memory_budget)
    whole = isinstance(guide, LocalGuide)
    # traced on a real chunk: a local guide accepts only its own batch
    first = slice(0, n if whole else min(n, batch_size or CHECK_POINTS))
    a, kw = _slice_args(args, kwargs, n, first)
    pair = check_pair(model, guide, x[first], *a, **kw)  # the contract, once per call
    check_support(pair, x)  # every row, not only the traced chunk's
    if not whole and batch_size is None:  # any batch will do: measure on a few points
        first = slice(0, min(n, PROBE_POINTS))
        a, kw = _slice_args(args, kwargs, n, first)
    cost = _probe(model, guide, x[first], a, kw, pair.nesting)
    return plan_chunks(n, num_samples, *cost, budget, batch_size=batch_size, whole_batch=whole), pair.nesting


def chunk_plan(model: Callable, guide: Callable, x: torch.Tensor, *args, num_samples: int = 1000,
               batch_size: int | None = None, memory_budget: int | str | None = None, **kwargs) -> ChunkPlan:
    """How the evaluators would cut K draws for each of the datapoints ``x`` into chunks, and the costs behind it.

    Runs what they run before their chunks: the contract check (which draws once from the
    guide, as they do) and the cost probe (which draws off a forked random stream).

    :param num_samples: K.
    :param batch_size: datapoints per chunk fixed by the caller (None: the memory budget decides).
    :param memory_budget: bytes of working memory per chunk, or a size such as ``"2GiB"``
        (default: :func:`chunk_budget`).
    :returns: :class:`ChunkPlan`.

    Example::

        plan = vi_lab.evaluate.chunk_plan(model, guide, x_test, num_samples=5000)
        plan.points, plan.samples  # e.g. (1, 2500) on a CPU for a 784-400-20 VAE: one image, half its draws
    """
    return _prepare(model, guide, x, args, kwargs, num_samples, batch_size, memory_budget)[0]


def world_of(x: Any) -> distributed.World:
    """The :class:`~vi_lab.distributed.World` of work on ``x``, joining torchrun's process group first
    (:func:`vi_lab.distributed.setup` on ``x``'s device: ``nccl`` for CUDA data, else ``gloo``)."""
    return distributed.setup(x.device if torch.is_tensor(x) else None)


def split_datapoints(fn: Callable[..., Any], x: torch.Tensor, args: tuple = (), kwargs: dict | None = None, *,
                     join: Callable[[Any, Callable[[torch.Tensor], torch.Tensor]], Any] | None = None,
                     whole: bool = False, ship: Callable[[Any], Any] | None = None,
                     what: str = "the evaluation") -> Any:
    """Per-datapoint work ``fn(x, *args, **kwargs)``, split across the processes of a torchrun launch.

    In one process this is ``fn(x, *args, **kwargs)``. Under data parallelism
    (:mod:`vi_lab.distributed`) each process runs ``fn`` alone (:func:`~vi_lab.distributed.alone`:
    evaluators inside do not split again) on its contiguous rows of ``x``
    (:func:`~vi_lab.distributed.shard_bounds`) and of the tensor arguments with ``x``'s first
    dimension; then ``join(local, gather)`` builds the result, where ``gather(t)`` joins a
    per-datapoint tensor ``(..., n_rank)`` into ``(..., N)``, in data order, on every process.
    An error in any process's share is raised in every process (the lowest rank's, naming its
    rows). With fewer datapoints than processes, or with ``whole`` (work that needs all of
    ``x`` at once, e.g. a local guide's), process 0 runs ``fn`` on all of ``x`` and the others
    receive ``ship(result)`` with its tensors moved to ``x``'s device.

    Each process draws from its own random generator. Processes seeded alike (or not at all:
    torch starts every process from the same seed) use the same noise for their different
    datapoints, which leaves every estimate unbiased but correlates the shares' errors: seed
    each process apart, e.g. ``pyro.set_rng_seed(seed + rank)``.

    :param fn: ``fn(x, *args, **kwargs)``, whose result is per datapoint.
    :param x: the N datapoints, batch first.
    :param join: ``join(local, gather) -> result``; default: ``gather`` of the result, a tensor
        or a tuple of tensors with the datapoints last.
    :param whole: process 0 does all of the work (the others wait for its result).
    :param ship: what process 0 sends of its result (default: all of it); drop what need not travel.
    :param what: the work, as errors name it.
    :returns: the same result on every process.

    Example::

        def score(xs):
            return vi_lab.evaluate.log_weights(model, guide, xs, num_samples=100).max(0).values  # (n,)

        best = split_datapoints(score, x)  # (N,) on every process, each process scoring its share
    """
    kwargs = kwargs or {}
    w = world_of(x)
    if not w.parallel:
        return fn(x, *args, **kwargs)
    check_data(x)  # every process alike, naming rows of all of x
    if whole or x.shape[0] < w.size:
        return _on_main(lambda: fn(x, *args, **kwargs), x.device, ship or (lambda r: r), what)
    local = _on_shard(fn, x, args, kwargs, what)
    n = x.shape[0]
    return (join or _gather_each)(local, lambda t: distributed.gather_rows(t, n, f"the gather of {what}"))


def _gather_each(local: Any, gather: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    return tuple(gather(t) for t in local) if isinstance(local, tuple) else gather(local)


def _on_shard(fn: Callable[..., Any], x: torch.Tensor, args: tuple, kwargs: dict, what: str) -> Any:
    """``fn`` on this process's rows, alone; an error in any process's share is raised in every process."""
    w = distributed.world()
    lo, hi = distributed.shard_bounds(x.shape[0], w)
    xs, a, kw = distributed.shard_args(x, args, kwargs)
    result, error, told = None, None, None
    try:
        with distributed.alone():
            result = fn(xs, *a, **kw)
    except Exception as err:  # noqa: BLE001 - every process raises the first process's error
        error = err
        told = _portable_error(err, f"datapoints {lo}-{hi - 1} (process {w.rank} of {w.size})")
    errors = distributed.all_gather_object(told, f"the outcome of {what}")
    first = next((r for r, e in enumerate(errors) if e is not None), None)
    if first is None:
        return result
    if first == w.rank:
        raise told from error
    raise errors[first]


def _portable_error(err: Exception, where: str) -> Exception:
    """``err`` with ``where`` in front of its message, in a form that can be sent to the other processes."""
    try:
        told = type(err)(f"{where}: {err}")
        pickle.loads(pickle.dumps(told))
    except Exception:  # noqa: BLE001 - an error type that takes other arguments or does not pickle
        told = RuntimeError(f"{where}: {type(err).__name__}: {err}")
    return told


def _on_main(fn: Callable[[], Any], device: torch.device, ship: Callable[[Any], Any], what: str) -> Any:
    """``fn()`` run alone by process 0; the others get ``ship`` of its result (an error: raised everywhere)."""
    mine = []

    def run():
        with distributed.alone():
            mine.append(fn())
        return _moved(ship(mine[0]), torch.device("cpu"))  # a CUDA tensor would land on process 0's GPU

    shipped = distributed.main_decides(run, what)
    return mine[0] if mine else _moved(shipped, device)


def _moved(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (in tuples, lists, dicts and dataclasses) moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple
        return type(obj)(*(_moved(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_moved(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _moved(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _moved(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def share_progress(progress: bool | str, label: str, w: distributed.World | None = None) -> bool | str:
    """This process's progress bar under data parallelism: process 0's, named as its own share; none elsewhere."""
    w = w or distributed.world()
    if not progress or not w.parallel:
        return progress
    return f"{progress if isinstance(progress, str) else label} [process 0 of {w.size}]" if w.main else False


@torch.no_grad()
def _chunked(model, guide, x, args, kwargs, num_samples, batch_size, summarize, join, progress=False,
             memory_budget=None) -> torch.Tensor:
    """:func:`_in_chunks`, on each process's share of the datapoints under data parallelism.

    A local guide's parameters cover all of its batch: process 0 evaluates it alone.
    """
    w = world_of(x)
    if w.parallel:
        _check_inputs(x, num_samples, batch_size)  # every process alike, before any is left waiting
    bar = share_progress(progress, "weights", w)

    def run(xs, /, *a, **kw):
        return _in_chunks(model, guide, xs, a, kw, num_samples, batch_size, summarize, join, bar, memory_budget)

    return split_datapoints(run, x, args, kwargs, whole=isinstance(guide, LocalGuide), what="the evaluation")


@torch.no_grad()
def _in_chunks(model, guide, x, args, kwargs, num_samples, batch_size, summarize, join, progress=False,
               memory_budget=None) -> torch.Tensor:
    """Evaluate in chunks planned by :func:`chunk_plan`; join on the batch dim.

    Each chunk's :class:`LogWeightTerms` ``(k, b)`` go through ``summarize`` at once (so only
    summaries stay in memory); ``join(summaries) -> (..., b)`` combines a batch's K draws.
    The first chunk runs with Pyro's validation as the caller set it; the rest without
    (the checks cost time, and every chunk runs the same code on the same kind of data).
    ``progress`` shows a bar counting the weights drawn (datapoints x K).
    """
    plan, nesting = _prepare(model, guide, x, args, kwargs, num_samples, batch_size, memory_budget)
    n = x.shape[0]
    out = []
    bar = tqdm(total=n * num_samples, disable=not progress, unit="w", unit_scale=True, leave=False,
               desc=progress if isinstance(progress, str) else "weights")
    validated = False
    for start in range(0, n, plan.points):
        idx = slice(start, min(start + plan.points, n))
        xb = x[idx]
        a, kw = _slice_args(args, kwargs, n, idx)
        summaries = []
        for k0 in range(0, num_samples, plan.samples):
            k = min(plan.samples, num_samples - k0)
            with pyro.validation_enabled(False) if validated else contextlib.nullcontext():
                terms = log_weight_terms(model, guide, xb, *a, num_samples=k, nesting=nesting, **kw)
            summaries.append(summarize(terms))
            validated = True
            bar.update(k * xb.shape[0])
        out.append(join(summaries))
    bar.close()
    return torch.cat(out, dim=-1)


def log_weights(
    model: Callable, guide: Callable, x: torch.Tensor, *args, num_samples: int = 1000,
    batch_size: int | None = None, progress: bool | str = False, memory_budget: int | str | None = None, **kwargs,
) -> torch.Tensor:
    """All log importance weights ``log p(x, z_k) - log q(z_k | x)``, shape ``(K, B)``.

    For diagnostics such as Pareto k-hat; memory is K x B floats (the returned tensor, on
    top of the budget of one chunk).

    Under torchrun the datapoints are split across the processes, each evaluating its
    share with its own random draws, and every process returns the whole result in data order
    (:func:`split_datapoints`; a local guide is evaluated by process 0 alone).

    :param num_samples: K.
    :param batch_size: datapoints per chunk (None: the memory budget decides).
    :param memory_budget: bytes of working memory per chunk, or a size such as ``"2GiB"``
        (default: :func:`chunk_budget`).
    """
    return _chunked(model, guide, x, args, kwargs, num_samples, batch_size, progress=progress,
                    memory_budget=memory_budget, summarize=lambda t: t.log_weight,
                    join=lambda ws: torch.cat(ws))  # (K, B)


def _mean_over_draws(num_samples: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """Join per-chunk sums over draws into the mean over all K draws."""
    return lambda sums: torch.stack(sums).sum(0) / num_samples


def elbo(
    model: Callable, guide: Callable, x: torch.Tensor, *args, num_samples: int = 1,
    batch_size: int | None = None, progress: bool | str = False, memory_budget: int | str | None = None, **kwargs,
) -> torch.Tensor:
    """Per-datapoint ELBO ``E_q[log p(x, z) - log q(z | x)]``, Monte Carlo over ``num_samples`` draws.

    Under torchrun the datapoints are split across the processes, each evaluating its
    share with its own random draws, and every process returns the whole result in data order
    (:func:`split_datapoints`; a local guide is evaluated by process 0 alone).

    :param model: Pyro model keeping the data-plate contract.
    :param guide: Pyro guide with the same arguments.
    :param x: data, shape ``(N, ...)``; extra tensor arguments with first dimension N
        (e.g. labels of a conditional model) are sliced alongside.
    :param num_samples: draws per datapoint.
    :param batch_size: datapoints per chunk (None: the memory budget decides).
    :param memory_budget: bytes of working memory per chunk, or a size such as ``"2GiB"``
        (default: :func:`chunk_budget`, which reads ``VI_LAB_EVAL_MEMORY``).
    :returns: tensor ``(N,)`` in nats, higher is better.

    Example::

        vi_lab.evaluate.elbo(model, guide, x_test, num_samples=10).mean()
    """
    return _chunked(model, guide, x, args, kwargs, num_samples, batch_size, progress=progress,
                    memory_budget=memory_budget, summarize=lambda t: t.log_weight.sum(0),
                    join=_mean_over_draws(num_samples))


def log_likelihood(
    model: Callable, guide: Callable, x: torch.Tensor, *args, num_samples: int = 1000,
    batch_size: int | None = None, progress: bool | str = False, memory_budget: int | str | None = None, **kwargs,
) -> torch.Tensor:
    """Importance-sampled ``log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k | x)``, z_k ~ q.

    The log-mean-exp of K weights per datapoint, vectorized over K and the batch and
    chunked so that one chunk's working memory stays within a budget (K = 5000 is fine):
    all K draws of as many datapoints as fit, else K itself in pieces. With K = 1 it equals
    the single-sample ELBO on the same draw.

    Under torchrun the datapoints are split across the processes, each evaluating its
    share with its own random draws, and every process returns the whole result in data order
    (:func:`split_datapoints`; a local guide is evaluated by process 0 alone).

    :param num_samples: K.
    :param batch_size: datapoints per chunk (None: the memory budget decides).
    :param progress: show a progress bar of the weights drawn (a string names it).
    :param memory_budget: bytes of working memory per chunk, or a size such as ``"2GiB"``
        (default: :func:`chunk_budget`: half the free GPU memory, 64 MiB on a CPU, or
        ``VI_LAB_EVAL_MEMORY``).
    :returns: tensor ``(N,)`` in nats.

    Example::

        vi_lab.evaluate.log_likelihood(model, guide, x_test[:1000], num_samples=1000).mean()
    """

    def join(lses):
        return torch.stack(lses).logsumexp(0) - math.log(num_samples)  # (chunks, B) -> (B,)

    return _chunked(model, guide, x, args, kwargs, num_samples, batch_size, progress=progress,
                    memory_budget=memory_budget, summarize=lambda t: t.log_weight.logsumexp(0), join=join)


def elbo_terms(
    model: Callable, guide: Callable, x: torch.Tensor, *args, num_samples: int = 1,
    batch_size: int | None = None, progress: bool | str = False, memory_budget: int | str | None = None, **kwargs,
) -> dict[str, torch.Tensor]:
    """The ELBO split as reconstruction minus KL, per datapoint (Monte Carlo).

    Under torchrun the datapoints are split across the processes, each evaluating its
    share with its own random draws, and every process returns the whole result in data order
    (:func:`split_datapoints`; a local guide is evaluated by process 0 alone).

    :param batch_size: datapoints per chunk (None: the memory budget decides).
    :param memory_budget: bytes of working memory per chunk, or a size such as ``"2GiB"``.
    :returns: ``{"elbo", "reconstruction", "kl"}``, each ``(N,)`` in nats, with
        ``reconstruction = E_q[log p(x | z)]`` and ``kl = E_q[log q(z | x) - log p(z)]``.
    """

    def summarize(t):
        return torch.stack([t.log_lik.sum(0), (t.log_q - t.log_prior).sum(0)])  # (2, b): same draws for both

    rec, kl = _chunked(model, guide, x, args, kwargs, num_samples, batch_size, progress=progress,
                       memory_budget=memory_budget, summarize=summarize, join=_mean_over_draws(num_samples))
    return {"elbo": rec - kl, "reconstruction": rec, "kl": kl}
