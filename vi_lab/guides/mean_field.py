"""Mean-field (diagonal Gaussian) guides: the amortized encoder and its local counterpart."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from vi_lab.guides.base import AmortizedGuide
from vi_lab.guides.local_base import MIN_SCALE, LocalGuide, inv_softplus, moments


class MeanFieldGuide(AmortizedGuide):
    """q(z | x) = N(mu(x), diag(sigma(x)^2)), the standard VAE encoder.

    Example::

        guide = MeanFieldGuide(make_encoder("mlp", 784, [400]), latent_dim=20)
        guide.get_posterior(torch.rand(8, 784)).batch_shape  # torch.Size([8])
    """

    options: tuple[str, ...] = ()

    def __init__(self, encoder: nn.Module, latent_dim: int, **kwargs) -> None:
        super().__init__(encoder, latent_dim, **kwargs)
        self.loc = nn.Linear(self.feature_dim, latent_dim)
        self.raw_scale = nn.Linear(self.feature_dim, latent_dim)

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        h = self.encoder(x)
        return dist.Normal(self.loc(h), softplus(self.raw_scale(h)) + MIN_SCALE).to_event(1)


class LocalMeanField(LocalGuide):
    """q_i(z) = N(m_i, diag(s_i^2)), free m_i, s_i per datapoint.

    Example::

        local = LocalMeanField(100, 20).init_from(amortized.get_posterior(x[:100]))
    """

    def __init__(self, num_data: int, latent_dim: int, **kwargs) -> None:
        super().__init__(num_data, latent_dim, **kwargs)
        self.loc = nn.Parameter(torch.zeros(num_data, latent_dim))
        self.raw_scale = nn.Parameter(torch.full((num_data, latent_dim), float(inv_softplus(torch.tensor(1.0)))))

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        return dist.Normal(self.loc, softplus(self.raw_scale) + MIN_SCALE).to_event(1)

    @torch.no_grad()
    def init_from(self, q: dist.Distribution) -> "LocalMeanField":
        self._check_init(q)
        mean, cov = moments(q)
        self.loc.copy_(mean)
        std = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(4 * MIN_SCALE**2).sqrt()
        self.raw_scale.copy_(inv_softplus(std - MIN_SCALE))
        return self
