"""Mean-field (diagonal Gaussian) amortized guide."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from vi_lab.guides.base import AmortizedGuide

MIN_SCALE = 1e-4  # keeps q's density finite when the encoder pushes a scale towards 0


class MeanFieldGuide(AmortizedGuide):
    """q(z | x) = N(mu(x), diag(sigma(x)^2)), the standard VAE encoder.

    Example::

        guide = MeanFieldGuide(make_encoder("mlp", 784, [400]), latent_dim=20)
        guide.get_posterior(torch.rand(8, 784)).batch_shape  # torch.Size([8])
    """

    def __init__(self, encoder: nn.Module, latent_dim: int, **kwargs) -> None:
        super().__init__(encoder, latent_dim, **kwargs)
        self.loc = nn.Linear(self.feature_dim, latent_dim)
        self.raw_scale = nn.Linear(self.feature_dim, latent_dim)

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        h = self.encoder(x)
        return dist.Normal(self.loc(h), softplus(self.raw_scale(h)) + MIN_SCALE).to_event(1)
