"""The variational autoencoder's generative model p(x, z) = N(z; 0, I) p(x | decoder(z))."""

from __future__ import annotations

from typing import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from vi_lab.models.likelihoods import make_likelihood
from vi_lab.nets import make_decoder


class VAE(nn.Module):
    """Pyro model of a VAE: ``z ~ N(0, I)`` per datapoint, ``x ~ likelihood(decoder(z))``.

    Calling the module runs the Pyro model; it keeps the contract of DESIGN.md (every
    per-datapoint site inside the ``"data"`` plate, batch as the rightmost batch
    dimension) so :func:`vi_lab.fit` and the evaluators take it as it is.

    ``beta`` is a scale on the latent site, declared in :attr:`site_scales`:
    :func:`vi_lab.fit` applies it to ``z`` in *both* model and guide, so the KL term
    (``E_q[log q(z|x) - log p(z)]``) is what gets weighted. Evaluators ignore it and
    report the true ELBO.

    :param latent_dim: size of z.
    :param hidden: decoder hidden widths (MLP) or ignored (conv).
    :param arch: ``"mlp"`` or ``"conv"``.
    :param likelihood: a name in :data:`vi_lab.models.likelihoods.LIKELIHOODS` or a module
        mapping decoder outputs to a distribution with event shape ``(x_dim,)``.
    :param beta: weight of the KL term (1 is the plain VAE).
    :param x_dim: flattened observation size.
    :param decoder: a ready decoder ``z -> (..., x_dim)`` instead of building one.
    :param name: prefix of the decoder's parameters in Pyro's param store.

    Example::

        model = VAE(latent_dim=20, hidden=[400])
        guide = vi_lab.guides.make_guide("mean_field", latent_dim=20, hidden=[400])
        result = vi_lab.fit(model, guide, x_train, epochs=10, batch_size=128, lr=1e-3)
    """

    def __init__(
        self,
        latent_dim: int = 20,
        hidden: int | Sequence[int] = (400,),
        *,
        arch: str = "mlp",
        likelihood: str | nn.Module = "bernoulli",
        beta: float = 1.0,
        x_dim: int = 784,
        decoder: nn.Module | None = None,
        name: str = "model",
    ) -> None:
        super().__init__()
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0 (1 is the plain VAE), got {beta!r}")
        self.latent_dim, self.x_dim, self.beta, self.name = latent_dim, x_dim, float(beta), name
        self.decoder = decoder if decoder is not None else make_decoder(arch, latent_dim, hidden, x_dim)
        self.likelihood = make_likelihood(likelihood, x_dim) if isinstance(likelihood, str) else likelihood

    @property
    def site_scales(self) -> dict[str, float]:
        """Per-site scales that :func:`vi_lab.fit` applies to model and guide alike."""
        return {} if self.beta == 1.0 else {"z": self.beta}

    def prior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """p(z) for a batch shaped like ``x``: batch shape ``(B,)``, event ``(D,)``."""
        # 0 and 1 made on x's device from no Python number: nothing to copy mid-step (CUDA graphs)
        return dist.Normal(x.new_zeros(()), x.new_ones(())).expand([x.shape[0], self.latent_dim]).to_event(1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x))
            out = self.decoder(z)  # (..., B, x_dim)
            pyro.sample("x", self.likelihood(out), obs=x)
        return z

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z), e.g. for pictures."""
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Means of p(x | z) for ``n`` prior draws z ~ N(0, I), shape ``(n, x_dim)``."""
        device = device or next(self.parameters()).device
        return self.decode(torch.randn(n, self.latent_dim, device=device))
