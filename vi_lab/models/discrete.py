"""VAEs with discrete latents: the generative side p(x, z) with binary or categorical z.

* :class:`SigmoidBeliefVAE`: ``z`` is a vector of binary units with a learned
  factorized prior, ``p(z_d = 1) = sigmoid(a_d)``, and ``x ~ Bernoulli(decoder(z))``:
  a sigmoid belief network with an MLP decoder (NVIL's SBN when ``hidden=()``).
  Guide: :class:`vi_lab.guides.discrete.BernoulliGuide`.
* :class:`CategoricalVAE`: ``z`` is one of K categories (one-hot), uniform prior.
  Guide: :class:`vi_lab.guides.discrete.CategoricalGuide`.

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

from vi_lab.models.vae import VAE

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


__all__ = ["CategoricalVAE", "SigmoidBeliefVAE"]
