"""fit(): stochastic variational inference with Pyro's ELBOs, checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import operator
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyro
import pyro.optim
import torch
from pyro.infer import ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoGuide
from tqdm.auto import tqdm

from vi_lab import checkpoint as ckpt
from vi_lab import distributed, evaluate
from vi_lab.contract import check_data, check_pair, check_row_shape, check_support
from vi_lab.data import BINARIZATIONS, DeviceBatches, binarize as binarize_fn, check_unit_interval
from vi_lab.device import resolve_device
from vi_lab.estimators import Estimator, prepare as prepare_estimator
from vi_lab.importance import OBJECTIVES
from vi_lab.objectives import LOSSES, make_loss, training_objective  # noqa: F401 (re-exported: vi_lab.infer.LOSSES)
from vi_lab.optim import Adam
from vi_lab.capture import CaptureRun, CaptureUnavailable
from vi_lab.step import TrainStep, make_optimizer

CHECKPOINT_NAME = "last.pt"
METRICS_NAME = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became NaN or infinite; carries where, and which checkpoint is still good."""

    def __init__(self, what: str, epoch: int, step: int, steps: int, checkpoint: Path | None,
                 loss: float = float("nan")) -> None:
        where = f"epoch {epoch}, step {step} of {steps}"
        if checkpoint is not None and checkpoint.exists():
            # fit() writes a checkpoint only after checking its parameters are finite
            kept = (f"the checkpoint of the last finished epoch is intact at {checkpoint}; resume from it with a "
                    f"lower lr")
        elif checkpoint is not None:
            kept = "no epoch had finished, so no checkpoint was written; start again with a lower lr"
        else:
            kept = "no checkpoint was written (pass checkpoint_dir= to keep one); start again with a lower lr"
        super().__init__(f"training diverged at {where}: {what}; training stopped, {kept}")
        self.loss, self.epoch, self.step, self.checkpoint = loss, epoch, step, checkpoint


class TrainingUnstable(UserWarning):
    """The training ELBO fell by orders of magnitude below where it started: the numbers are not trustworthy."""


#: an epoch whose loss exceeds the first steps' by this many times their size is warned about
EXPLOSION_FACTOR = 100.0

#: fit() settings a resumed run must share with its checkpoint (lr and epochs may change)
FIXED_ON_RESUME = ("loss", "objective", "kl_warmup", "estimator", "baseline", "num_particles", "batch_size",
                   "binarize", "data")


@dataclass
class FitResult:
    """What :func:`fit` returns.

    :ivar history: one dict per epoch: ``epoch``, ``train_elbo`` (nats per datapoint,
        the training objective averaged over the epoch), ``seconds``, and ``test_elbo``
        when ``eval_data`` was given.
    :ivar device: where training ran.
    :ivar checkpoint: path of the last checkpoint, if any.
    :ivar metrics_path: the JSON-lines file of per-epoch metrics, if any.
    :ivar captured_steps: steps replayed from a CUDA graph (``capture=True``); 0 when eager.
    :ivar world_size: processes that trained the model together (1 without torchrun).
    :ivar backend: their ``torch.distributed`` backend (``gloo``, ``nccl``), None for one process.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    device: str = "cpu"
    checkpoint: Path | None = None
    metrics_path: Path | None = None
    captured_steps: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def train_elbo(self) -> float:
        return self.history[-1]["train_elbo"] if self.history else float("nan")

    @property
    def seconds_per_epoch(self) -> float:
        # records may be epochs or points by samples seen (record_at); their seconds add up to the run's
        secs = [h["seconds"] for h in self.history]
        return sum(secs) / self.history[-1]["epoch"] if secs else float("nan")


def data_tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split training data into ``(x, extra)``: a tensor, a vi_lab Dataset (images), or a pair.

    :param data: what :func:`fit` accepts as data.
    :returns: ``(x, None)`` or ``(x, extra)``.
    """
    if hasattr(data, "images"):
        return data.images, None
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError("data as a tuple must be (x, extra), e.g. (images, labels)")
        return data[0], data[1]
    if torch.is_tensor(data):
        return data, None
    raise TypeError(f"data must be a tensor, a vi_lab Dataset or an (x, extra) pair, got {type(data).__name__}")


def _modules(*objs: Any) -> list[torch.nn.Module]:
    """The nn.Modules among ``objs``; a bound method counts as its module (``ae.model``)."""
    found: list[torch.nn.Module] = []
    for o in objs:
        o = o if isinstance(o, torch.nn.Module) else getattr(o, "__self__", o)
        if isinstance(o, torch.nn.Module) and all(o is not f for f in found):
            found.append(o)
    return found


def _settings(loss, estimator: str, baseline, num_particles: int, batch_size: int, binarize: str,
              x: torch.Tensor) -> dict[str, Any]:
    """What a checkpoint was trained with and a resumed run must keep (:data:`FIXED_ON_RESUME`)."""
    return {
        "loss": loss if isinstance(loss, str) else type(loss).__name__,
        "estimator": estimator, "baseline": baseline, "num_particles": num_particles, "batch_size": batch_size,
        "binarize": binarize,
        # the shape and a sum tell one dataset from another; the sum is compared with a tolerance
        # (summation order differs between devices)
        "data": {"shape": list(x.shape), "sum": float(x.double().sum())},
    }


def _same(key: str, then: Any, now: Any) -> bool:
    if key == "data":
        return then["shape"] == now["shape"] and math.isclose(then["sum"], now["sum"], rel_tol=1e-6, abs_tol=1e-6)
    return then == now


def _check_settings(saved: dict[str, Any] | None, now: dict[str, Any], path: Path) -> None:
    if saved is None:
        return  # a checkpoint from before settings were recorded
    changed = [k for k in FIXED_ON_RESUME if k in saved and not _same(k, saved[k], now[k])]
    if not changed:
        return
    what = "; ".join(
        f"the training data was {saved[k]['shape']} (sum {saved[k]['sum']:.6g}), now {now[k]['shape']} (sum "
        f"{now[k]['sum']:.6g})" if k == "data" else f"{k}={saved[k]!r} then, {k}={now[k]!r} now" for k in changed)
    raise ValueError(
        f"cannot resume {path}: {', '.join(changed)} cannot change on resume ({what}). Resume with what the "
        f"checkpoint was trained with, or start a new run (in another directory, or with --overwrite in the "
        f"examples); lr and epochs may change on resume.")


def _apply_current_hyperparameters(optim: pyro.optim.PyroOptim | Adam, saved: dict[str, Any]) -> None:
    """Put the optimizer arguments given now (lr, ...) into restored optimizer states.

    Pyro's ``set_state`` restores each parameter's torch state dict, hyperparameters included,
    so without this a resumed run would keep the lr it was started with whatever it is told.
    Learning-rate schedulers keep their own state (their schedule decides the lr).
    :class:`vi_lab.optim.Adam` keeps the settings given now by itself.
    """
    if isinstance(optim, Adam):
        return
    store = pyro.get_param_store()
    for name, state in saved.items():
        if "param_groups" not in state or name not in store._params:
            continue
        args = optim._get_optim_args(store._params[name])
        for group in state["param_groups"]:
            group.update({k: v for k, v in args.items() if k in group})


def _gathered_params(world: distributed.World) -> dict[str, torch.Tensor]:
    """The param store as one process would hold it: per-position baselines joined over ranks (last dim).

    A rank's losses are per datapoint of its own share, so its baselines are in units of its
    share (cost / n_rank); joined, they are put in the whole batch's units (cost / n_batch),
    as one process keeps them (:func:`_restore` converts back).
    """
    store = pyro.get_param_store()
    params = {k: v.detach().clone() for k, v in store._params.items()}
    if world.parallel:
        for name in sorted(k for k in params if k.startswith(distributed.PER_POSITION_PREFIX)):
            parts = distributed.all_gather_object(params[name].cpu(), "the gather of baseline averages")
            total = sum(p.shape[-1] for p in parts)
            params[name] = torch.cat([p * (p.shape[-1] / total) for p in parts], dim=-1).to(params[name].device)
    return params


def _state(model, guide, optim, epoch: int, history: list, settings: dict[str, Any],
           tally: "_Tally | None", world: distributed.World) -> dict[str, Any]:
    """What a checkpoint holds; under data parallelism every rank calls it (it gathers), rank 0 writes it."""
    store = pyro.get_param_store()
    return {
        "epoch": epoch,
        "history": history,
        "settings": settings,
        # with record_at, the averages since the last record (a resumed run's next record continues them)
        "tally": tally.state() if tally is not None else None,
        # module state dicts let a user load the weights without Pyro; the param store
        # (all of it: modules, pyro.param sites, baseline nets) is what resume restores
        "model": model.state_dict() if isinstance(model, torch.nn.Module) else None,
        "guide": guide.state_dict() if isinstance(guide, torch.nn.Module) else None,
        "param_store": {"params": _gathered_params(world), "constraints": dict(store._constraints)},
        "optim": optim.get_state(),
        "rng": ckpt.rng_state(),
        # every rank's random state, for a resume on as many processes (rank 0's is "rng")
        "rng_ranks": distributed.all_gather_object(ckpt.rng_state(), "the gather of random states")
        if world.parallel else None,
        "world_size": world.size,
    }


def _restore(state: dict[str, Any], model, guide, optim, step: TrainStep, first_args: tuple, path: Path) -> None:
    for label, obj in (("model", model), ("guide", guide)):
        if state.get(label) is not None and isinstance(obj, torch.nn.Module):
            try:
                obj.load_state_dict(state[label])
            except RuntimeError as err:
                raise ValueError(f"checkpoint {path} was written for a different {label}: {err}") from None
    # One evaluation registers every parameter the pair uses (pyro.module, pyro.param,
    # baselines) under its own tensor; the saved values are then copied *into* those
    # tensors, so modules hidden in plain functions stay tied to what the optimizer steps.
    pyro.clear_param_store()
    step.evaluate(*first_args)
    store = pyro.get_param_store()
    saved = state["param_store"]
    world = distributed.world()
    for name, value in saved["params"].items():
        per_position = name.startswith(distributed.PER_POSITION_PREFIX)
        if per_position and world.parallel:
            lo, hi = distributed.shard_bounds(value.shape[-1], world)  # this rank's batch positions
            value = value[..., lo:hi] * (value.shape[-1] / (hi - lo))  # in its share's units
        if name in store._params and not (per_position and store._params[name].shape != value.shape):
            with torch.no_grad():
                store._params[name].copy_(value)
        else:
            store._params[name] = value.to(first_args[0].device).clone().requires_grad_()
            store._constraints[name] = saved["constraints"][name]
            store._param_to_name[store._params[name]] = name
    _apply_current_hyperparameters(optim, state["optim"])
    optim.set_state(state["optim"])
    ckpt.set_rng_state(state["rng"])  # last: the registering evaluation drew random numbers


def adam(lr: float = 1e-3, **module_lrs: float) -> Adam:
    """Adam with one learning rate per network, for :func:`fit`'s ``optimizer``.

    Wake-sleep trains the generator and the recognition network at their own paces; both
    step in the one optimizer, each parameter with the learning rate of the network it is
    registered under (``pyro.module(name, ...)``: a vi_lab guide's ``name``, ``"guide"`` by
    default; a :class:`vi_lab.models.VAE`'s ``name``, ``"model"`` by default).

    :param lr: learning rate of every parameter not named in ``module_lrs``.
    :param module_lrs: ``name=lr`` for the networks that differ.
    :returns: a :class:`vi_lab.optim.Adam` (one torch Adam over all parameters, fused where
        torch has the kernel; its state reads and writes in ``pyro.optim``'s format).

    Example::

        fit(model, guide, x, loss="wake_sleep", optimizer=adam(1e-3, guide=3e-3))
    """
    # fit checks each name in module_lrs against the networks the pair registers
    return Adam(lr, module_lrs=module_lrs)


@dataclass
class _OwnLoss:
    """A loss that is not an ELBO (wake-sleep): it takes its own gradients, no estimator applies."""

    guide: Callable
    loss: Callable
    fixed_batch: bool = False


def _objective(guide, loss, estimator, baseline, num_particles: int, x_dim: int, dev, seed: int,
               objective: str = "elbo"):
    """The guide the step runs and the objective: an estimator made concrete for an ELBO, else the loss itself."""
    if objective != "elbo":
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; valid: elbo, {', '.join(OBJECTIVES)}")
        if loss != "trace" or estimator != "reparam" or baseline is not None:
            raise ValueError(f"objective={objective!r} is its own loss with reparameterized gradients: leave loss "
                             f"('trace'), estimator ('reparam') and baseline (None) at their defaults, got "
                             f"loss={_loss_label(loss)!r}, estimator={estimator!r}, baseline={baseline!r}")
        return _OwnLoss(guide, OBJECTIVES[objective](num_particles))
    resolved = make_loss(loss, num_particles) if isinstance(loss, str) else loss
    if isinstance(resolved, ELBO):
        # one lookup in vi_lab.estimators.ESTIMATORS: the Pyro objective and the guide it runs
        return prepare_estimator(guide, estimator, loss=loss, num_particles=num_particles, baseline=baseline,
                                 x_dim=x_dim, device=dev, seed=seed)
    if not callable(resolved):
        raise ValueError(f"loss must be a name in {sorted(LOSSES)}, a pyro.infer.ELBO or a callable "
                         f"loss(model, guide, *args) -> tensor, got {type(loss).__name__}")
    if estimator != "reparam" or baseline is not None:
        raise ValueError(f"loss {_loss_label(loss)} computes its own gradients: estimator={estimator!r} and "
                         f"baseline={baseline!r} apply to ELBO losses only; leave them at their defaults")
    return _OwnLoss(guide, resolved)


def training_step(model: Callable, guide: Callable, *, loss: str | ELBO | Callable = "trace",
                  estimator: str | Estimator = "reparam", baseline: str | None = None, lr: float = 1e-3,
                  optimizer: Any = None, num_particles: int = 1, x_dim: int | None = None,
                  device: torch.device | str | None = None, seed: int = 0, objective: str = "elbo") -> TrainStep:
    """The training step :func:`fit` runs for these settings (same arguments as fit's).

    ``benchmarks/step_time.py`` times this object against a hand-written PyTorch step.
    The estimator made concrete for the guide is kept as ``step.estimator``.

    Example::

        step = training_step(model, guide, lr=1e-3, x_dim=784)
        loss = step(x_batch)  # a 0-dim tensor: the batch's -ELBO per datapoint, after one update
    """
    est = _objective(guide, loss, estimator, baseline, num_particles, x_dim, device, seed, objective)
    step = TrainStep(model, est.guide, est.loss, make_optimizer(lr, optimizer), getattr(model, "site_scales", None))
    step.estimator = est
    return step


def _loss_label(loss: Any) -> str:
    if isinstance(loss, str):
        return loss
    own_repr = type(loss).__repr__ is not object.__repr__ and not isinstance(loss, ELBO)
    return repr(loss) if own_repr else type(loss).__name__


@dataclass
class _Data:
    """Training and held-out data on the training device, checked once."""

    x: torch.Tensor
    extra: torch.Tensor | None
    eval_x: torch.Tensor | None
    eval_extra: torch.Tensor | None
    transform: Callable | None
    device: torch.device
    world: distributed.World


def _prepare_data(model, guide, data, eval_data, device, binarize: str, seed: int) -> _Data:
    """Device and binarization, decided once for the run (held-out data: dynamic becomes static)."""
    x, extra = data_tensors(data)
    check_data(x, "data")
    check_row_shape(model, guide, x, "data")
    dev = resolve_device(device, x)
    world = distributed.setup(dev)  # joins the run's processes under torchrun; one process otherwise
    dev = distributed.local_device(dev, world)
    x = x.to(dev)
    extra = extra.to(dev) if extra is not None else None
    for m in _modules(model, guide):
        m.to(dev)
    transform = None if binarize == "none" else (lambda b: binarize_fn(b, binarize))
    if transform is not None:
        if binarize in BINARIZATIONS:  # every row, once: binarize reads x as probabilities
            check_unit_interval(x, "data", binarize)
        binarize_fn(x[:1], binarize)  # validate the mode before training starts
    eval_x, eval_extra = data_tensors(eval_data) if eval_data is not None else (None, None)
    if eval_x is not None:
        check_data(eval_x, "eval_data")
        if binarize != "none":
            check_unit_interval(eval_x, "eval_data", binarize)
        eval_x = heldout_binarized(eval_x.to(dev), binarize, seed)  # once: the held-out set is fixed
        eval_extra = eval_extra.to(dev) if eval_extra is not None else None
    return _Data(x, extra, eval_x, eval_extra, transform, dev, world)


def _record_marks(record_at: Any, per_epoch: int, epochs: int) -> list[int] | None:
    """Sample counts at which to record (sorted, the end of training included), or None: every epoch."""
    if record_at is None:
        return None
    try:
        items = list(record_at)
        marks = [operator.index(m) for m in items if not isinstance(m, bool)]
    except TypeError:
        items, marks = [None], []
    if not marks or len(marks) != len(items) or min(marks) < 1:
        raise ValueError(f"record_at must be a list of positive whole numbers of training samples seen, e.g. "
                         f"[1000, 10000], got {record_at!r}")
    total = epochs * per_epoch
    return sorted({m for m in marks if m < total} | {total})


class _Tally:
    """Per-datapoint averages of a step's monitored terms since the last record, and the time spent.

    :param state: what :meth:`state` saved in a checkpoint (a resumed run continues it), or None.
    """

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.sums: dict[str, float] = dict(state["sums"]) if state else {}
        self.n: int = state["n"] if state else 0
        self._before = (state["seconds"], state["cpu_seconds"]) if state else (0.0, 0.0)
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def add(self, terms: dict[str, float], n: int) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.n += n

    def means(self) -> dict[str, float]:
        return {k: v / self.n for k, v in self.sums.items()}

    def elapsed(self) -> tuple[float, float]:
        """Wall and CPU seconds since the last record."""
        return (self._before[0] + time.perf_counter() - self._t0,
                self._before[1] + time.process_time() - self._c0)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the sums so far and the time spent."""
        seconds, cpu_seconds = self.elapsed()
        return {"sums": dict(self.sums), "n": self.n, "seconds": seconds, "cpu_seconds": cpu_seconds}


def fit(
    model: Callable,
    guide: Callable,
    data: Any,
    *,
    loss: str | ELBO | Callable = "trace",
    objective: str = "elbo",
    kl_warmup: float = 0,
    estimator: str | Estimator = "reparam",
    baseline: str | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    device: str | torch.device | None = None,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    progress: bool | str = True,
    binarize: str = "none",
    eval_data: Any = None,
    eval_samples: int = 1,
    num_particles: int = 1,
    optimizer: Adam | pyro.optim.PyroOptim | None = None,
    metrics_path: str | Path | None = None,
    record_at: Any = None,
    capture: bool = False,
) -> FitResult:
    """Train a model/guide pair: vi_lab's one training loop.

    Minibatches are index slices of a device-side permutation of ``data``; each step
    (:class:`vi_lab.step.TrainStep`) differentiates the per-datapoint objective (see
    :func:`vi_lab.objectives.training_objective`) and steps one Adam over all parameters;
    Pyro's validation checks run on the first step only. The objective is an ELBO with any
    gradient estimator, or a loss that takes its own gradients (wake-sleep); models
    without latent variables (an autoencoder's reconstruction, a classifier) train by
    maximum likelihood with an empty guide through the same loop. After every epoch the
    metrics go to a JSON-lines file and, with ``checkpoint_dir``, a checkpoint (model,
    guide, free Pyro params, optimizer and RNG state) is written atomically, so
    ``resume=True`` continues exactly where it stopped: the resumed run's next loss
    equals the uninterrupted run's.

    :param model: Pyro model ``model(x[, extra])`` (an ``nn.Module``, a bound method of
        one, or any callable using ``pyro.module``/``pyro.param``).
    :param guide: Pyro guide with the model's arguments.
    :param data: tensor ``(N, ...)``, a :class:`vi_lab.data.Dataset`, or a pair
        ``(x, extra)`` whose ``extra`` (e.g. labels) is passed as the second argument.
    :param loss: a name in :data:`vi_lab.objectives.LOSSES` (``"trace"``: Trace_ELBO,
        ``"meanfield"``: analytic KL where available, ``"tracegraph"``, ``"wake_sleep"``,
        ``"rws"``), any ``pyro.infer.ELBO`` instance, or a callable
        ``loss(model, guide, *args) -> tensor`` that may leave its monitored numbers in a
        ``terms`` dict (as :class:`vi_lab.wake_sleep.ReweightedWakeSleep` does).
    :param objective: ``"elbo"`` (train ``loss``), or a tighter bound of
        :data:`vi_lab.importance.OBJECTIVES`: ``"iwae"``, the ``num_particles``-sample
        importance-weighted bound per datapoint (Burda et al., 2016; K = 1 is the ELBO), or
        ``"dreg"``, the same bound with the doubly-reparameterized guide gradient (Tucker et al.,
        2019). Both need reparameterized guide sites; ``train_bound`` joins the history (its
        ``train_elbo`` is the mean log weight of the same draws).
    :param kl_warmup: epochs over which the weight of the latent sites (``log p(z)`` and
        ``log q(z | x)``, so the KL term of the ELBO) rises linearly from 0 to 1, step by step
        (Bowman et al., 2016; Sonderby et al., 2016; the setup of Cremer et al., 2018); 0: none.
        The weight multiplies a beta-VAE's beta; ``kl_weight`` joins the history, and during the
        warm-up ``train_elbo`` is the weighted objective (``test_elbo`` is always the true ELBO).
    :param estimator: gradient estimator of an ELBO, a key of
        :data:`vi_lab.estimators.ESTIMATORS` (``"reparam"``, ``"reinforce"``,
        ``"reinforce_baseline"``, ``"relaxed"``, ``"enum"``) or a
        :class:`vi_lab.estimators.Estimator`; all but ``"reparam"`` pick their Pyro
        objective themselves (leave ``loss="trace"``).
    :param baseline: baseline of ``"reinforce_baseline"``: ``"decaying_avg"`` (default)
        or ``"nn"`` (a learned b(x) network, trained alongside).
    :param epochs: total epochs (a resumed run continues up to this number).
    :param batch_size: datapoints per step.
    :param lr: Adam learning rate (ignored when ``optimizer`` is given; per-network rates:
        ``optimizer=adam(lr, guide=guide_lr)``, see :func:`adam`).
    :param device: where to train: ``None`` keeps the data's device, ``"auto"`` picks
        ``cuda`` when available, else a device such as ``"cuda"`` or ``"cpu"``. Data,
        model and guide are moved there (and stay there afterwards).
    :param seed: seeds Pyro/torch/NumPy/random at the start of a fresh run.
    :param checkpoint_dir: where ``last.pt`` and ``metrics.jsonl`` go.
    :param resume: ``True`` to continue from ``checkpoint_dir/last.pt``, or a checkpoint path.
        The run continues with the ``lr`` (and optimizer arguments) given now; the loss,
        estimator, baseline, particles, batch size, binarization and data must be the
        checkpoint's (:data:`FIXED_ON_RESUME`, a ValueError names what differs).
        ``metrics.jsonl`` is cut back to the checkpoint's records. Without ``resume``, a
        ``checkpoint_dir`` (or ``metrics_path``) that already holds a run is refused
        (``FileExistsError``), so an earlier run is never overwritten.
    :param progress: ``True``: a tqdm bar with the running ELBO and one line per record;
        ``"epochs"``: the lines only; ``False``: nothing.
    :param binarize: a mode of :func:`vi_lab.data.binarize` applied per batch
        (``"dynamic"`` draws fresh binary images every epoch); held-out data is binarized
        once (dynamic becomes static, :func:`heldout_binarized`).
    :param eval_data: held-out data; its ELBO (true ELBO, ``eval_samples`` draws) is
        recorded as ``test_elbo`` with every record.
    :param num_particles: ELBO particles per step (vectorized); wake particles for ``"rws"``.
    :param optimizer: a :class:`vi_lab.optim.Adam` (:func:`adam`) or any ``pyro.optim``
        optimizer (``ClippedAdam``, a learning-rate scheduler, ...), stepped as SVI does.
    :param metrics_path: JSON-lines file (default ``checkpoint_dir/metrics.jsonl``).
    :param record_at: numbers of training samples seen at which to record a history entry
        (e.g. log-spaced, for learning curves by samples seen); default: the end of every
        epoch. The end of training is always recorded. Checkpoints stay at epoch ends and keep
        the averages since the last record, so a resumed run records what an uninterrupted one
        would; the end-of-training record of a run later resumed for more epochs stays in its
        history.
    :param capture: on a GPU, record one whole training step (forward, backward, Adam) as a
        CUDA graph after a validated first step, an audited second step
        (:class:`vi_lab.capture.SyncAudit`) and three warm-up steps, then replay it for every
        batch of the same shape: Python runs once, not every step; random draws are fresh at
        every replay; a ragged last batch runs eagerly on the same parameters. Losses are read
        back once per record instead of per step. Where capture cannot apply (another loss or
        estimator than ``trace`` with ``reparam``/``reinforce``/``relaxed``, a ``pyro.optim``
        optimizer, a pair that reads values back, no GPU) one :class:`vi_lab.capture.CaptureUnavailable`
        warning says why and training runs eagerly. See :mod:`vi_lab.capture`.
    Under ``torchrun --nproc_per_node=N`` (:mod:`vi_lab.distributed`) the N processes train
    one model: fit joins the process group itself (``gloo`` on a CPU, ``nccl`` on a GPU),
    every process starts from rank 0's parameters, each takes its contiguous share of every
    ``batch_size`` batch of rank 0's permutation, and one all-reduce per step makes the
    gradient the whole batch's; the recorded numbers are the whole batch's; rank 0 alone
    writes the checkpoint and metrics; a checkpoint resumes on any number of processes. A
    process that dies makes the others raise :class:`vi_lab.distributed.PeerLost`, naming the
    intact checkpoint. Pyro autoguides and ``capture`` are not combined with several processes.

    :returns: :class:`FitResult`; each history entry holds ``epoch``, ``samples_seen``,
        ``train_elbo`` (nats per datapoint, averaged since the previous entry), the loss's
        other terms (``model_loss``, ``guide_loss`` for wake-sleep), ``seconds``,
        ``cpu_seconds`` and, with ``eval_data``, ``test_elbo``.
    :raises TrainingDiverged: when the loss or the parameters become NaN or infinite (or a
        distribution rejects parameters that overflowed); the last checkpoint stays intact.
    :raises vi_lab.contract.ContractError: when the pair breaks the per-datapoint contract
        (checked once on the first batch, see :func:`vi_lab.contract.check_pair`).
    :raises vi_lab.checkpoint.CheckpointError: when a checkpoint cannot be written (disk
        full, read-only) or a resumed one is damaged.
    :warns TrainingUnstable: when an epoch's loss is orders of magnitude above the first steps'.

    Example::

        model, guide = VAE(latent_dim=20), make_guide("mean_field", latent_dim=20)
        result = fit(model, guide, x_train, epochs=10, batch_size=128, lr=1e-3,
                     binarize="dynamic", checkpoint_dir="runs/vae")
        print(result.train_elbo)  # nats per datapoint
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if optimizer is None and not (lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if progress not in (True, False, "epochs"):
        raise ValueError(f"progress must be True, False or 'epochs', got {progress!r}")
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    if isinstance(kl_warmup, bool) or not isinstance(kl_warmup, (int, float)) or not 0 <= kl_warmup < math.inf:
        raise ValueError(f"kl_warmup must be a number of epochs >= 0 (0: no warm-up), got {kl_warmup!r}")
    d = _prepare_data(model, guide, data, eval_data, device, binarize, seed)
    x, extra, transform, world = d.x, d.extra, d.transform, d.world
    if world.parallel:
        _check_parallel(guide, batch_size, x.shape[0], world)
    train_step = training_step(model, guide, loss=loss, estimator=estimator, baseline=baseline, lr=lr,
                               optimizer=optimizer, num_particles=num_particles, x_dim=x[0].numel(),
                               device=d.device, seed=seed, objective=objective)
    est, optim = train_step.estimator, train_step.optim
    # a loss with its own gradients and no KL term (wake-sleep); the bounds of objective= have one
    own_loss = isinstance(est, _OwnLoss) and objective == "elbo"
    averager = distributed.GradientAverager() if world.parallel else None
    train_step.reduce = averager
    if own_loss and getattr(model, "site_scales", None):
        raise ValueError(f"loss {_loss_label(loss)} has no KL term to weight: site scales {model.site_scales} "
                         "(beta) apply to ELBO losses only; build the model with beta=1")
    if own_loss and kl_warmup:
        raise ValueError(f"loss {_loss_label(loss)} has no KL term to warm up: kl_warmup applies to the ELBO and the "
                         f"importance-weighted objectives; leave kl_warmup=0")
    # Pyro keeps a decaying-average baseline per batch position: batches must not change size
    batches = DeviceBatches(x, batch_size, shuffle=True, transform=transform, extra=extra,
                            drop_last=est.fixed_batch and x.shape[0] >= batch_size, world=world)
    per_epoch = x.shape[0] if not batches.drop_last else len(batches) * batch_size
    marks = _record_marks(record_at, per_epoch, epochs)

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ckpt_path = ckpt_dir / CHECKPOINT_NAME if ckpt_dir is not None else None
    if metrics_path is None and ckpt_dir is not None:
        metrics_path = ckpt_dir / METRICS_NAME
    metrics_path = Path(metrics_path) if metrics_path is not None else None
    if not resume:
        distributed.main_decides(lambda: _refuse_existing_run(ckpt_path, metrics_path), "the check for an earlier run")

    _refuse_untrainable(model, guide, batch_size, x.shape[0])

    def door() -> tuple:
        """The contract, once, on a batch as the steps see it; returns that batch's arguments."""
        lo, hi = distributed.shard_bounds(min(batch_size, x.shape[0]), world)  # this rank's part of it
        x0 = transform(x[lo:hi]) if transform is not None else x[lo:hi]
        first = (x0, extra[lo:hi]) if extra is not None else (x0,)
        enumerated_ok = not isinstance(est, _OwnLoss) and isinstance(est.loss, TraceEnum_ELBO)
        pair = check_pair(model, guide, *first, enumerated_ok=enumerated_ok, what="data")
        _check_module_lrs(optim)  # the pair's networks are registered now
        if transform is None:
            check_support(pair, x, "data")
        if d.eval_x is not None:
            check_support(pair, d.eval_x, "eval_data")
        return first

    label = "own" if own_loss else estimator if isinstance(estimator, str) else est.estimator.label
    settings = _settings(_loss_label(loss), label, baseline, num_particles, batch_size, binarize, x)
    settings.update(objective=objective, kl_warmup=kl_warmup)
    settings.update(lr=lr if optimizer is None else None, seed=seed)  # recorded, free to change on resume
    if world.parallel:
        _check_same_data(settings["data"])


    start_epoch, history, partial = _begin(resume, ckpt_path, metrics_path, door, settings, model, guide, optim,
                                           train_step, seed, world)
    if ckpt_path is not None and world.main:
        ckpt.remove_temporaries(ckpt_path)  # left by a process killed mid-write
    saved_epoch = start_epoch if resume else None  # the epoch the checkpoint on disk holds

    modules = _modules(model, guide)
    for m in modules:
        m.zero_grad(set_to_none=True)  # stale gradients would bend the first step
    if capture and kl_warmup:
        warnings.warn("capture=True: the KL warm-up changes the step's weights every step, which a recorded CUDA "
                      "graph cannot; training eagerly instead", CaptureUnavailable, stacklevel=2)
        capture = False
    if capture and world.parallel:
        warnings.warn(f"capture=True: data-parallel training ({world.size} processes) is not captured; training "
                      f"eagerly instead", CaptureUnavailable, stacklevel=2)
        capture = False
    runner = CaptureRun(train_step, d.device) if capture else None
    progress = progress if world.main else False  # one rank prints
    run_step = runner if runner is not None else train_step
    unread: list[tuple[torch.Tensor, int, tuple]] = []  # captured steps' losses, not read back yet
    reference = None  # the loss of the run's first steps, to recognise an explosion
    seen = start_epoch * per_epoch
    next_mark = 0 if marks is None else sum(m <= seen for m in marks)
    tally = _Tally(partial if marks is not None else None)

    def save(epoch: int, partial: _Tally | None = None) -> None:  # partial: with record_at, the averages so far
        nonlocal saved_epoch
        state = _state(model, guide, optim, epoch, history, settings, partial, world)  # every rank: it gathers
        # rank 0 writes; a failure (disk full) is raised on every rank, and no rank moves on before it is written
        distributed.main_decides(lambda: ckpt.save_atomic(state, ckpt_path), "writing the checkpoint")
        saved_epoch = epoch

    def record(epoch: int) -> None:
        nonlocal tally
        seconds, cpu_seconds = tally.elapsed()
        # CPU seconds beside wall seconds: on a shared machine wall time alone misleads
        entry: dict[str, Any] = {"epoch": epoch, "samples_seen": seen, **tally.means(),
                                 "seconds": seconds, "cpu_seconds": cpu_seconds}
        if kl_warmup:
            entry["kl_weight"] = train_step.latent_weight.value
        _warn_if_exploding(entry, reference, history, optimizer is None and lr)
        if d.eval_x is not None:
            for m in modules:
                m.eval()
            eval_args = (d.eval_extra,) if d.eval_extra is not None else ()
            entry["test_elbo"] = evaluate.elbo(model, guide, d.eval_x, *eval_args,
                                               num_samples=eval_samples).mean().item()
            for m in modules:
                m.train()
        history.append(entry)
        if marks is None and ckpt_path is not None:
            # checkpoint first, then the metrics line: a crash between them leaves a line short,
            # never a line the checkpoint does not hold (resume rewrites the log from the checkpoint)
            save(epoch)
        if metrics_path is not None and world.main:
            _append_metrics(metrics_path, entry)
        if progress:
            where = f"epoch {epoch}" if marks is None else f"epoch {epoch}, {seen} samples"
            tail = f", test ELBO {entry['test_elbo']:.2f}" if "test_elbo" in entry else ""
            tqdm.write(f"{where}: train ELBO {entry['train_elbo']:.2f} nats/datapoint{tail} "
                       f"({entry['seconds']:.1f} s)")
        tally = _Tally()

    epoch = step = 0
    try:
        for epoch in range(start_epoch + 1, epochs + 1):
            for m in modules:
                m.train()
            bar = tqdm(batches, desc=f"epoch {epoch}/{epochs}", disable=progress is not True, leave=False)
            for step, batch in enumerate(bar, start=1):
                args = batch if isinstance(batch, tuple) else (batch,)
                where = (epoch, step, len(batches), ckpt_path)
                n = batches.rows(step - 1)  # the whole batch's rows (this rank's share is args[0])
                seen += n
                if averager is not None:
                    averager.weight = args[0].shape[0] / n
                if kl_warmup:  # linear in steps taken, so a resumed run continues the same schedule
                    taken = (epoch - 1) * len(batches) + step
                    train_step.latent_weight.value = min(1.0, taken / (kl_warmup * len(batches)))
                value = _step(run_step, args, model, guide, where)
                if runner is not None and runner.captured is not None:
                    unread.append((value.clone(), n, where))  # read back in bulk: a replay waits for nothing
                else:
                    terms = _terms(train_step, float(value), where)
                    tally.add(terms, n)
                    if reference is None:  # the loss before this run's first update
                        reference = -terms["train_elbo"]
                    bar.set_postfix(elbo=f"{tally.sums['train_elbo'] / tally.n:.2f}")
                if marks is not None and next_mark < len(marks) and seen >= marks[next_mark]:
                    _read_back(unread, train_step, tally, bar)
                    record(epoch)
                    while next_mark < len(marks) and marks[next_mark] <= seen:
                        next_mark += 1
            _read_back(unread, train_step, tally, bar)
            if _non_finite(model, guide, store=True):
                raise TrainingDiverged("a parameter became NaN or infinite", epoch, len(batches), len(batches),
                                       ckpt_path)
            if marks is None:
                record(epoch)
            elif ckpt_path is not None:
                save(epoch, tally)
    except distributed.PeerLost as err:
        kept = (f"the last checkpoint, {ckpt_path} (epoch {saved_epoch}), is intact: continue with resume=True "
                f"(--resume) on any number of processes" if saved_epoch else
                "no checkpoint was written yet" if ckpt_path is not None else "no checkpoint_dir was given")
        raise distributed.PeerLost(f"{err}, in epoch {epoch}, step {step}; {kept}") from err
    for m in modules:
        m.eval()
    written = ckpt_path if ckpt_path is not None and ckpt_path.is_file() else None  # none after 0 epochs
    return FitResult(history=history, device=str(d.device), checkpoint=written, metrics_path=metrics_path,
                     captured_steps=runner.captured.replays if runner is not None and runner.captured else 0,
                     world_size=world.size, backend=world.backend)


def _check_same_data(mine: dict[str, Any]) -> None:
    """Every process must hold the whole, same data (fit shares it out); raised on every rank when not."""
    datas = distributed.all_gather_object(mine, "the comparison of the training data")
    if not all(_same("data", datas[0], d) for d in datas):
        shown = "; ".join(f"rank {r}: {d['shape']} (sum {d['sum']:.6g})" for r, d in enumerate(datas))
        raise ValueError(f"the {len(datas)} processes were given different training data ({shown}); give every "
                         f"process all of it, the same: fit cuts each batch into the processes' shares itself")


def _check_parallel(guide, batch_size: int, num_data: int, world: distributed.World) -> None:
    """Refuse what data parallelism cannot do, before anything runs."""
    if min(batch_size, num_data) < world.size:
        what = f"batch_size={batch_size}" if batch_size <= num_data else f"the data's {num_data} rows"
        raise ValueError(f"{what} is fewer than the {world.size} processes training together: each takes a part of "
                         f"every batch; use batch_size >= {world.size} (the global batch) and at least as many rows")
    if isinstance(guide, AutoGuide):
        raise ValueError(f"{type(guide).__name__} keeps one row of parameters per batch position, and under data "
                         f"parallelism each of the {world.size} processes sees other rows; train it in one process, "
                         f"or use an amortized guide (vi_lab.make_guide)")


def _begin(resume, ckpt_path: Path | None, metrics_path: Path | None, door: Callable[[], tuple],
           settings: dict[str, Any], model, guide, optim, train_step: TrainStep,
           seed: int, world: distributed.World) -> tuple[int, list[dict[str, Any]], dict[str, Any] | None]:
    """Start a run: restore a checkpoint (``resume``) or seed a fresh one; the contract is checked
    either way (``door``). Returns the epoch reached, the history so far and, with ``record_at``,
    the averages since the last record.

    Under data parallelism rank 0 reads the checkpoint and shares it; a fresh run takes rank 0's
    initial parameters everywhere. Each rank draws from its own random stream: rank 0's is the
    one a single process would use, the others' are seeded from ``seed``, the epoch and the rank
    (or restored, when the checkpoint was written by as many processes)."""
    if resume:
        path = ckpt_path if resume is True else Path(resume)
        if path is None:
            raise ValueError("resume=True needs checkpoint_dir (or pass the checkpoint's path as resume=)")
        # on the CPU: load_state_dict and copy_ below put each tensor where its parameter is,
        # and torch's optimizer keeps its step counters on the CPU, as in a fresh run
        first = door()  # its draws come before the RNG state restored below
        state = distributed.main_decides(lambda: ckpt.load(path, map_location="cpu"), "reading the checkpoint")
        _check_settings(state.get("settings"), settings, path)
        _restore(state, model, guide, optim, train_step, first, path)
        if world.parallel and world.rank:
            saved = state.get("rng_ranks")
            if saved and len(saved) == world.size:
                ckpt.set_rng_state(saved[world.rank])
            else:  # written by another number of processes: a fresh stream for this rank
                pyro.set_rng_seed(_rank_seed(seed, state["epoch"], world.rank))
        history = list(state["history"])
        if metrics_path is not None and world.main:
            # a crash between the checkpoint and the metrics line, or after a line of an epoch
            # the checkpoint does not hold: the log restarts from what the checkpoint holds
            # (left alone when it says that already: a finished run may live in a read-only place)
            _write_metrics(metrics_path, history)
        return state["epoch"], history, state.get("tally")
    before = (ckpt.rng_state(), pyro.get_param_store().get_state())
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    # after the seed, so guides that set their parameters on first call (Pyro's autoguides) are
    # seeded; the RNG is then put back so training draws what it drew before the check existed
    rng = ckpt.rng_state()
    try:
        door()
    except Exception:
        ckpt.set_rng_state(before[0])  # refused: the caller's RNG and param store as they were
        pyro.clear_param_store()
        pyro.get_param_store().set_state(before[1])
        raise
    ckpt.set_rng_state(rng)
    if world.parallel:
        _share_parameters(model, guide)
        if world.rank:
            pyro.set_rng_seed(_rank_seed(seed, 0, world.rank))
    return 0, [], None


def _rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of rank ``rank``'s random stream when a run (re)starts at ``epoch`` (rank 0 keeps ``seed``)."""
    return (seed * 1_000_003 + epoch * 7_919 + rank) % 2**63


def _share_parameters(model, guide) -> None:
    """Every rank starts from rank 0's parameters (param store, in name order) and module buffers."""
    store = pyro.get_param_store()
    with torch.no_grad():
        for name in sorted(store._params):
            if not name.startswith(distributed.PER_POSITION_PREFIX):
                distributed.broadcast_(store._params[name].data, "the share of the initial parameters")
        for m in _modules(model, guide):
            for b in m.buffers():
                distributed.broadcast_(b.data, "the share of the initial parameters")


def _check_module_lrs(optim: Any) -> None:
    """A learning rate given for a network name the pair never registers would silently not apply."""
    wanted = getattr(optim, "module_lrs", None)
    if not wanted:
        return
    names = sorted({name.split("$$$")[0] for name in pyro.get_param_store().keys() if "$$$" in name})
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ValueError(f"adam() got learning rates for {', '.join(unknown)}, but the model and guide register "
                         f"their networks as {', '.join(names) or 'nothing (no pyro.module)'}; use those names")


def _step(run_step: Callable[..., torch.Tensor], args: tuple, model, guide, where: tuple) -> torch.Tensor:
    """One training step; returns its loss as a tensor (a ValueError of divergence becomes TrainingDiverged)."""
    epoch, step, steps, ckpt_path = where
    try:
        return run_step(*args)
    except ValueError as err:
        reason = _divergence(err, model, guide, trained=epoch > 1 or step > 1)
        if reason is None:
            raise
        raise TrainingDiverged(reason, epoch, step, steps, ckpt_path) from err


def _read_back(unread: list[tuple[torch.Tensor, int, tuple]], train_step: TrainStep, tally: _Tally, bar) -> None:
    """Read captured steps' losses back in one transfer, check them and add them to the tally."""
    if not unread:
        return
    values = torch.stack([u[0] for u in unread]).tolist()
    for value, (_, n, where) in zip(values, unread):
        tally.add(_terms(train_step, value, where), n)
    unread.clear()
    bar.set_postfix(elbo=f"{tally.sums['train_elbo'] / tally.n:.2f}")


def _terms(train_step: TrainStep, step_loss: float, where: tuple) -> dict[str, float]:
    """A step's monitored terms (``train_elbo``, and the loss's own ``terms``), checked to be finite."""
    epoch, step, steps, ckpt_path = where
    terms = dict(getattr(train_step.loss, "terms", None) or {})
    # the loss's own terms name the culprit (the model or the guide loss), then its ELBO estimate
    named = [(k.replace("_", " "), v) for k, v in terms.items() if k != "train_elbo"]
    named += [("training ELBO", terms["train_elbo"])] if "train_elbo" in terms else []
    for name, value in (*named, ("loss", step_loss)):
        if not math.isfinite(value):
            raise TrainingDiverged(f"the {name} became {value}", epoch, step, steps, ckpt_path, loss=value)
    terms.setdefault("train_elbo", -step_loss)
    return terms


def _refuse_untrainable(model, guide, batch_size: int, num_data: int) -> None:
    """Refuse, before anything runs, a pair whose parameters are not finite or a non-amortized
    Pyro autoguide on minibatches (its rows belong to batch positions, not datapoints)."""
    bad = _non_finite(model, guide)
    if bad:
        raise ValueError(f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold NaN or infinite values before "
                         f"training: the model or guide comes broken (e.g. from a diverged run); build them afresh "
                         f"or load finite weights")
    if isinstance(guide, AutoGuide) and batch_size < num_data:
        raise ValueError(
            f"{type(guide).__name__} is not amortized: it keeps one row of parameters per position in the batch it "
            f"was first run on, so minibatches of {batch_size} out of {num_data} datapoints would share rows "
            f"between different datapoints. Train it on the whole data (batch_size={num_data}), or use an "
            f"amortized guide (vi_lab.make_guide).")


def _refuse_existing_run(ckpt_path: Path | None, metrics_path: Path | None) -> None:
    held = [p for p in (ckpt_path, metrics_path) if p is not None and p.is_file() and p.stat().st_size > 0]
    if held:
        where = ckpt_path.parent if ckpt_path is not None else metrics_path.parent
        raise FileExistsError(
            f"{where} already holds a run ({', '.join(p.name for p in held)}); nothing was changed. Pass "
            f"resume=True to continue it (--resume), remove those files to replace it (--overwrite), or choose "
            f"another directory.")


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in history)
    if path.is_file() and path.read_text() == text:
        return
    ckpt.write_text_atomic(path, text, what="metrics log")


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise ckpt.CheckpointWriteError(f"could not append to {path}: {ckpt.describe_os_error(err)}") from err


def _divergence(err: ValueError, model, guide, trained: bool) -> str | None:
    """Why a ValueError from a step is divergence, or None when it is not (a bug to re-raise)."""
    if _non_finite(model, guide, store=True):
        return "a parameter became NaN or infinite"
    text = str(err)
    # with validation on, parameters that overflowed surface as a distribution's invalid
    # arguments; before any step was taken such an error is the pair's own bug, not divergence
    if trained and "invalid values" in text and any(w in text for w in ("nan", "inf")):
        return ("a distribution got NaN or infinite arguments (the networks' outputs overflowed): "
                + text.splitlines()[0][:200].rstrip(":"))
    return None


def _warn_if_exploding(record: dict[str, Any], reference: float | None, history: list, lr: float | None) -> None:
    """Warn when an epoch's loss is orders of magnitude above the run's first step or best epoch (lr too large)."""
    candidates = [reference] if reference is not None else []
    candidates += [-h["train_elbo"] for h in history if math.isfinite(h["train_elbo"])]
    if not candidates:
        return
    reference = min(candidates)
    loss = -record["train_elbo"]
    if loss - reference > EXPLOSION_FACTOR * max(abs(reference), 1.0):
        hint = f" (lr {lr:g} is probably too large)" if lr else ""
        warnings.warn(
            f"epoch {record['epoch']}: train ELBO {record['train_elbo']:.4g} nats/datapoint is far below the "
            f"{-reference:.4g} it reached before: the optimization is unstable{hint}, and its numbers are not "
            f"trustworthy", TrainingUnstable, stacklevel=3)
        record["unstable"] = True


def _non_finite(*objs: Any, store: bool = False) -> list[str]:
    """Names of the modules' parameters (and with ``store``, Pyro's params) holding NaN or inf."""
    named = [(f"{type(m).__name__}.{n}", p) for m in _modules(*objs) for n, p in m.named_parameters()]
    if store:
        named += list(pyro.get_param_store().items())
    return [name for name, t in named if not t.is_meta and not bool(torch.isfinite(t).all())]


def heldout_binarized(x: torch.Tensor, mode: str, seed: int = 0) -> torch.Tensor:
    """Held-out data as every evaluation sees it: binarized once, so epochs and runs compare.

    A dynamic binarization (fresh draws per batch in training) becomes a static one (one
    draw seeded by the run's ``seed + 1``, apart from the training draws) for held-out data;
    the other modes apply as they are. The one place this rule lives: :func:`fit` and the
    command line both call it.

    :param x: held-out data in [0, 1].
    :param mode: the training binarization, a key of :data:`vi_lab.data.BINARIZATIONS`.
    :param seed: the run's seed.
    """
    if mode == "none":
        return x
    return binarize_fn(x, "static" if mode == "dynamic" else mode, seed=seed + 1)
