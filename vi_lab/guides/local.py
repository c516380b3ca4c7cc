"""Non-amortized (local) guides: free variational parameters for each of N fixed datapoints.

A local guide answers "how good could q(z | x) be for *these* points if the encoder
were perfect?": optimizing it per datapoint removes the amortization gap and leaves
only the approximation gap of its family (Cremer, Li & Duvenaud, 2018). Each family
mirrors an amortized one and can start from an amortized guide's output for the same
data (:meth:`LocalGuide.init_from`), so the optimization refines what the encoder gave.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
from pyro.infer import SVI, ELBO, Trace_ELBO
from torch import nn
from torch.nn.functional import softplus

from vi_lab.guides.base import sample_posterior

MIN_SCALE = 1e-4


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


@torch.no_grad()
def moments(q: dist.Distribution, num_samples: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(B, D)`` and covariance ``(B, D, D)`` of a posterior, by Monte Carlo where needed.

    :param q: batch shape ``(B,)``, event shape ``(D,)``.
    :param num_samples: draws when the family has no closed-form moments (flows, mixtures).
    """
    base = q.base_dist if isinstance(q, dist.Independent) else q
    if isinstance(base, dist.Normal):
        return base.mean, torch.diag_embed(base.variance)
    if isinstance(q, (dist.MultivariateNormal, dist.LowRankMultivariateNormal)):
        return q.mean, q.covariance_matrix
    z = q.sample((num_samples,))  # (S, B, D)
    mean = z.mean(0)
    c = z - mean
    return mean, torch.einsum("sbi,sbj->bij", c, c) / (num_samples - 1)


class LocalGuide(nn.Module):
    """Base class of the local families: ``get_posterior`` reads per-datapoint parameters.

    :param num_data: N, the number of datapoints this guide holds parameters for.
    :param latent_dim: D.
    :param site: name of the latent site.
    :param name: prefix in Pyro's param store.

    The guide must be called with the same N datapoints, in the same order, every time
    (full batch): row i of every parameter belongs to datapoint i.
    """

    def __init__(self, num_data: int, latent_dim: int, *, site: str = "z", name: str = "local_guide") -> None:
        super().__init__()
        if num_data < 1 or latent_dim < 1:
            raise ValueError(f"num_data and latent_dim must be positive, got {num_data}, {latent_dim}")
        self.num_data, self.latent_dim, self.site, self.name = num_data, latent_dim, site, name
        self.reparameterized = True

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[0] != self.num_data:
            raise ValueError(f"this local guide holds parameters for {self.num_data} datapoints but got a batch "
                             f"of {x.shape[0]}; call it with the same full set of points it was built for")

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        """q_i(z) for each of the N datapoints: batch ``(N,)``, event ``(D,)``."""
        raise NotImplementedError

    def init_from(self, q: dist.Distribution) -> "LocalGuide":
        """Start from a posterior for the same N points (e.g. an amortized guide's output)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check(x)
        return sample_posterior(self, x, *args, **kwargs)


class LocalMeanField(LocalGuide):
    """q_i(z) = N(m_i, diag(s_i^2)), free m_i, s_i per datapoint."""

    def __init__(self, num_data: int, latent_dim: int, **kwargs) -> None:
        super().__init__(num_data, latent_dim, **kwargs)
        self.loc = nn.Parameter(torch.zeros(num_data, latent_dim))
        self.raw_scale = nn.Parameter(torch.full((num_data, latent_dim), float(_inv_softplus(torch.tensor(1.0)))))

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        return dist.Normal(self.loc, softplus(self.raw_scale) + MIN_SCALE).to_event(1)

    @torch.no_grad()
    def init_from(self, q: dist.Distribution) -> "LocalMeanField":
        mean, cov = moments(q)
        self.loc.copy_(mean)
        std = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(4 * MIN_SCALE**2).sqrt()
        self.raw_scale.copy_(_inv_softplus(std - MIN_SCALE))
        return self


class LocalFullCov(LocalGuide):
    """q_i(z) = N(m_i, L_i L_i^T) with a free Cholesky factor L_i per datapoint."""

    def __init__(self, num_data: int, latent_dim: int, **kwargs) -> None:
        super().__init__(num_data, latent_dim, **kwargs)
        self.loc = nn.Parameter(torch.zeros(num_data, latent_dim))
        self.raw_diag = nn.Parameter(torch.full((num_data, latent_dim), float(_inv_softplus(torch.tensor(1.0)))))
        self.lower = nn.Parameter(torch.zeros(num_data, latent_dim, latent_dim))

    def scale_tril(self) -> torch.Tensor:
        """Cholesky factors ``(N, D, D)``: positive diagonal, free strict lower triangle."""
        return self.lower.tril(-1) + torch.diag_embed(softplus(self.raw_diag) + MIN_SCALE)

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        return dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril())

    @torch.no_grad()
    def init_from(self, q: dist.Distribution) -> "LocalFullCov":
        mean, cov = moments(q)
        jitter = 1e-6 * torch.eye(self.latent_dim, dtype=cov.dtype, device=cov.device)
        chol = torch.linalg.cholesky(cov + jitter)
        self.loc.copy_(mean)
        diag = torch.diagonal(chol, dim1=-2, dim2=-1).clamp_min(2 * MIN_SCALE)
        self.raw_diag.copy_(_inv_softplus(diag - MIN_SCALE))
        self.lower.copy_(chol.tril(-1))
        return self


LOCAL_GUIDES: dict[str, type[LocalGuide]] = {
    "mean_field": LocalMeanField,
    "full_cov": LocalFullCov,
}


def make_local_guide(
    name: str,
    num_data: int | None = None,
    latent_dim: int | None = None,
    *,
    init_from: nn.Module | dist.Distribution | None = None,
    x: torch.Tensor | None = None,
    **family_kwargs,
) -> LocalGuide:
    """Build a local guide of family ``name``, optionally initialized from an amortized guide.

    :param name: a key of :data:`LOCAL_GUIDES`.
    :param num_data: N (taken from ``x`` when omitted).
    :param latent_dim: D (taken from ``init_from`` when omitted).
    :param init_from: an amortized guide (then ``x`` is required: its output for ``x``
        is the starting point) or a posterior distribution with batch ``(N,)``.
    :param x: the N datapoints.
    :param family_kwargs: family options, passed to the class.

    Example::

        local = make_local_guide("full_cov", init_from=amortized_guide, x=x_test[:100])
        optimize_local(model, local, x_test[:100])
    """
    try:
        cls = LOCAL_GUIDES[name]
    except KeyError:
        raise ValueError(f"unknown local guide {name!r}; valid names: {', '.join(sorted(LOCAL_GUIDES))}") from None
    q = None
    if init_from is not None and not isinstance(init_from, dist.Distribution):
        if x is None:
            raise ValueError("initializing from an amortized guide needs the datapoints: pass x=")
        with torch.no_grad():
            q = init_from.get_posterior(x)
        family_kwargs.setdefault("site", getattr(init_from, "site", "z"))
    elif init_from is not None:
        q = init_from
    if num_data is None:
        if x is None and q is None:
            raise ValueError("pass num_data=, x= or init_from=")
        num_data = x.shape[0] if x is not None else q.batch_shape[0]
    if latent_dim is None:
        if q is None:
            raise ValueError("pass latent_dim= (or init_from= to take it from)")
        latent_dim = q.event_shape[0]
    guide = cls(num_data, latent_dim, **family_kwargs)
    if x is not None or q is not None:
        guide.to(x.device if x is not None else q.sample().device)
    if q is not None:
        guide.init_from(q)
    return guide


@dataclass
class LocalFit:
    """Outcome of :func:`optimize_local`: steps used, whether the criterion was met, loss trace.

    ``criterion`` states the rule, e.g. "mean -ELBO over a 100-step window improved by
    < 0.001 nats per datapoint".
    """

    steps: int
    converged: bool
    criterion: str
    losses: list[float] = field(default_factory=list)


def optimize_local(
    model: nn.Module,
    guide: LocalGuide,
    x: torch.Tensor,
    *args,
    max_steps: int = 5000,
    lr: float = 1e-2,
    num_particles: int = 16,
    loss: ELBO | None = None,
    window: int = 100,
    tol: float = 1e-3,
    **kwargs,
) -> LocalFit:
    """Maximize the ELBO of a local guide on its N datapoints (full batch), model fixed.

    Adam on the guide's parameters only; the loss is the per-datapoint -ELBO with
    ``num_particles`` vectorized draws. Converged when the mean loss over the last
    ``window`` steps improves on the window before by less than ``tol`` nats per
    datapoint; otherwise stops at ``max_steps``.

    :param model: the (trained) model; its parameters are not updated.
    :param guide: a :class:`LocalGuide` for exactly the N rows of ``x``.
    :param x: the datapoints.
    :param max_steps: step budget.
    :param lr: Adam learning rate.
    :param num_particles: ELBO draws per step.
    :param loss: a Pyro ELBO to use instead of ``Trace_ELBO``.
    :param window: steps per convergence window.
    :param tol: convergence threshold in nats per datapoint.
    :returns: :class:`LocalFit`.
    """
    from vi_lab.infer import training_objective  # deferred: infer imports the guides package

    elbo = loss or Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    optim = pyro.optim.Adam({"lr": lr})
    store = pyro.get_param_store()
    for key in [k for k in store.keys() if k.startswith(guide.name + "$$$")]:
        del store[key]  # an earlier local guide of the same name must not lend its tensors
    was_training = model.training if isinstance(model, nn.Module) else False
    frozen = [p for p in (model.parameters() if isinstance(model, nn.Module) else []) if p.requires_grad]
    for p in frozen:  # no gradients for the model: cheaper, and nothing can move it
        p.requires_grad_(False)
    if isinstance(model, nn.Module):
        model.eval()
    # the block keeps the model's params out of the optimizer: only the guide's are stepped
    wrapped_model = pyro.poutine.block(training_objective(model), hide_types=["param"])
    svi = SVI(wrapped_model, training_objective(guide), optim, elbo)
    criterion = f"mean -ELBO over a {window}-step window improved by < {tol} nats per datapoint"
    losses: list[float] = []
    converged = False
    try:
        for step in range(1, max_steps + 1):
            losses.append(svi.step(x, *args, **kwargs))
            if step >= 2 * window and step % window == 0:
                prev = sum(losses[-2 * window:-window]) / window
                last = sum(losses[-window:]) / window
                if prev - last < tol:
                    converged = True
                    break
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if isinstance(model, nn.Module):
            model.train(was_training)
    return LocalFit(steps=len(losses), converged=converged, criterion=criterion, losses=losses)
