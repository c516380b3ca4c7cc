"""fit(): stochastic variational inference with Pyro's ELBOs, checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoGuide
from tqdm.auto import tqdm

from vi_lab import checkpoint as ckpt
from vi_lab import evaluate
from vi_lab.contract import check_data, check_pair, check_row_shape, check_support
from vi_lab.data import BINARIZATIONS, DeviceBatches, binarize as binarize_fn, check_unit_interval
from vi_lab.device import resolve_device
from vi_lab.estimators import Estimator, prepare as prepare_estimator
from vi_lab.objectives import LOSSES, make_loss, training_objective  # noqa: F401 (re-exported: vi_lab.infer.LOSSES)

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
FIXED_ON_RESUME = ("loss", "estimator", "baseline", "num_particles", "batch_size", "binarize", "data")


@dataclass
class FitResult:
    """What :func:`fit` returns.

    :ivar history: one dict per epoch: ``epoch``, ``train_elbo`` (nats per datapoint,
        the training objective averaged over the epoch), ``seconds``, and ``test_elbo``
        when ``eval_data`` was given.
    :ivar device: where training ran.
    :ivar checkpoint: path of the last checkpoint, if any.
    :ivar metrics_path: the JSON-lines file of per-epoch metrics, if any.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    device: str = "cpu"
    checkpoint: Path | None = None
    metrics_path: Path | None = None

    @property
    def train_elbo(self) -> float:
        return self.history[-1]["train_elbo"] if self.history else float("nan")

    @property
    def seconds_per_epoch(self) -> float:
        secs = [h["seconds"] for h in self.history]
        return sum(secs) / len(secs) if secs else float("nan")


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
    return [o for o in objs if isinstance(o, torch.nn.Module)]


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


def _apply_current_hyperparameters(optim: pyro.optim.PyroOptim, saved: dict[str, Any]) -> None:
    """Put the optimizer arguments given now (lr, ...) into restored optimizer states.

    Pyro's ``set_state`` restores each parameter's torch state dict, hyperparameters included,
    so without this a resumed run would keep the lr it was started with whatever it is told.
    Learning-rate schedulers keep their own state (their schedule decides the lr).
    """
    store = pyro.get_param_store()
    for name, state in saved.items():
        if "param_groups" not in state or name not in store._params:
            continue
        args = optim._get_optim_args(store._params[name])
        for group in state["param_groups"]:
            group.update({k: v for k, v in args.items() if k in group})


def _state(model, guide, optim, epoch: int, history: list, settings: dict[str, Any]) -> dict[str, Any]:
    store = pyro.get_param_store()
    return {
        "epoch": epoch,
        "history": history,
        "settings": settings,
        # module state dicts let a user load the weights without Pyro; the param store
        # (all of it: modules, pyro.param sites, baseline nets) is what resume restores
        "model": model.state_dict() if isinstance(model, torch.nn.Module) else None,
        "guide": guide.state_dict() if isinstance(guide, torch.nn.Module) else None,
        "param_store": {"params": {k: v.detach().clone() for k, v in store._params.items()},
                        "constraints": dict(store._constraints)},
        "optim": optim.get_state(),
        "rng": ckpt.rng_state(),
    }


def _restore(state: dict[str, Any], model, guide, optim, svi: SVI, first_args: tuple, path: Path) -> None:
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
    with torch.no_grad():
        svi.evaluate_loss(*first_args)
    store = pyro.get_param_store()
    saved = state["param_store"]
    for name, value in saved["params"].items():
        if name in store._params:
            with torch.no_grad():
                store._params[name].copy_(value)
        else:
            store._params[name] = value.to(first_args[0].device).requires_grad_()
            store._constraints[name] = saved["constraints"][name]
            store._param_to_name[store._params[name]] = name
    _apply_current_hyperparameters(optim, state["optim"])
    optim.set_state(state["optim"])
    ckpt.set_rng_state(state["rng"])  # last: the registering evaluation drew random numbers


def fit(
    model: Callable,
    guide: Callable,
    data: Any,
    *,
    loss: str | ELBO = "trace",
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
    optimizer: pyro.optim.PyroOptim | None = None,
    metrics_path: str | Path | None = None,
) -> FitResult:
    """Train a model/guide pair by stochastic variational inference.

    Minibatches are index slices of a device-side permutation of ``data``; each step
    runs Pyro's ``SVI.step`` on the per-datapoint objective (see
    :func:`training_objective`). After every epoch the metrics go to a JSON-lines file
    and, with ``checkpoint_dir``, a checkpoint (model, guide, free Pyro params,
    optimizer and RNG state) is written atomically, so ``resume=True`` continues exactly
    where it stopped: the resumed run's next loss equals the uninterrupted run's.

    :param model: Pyro model ``model(x[, extra])`` (an ``nn.Module`` or any callable using
        ``pyro.module``/``pyro.param``).
    :param guide: Pyro guide with the model's arguments.
    :param data: tensor ``(N, ...)``, a :class:`vi_lab.data.Dataset`, or a pair
        ``(x, extra)`` whose ``extra`` (e.g. labels) is passed as the second argument.
    :param loss: ``"trace"`` (Trace_ELBO), ``"meanfield"`` (TraceMeanField_ELBO, analytic
        KL where available), ``"tracegraph"``, or any ``pyro.infer.ELBO`` instance.
    :param estimator: gradient estimator, a key of :data:`vi_lab.estimators.ESTIMATORS`
        (``"reparam"``, ``"reinforce"``, ``"reinforce_baseline"``, ``"relaxed"``, ``"enum"``)
        or a :class:`vi_lab.estimators.Estimator`; all but ``"reparam"`` pick their Pyro
        objective themselves (leave ``loss="trace"``).
    :param baseline: baseline of ``"reinforce_baseline"``: ``"decaying_avg"`` (default)
        or ``"nn"`` (a learned b(x) network, trained alongside).
    :param epochs: total epochs (a resumed run continues up to this number).
    :param batch_size: datapoints per step.
    :param lr: Adam learning rate (ignored when ``optimizer`` is given).
    :param device: where to train: ``None`` keeps the data's device, ``"auto"`` picks
        ``cuda`` when available, else a device such as ``"cuda"`` or ``"cpu"``. Data,
        model and guide are moved there (and stay there afterwards).
    :param seed: seeds Pyro/torch/NumPy/random at the start of a fresh run.
    :param checkpoint_dir: where ``last.pt`` and ``metrics.jsonl`` go.
    :param resume: ``True`` to continue from ``checkpoint_dir/last.pt``, or a checkpoint path.
        The run continues with the ``lr`` (and optimizer arguments) given now; the loss,
        estimator, baseline, particles, batch size, binarization and data must be the
        checkpoint's (:data:`FIXED_ON_RESUME`, a ValueError names what differs).
        ``metrics.jsonl`` is cut back to the checkpoint's epochs. Without ``resume``, a
        ``checkpoint_dir`` (or ``metrics_path``) that already holds a run is refused
        (``FileExistsError``), so an earlier run is never overwritten.
    :param progress: ``True``: a tqdm bar with the running ELBO and one line per epoch;
        ``"epochs"``: the lines only; ``False``: nothing.
    :param binarize: a mode of :func:`vi_lab.data.binarize` applied per batch
        (``"dynamic"`` draws fresh binary images every epoch).
    :param eval_data: held-out data; its ELBO (true ELBO, ``eval_samples`` draws) is
        recorded as ``test_elbo`` after each epoch.
    :param num_particles: ELBO particles per step (vectorized).
    :param optimizer: a Pyro optimizer instead of ``Adam(lr)``.
    :param metrics_path: JSON-lines file (default ``checkpoint_dir/metrics.jsonl``).
    :returns: :class:`FitResult`.
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
    x, extra = data_tensors(data)
    check_data(x, "data")
    check_row_shape(model, guide, x, "data")
    dev = resolve_device(device, x)
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
        eval_x = _eval_binarized(eval_x.to(dev), binarize)  # once: the held-out set is fixed
        eval_extra = eval_extra.to(dev) if eval_extra is not None else None
    # one lookup in vi_lab.estimators.ESTIMATORS: the Pyro objective and the guide it runs
    est = prepare_estimator(guide, estimator, loss=loss, num_particles=num_particles, baseline=baseline,
                            x_dim=x[0].numel(), device=dev, seed=seed)
    # Pyro keeps a decaying-average baseline per batch position: batches must not change size
    batches = DeviceBatches(x, batch_size, shuffle=True, transform=transform, extra=extra,
                            drop_last=est.fixed_batch and x.shape[0] >= batch_size)

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ckpt_path = ckpt_dir / CHECKPOINT_NAME if ckpt_dir is not None else None
    if metrics_path is None and ckpt_dir is not None:
        metrics_path = ckpt_dir / METRICS_NAME
    metrics_path = Path(metrics_path) if metrics_path is not None else None
    if not resume:
        _refuse_existing_run(ckpt_path, metrics_path)

    _refuse_untrainable(model, guide, batch_size, x.shape[0])

    def door() -> tuple:
        """The contract, once, on a batch as the steps see it; returns that batch's arguments."""
        x0 = transform(x[:batch_size]) if transform is not None else x[:batch_size]
        first = (x0, extra[:batch_size]) if extra is not None else (x0,)
        pair = check_pair(model, guide, *first, enumerated_ok=isinstance(est.loss, TraceEnum_ELBO), what="data")
        if transform is None:
            check_support(pair, x, "data")
        if eval_x is not None:
            check_support(pair, eval_x, "eval_data")
        return first

    settings = _settings(loss, estimator if isinstance(estimator, str) else est.estimator.label, baseline,
                         num_particles, batch_size, binarize, x)
    settings.update(lr=lr if optimizer is None else None, seed=seed)  # recorded, free to change on resume

    optim = optimizer if optimizer is not None else pyro.optim.Adam({"lr": lr})
    svi = SVI(
        training_objective(model, getattr(model, "site_scales", None)),
        training_objective(est.guide, getattr(model, "site_scales", None)),
        optim,
        est.loss,
    )

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume:
        path = ckpt_path if resume is True else Path(resume)
        if path is None:
            raise ValueError("resume=True needs checkpoint_dir (or pass the checkpoint's path as resume=)")
        # on the CPU: load_state_dict and copy_ below put each tensor where its parameter is,
        # and torch's optimizer keeps its step counters on the CPU, as in a fresh run
        first = door()  # its draws come before the RNG state restored below
        state = ckpt.load(path, map_location="cpu")
        _check_settings(state.get("settings"), settings, path)
        _restore(state, model, guide, optim, svi, first, path)
        start_epoch, history = state["epoch"], list(state["history"])
        if metrics_path is not None:
            # a crash between the checkpoint and the metrics line, or after a line of an epoch
            # the checkpoint does not hold: the log restarts from what the checkpoint holds
            # (left alone when it says that already: a finished run may live in a read-only place)
            _write_metrics(metrics_path, history)
    else:
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
    if ckpt_path is not None:
        ckpt.remove_temporaries(ckpt_path)  # left by a process killed mid-write

    for m in _modules(model, guide):
        m.zero_grad(set_to_none=True)  # SVI adds to .grad: stale gradients would bend the first step
    reference = None  # the loss of the run's first steps, to recognise an explosion
    for epoch in range(start_epoch + 1, epochs + 1):
        for m in _modules(model, guide):
            m.train()
        t0, c0 = time.perf_counter(), time.process_time()
        total, seen = 0.0, 0
        bar = tqdm(batches, desc=f"epoch {epoch}/{epochs}", disable=progress is not True, leave=False)
        for step, batch in enumerate(bar, start=1):
            args = batch if isinstance(batch, tuple) else (batch,)
            try:
                step_loss = svi.step(*args)
            except ValueError as err:
                reason = _divergence(err, model, guide, trained=epoch > 1 or step > 1)
                if reason is None:
                    raise
                raise TrainingDiverged(reason, epoch, step, len(batches), ckpt_path) from err
            if not math.isfinite(step_loss):
                raise TrainingDiverged(f"the loss became {step_loss}", epoch, step, len(batches), ckpt_path,
                                       loss=step_loss)
            n = args[0].shape[0]
            total, seen = total - step_loss * n, seen + n
            if reference is None:  # the loss before this run's first update
                reference = step_loss
            bar.set_postfix(elbo=f"{total / seen:.2f}")
        if _non_finite(model, guide, store=True):
            raise TrainingDiverged("a parameter became NaN or infinite", epoch, len(batches), len(batches),
                                   ckpt_path)
        # CPU seconds beside wall seconds: on a shared machine wall time alone misleads
        record: dict[str, Any] = {"epoch": epoch, "train_elbo": total / seen,
                                  "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
        _warn_if_exploding(record, reference, history, optimizer is None and lr)
        if eval_x is not None:
            for m in _modules(model, guide):
                m.eval()
            eval_args = (eval_extra,) if eval_extra is not None else ()
            record["test_elbo"] = evaluate.elbo(model, guide, eval_x, *eval_args,
                                                num_samples=eval_samples).mean().item()
        history.append(record)
        # checkpoint first, then the metrics line: a crash between them leaves a line short,
        # never a line the checkpoint does not hold (resume rewrites the log from the checkpoint)
        if ckpt_path is not None:
            ckpt.save_atomic(_state(model, guide, optim, epoch, history, settings), ckpt_path)
        if metrics_path is not None:
            _append_metrics(metrics_path, record)
        if progress:
            tail = f", test ELBO {record['test_elbo']:.2f}" if "test_elbo" in record else ""
            tqdm.write(f"epoch {epoch}: train ELBO {record['train_elbo']:.2f} nats/datapoint{tail} "
                       f"({record['seconds']:.1f} s)")
    for m in _modules(model, guide):
        m.eval()
    written = ckpt_path if ckpt_path is not None and ckpt_path.is_file() else None  # none after 0 epochs
    return FitResult(history=history, device=str(dev), checkpoint=written, metrics_path=metrics_path)


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


def _eval_binarized(x: torch.Tensor, mode: str) -> torch.Tensor:
    # held-out data must be fixed across epochs to compare them: a dynamic
    # binarization is replaced by a static one for evaluation
    if mode == "none":
        return x
    return binarize_fn(x, "static" if mode == "dynamic" else mode)
