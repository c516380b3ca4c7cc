"""Amortized guides for discrete latents: q(z | x) over binary units or one of K categories.

* :class:`BernoulliGuide`: independent Bernoulli units, ``q(z_d = 1 | x) = sigmoid(f_d(x))``,
  as a :class:`BinaryVector` so that a few units can be enumerated exactly (the guide of
  :class:`vi_lab.models.discrete.SigmoidBeliefVAE`);
* :class:`CategoricalGuide`: ``OneHotCategorical(softmax(f(x)))`` (the guide of
  :class:`vi_lab.models.discrete.CategoricalVAE`).

These sites have no pathwise gradient: train them with the ``reinforce``,
``reinforce_baseline``, ``relaxed`` or ``enum`` estimators of :mod:`vi_lab.estimators`.
"""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from vi_lab.guides.base import AmortizedGuide
from vi_lab.nets import make_encoder

#: largest number of binary units :class:`BinaryVector` lets TraceEnum_ELBO enumerate
MAX_ENUM_BITS = 12


class BinaryVector(dist.Independent):
    """Independent Bernoulli units as one vector-valued site whose 2^D values can be listed.

    ``Bernoulli(logits).to_event(1)`` refuses enumeration (Pyro cannot enumerate a
    reinterpreted batch); this lists all ``2**D`` binary vectors so TraceEnum_ELBO can
    sum over them, for ``D <= MAX_ENUM_BITS``. Build it as ``BinaryVector(Bernoulli(...), 1)``.

    Example::

        q = BinaryVector(dist.Bernoulli(logits=torch.zeros(5, 3)), 1)
        q.enumerate_support(expand=False).shape  # torch.Size([8, 1, 3])
    """

    @property
    def has_enumerate_support(self) -> bool:
        return self.reinterpreted_batch_ndims == 1 and self.event_shape[-1] <= MAX_ENUM_BITS

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        if not self.has_enumerate_support:
            raise NotImplementedError(f"enumerating {self.event_shape} binary units is not supported "
                                      f"(at most {MAX_ENUM_BITS} in one event dimension)")
        d = self.event_shape[-1]
        logits = self.base_dist.logits
        codes = torch.arange(2**d, device=logits.device)
        bits = ((codes[:, None] >> torch.arange(d, device=logits.device)) & 1).to(logits.dtype)  # (2^D, D)
        values = bits.reshape((2**d,) + (1,) * len(self.batch_shape) + (d,))  # (2^D, 1.., D)
        return values.expand((2**d,) + self.batch_shape + (d,)) if expand else values


class BernoulliGuide(AmortizedGuide):
    """q(z | x) = prod_d Bernoulli(z_d; sigmoid(f_d(x))).

    The guide of :class:`vi_lab.models.discrete.SigmoidBeliefVAE`. The posterior is a
    :class:`BinaryVector`, so a few units can be enumerated exactly.

    Example::

        guide = BernoulliGuide(make_encoder("mlp", 784, [200]), latent_dim=200)
        guide.get_posterior(torch.rand(8, 784)).event_shape  # torch.Size([200])
    """

    def __init__(self, encoder: nn.Module, latent_dim: int, **kwargs) -> None:
        super().__init__(encoder, latent_dim, **kwargs)
        self.logits = nn.Linear(self.feature_dim, latent_dim)

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        return BinaryVector(dist.Bernoulli(logits=self.logits(self.encoder(x))), 1)

    @classmethod
    def make(cls, latent_dim: int, *, hidden: int | Sequence[int] = (200,), arch: str = "mlp",
             x_dim: int = 784, **kwargs) -> "BernoulliGuide":
        """Build with a fresh encoder trunk (the arguments of :func:`vi_lab.guides.make_guide`)."""
        return cls(make_encoder(arch, x_dim, hidden), latent_dim, **kwargs)


class CategoricalGuide(AmortizedGuide):
    """q(z | x) = OneHotCategorical(softmax(f(x))) over K categories.

    The guide of :class:`vi_lab.models.discrete.CategoricalVAE`.

    Example::

        guide = CategoricalGuide(make_encoder("mlp", 784, [400]), num_categories=10)
        guide.get_posterior(torch.rand(8, 784)).probs.shape  # torch.Size([8, 10])
    """

    def __init__(self, encoder: nn.Module, num_categories: int, **kwargs) -> None:
        super().__init__(encoder, num_categories, **kwargs)
        self.logits = nn.Linear(self.feature_dim, num_categories)

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        return dist.OneHotCategorical(logits=self.logits(self.encoder(x)))

    @classmethod
    def make(cls, num_categories: int, *, hidden: int | Sequence[int] = (400,), arch: str = "mlp",
             x_dim: int = 784, **kwargs) -> "CategoricalGuide":
        """Build with a fresh encoder trunk (the arguments of :func:`vi_lab.guides.make_guide`)."""
        return cls(make_encoder(arch, x_dim, hidden), num_categories, **kwargs)


__all__ = ["MAX_ENUM_BITS", "BernoulliGuide", "BinaryVector", "CategoricalGuide"]
