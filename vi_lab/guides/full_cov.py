"""Full-covariance Gaussian guides: q(z | x) = N(mu(x), L(x) L(x)^T) with a Cholesky factor L."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from vi_lab.guides.base import AmortizedGuide
from vi_lab.guides.local_base import MIN_SCALE, LocalGuide, inv_softplus, moments


def cholesky_factor(raw_diag: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Lower-triangular factors ``(..., D, D)`` with diagonal ``softplus(raw_diag) + MIN_SCALE``.

    :param raw_diag: ``(..., D)`` unconstrained diagonal.
    :param lower: ``(..., D, D)`` whose strict lower triangle is used as is (the rest is ignored).
    """
    return lower.tril(-1) + torch.diag_embed(softplus(raw_diag) + MIN_SCALE)


class FullCovGuide(AmortizedGuide):
    """q(z | x) = MultivariateNormal(mu(x), scale_tril=L(x)), L from the encoder.

    Three heads read the encoder's features: the mean, the diagonal of L (made positive
    by a softplus) and the D(D-1)/2 entries of its strict lower triangle. The last head
    starts at zero and its output is scaled by :attr:`LOWER_SCALE`, so training starts
    from a mean-field posterior and adds correlations at a tenth of Adam's usual pace.

    :param encoder: trunk ``x -> features``.
    :param latent_dim: D.

    Example::

        guide = FullCovGuide(make_encoder("mlp", 784, [400]), latent_dim=20)
        guide.get_posterior(torch.rand(8, 784)).scale_tril.shape  # torch.Size([8, 20, 20])
    """

    options: tuple[str, ...] = ()
    LOWER_SCALE = 0.1  # output scale of the off-diagonal head (see __init__)

    def __init__(self, encoder: nn.Module, latent_dim: int, **kwargs) -> None:
        super().__init__(encoder, latent_dim, **kwargs)
        self.loc = nn.Linear(self.feature_dim, latent_dim)
        self.raw_diag = nn.Linear(self.feature_dim, latent_dim)
        self.lower = nn.Linear(self.feature_dim, latent_dim * (latent_dim - 1) // 2)
        # Start as the mean-field guide, and let the correlations grow slowly: Adam moves
        # every weight by about lr per step whatever its gradient's signal-to-noise, and the
        # D(D-1)/2 off-diagonal outputs get mostly noise early on; the spurious correlated
        # variance costs ELBO (on MNIST after 10 epochs: random init 4.6 nats of test ELBO
        # behind mean-field, zero init 2.9). LOWER_SCALE = 0.1 makes that head's steps 10x
        # smaller. Zero is not a stationary point here, unlike for a low-rank factor: the
        # ELBO's gradient in L_ij is nonzero.
        nn.init.zeros_(self.lower.weight)
        nn.init.zeros_(self.lower.bias)
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)

    def scale_tril(self, h: torch.Tensor) -> torch.Tensor:
        """Cholesky factors ``(B, D, D)`` for features ``h`` ``(B, F)``."""
        d = self.latent_dim
        lower = h.new_zeros(*h.shape[:-1], d, d)
        lower[..., self._rows, self._cols] = self.LOWER_SCALE * self.lower(h)  # the strict lower triangle
        return cholesky_factor(self.raw_diag(h), lower)

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        h = self.encoder(x)
        return dist.MultivariateNormal(self.loc(h), scale_tril=self.scale_tril(h))


class LocalFullCov(LocalGuide):
    """q_i(z) = N(m_i, L_i L_i^T) with a free Cholesky factor L_i per datapoint.

    Example::

        local = LocalFullCov(100, 20).init_from(amortized.get_posterior(x[:100]))
    """

    def __init__(self, num_data: int, latent_dim: int, **kwargs) -> None:
        super().__init__(num_data, latent_dim, **kwargs)
        self.loc = nn.Parameter(torch.zeros(num_data, latent_dim))
        self.raw_diag = nn.Parameter(torch.full((num_data, latent_dim), float(inv_softplus(torch.tensor(1.0)))))
        self.lower = nn.Parameter(torch.zeros(num_data, latent_dim, latent_dim))

    def scale_tril(self) -> torch.Tensor:
        """Cholesky factors ``(N, D, D)``: positive diagonal, free strict lower triangle."""
        return cholesky_factor(self.raw_diag, self.lower)

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        return dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril())

    @torch.no_grad()
    def init_from(self, q: dist.Distribution) -> "LocalFullCov":
        self._check_init(q)
        if isinstance(q, dist.MultivariateNormal):  # same family: copy it exactly
            mean, chol = q.mean, q.scale_tril
        else:
            mean, cov = moments(q)
            jitter = 1e-6 * torch.eye(self.latent_dim, dtype=cov.dtype, device=cov.device)
            chol = torch.linalg.cholesky(cov + jitter)
        self.loc.copy_(mean)
        diag = torch.diagonal(chol, dim1=-2, dim2=-1).clamp_min(2 * MIN_SCALE)
        self.raw_diag.copy_(inv_softplus(diag - MIN_SCALE))
        self.lower.copy_(chol.tril(-1))
        return self
