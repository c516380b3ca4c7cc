"""Straight-through Gumbel-softmax draws of a discrete distribution: exact values, relaxed gradients.

:class:`StraightThrough` wraps a ``Bernoulli`` or ``OneHotCategorical`` (possibly
``Independent``) so that ``rsample`` gives exact discrete draws whose backward pass
goes through Pyro's ``Relaxed*StraightThrough`` relaxation, while ``log_prob`` stays
the discrete log-probability. The objective's value is then a true single-sample
ELBO and only its gradient is biased (the ``relaxed`` estimator of
:mod:`vi_lab.estimators`).

On the objective floor (DESIGN.md): it imports nothing of vi_lab.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import RelaxedBernoulliStraightThrough, RelaxedOneHotCategoricalStraightThrough

#: discrete family -> Pyro's straight-through relaxation of it
RELAXATIONS: dict[type, type] = {
    torch.distributions.Bernoulli: RelaxedBernoulliStraightThrough,
    torch.distributions.OneHotCategorical: RelaxedOneHotCategoricalStraightThrough,
}


def _unwrap_independent(d: torch.distributions.Distribution) -> tuple[torch.distributions.Distribution, int]:
    """The distribution inside nested ``Independent`` wrappers, and how many dims they reinterpret."""
    ndims = 0
    while isinstance(d, torch.distributions.Independent):
        ndims += d.reinterpreted_batch_ndims
        d = d.base_dist
    return d, ndims


class StraightThrough(dist.TorchDistribution):
    """Hard samples of a discrete distribution with Gumbel-softmax (relaxed) gradients.

    ``rsample`` returns exact draws of ``discrete`` (a relaxed draw rounded, so
    ``P(z = 1) = sigmoid(logits)`` whatever the temperature) whose backward pass goes
    through the relaxed draw (Pyro's ``Relaxed*StraightThrough``). ``log_prob`` is the
    *discrete* log-probability, so the objective's value is a true single-sample ELBO;
    only its gradient is biased.

    :param discrete: ``Bernoulli`` or ``OneHotCategorical`` (possibly ``Independent``).
    :param temperature: relaxation temperature; lower is less biased and noisier.

    Example::

        q = StraightThrough(dist.Bernoulli(logits=logits).to_event(1), temperature=0.5)
        z = q.rsample()  # values in {0, 1}, differentiable w.r.t. logits
    """

    has_rsample = True
    arg_constraints: dict = {}

    def __init__(self, discrete: torch.distributions.Distribution, temperature: float) -> None:
        base, ndims = _unwrap_independent(discrete)
        relax = next((r for family, r in RELAXATIONS.items() if isinstance(base, family)), None)
        if relax is None:
            raise ValueError(f"the relaxed estimator needs Bernoulli or OneHotCategorical sites, got "
                             f"{type(base).__name__}; valid families: {[f.__name__ for f in RELAXATIONS]}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        temp = torch.as_tensor(float(temperature), dtype=base.logits.dtype, device=base.logits.device)
        relaxed = relax(temp, logits=base.logits)
        self.discrete, self.temperature = discrete, float(temperature)
        self.relaxed = relaxed.to_event(ndims) if ndims else relaxed
        super().__init__(discrete.batch_shape, discrete.event_shape, validate_args=False)

    @property
    def support(self):
        return self.discrete.support

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.relaxed.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.discrete.log_prob(value)

    def expand(self, batch_shape, _instance=None) -> "StraightThrough":
        return StraightThrough(self.discrete.expand(batch_shape), self.temperature)


__all__ = ["RELAXATIONS", "StraightThrough"]
