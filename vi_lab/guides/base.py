"""The amortized guide family's base class.

A guide here is an ``nn.Module`` whose call runs the Pyro guide ``q(z | x)``: it
samples the latent site inside the ``"data"`` plate from the distribution that
:meth:`AmortizedGuide.get_posterior` returns for the batch. Each family (mean-field,
full covariance, flows, ...) overrides only that method, in the pattern of Pyro's
``AutoContinuous.get_posterior``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn


class AmortizedGuide(nn.Module):
    """Base class: an encoder trunk ``x -> features`` and a family-specific head.

    :param encoder: module mapping ``(B, x_dim)`` to ``(B, encoder.out_dim)`` features.
    :param latent_dim: size D of the latent site.
    :param site: name of the latent sample site (must match the model's).
    :param name: prefix of this guide's parameters in Pyro's param store.

    Subclasses implement :meth:`get_posterior`. Score-function (REINFORCE) training of
    the same family is the guide run under :class:`vi_lab.score_function.ScoreFunction`
    (the ``reinforce`` estimators do it), which turns the posterior's ``has_rsample`` off.
    """

    def __init__(self, encoder: nn.Module, latent_dim: int, *, site: str = "z", name: str = "guide") -> None:
        super().__init__()
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        self.encoder, self.latent_dim, self.site, self.name = encoder, latent_dim, site, name
        self.feature_dim = encoder.out_dim

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        """Return q(z | x) for a batch: batch shape ``(B,)``, event shape ``(D,)``.

        :param x: a batch of observations, shape ``(B, x_dim)``.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample_posterior(self, x, *args, **kwargs)


def sample_posterior(guide: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The Pyro guide every vi_lab guide runs: register parameters, sample the site in the data plate.

    Shared by the amortized and the local (per-datapoint) families, which differ only
    in how ``get_posterior`` finds the distribution.
    """
    pyro.module(guide.name, guide)
    with pyro.plate("data", x.shape[0]):
        return pyro.sample(guide.site, guide.get_posterior(x, *args, **kwargs))
