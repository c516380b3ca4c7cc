"""Probabilistic PCA: a linear-Gaussian latent model with everything in closed form.

``z ~ N(0, I_D)``, ``x | z ~ N(W z + mu, sigma^2 I)``. Its marginal
``p(x) = N(mu, W W^T + sigma^2 I)`` and posterior ``p(z | x) = N(m(x), L^{-1})`` with
precision ``L = I + W^T W / sigma^2`` are exact, which makes it the oracle for ELBOs,
log-likelihood estimators and inference gaps (the optimal mean-field gap is
``0.5 * (sum_i log L_ii - log det L)``).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn


class PPCA(nn.Module):
    """Pyro model of probabilistic PCA with fixed (buffer) parameters.

    :param W: loading matrix ``(x_dim, latent_dim)``.
    :param mu: offset ``(x_dim,)`` (zeros by default).
    :param sigma: observation noise standard deviation.

    Example::

        model = PPCA(torch.randn(5, 2), sigma=0.5)
        x = model.sample(100)
        model.log_marginal(x)  # exact log p(x), shape (100,)
    """

    def __init__(self, W: torch.Tensor, mu: torch.Tensor | None = None, sigma: float = 1.0) -> None:
        super().__init__()
        if W.dim() != 2:
            raise ValueError(f"W must be (x_dim, latent_dim), got shape {tuple(W.shape)}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.register_buffer("W", W.clone())
        self.register_buffer("mu", W.new_zeros(W.shape[0]) if mu is None else mu.to(W).clone())
        self.sigma = float(sigma)
        self.x_dim, self.latent_dim = W.shape

    def forward(self, x: torch.Tensor, *args, **kwargs) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([x.shape[0], self.latent_dim]).to_event(1))
            loc = z @ self.W.T + self.mu  # (..., B, x_dim)
            pyro.sample("x", dist.Normal(loc, self.sigma).to_event(1), obs=x)

    def marginal(self) -> dist.MultivariateNormal:
        """p(x) = N(mu, W W^T + sigma^2 I)."""
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.x_dim, dtype=self.W.dtype, device=self.W.device)
        return dist.MultivariateNormal(self.mu, covariance_matrix=cov)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x), shape ``(B,)``."""
        return self.marginal().log_prob(x)

    def posterior_precision(self) -> torch.Tensor:
        """L = I + W^T W / sigma^2, the same for every x."""
        return torch.eye(self.latent_dim, dtype=self.W.dtype, device=self.W.device) + self.W.T @ self.W / self.sigma**2

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """Exact p(z | x): batch shape ``(B,)``, event ``(D,)``."""
        L = self.posterior_precision()
        mean = torch.linalg.solve(L, (self.W.T @ (x - self.mu).T) / self.sigma**2).T  # (B, D)
        return dist.MultivariateNormal(mean, precision_matrix=L.expand(x.shape[0], -1, -1))

    def optimal_mean_field_gap(self) -> float:
        """KL(q* || p(z|x)) for the best diagonal Gaussian q*: 0.5 (sum log L_ii - log det L)."""
        L = self.posterior_precision()
        return 0.5 * (torch.log(torch.diagonal(L)).sum() - torch.logdet(L)).item()

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Draw ``n`` observations from p(x)."""
        return self.marginal().sample((n,))


class PPCAPosteriorGuide(nn.Module):
    """The exact posterior of a :class:`PPCA` as a guide (its ELBO equals log p(x))."""

    def __init__(self, ppca: PPCA) -> None:
        super().__init__()
        self.ppca = ppca

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.ppca.posterior(x))
