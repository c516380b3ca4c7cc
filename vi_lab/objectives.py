"""The objective layer: per-datapoint scaling, site scales and the loss registry (ELBOs, wake-sleep).

The lowest floor of inference (DESIGN.md): the training loop, the estimators and local
optimization build their Pyro objectives from here, and this module imports none of them.
The wake-sleep loss it registers (:mod:`vi_lab.wake_sleep`) sits beside it on this floor and
imports only the contract.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import is_identically_zero
from pyro.poutine.messenger import Messenger

from vi_lab.wake_sleep import ReweightedWakeSleep


class SyncFreeTrace_ELBO(Trace_ELBO):
    """Pyro's ``Trace_ELBO`` estimator whose loss never leaves the device.

    ``Trace_ELBO.differentiable_loss`` reads every site's log-density back as a Python
    number (``torch_item``), one device synchronization per site and step, and checks the
    loss for NaN (another). This subclass computes the same estimator from the same traces
    with tensors only: the returned loss has the value of the ELBO estimate (negated) and
    the gradient of Pyro's surrogate, score-function terms with their partial
    Rao-Blackwellization included. So a training step can run ahead of the device, or be
    captured whole in a CUDA graph. :func:`vi_lab.fit` checks the loss for NaN itself.

    ``loss`` (a float, for monitoring) is Pyro's; ``loss_and_grads`` backpropagates this
    loss and returns it as a float, so ``pyro.infer.SVI`` takes the class as it is.

    Example::

        elbo = SyncFreeTrace_ELBO()
        loss = elbo.differentiable_loss(model, guide, x)  # a 0-dim tensor on x's device
        loss.backward()
    """

    def _particle(self, model_trace, guide_trace) -> tuple[torch.Tensor, torch.Tensor]:
        """(elbo, surrogate elbo) of one particle: Pyro's ``_differentiable_loss_particle`` without ``torch_item``."""
        elbo = surrogate = 0.0
        log_r = None
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo + site["log_prob_sum"]
                surrogate = surrogate + site["log_prob_sum"]
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                _, score_function_term, entropy_term = site["score_parts"]
                elbo = elbo - site["log_prob_sum"]
                if not is_identically_zero(entropy_term):
                    surrogate = surrogate - entropy_term.sum()
                if not is_identically_zero(score_function_term):
                    if log_r is None:
                        log_r = _compute_log_r(model_trace, guide_trace)
                    surrogate = surrogate + (log_r.sum_to(site["cond_indep_stack"]) * score_function_term).sum()
        return elbo, surrogate

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        elbo = surrogate = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            e, s = self._particle(model_trace, guide_trace)
            elbo = elbo + e / self.num_particles
            surrogate = surrogate + s / self.num_particles
        if not torch.is_tensor(surrogate):  # a pair without sample sites
            return torch.as_tensor(-elbo)
        # the value of -elbo, the gradient of -surrogate (they differ only for score-function sites)
        return -(elbo.detach() + (surrogate - surrogate.detach()))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return loss.item()


def _rws(num_particles: int) -> ReweightedWakeSleep:
    if num_particles < 2:
        raise ValueError(f"loss rws needs num_particles >= 2 wake particles (5 is usual), got {num_particles}; "
                         "with one particle use loss='wake_sleep'")
    return ReweightedWakeSleep(num_particles=num_particles, insomnia=1.0)


#: loss names accepted by :func:`vi_lab.fit`, each made from the number of particles; any
#: ``pyro.infer.ELBO`` instance, or a callable ``loss(model, guide, *args) -> tensor``, is accepted too
LOSSES: dict[str, Callable[[int], Callable]] = {
    "trace": lambda n: SyncFreeTrace_ELBO(num_particles=n, vectorize_particles=n > 1),
    "meanfield": lambda n: TraceMeanField_ELBO(num_particles=n, vectorize_particles=n > 1),
    "tracegraph": lambda n: TraceGraph_ELBO(num_particles=n, vectorize_particles=n > 1),
    # classic wake-sleep: one wake draw, the guide learns from dreams only
    "wake_sleep": lambda n: ReweightedWakeSleep(num_particles=n, insomnia=0.0),
    # reweighted wake-sleep: n wake particles, the guide learns from them (wake-phi)
    "rws": _rws,
}


class _SiteScale(Messenger):
    """Multiply the scale of named sample sites (beta of a beta-VAE on ``z``)."""

    def __init__(self, scales: dict[str, float]) -> None:
        super().__init__()
        self.scales = scales

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["name"] in self.scales:
            msg["scale"] = msg["scale"] * self.scales[msg["name"]]


class LatentWeight(Messenger):
    """Multiply the scale of every latent sample site by ``value``: KL warm-up's weight.

    In the model the latent sites carry log p(z), in the guide log q(z | x), so a weight w
    turns the ELBO into ``E_q[log p(x | z)] - w KL(q || p)`` (Pyro's ELBOs read ``msg["scale"]``;
    the importance-weighted objectives of :mod:`vi_lab.importance` read ``value`` itself).
    ``value`` is changed between steps by :func:`vi_lab.fit` (``kl_warmup``).
    """

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.value = value

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.value


def training_objective(fn: Callable, site_scales: dict[str, float] | None = None,
                       latent_weight: LatentWeight | None = None) -> Callable:
    """Wrap a model or guide so its loss is per datapoint and declared site scales apply.

    Scaling every site by ``1 / batch_size`` makes Pyro's loss the mean -ELBO of the
    batch, so the number :func:`vi_lab.fit` reports is in nats per datapoint whatever the
    batch size; ``site_scales`` (from ``model.site_scales``) go to model and guide alike
    so that a scaled latent site scales the whole KL term; so does ``latent_weight`` (KL
    warm-up), on every latent site, when its value is not 1.
    """
    scales = dict(site_scales or {})

    def wrapped(x, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            stack.enter_context(poutine.scale(scale=1.0 / x.shape[0]))
            if scales:  # one handler fewer for every site of every step
                stack.enter_context(_SiteScale(scales))
            if latent_weight is not None and latent_weight.value != 1.0:
                stack.enter_context(latent_weight)
            return fn(x, *args, **kwargs)

    return wrapped


def make_loss(loss: str | ELBO, num_particles: int = 1) -> Callable:
    """Resolve a loss name in :data:`LOSSES` (or pass an ELBO instance through).

    :param loss: a name in :data:`LOSSES` or a ``pyro.infer.ELBO``.
    :param num_particles: particles per step (wake particles for ``"rws"``).

    Example::

        make_loss("meanfield", num_particles=4)  # TraceMeanField_ELBO, vectorized particles
    """
    if isinstance(loss, ELBO):
        return loss
    try:
        return LOSSES[loss](num_particles)
    except KeyError:
        raise ValueError(f"unknown loss {loss!r}; valid: {sorted(LOSSES)} or a pyro.infer.ELBO instance") from None
