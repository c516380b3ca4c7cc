"""Mixture guides: q(z | x) = sum_k pi_k(x) N(mu_k(x), diag(sigma_k(x)^2)), reparameterized.

Sampling a mixture picks a component, which is not differentiable; Pyro's
``MixtureOfDiagNormals`` supplies pathwise gradients for its samples anyway (Jankowiak
& Karaletsos, 2018), so the mixture trains with the same reparameterized ELBO as the
Gaussian families. It needs D >= 2.
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from vi_lab.guides.base import AmortizedGuide
from vi_lab.guides.local_base import MIN_SCALE, LocalGuide, inv_softplus, moments


class DiagNormalMixture(dist.MixtureOfDiagNormals):
    """Pyro's ``MixtureOfDiagNormals`` whose ``rsample`` also takes a sample shape with batch dimensions.

    Pyro's version gathers the chosen components from parameters that are not broadcast
    to the sample shape, which fails for batched parameters; expanding the distribution
    to ``sample_shape + batch_shape`` first draws the same thing (one draw per entry).
    """

    def expand(self, batch_shape, _instance=None) -> "DiagNormalMixture":
        new = self._get_checked_instance(DiagNormalMixture, _instance)
        return super().expand(batch_shape, _instance=new)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        sample_shape = torch.Size(sample_shape)
        if sample_shape and self.batch_shape:
            return self.expand(sample_shape + self.batch_shape).rsample()
        return super().rsample(sample_shape)


def _check_components(components: int, latent_dim: int) -> None:
    if not isinstance(components, int) or components < 1:
        raise ValueError(f"components must be a positive integer, got {components!r}")
    if latent_dim < 2:
        raise ValueError("the mixture guide needs latent_dim >= 2 (Pyro's MixtureOfDiagNormals does not support "
                         "D = 1); use mean_field or full_cov for a one-dimensional latent")


class MixtureGuide(AmortizedGuide):
    """q(z | x) = a mixture of ``components`` diagonal Normals (:class:`DiagNormalMixture`), read off the encoder.

    :param encoder: trunk ``x -> features``.
    :param latent_dim: D (at least 2).
    :param components: m, the number of mixture components.

    Example::

        guide = MixtureGuide(make_encoder("mlp", 784, [400]), latent_dim=20, components=5)
        guide.get_posterior(torch.rand(8, 784)).locs.shape  # torch.Size([8, 5, 20])
    """

    options: tuple[str, ...] = ("components",)

    def __init__(self, encoder: nn.Module, latent_dim: int, *, components: int = 5, **kwargs) -> None:
        super().__init__(encoder, latent_dim, **kwargs)
        _check_components(components, latent_dim)
        self.components = components
        self.locs = nn.Linear(self.feature_dim, components * latent_dim)
        self.raw_scales = nn.Linear(self.feature_dim, components * latent_dim)
        self.logits = nn.Linear(self.feature_dim, components)

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        h = self.encoder(x)
        shape = (*h.shape[:-1], self.components, self.latent_dim)
        locs = self.locs(h).reshape(shape)  # (B, m, D)
        scales = softplus(self.raw_scales(h)).reshape(shape) + MIN_SCALE
        return DiagNormalMixture(locs, scales, self.logits(h))


class LocalMixture(LocalGuide):
    """q_i(z) = a mixture of m diagonal Normals with free means, scales and weights per datapoint.

    :param components: m.

    Example::

        local = LocalMixture(100, 20, components=5).init_from(amortized.get_posterior(x[:100]))
    """

    def __init__(self, num_data: int, latent_dim: int, *, components: int = 5, **kwargs) -> None:
        super().__init__(num_data, latent_dim, **kwargs)
        _check_components(components, latent_dim)
        self.components = components
        # distinct means: coinciding components are a saddle, and MixtureOfDiagNormals' gradient
        # divides by the distance between means
        self.locs = nn.Parameter(0.1 * torch.randn(num_data, components, latent_dim))
        self.raw_scales = nn.Parameter(torch.full((num_data, components, latent_dim),
                                                  float(inv_softplus(torch.tensor(1.0)))))
        self.logits = nn.Parameter(torch.zeros(num_data, components))

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        return DiagNormalMixture(self.locs, softplus(self.raw_scales) + MIN_SCALE, self.logits)

    @classmethod
    def options_from(cls, q: dist.Distribution) -> dict[str, Any]:
        return {"components": q.locs.shape[-2]} if isinstance(q, dist.MixtureOfDiagNormals) else {}

    @torch.no_grad()
    def init_from(self, q: dist.Distribution) -> "LocalMixture":
        self._check_init(q)
        if isinstance(q, dist.MixtureOfDiagNormals) and q.locs.shape[-2] == self.components:
            self.locs.copy_(q.locs)
            self.raw_scales.copy_(inv_softplus((q.coord_scale - MIN_SCALE).clamp_min(MIN_SCALE)))
            self.logits.copy_(q.component_logits - q.component_logits.logsumexp(-1, keepdim=True))
            return self
        # every component at the posterior's mean and marginal scales, spread a little apart
        mean, cov = moments(q)
        std = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(4 * MIN_SCALE**2).sqrt()  # (N, D)
        spread = 0.1 * std.unsqueeze(-2) * torch.randn_like(self.locs)  # (N, m, D)
        self.locs.copy_(mean.unsqueeze(-2) + spread)
        self.raw_scales.copy_(inv_softplus(std - MIN_SCALE).unsqueeze(-2).expand_as(self.raw_scales))
        self.logits.zero_()
        return self
