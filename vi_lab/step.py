"""One training step of a model/guide pair: the objective, its gradient and the optimizer.

:func:`vi_lab.fit` runs every step through :class:`TrainStep`; ``benchmarks/step_time.py``
times the same object against a hand-written PyTorch step. What it does where
``pyro.infer.SVI.step`` did the same job:

* the default objective (:class:`vi_lab.objectives.SyncFreeTrace_ELBO`) returns its loss as
  a tensor on the device, so a step never waits for the device (the caller reads the loss
  when it needs the number);
* one optimizer steps every parameter at once (:class:`vi_lab.optim.Adam`, fused where torch
  has the kernel) instead of one optimizer per tensor, and the parameters are not collected
  from a trace each step;
* Pyro's validation checks (argument and support checks of every distribution, NaN
  warnings that read values back) run on the run's first step and are off afterwards; a
  non-finite loss is still caught, by the caller, from the loss itself.

Other ELBOs (``TraceGraph_ELBO``, ``TraceEnum_ELBO``, ...) run through their own
``loss_and_grads``; a ``pyro.optim`` optimizer given by the user steps the parameters as
SVI would. This module sits on the objective floor (DESIGN.md).
"""

from __future__ import annotations

from typing import Any, Callable

import pyro
import pyro.optim
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO

from vi_lab.objectives import LatentWeight, SyncFreeTrace_ELBO, training_objective
from vi_lab.optim import Adam


class TrainStep:
    """A model/guide pair's training step: ``step(*args)`` returns the loss as a 0-dim tensor.

    :param model: the Pyro model (as the user gave it).
    :param guide: the guide the objective runs (an estimator's training guide).
    :param loss: a ``pyro.infer.ELBO``, or a callable ``loss(model, guide, *args) -> tensor``
        that takes its own gradients (wake-sleep).
    :param optim: a :class:`vi_lab.optim.Adam` or a ``pyro.optim.PyroOptim``.
    :param site_scales: per-site scales applied to model and guide (a beta-VAE's ``{"z": beta}``).
    :param validate_first: run the first step with Pyro's validation on (later steps run without).

    Example::

        step = TrainStep(model, guide, SyncFreeTrace_ELBO(), Adam(1e-3))
        for xb in batches:
            loss = step(xb)  # no device synchronization
    """

    def __init__(self, model: Callable, guide: Callable, loss: ELBO | Callable, optim: Adam | Any,
                 site_scales: dict[str, float] | None = None, validate_first: bool = True) -> None:
        #: the weight of every latent site (KL warm-up): :func:`vi_lab.fit` sets ``latent_weight.value``
        self.latent_weight = LatentWeight()
        self.model = training_objective(model, site_scales, self.latent_weight)
        self.guide = training_objective(guide, site_scales, self.latent_weight)
        if hasattr(loss, "weigh"):  # a loss that weighs latent sites itself (vi_lab.importance)
            loss.weigh(site_scales, self.latent_weight)
        self.loss, self.optim = loss, optim
        self.validate_next = validate_first
        self.estimator: Any = None  # what vi_lab.infer.training_step made concrete for the guide
        #: the parameters the pair uses, found by tracing a step (as SVI does every step)
        self.params: list[torch.Tensor] = []
        self.names: list[str] = []  # their names in Pyro's param store, when found
        #: under data parallelism, ``reduce(named_params, loss, terms) -> global loss``
        #: (:class:`vi_lab.distributed.GradientAverager`) runs between the gradients and the update
        self.reduce: Callable[..., torch.Tensor] | None = None
        self._store_size = -1  # the param store's size when self.params was last gathered

    def __call__(self, *args) -> torch.Tensor:
        with pyro.validation_enabled(self.validate_next):
            if args[0].shape[0] or self.reduce is None:
                value = self.gradients(*args)
            else:  # a rank whose share of a small last batch is empty: no gradient, still in the reduction
                for p in self.params:
                    p.grad = None
                value = args[0].new_zeros(())
            if self.reduce is not None:  # (an empty rank's stale terms count for nothing: its weight is 0)
                value = self.reduce(list(zip(self.names, self.params)), value, getattr(self.loss, "terms", None))
            self.update()
        self.validate_next = False
        return value

    def gradients(self, *args) -> torch.Tensor:
        """The loss of one batch, with its gradient in the parameters' ``.grad``."""
        for p in self.params:
            p.grad = None
        store = pyro.get_param_store()
        if len(store._params) == self._store_size:
            return self._gradients(*args)
        # the first step, or the pair registered new parameters: find what it uses
        with poutine.trace(param_only=True) as capture:
            value = self._gradients(*args)
        known = set(self.params)
        new = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
        new = [p for p in dict.fromkeys(new) if p not in known]
        self.params += new
        self.names += [store.param_name(p) for p in new]
        if isinstance(self.optim, Adam):
            self.optim.bind((store.param_name(p), p) for p in new)
        self._store_size = len(store._params)
        return value

    def _gradients(self, *args) -> torch.Tensor:
        if isinstance(self.loss, SyncFreeTrace_ELBO):
            loss = self.loss.differentiable_loss(self.model, self.guide, *args)
        elif isinstance(self.loss, ELBO):
            # Pyro's own estimators (TraceGraph_ELBO's baselines, TraceEnum_ELBO) backpropagate themselves
            return torch.tensor(float(self.loss.loss_and_grads(self.model, self.guide, *args)))
        else:
            loss = self.loss(self.model, self.guide, *args)
        if loss.requires_grad:
            loss.backward()
        return loss.detach()

    def update(self) -> None:
        """The optimizer's step on the gradients :meth:`gradients` left."""
        if isinstance(self.optim, Adam):
            self.optim.step()
            return
        # a pyro.optim optimizer, as SVI drives it: the parameters that got a gradient
        self.optim([p for p in self.params if p.grad is not None])

    def evaluate(self, *args) -> float:
        """The loss without gradients or an update (registers the pair's parameters, as SVI's ``evaluate_loss``)."""
        with torch.no_grad():
            fn = self.loss.loss if isinstance(self.loss, ELBO) else self.loss
            return float(fn(self.model, self.guide, *args))


def make_optimizer(lr: float, optimizer: Any = None) -> Adam | pyro.optim.PyroOptim:
    """fit's optimizer: the given one, else :class:`vi_lab.optim.Adam` at ``lr``."""
    if optimizer is None:
        return Adam(lr)
    if isinstance(optimizer, (Adam, pyro.optim.PyroOptim)):
        return optimizer
    raise TypeError(f"optimizer must be vi_lab.optim.Adam (vi_lab.infer.adam(...)) or a pyro.optim optimizer, got "
                    f"{type(optimizer).__name__}")


__all__ = ["TrainStep", "make_optimizer"]
