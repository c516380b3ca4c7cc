"""The objective layer: per-datapoint scaling, site scales and the loss registry.

The lowest floor of inference (DESIGN.md): the training loop, the estimators, local
optimization and wake-sleep all build their Pyro objectives from here, and this module
imports none of them.
"""

from __future__ import annotations

from typing import Callable

import pyro.poutine as poutine
from pyro.infer import ELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger

#: loss names accepted by :func:`vi_lab.fit`; any ``pyro.infer.ELBO`` instance is accepted too
LOSSES: dict[str, Callable[[int], ELBO]] = {
    "trace": lambda n: Trace_ELBO(num_particles=n, vectorize_particles=n > 1),
    "meanfield": lambda n: TraceMeanField_ELBO(num_particles=n, vectorize_particles=n > 1),
    "tracegraph": lambda n: TraceGraph_ELBO(num_particles=n, vectorize_particles=n > 1),
}


class _SiteScale(Messenger):
    """Multiply the scale of named sample sites (beta of a beta-VAE on ``z``)."""

    def __init__(self, scales: dict[str, float]) -> None:
        super().__init__()
        self.scales = scales

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["name"] in self.scales:
            msg["scale"] = msg["scale"] * self.scales[msg["name"]]


def training_objective(fn: Callable, site_scales: dict[str, float] | None = None) -> Callable:
    """Wrap a model or guide so its loss is per datapoint and declared site scales apply.

    Scaling every site by ``1 / batch_size`` makes Pyro's loss the mean -ELBO of the
    batch, so the number :func:`vi_lab.fit` reports is in nats per datapoint whatever the
    batch size; ``site_scales`` (from ``model.site_scales``) go to model and guide alike
    so that a scaled latent site scales the whole KL term.
    """
    scales = dict(site_scales or {})

    def wrapped(x, *args, **kwargs):
        with poutine.scale(scale=1.0 / x.shape[0]), _SiteScale(scales):
            return fn(x, *args, **kwargs)

    return wrapped


def make_loss(loss: str | ELBO, num_particles: int = 1) -> ELBO:
    """Resolve a loss name in :data:`LOSSES` (or pass an ELBO instance through)."""
    if isinstance(loss, ELBO):
        return loss
    try:
        return LOSSES[loss](num_particles)
    except KeyError:
        raise ValueError(f"unknown loss {loss!r}; valid: {sorted(LOSSES)} or a pyro.infer.ELBO instance") from None
