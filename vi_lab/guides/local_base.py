"""The base class of the local (per-datapoint) guides and the helpers every family shares.

A local guide holds one free set of variational parameters per datapoint of a fixed set
of N points; each family (mean-field, full covariance, low rank, mixture, flows) lives
in the module of its amortized counterpart, so that its :meth:`LocalGuide.init_from`
can copy what the amortized guide of the same family computes for those points.
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
from torch import nn

from vi_lab.guides.base import sample_posterior

#: floor added to every scale: keeps q's density finite when a scale is pushed towards 0
MIN_SCALE = 1e-4


def inv_softplus(y: torch.Tensor) -> torch.Tensor:
    """The inverse of ``softplus`` (for ``y > 0``), to start a softplus-parameterized scale at ``y``."""
    return y + torch.log(-torch.expm1(-y))


@torch.no_grad()
def moments(q: dist.Distribution, num_samples: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(B, D)`` and covariance ``(B, D, D)`` of a posterior, by Monte Carlo where needed.

    :param q: batch shape ``(B,)``, event shape ``(D,)``.
    :param num_samples: draws when the family has no closed-form moments (flows, mixtures).

    Example::

        mean, cov = moments(guide.get_posterior(x))  # (B, D), (B, D, D)
    """
    base = q.base_dist if isinstance(q, dist.Independent) else q
    if isinstance(base, dist.Normal):
        return base.mean, torch.diag_embed(base.variance)
    if isinstance(q, (dist.MultivariateNormal, dist.LowRankMultivariateNormal)):
        return q.mean, q.covariance_matrix
    z = q.sample((num_samples,))  # (S, B, D)
    mean = z.mean(0)
    c = z - mean
    return mean, torch.einsum("sbi,sbj->bij", c, c) / (num_samples - 1)


class LocalGuide(nn.Module):
    """Base class of the local families: ``get_posterior`` reads per-datapoint parameters.

    :param num_data: N, the number of datapoints this guide holds parameters for.
    :param latent_dim: D.
    :param site: name of the latent site.
    :param name: prefix in Pyro's param store.

    The guide must be called with the same N datapoints, in the same order, every time
    (full batch): row i of every parameter belongs to datapoint i. Families override
    :meth:`get_posterior` and :meth:`init_from`, and :meth:`options_from` when their
    options (rank, components, flow steps) can be read off a posterior to start from.
    """

    def __init__(self, num_data: int, latent_dim: int, *, site: str = "z", name: str = "local_guide") -> None:
        super().__init__()
        if num_data < 1 or latent_dim < 1:
            raise ValueError(f"num_data and latent_dim must be positive, got {num_data}, {latent_dim}")
        self.num_data, self.latent_dim, self.site, self.name = num_data, latent_dim, site, name

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[0] != self.num_data:
            raise ValueError(f"this local guide holds parameters for {self.num_data} datapoints but got a batch "
                             f"of {x.shape[0]}; call it with the same full set of points it was built for")

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        """q_i(z) for each of the N datapoints: batch ``(N,)``, event ``(D,)``."""
        raise NotImplementedError

    def init_from(self, q: dist.Distribution) -> "LocalGuide":
        """Start from a posterior for the same N points (e.g. an amortized guide's output).

        A posterior of the same family is copied exactly; any other is matched by its
        mean and covariance (Monte Carlo moments for flows and mixtures).
        """
        raise NotImplementedError

    @classmethod
    def options_from(cls, q: dist.Distribution) -> dict[str, Any]:
        """Family options that make this class able to copy ``q`` exactly (``{}`` if none apply)."""
        return {}

    def _check_init(self, q: dist.Distribution) -> None:
        if q.batch_shape != (self.num_data,) or q.event_shape != (self.latent_dim,):
            raise ValueError(f"cannot start from a posterior with batch {tuple(q.batch_shape)} and event "
                             f"{tuple(q.event_shape)}: this local guide needs batch ({self.num_data},) and event "
                             f"({self.latent_dim},)")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check(x)
        return sample_posterior(self, x, *args, **kwargs)
