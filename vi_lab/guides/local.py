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

from vi_lab.contract import check_pair
from vi_lab.objectives import training_objective
from vi_lab.device import check_modules_on
from vi_lab.guides.full_cov import LocalFullCov
from vi_lab.guides.local_base import MIN_SCALE, LocalGuide, inv_softplus, moments
from vi_lab.guides.local_flows import LocalIAF, LocalPlanar, LocalRadial
from vi_lab.guides.low_rank import LocalLowRank
from vi_lab.guides.mean_field import LocalMeanField
from vi_lab.guides.mixture import LocalMixture

__all__ = [
    "LOCAL_GUIDES", "LocalFit", "LocalFullCov", "LocalGuide", "LocalIAF", "LocalLowRank", "LocalMeanField",
    "LocalMixture", "LocalPlanar", "LocalRadial", "MIN_SCALE", "inv_softplus", "make_local_guide", "moments",
    "optimize_local",
]

#: local families by name: the same names as the amortized ones in :data:`vi_lab.guides.GUIDES`
LOCAL_GUIDES: dict[str, type[LocalGuide]] = {
    "mean_field": LocalMeanField,
    "full_cov": LocalFullCov,
    "low_rank": LocalLowRank,
    "mixture": LocalMixture,
    "iaf": LocalIAF,
    "planar": LocalPlanar,
    "radial": LocalRadial,
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
        is the starting point) or a posterior distribution with batch ``(N,)``. A
        posterior of the same family is copied exactly (a flow's per-datapoint step
        parameters included); any other is matched by its mean and covariance.
    :param x: the N datapoints.
    :param family_kwargs: family options, passed to the class (``rank``, ``components``,
        ``flow_steps``, ``flow_hidden``). Options left out are read off ``init_from``
        when it is of the same family, so the copy is exact.

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
    if q is not None:
        family_kwargs = {**cls.options_from(q), **family_kwargs}
    guide = cls(num_data, latent_dim, **family_kwargs)
    if x is not None or q is not None:
        guide.to(x.device if x is not None else _device_of(q))
    if q is not None:
        guide.init_from(q)
    return guide


def _device_of(q: dist.Distribution) -> torch.device:
    """The device of a distribution's parameters (a draw only when none is found: it costs randomness)."""
    todo = [q]
    while todo:
        for value in vars(todo.pop()).values():
            if torch.is_tensor(value):
                return value.device
            if isinstance(value, torch.distributions.Distribution):
                todo.append(value)
    return q.sample().device


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

    Why a loop of its own and not :func:`vi_lab.fit`: this is not training over epochs of
    minibatches but one full-batch optimization of a fixed set of N points, with the model
    frozen and a stopping rule on convergence (a window of steps), and it runs inside the
    gap analysis for each of several families. It shares fit's objective layer
    (:func:`vi_lab.objectives.training_objective`, Pyro's SVI and ELBOs), not its epochs,
    batching, binarization, checkpoints or metrics, none of which apply.
    """
    check_modules_on(x, model, guide)
    check_pair(model, guide, x, *args, **kwargs)  # before Pyro's own checks, which name no fix
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
