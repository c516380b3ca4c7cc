"""Wake-sleep and reweighted wake-sleep, and AEVB, in one two-optimizer training loop.

Wake-sleep (Hinton et al., 1995) trains the generator p(x, z) and the recognition
network q(z | x) on *different* objectives:

* **wake phase**: draw z ~ q(z | x) for each datapoint and, holding z fixed as imputed
  data, raise ``log p(x, z)`` in the generator's parameters only;
* **sleep phase**: dream pairs (z, x~) ~ p(z) p(x | z) from the model and raise
  ``log q(z | x~)`` in the recognition network's parameters only: the encoder is
  trained on fake data, never on the training set.

Reweighted wake-sleep (Bornschein & Bengio, 2015; Le et al., 2019) draws K particles
in the wake phase: the generator climbs the K-sample importance-weighted bound and the
guide may also learn in the wake phase from self-normalized weights ("wake-phi",
mixed with sleep by ``insomnia``). Classic wake-sleep is the special case K = 1,
insomnia = 0. AEVB (Kingma & Welling, 2014) trains both networks on the one ELBO with
reparameterized gradients; it runs here through Pyro's own ``Trace_ELBO`` so the three
algorithms share batching, optimizers and the evaluation schedule (the comparison of
Kingma & Welling's Figure 2).

Why not ``pyro.infer.ReweightedWakeSleep`` as it is: it sums each particle's log weight
over the whole minibatch before the log-sum-exp ("mini-batch training is not supported
yet" in its docstring), so with B datapoints it weighs K joint particles of the batch
instead of K particles per datapoint, and its weights degenerate as B grows. The
estimator here is the same per datapoint: with a batch of one it reproduces Pyro's
losses and gradients exactly (``tests/test_wake_sleep.py``). Pyro's class also needs a
guide that reads dreamed observations from an ``observations=`` keyword; vi_lab's
guides take x positionally, and would silently see the data instead.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from torch import nn
from tqdm.auto import tqdm

from vi_lab import evaluate
from vi_lab.contract import check_data, check_row_shape
from vi_lab.data import BINARIZATIONS, DeviceBatches, binarize as binarize_fn, check_unit_interval
from vi_lab.device import resolve_device
from vi_lab.infer import FitResult, TrainingDiverged, data_tensors
from vi_lab.objectives import make_loss, training_objective


class PhaseLosses(NamedTuple):
    """The two losses of one step, each a scalar in nats per datapoint.

    ``model_loss`` carries gradient only to the generator, ``guide_loss`` only to the
    recognition network (for AEVB both are the same -ELBO). ``train_elbo`` is a
    detached estimate of the batch's mean ELBO (or the training objective for AEVB),
    for monitoring.
    """

    model_loss: torch.Tensor
    guide_loss: torch.Tensor
    train_elbo: float


def _single_observed_site(trace) -> str:
    names = [n for n, s in trace.nodes.items() if s["type"] == "sample" and s["infer"].get("was_observed")]
    if len(names) != 1:
        raise ValueError(f"wake-sleep dreams one observed site x for the guide to read; the model has {names}")
    return names[0]


def _tile(a: Any, k: int, batch: int) -> Any:
    """Repeat a batch-first tensor argument k times along dim 0 (``(B, ...) -> (k*B, ...)``)."""
    if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == batch:
        return a.repeat(k, *([1] * (a.dim() - 1)))
    return a


class ReweightedWakeSleep:
    """Reweighted wake-sleep with per-datapoint importance weights; K = 1, insomnia = 0 is wake-sleep.

    For a batch x of B datapoints, with K draws ``z_k ~ q(z | x)`` held fixed
    (detached) and weights ``log w_k = log p(x, z_k) - log q(z_k | x)``:

    * wake-theta (generator): ``-mean_b [logsumexp_k log w_kb - log K]``, gradient in the
      model's parameters only (z and log q are constants);
    * wake-phi (guide): ``-mean_b sum_k w~_kb log q(z_kb | x_b)`` with self-normalized
      weights ``w~`` (constants);
    * sleep-phi (guide): ``-mean log q(z~ | x~)`` over ``num_sleep_particles * B``
      dreamed pairs ``(z~, x~) ~ p(z) p(x | z)``;
    * guide loss: ``insomnia * wake_phi + (1 - insomnia) * sleep_phi``.

    :param num_particles: K wake particles per datapoint.
    :param insomnia: weight of wake-phi against sleep-phi, in [0, 1]; 1 uses no dreams,
        0 is the sleep phase alone (classic wake-sleep).
    :param num_sleep_particles: dreams per datapoint of the batch (default: K).

    Example::

        classic = ReweightedWakeSleep(num_particles=1, insomnia=0.0)
        losses = classic(model, guide, x_batch)
        losses.model_loss.backward()  # gradients in the generator only
    """

    def __init__(self, num_particles: int = 5, insomnia: float = 1.0, num_sleep_particles: int | None = None) -> None:
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        if not 0.0 <= insomnia <= 1.0:
            raise ValueError(f"insomnia must be in [0, 1] (1: wake-phi only, 0: sleep only), got {insomnia!r}")
        if insomnia > 0 and num_particles < 2:
            raise ValueError("wake-phi (insomnia > 0) needs num_particles >= 2: with one particle the "
                             "self-normalized weight is 1 and the guide gets no signal; use insomnia=0")
        sleep = num_particles if num_sleep_particles is None else num_sleep_particles
        if not isinstance(sleep, int) or sleep < 1:
            raise ValueError(f"num_sleep_particles must be a positive integer, got {num_sleep_particles!r}")
        self.num_particles, self.insomnia, self.num_sleep_particles = num_particles, float(insomnia), sleep
        self._nesting: int | None = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_particles={self.num_particles}, insomnia={self.insomnia}, "
                f"num_sleep_particles={self.num_sleep_particles})")

    def _plate_nesting(self, model, guide, x, args) -> int:
        if self._nesting is None:  # static structure assumed, as in Pyro's ELBOs
            self._nesting = evaluate.max_plate_nesting(model, guide, x, *args)
        return self._nesting

    def wake(self, model: Callable, guide: Callable, x: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Wake phase: ``(wake_theta_loss, wake_phi_loss, log_weight (K, B) detached)``.

        :param x: batch ``(B, ...)``; ``args`` are passed to model and guide (e.g. labels).
        """
        nesting = self._plate_nesting(model, guide, x, args)
        with pyro.plate("_wake_particles", self.num_particles, dim=-(nesting + 1)):
            guide_trace = poutine.trace(guide).get_trace(x, *args)
            guide_trace.detach_()  # z is imputed data: no pathwise gradient into the guide
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, *args)
        guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
        log_joint = sum(evaluate.site_log_prob(s, nesting + 1) for s in model_trace.nodes.values()
                        if s["type"] == "sample")  # (K, B), gradient in theta only
        log_q = sum(evaluate.site_log_prob(s, nesting + 1) for s in guide_trace.nodes.values()
                    if s["type"] == "sample")  # (K, B), gradient in phi only
        log_w = log_joint - log_q.detach()
        log_norm = log_w.logsumexp(0)  # (B,)
        wake_theta = -(log_norm - math.log(self.num_particles)).mean()
        snis = (log_w - log_norm).exp().detach()  # (K, B) self-normalized weights
        wake_phi = -(snis * log_q).sum(0).mean()
        return wake_theta, wake_phi, log_w.detach()

    def sleep(self, model: Callable, guide: Callable, x: torch.Tensor, *args) -> torch.Tensor:
        """Sleep phase: ``-mean log q(z~ | x~)`` over pairs dreamed from the model.

        ``x`` only sets the batch size B (and ``args``, e.g. labels, what to condition
        the dreams on); the guide never sees it. Dreams come as ``(S, B, ...)`` and are
        flattened to ``(S*B, ...)`` for the guide, whose plate is read from its input.
        """
        nesting = self._plate_nesting(model, guide, x, args)
        s, batch = self.num_sleep_particles, x.shape[0]
        with torch.no_grad(), pyro.plate("_sleep_particles", s, dim=-(nesting + 1)):
            dream = prune_subsample_sites(poutine.trace(poutine.uncondition(model)).get_trace(x, *args))
        obs = _single_observed_site(dream)
        x_dream = dream.nodes[obs]["value"].reshape(s * batch, *x.shape[1:])  # (S*B, ...)
        latents = {name: site["value"].reshape(s * batch, *site["value"].shape[nesting + 1:])  # (S*B, ...)
                   for name, site in dream.nodes.items()
                   if site["type"] == "sample" and name != obs and not site["infer"].get("was_observed")}
        tiled = tuple(_tile(a, s, batch) for a in args)
        guide_trace = prune_subsample_sites(
            poutine.trace(poutine.condition(guide, data=latents)).get_trace(x_dream, *tiled))
        log_q = x_dream.new_zeros(())
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                log_q = log_q + scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"]).sum()
        return -log_q / (s * batch)

    def __call__(self, model: Callable, guide: Callable, x: torch.Tensor, *args) -> PhaseLosses:
        """Both phases on one batch (wake draws first, then dreams)."""
        wake_theta, wake_phi, log_w = self.wake(model, guide, x, *args)
        if self.insomnia == 1.0:
            guide_loss = wake_phi
        else:
            sleep_phi = self.sleep(model, guide, x, *args)
            guide_loss = sleep_phi if self.insomnia == 0.0 else self.insomnia * wake_phi + (1 - self.insomnia) * sleep_phi
        return PhaseLosses(wake_theta, guide_loss, log_w.mean().item())


class AEVB:
    """Auto-encoding variational Bayes: one ELBO, reparameterized gradients, both networks.

    Runs Pyro's ELBO (``Trace_ELBO`` by default) on the per-datapoint objective of
    :func:`vi_lab.objectives.training_objective`, so beta (``model.site_scales``) applies as
    in :func:`vi_lab.fit`.

    :param loss: ``"trace"`` or ``"meanfield"`` (an ELBO with ``differentiable_loss``).
    :param num_particles: ELBO particles per step.

    Example::

        losses = AEVB()(model, guide, x_batch)
        losses.model_loss is losses.guide_loss  # True: one objective
    """

    def __init__(self, loss: str = "trace", num_particles: int = 1) -> None:
        self.elbo = make_loss(loss, num_particles)
        if not hasattr(self.elbo, "differentiable_loss"):
            raise ValueError(f"AEVB needs an ELBO with differentiable_loss ('trace' or 'meanfield'), got {loss!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.elbo).__name__})"

    def __call__(self, model: Callable, guide: Callable, x: torch.Tensor, *args) -> PhaseLosses:
        scales = getattr(model, "site_scales", None)
        loss = self.elbo.differentiable_loss(training_objective(model, scales), training_objective(guide, scales), x, *args)
        return PhaseLosses(loss, loss, -loss.item())


#: training algorithms accepted by :func:`fit_wake_sleep` (or pass an instance)
OBJECTIVES: dict[str, Callable[[], Callable]] = {
    "wake_sleep": lambda: ReweightedWakeSleep(num_particles=1, insomnia=0.0),
    "rws": lambda: ReweightedWakeSleep(num_particles=5, insomnia=1.0),
    "aevb": AEVB,
}


def make_objective(objective: str | Callable) -> Callable:
    """Resolve a name in :data:`OBJECTIVES` (instances pass through).

    :param objective: ``"wake_sleep"``, ``"rws"``, ``"aevb"``, or an object with the
        :class:`ReweightedWakeSleep` call signature.

    Example::

        make_objective("wake_sleep")  # ReweightedWakeSleep(num_particles=1, insomnia=0.0, ...)
    """
    if not isinstance(objective, str):
        return objective
    try:
        return OBJECTIVES[objective]()
    except KeyError:
        raise ValueError(f"unknown objective {objective!r}; valid: {sorted(OBJECTIVES)}") from None


def _params(module: Any, label: str) -> list[torch.Tensor]:
    if not isinstance(module, nn.Module):
        raise TypeError(f"the {label} must be an nn.Module (its parameters get their own optimizer), "
                        f"got {type(module).__name__}")
    return [p for p in module.parameters() if p.requires_grad]


def fit_wake_sleep(
    model: nn.Module,
    guide: nn.Module,
    data: Any,
    *,
    objective: str | Callable = "wake_sleep",
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    guide_lr: float | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool | str = True,
    binarize: str = "none",
    eval_data: Any = None,
    eval_samples: int = 1,
    eval_at: Sequence[int] | None = None,
) -> FitResult:
    """Train a model/guide pair with separate generator and recognition optimizers.

    Each step computes the objective's two losses, takes the generator's gradient of the
    model loss and the recognition network's gradient of the guide loss (nothing
    crosses over), and steps one Adam optimizer per network. Batching, dynamic
    binarization and the seed work as in :func:`vi_lab.fit`, so ``objective="aevb"``
    follows the same path as ``fit(loss="trace")``.

    :param model: the generator, an ``nn.Module`` Pyro model ``model(x[, extra])``.
    :param guide: the recognition network, an ``nn.Module`` Pyro guide.
    :param data: tensor ``(N, ...)`` or ``(x, extra)`` (extra, e.g. labels, is the second argument).
    :param objective: a name in :data:`OBJECTIVES` or an instance (e.g.
        ``ReweightedWakeSleep(num_particles=10, insomnia=0.5)``).
    :param epochs: passes over the data.
    :param batch_size: datapoints per step.
    :param lr: generator learning rate (and the guide's unless ``guide_lr``).
    :param guide_lr: recognition network learning rate.
    :param device: ``None`` keeps the data's device, ``"auto"`` picks ``cuda`` when available, or a device.
    :param seed: seeds Pyro/torch at the start.
    :param progress: ``True``: a tqdm bar and a line per recorded point; ``"epochs"``: the
        lines only; ``False``: nothing.
    :param binarize: per-batch binarization mode (``"dynamic"`` resamples every batch).
    :param eval_data: held-out data (tensor or ``(x, extra)``), in the training format;
        its ELBO (``eval_samples`` draws, true ELBO) is recorded as ``test_elbo``.
    :param eval_at: numbers of training samples seen at which to record a history
        entry (e.g. log-spaced, for learning curves); default: the end of each epoch.
        The end of training is always recorded.
    :returns: :class:`vi_lab.infer.FitResult` whose history entries hold ``epoch``,
        ``samples_seen``, ``train_elbo`` (mean since the previous entry), ``model_loss``,
        ``guide_loss``, ``seconds`` (training time since the previous entry) and
        ``test_elbo``.
    :raises TrainingDiverged: when a loss is NaN or infinite.

    Example::

        model, guide = VAE(latent_dim=10), make_guide("mean_field", latent_dim=10)
        result = fit_wake_sleep(model, guide, x_train, objective="wake_sleep", epochs=5,
                                binarize="dynamic", eval_data=x_test)
        result.history[-1]["test_elbo"]  # nats per datapoint
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    for name, value in (("lr", lr), ("guide_lr", lr if guide_lr is None else guide_lr)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    algo = make_objective(objective)
    if isinstance(algo, ReweightedWakeSleep) and getattr(model, "site_scales", None):
        raise ValueError(f"wake-sleep has no KL term to weight: site scales {model.site_scales} (beta) "
                         "apply to objective='aevb' only; build the model with beta=1")
    model_params, guide_params = _params(model, "model"), _params(guide, "guide")
    x, extra = data_tensors(data)
    check_data(x, "data")  # all of it, before batching hides a row's position or a missing batch dimension
    check_row_shape(model, guide, x, "data")
    if binarize in BINARIZATIONS and binarize != "none":
        check_unit_interval(x, "data", binarize)
    dev = resolve_device(device, x)
    x, extra = x.to(dev), (extra.to(dev) if extra is not None else None)
    model.to(dev)
    guide.to(dev)
    if eval_data is not None:
        eval_x, eval_extra = data_tensors(eval_data)
        check_data(eval_x, "eval_data")
        eval_x = eval_x.to(dev)
        if binarize != "none":  # held-out data fixed across evaluations, as in fit()
            eval_x = binarize_fn(eval_x, "static" if binarize == "dynamic" else binarize)
        eval_args = (eval_extra.to(dev),) if eval_extra is not None else ()
    transform = None if binarize == "none" else (lambda b: binarize_fn(b, binarize))
    if transform is not None:
        transform(x[:1])  # validate the mode before training
    batches = DeviceBatches(x, batch_size, shuffle=True, transform=transform, extra=extra)
    total = epochs * x.shape[0]
    if eval_at is None:
        marks = [e * x.shape[0] for e in range(1, epochs + 1)]
    else:
        marks = sorted({int(m) for m in eval_at if 0 < m < total} | {total})

    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    model_opt = torch.optim.Adam(model_params, lr=lr) if model_params else None
    guide_opt = torch.optim.Adam(guide_params, lr=lr if guide_lr is None else guide_lr) if guide_params else None
    same = isinstance(algo, AEVB)

    history: list[dict[str, Any]] = []
    seen, next_mark = 0, 0
    acc = {"train_elbo": 0.0, "model_loss": 0.0, "guide_loss": 0.0, "n": 0, "seconds": 0.0}
    for epoch in range(1, epochs + 1):
        model.train()
        guide.train()
        bar = tqdm(batches, desc=f"epoch {epoch}/{epochs}", disable=progress is not True, leave=False)
        t0 = time.perf_counter()
        for step, batch in enumerate(bar, start=1):
            args = batch if isinstance(batch, tuple) else (batch,)
            losses = algo(model, guide, *args)
            for p in (*model_params, *guide_params):
                p.grad = None
            if same:
                losses.model_loss.backward()
            else:
                _set_grads(losses.model_loss, model_params, retain=True)
                _set_grads(losses.guide_loss, guide_params, retain=False)
            ml, gl = losses.model_loss.item(), losses.guide_loss.item()
            if not (math.isfinite(ml) and math.isfinite(gl)):
                which, bad = ("model", ml) if not math.isfinite(ml) else ("guide", gl)
                raise TrainingDiverged(f"the {which} loss became {bad}", epoch, step, len(batches), None, loss=bad)
            for opt in (model_opt, guide_opt):
                if opt is not None:
                    opt.step()
            n = args[0].shape[0]
            seen += n
            for key, value in (("train_elbo", losses.train_elbo), ("model_loss", ml), ("guide_loss", gl)):
                acc[key] += value * n
            acc["n"] += n
            bar.set_postfix(elbo=f"{acc['train_elbo'] / acc['n']:.2f}")
            if next_mark < len(marks) and seen >= marks[next_mark]:
                acc["seconds"] += time.perf_counter() - t0
                record = {"epoch": epoch, "samples_seen": seen,
                          **{k: acc[k] / acc["n"] for k in ("train_elbo", "model_loss", "guide_loss")},
                          "seconds": acc["seconds"]}
                if eval_data is not None:
                    model.eval()
                    guide.eval()
                    record["test_elbo"] = evaluate.elbo(model, guide, eval_x, *eval_args,
                                                        num_samples=eval_samples).mean().item()
                    model.train()
                    guide.train()
                history.append(record)
                if progress:
                    tail = f", test ELBO {record['test_elbo']:.2f}" if "test_elbo" in record else ""
                    tqdm.write(f"{seen} samples: train ELBO {record['train_elbo']:.2f} nats/datapoint{tail}")
                acc = {"train_elbo": 0.0, "model_loss": 0.0, "guide_loss": 0.0, "n": 0, "seconds": 0.0}
                while next_mark < len(marks) and marks[next_mark] <= seen:
                    next_mark += 1
                t0 = time.perf_counter()
        acc["seconds"] += time.perf_counter() - t0
    for p in (*model_params, *guide_params):
        p.grad = None  # leave no stale gradient for a later optimizer (SVI adds to .grad)
    model.eval()
    guide.eval()
    return FitResult(history=history, device=str(dev))


def _set_grads(loss: torch.Tensor, params: list[torch.Tensor], *, retain: bool) -> None:
    """Give ``params`` the gradient of ``loss`` (and nothing else a gradient of it)."""
    if not params or not loss.requires_grad:
        return
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain)
    for p, g in zip(params, grads):
        p.grad = g
