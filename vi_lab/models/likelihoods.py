"""Observation likelihoods p(x | decoder output), one module per family.

Each maps the decoder's output ``(..., x_dim)`` to a ``pyro.distributions``
distribution with event shape ``(x_dim,)`` and knows its mean (for pictures).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn


class BernoulliLikelihood(nn.Module):
    """Bernoulli on logits: for binarized images (values in {0, 1})."""

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=out).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)


class ContinuousBernoulliLikelihood(nn.Module):
    """Continuous Bernoulli on logits (Loaiza-Ganem & Cunningham, 2019): grey levels in [0, 1]."""

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        return dist.ContinuousBernoulli(logits=out).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return dist.ContinuousBernoulli(logits=out).mean


class GaussianLikelihood(nn.Module):
    """Normal with mean ``sigmoid(out)`` and a learned per-pixel scale.

    :param x_dim: observation size.
    :param init_scale: initial standard deviation.
    :param min_scale: floor on the scale, so the density cannot collapse on constant pixels.
    """

    def __init__(self, x_dim: int, init_scale: float = 0.1, min_scale: float = 1e-3) -> None:
        super().__init__()
        self.raw_scale = nn.Parameter(torch.full((x_dim,), math.log(math.expm1(init_scale - min_scale))))
        self.min_scale = min_scale

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        scale = nn.functional.softplus(self.raw_scale) + self.min_scale
        return dist.Normal(torch.sigmoid(out), scale).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)


LIKELIHOODS = {
    "bernoulli": lambda x_dim: BernoulliLikelihood(),
    "continuous_bernoulli": lambda x_dim: ContinuousBernoulliLikelihood(),
    "gaussian": GaussianLikelihood,
}


def make_likelihood(name: str, x_dim: int) -> nn.Module:
    """Build a likelihood module by name.

    :param name: one of ``bernoulli``, ``continuous_bernoulli``, ``gaussian``.
    :param x_dim: observation size.

    Example::

        lik = make_likelihood("bernoulli", 784)
        lik(torch.zeros(2, 784)).log_prob(torch.ones(2, 784))  # (2,)
    """
    try:
        factory = LIKELIHOODS[name]
    except KeyError:
        raise ValueError(f"unknown likelihood {name!r}; valid: {sorted(LIKELIHOODS)}") from None
    return factory(x_dim)
