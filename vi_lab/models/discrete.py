"""VAEs with discrete latents, and their amortized guides.

* :class:`SigmoidBeliefVAE`: ``z`` is a vector of binary units with a learned
  factorized prior, ``p(z_d = 1) = sigmoid(a_d)``, and ``x ~ Bernoulli(decoder(z))``:
  a sigmoid belief network with an MLP decoder (NVIL's SBN when ``hidden=()``).
  Guide: :class:`BernoulliGuide`.
* :class:`CategoricalVAE`: ``z`` is one of K categories (one-hot), uniform prior.
  Guide: :class:`CategoricalGuide`.

No pathwise gradient exists for these latents: train them with the ``reinforce``,
``reinforce_baseline`` or (biased) ``relaxed`` estimators of :mod:`vi_lab.estimators`,
and, when the latent space is small enough to list (a categorical latent, or a few
binary units), with ``enum``: Pyro's ``TraceEnum_ELBO`` sums over it exactly and gives
the exact ELBO gradient, the reference the others are measured against.

Both models subclass :class:`vi_lab.models.vae.VAE` and change only the prior, so the
likelihoods, ``beta`` and the evaluators work as they do for the Gaussian VAE.
"""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from vi_lab.guides.base import AmortizedGuide
from vi_lab.models.vae import VAE
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


class SigmoidBeliefVAE(VAE):
    """Binary latent units with a learned prior ``p(z_d = 1) = sigmoid(a_d)``; ``x ~ likelihood(decoder(z))``.

    :param latent_dim: number of binary units (200 in NVIL's MNIST SBN).
    :param hidden: decoder hidden widths (``()`` for the one-layer SBN ``z -> x``).
    :param kwargs: the rest of :class:`vi_lab.models.vae.VAE` (``likelihood``, ``beta``, ...).

    Example::

        model, guide = SigmoidBeliefVAE(200, (200,)), BernoulliGuide.make(200, hidden=(200,))
        vi_lab.fit(model, guide, x_train, estimator="reinforce_baseline", baseline="nn",
                   binarize="dynamic")
    """

    def __init__(self, latent_dim: int = 200, hidden: int | Sequence[int] = (200,), **kwargs) -> None:
        super().__init__(latent_dim, hidden, **kwargs)
        self.prior_logits = nn.Parameter(torch.zeros(latent_dim))

    def prior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """p(z): batch shape ``(B,)``, event ``(D,)``."""
        return dist.Bernoulli(logits=self.prior_logits).expand([x.shape[0], self.latent_dim]).to_event(1)

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Means of p(x | z) for ``n`` prior draws, shape ``(n, x_dim)``."""
        z = dist.Bernoulli(logits=self.prior_logits).sample((n,))
        return self.decode(z.to(device or self.prior_logits.device))


class CategoricalVAE(VAE):
    """One of K categories, uniform prior, as a one-hot ``z``; ``x ~ likelihood(decoder(z))``.

    One-hot values (``OneHotCategorical``) rather than indices, so a relaxed estimator
    can pass gradients through ``z`` into the decoder.

    :param num_categories: K.
    :param hidden: decoder hidden widths.
    :param kwargs: the rest of :class:`vi_lab.models.vae.VAE`.

    Example::

        model, guide = CategoricalVAE(10), CategoricalGuide.make(10)
        vi_lab.fit(model, guide, x_train, estimator="enum", binarize="dynamic")  # exact gradients
    """

    def __init__(self, num_categories: int = 10, hidden: int | Sequence[int] = (400,), **kwargs) -> None:
        if not isinstance(num_categories, int) or num_categories < 2:
            raise ValueError(f"num_categories must be an integer >= 2, got {num_categories!r}")
        super().__init__(num_categories, hidden, **kwargs)

    @property
    def num_categories(self) -> int:
        return self.latent_dim

    def prior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """p(z) uniform over K one-hot vectors: batch shape ``(B,)``, event ``(K,)``."""
        return dist.OneHotCategorical(logits=x.new_zeros(self.latent_dim)).expand([x.shape[0]])

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Means of p(x | z) for ``n`` prior draws, shape ``(n, x_dim)``."""
        device = device or next(self.parameters()).device
        return self.decode(dist.OneHotCategorical(logits=torch.zeros(self.latent_dim, device=device)).sample((n,)))

    @torch.no_grad()
    def prototypes(self) -> torch.Tensor:
        """Decoder mean of every category, shape ``(K, x_dim)``."""
        return self.decode(torch.eye(self.latent_dim, device=next(self.parameters()).device))


class BernoulliGuide(AmortizedGuide):
    """q(z | x) = prod_d Bernoulli(z_d; sigmoid(f_d(x))), for :class:`SigmoidBeliefVAE`.

    The posterior is a :class:`BinaryVector`, so a few units can be enumerated exactly.

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
    """q(z | x) = OneHotCategorical(softmax(f(x))) over K categories, for :class:`CategoricalVAE`.

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


__all__ = ["MAX_ENUM_BITS", "BernoulliGuide", "BinaryVector", "CategoricalGuide", "CategoricalVAE",
           "SigmoidBeliefVAE"]
