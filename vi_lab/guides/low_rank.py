"""Low-rank-plus-diagonal Gaussian guides: covariance ``W W^T + diag(d)`` with W of rank r."""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from vi_lab.guides.base import AmortizedGuide
from vi_lab.guides.local_base import MIN_SCALE, LocalGuide, inv_softplus, moments


def _check_rank(rank: int, latent_dim: int) -> None:
    if not isinstance(rank, int) or not 1 <= rank <= latent_dim:
        raise ValueError(f"rank must be an integer between 1 and latent_dim={latent_dim}, got {rank!r}")


class LowRankGuide(AmortizedGuide):
    """q(z | x) = LowRankMultivariateNormal(mu(x), W(x), d(x)): covariance ``W W^T + diag(d)``.

    Between mean-field (r = 0) and full covariance (r = D) at O(D r) cost per datapoint.

    :param encoder: trunk ``x -> features``.
    :param latent_dim: D.
    :param rank: r, the number of columns of the factor W (1 <= r <= D).

    Example::

        guide = LowRankGuide(make_encoder("mlp", 784, [400]), latent_dim=20, rank=3)
        guide.get_posterior(torch.rand(8, 784)).cov_factor.shape  # torch.Size([8, 20, 3])
    """

    options: tuple[str, ...] = ("rank",)

    def __init__(self, encoder: nn.Module, latent_dim: int, *, rank: int = 2, **kwargs) -> None:
        super().__init__(encoder, latent_dim, **kwargs)
        _check_rank(rank, latent_dim)
        self.rank = rank
        self.loc = nn.Linear(self.feature_dim, latent_dim)
        self.raw_diag = nn.Linear(self.feature_dim, latent_dim)
        self.factor = nn.Linear(self.feature_dim, latent_dim * rank)

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        h = self.encoder(x)
        cov_factor = self.factor(h).reshape(*h.shape[:-1], self.latent_dim, self.rank)  # (B, D, r)
        cov_diag = (softplus(self.raw_diag(h)) + MIN_SCALE) ** 2
        return dist.LowRankMultivariateNormal(self.loc(h), cov_factor, cov_diag)


class LocalLowRank(LocalGuide):
    """q_i(z) = N(m_i, W_i W_i^T + diag(d_i)) with free m_i, W_i (D x r), d_i per datapoint.

    :param rank: r.

    Example::

        local = LocalLowRank(100, 20, rank=3).init_from(amortized.get_posterior(x[:100]))
    """

    def __init__(self, num_data: int, latent_dim: int, *, rank: int = 2, **kwargs) -> None:
        super().__init__(num_data, latent_dim, **kwargs)
        _check_rank(rank, latent_dim)
        self.rank = rank
        self.loc = nn.Parameter(torch.zeros(num_data, latent_dim))
        # W = 0 is a saddle of the ELBO (W and -W are equivalent): start slightly off it
        self.cov_factor = nn.Parameter(0.1 * torch.randn(num_data, latent_dim, rank))
        self.raw_diag = nn.Parameter(torch.full((num_data, latent_dim), float(inv_softplus(torch.tensor(1.0)))))

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        cov_diag = (softplus(self.raw_diag) + MIN_SCALE) ** 2
        return dist.LowRankMultivariateNormal(self.loc, self.cov_factor, cov_diag)

    @classmethod
    def options_from(cls, q: dist.Distribution) -> dict[str, Any]:
        return {"rank": q.cov_factor.shape[-1]} if isinstance(q, dist.LowRankMultivariateNormal) else {}

    @torch.no_grad()
    def init_from(self, q: dist.Distribution) -> "LocalLowRank":
        self._check_init(q)
        if isinstance(q, dist.LowRankMultivariateNormal) and q.cov_factor.shape[-1] == self.rank:
            mean, factor, diag = q.loc, q.cov_factor, q.cov_diag
        else:
            # the best rank-r part of the covariance (top eigenpairs), the rest on the diagonal
            mean, cov = moments(q)
            evals, evecs = torch.linalg.eigh(cov)  # ascending
            top, rest = evals[..., -self.rank:], evals[..., :-self.rank]
            floor = rest.mean(-1, keepdim=True) if rest.shape[-1] else top.new_zeros(top.shape[:-1] + (1,))
            factor = evecs[..., -self.rank:] * (top - floor).clamp_min(1e-4).sqrt().unsqueeze(-2)  # (N, D, r)
            diag = (torch.diagonal(cov, dim1=-2, dim2=-1) - factor.pow(2).sum(-1)).clamp_min(4 * MIN_SCALE**2)
        self.loc.copy_(mean)
        self.cov_factor.copy_(factor)
        self.raw_diag.copy_(inv_softplus(diag.sqrt() - MIN_SCALE))
        return self
