"""Normalizing-flow guides: a diagonal Normal pushed through k conditional flow steps.

``q(z | x)`` is ``ConditionalTransformedDistribution(base, steps).condition(h)`` with
``h`` the encoder's features: the base ``N(mu(h), diag(sigma(h)^2))`` and every step's
parameters are functions of ``h`` (Pyro's conditional transforms), so the flow is
amortized like the encoder. Three step types:

* ``iaf``: inverse autoregressive flow (Kingma et al., 2016), Pyro's
  ``ConditionalAffineAutoregressive`` with a conditional MADE that reads z and h;
* ``planar`` / ``radial`` (Rezende & Mohamed, 2015): Pyro's ``ConditionalPlanar`` /
  ``ConditionalRadial``, whose few per-datapoint parameters a hypernetwork reads off h.

Log-densities come from Pyro's ``TransformedDistribution`` (base log-density minus each
step's ``log_abs_det_jacobian``). Planar and radial steps have no closed-form inverse:
a sample is scored through the transform's cache, which is exactly how Pyro's ELBOs and
the vi_lab evaluators use a guide (sample, then score that same tensor). Their posterior
is a :class:`ForwardOnlyFlow`, which declares that a detached draw cannot be scored, so
score-function (REINFORCE) training of those two families is a clear error
(:mod:`vi_lab.score_function`).
"""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions.conditional import ConditionalDistribution, ConditionalTransformModule
from pyro.nn import DenseNN
from torch import nn
from torch.nn.functional import softplus

from vi_lab.guides.base import AmortizedGuide
from vi_lab.guides.local_base import MIN_SCALE


class DiagNormalHead(nn.Module, ConditionalDistribution):
    """The flow's base as a conditional distribution: features ``h`` -> ``N(mu(h), diag(sigma(h)^2))``.

    :param in_dim: feature size.
    :param latent_dim: D.
    """

    def __init__(self, in_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.loc = nn.Linear(in_dim, latent_dim)
        self.raw_scale = nn.Linear(in_dim, latent_dim)

    def condition(self, context: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(self.loc(context), softplus(self.raw_scale(context)) + MIN_SCALE).to_event(1)


class LinearHeads(nn.Module):
    """A linear hypernetwork: features ``(..., F)`` -> a tuple of parameters of widths ``param_dims``.

    The output layout of Pyro's ``DenseNN`` (what ``ConditionalPlanar`` / ``ConditionalRadial``
    expect), without hidden layers: the encoder's features are already a learned representation.
    """

    def __init__(self, in_dim: int, param_dims: Sequence[int]) -> None:
        super().__init__()
        self.param_dims = list(param_dims)
        self.linear = nn.Linear(in_dim, sum(self.param_dims))

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.linear(context).split(self.param_dims, dim=-1))


def hypernet(in_dim: int, hidden: Sequence[int] | None, param_dims: Sequence[int]) -> nn.Module:
    """:class:`LinearHeads` when ``hidden`` is empty, else Pyro's ``DenseNN`` with those hidden widths."""
    return DenseNN(in_dim, list(hidden), param_dims=list(param_dims)) if hidden else LinearHeads(in_dim, param_dims)


def non_invertible_message(cls_name: str) -> str:
    """The error for score-function training of a flow without an inverse."""
    return (f"{cls_name} supports reparameterized sampling only: its steps have no inverse, so a detached "
            "(REINFORCE) draw cannot be scored with gradients; use iaf, a Gaussian or the mixture family for "
            "score-function gradients")


class ForwardOnlyFlow(dist.TransformedDistribution):
    """A flow whose steps have no inverse: it scores only the draws it made itself (the steps' cache).

    Pathwise training and the evaluators sample and then score the same tensor, which
    the cache serves. A score-function (REINFORCE) draw is detached, a fresh tensor
    the cache does not know; the flow declares so in ``score_function_error``, which
    :func:`vi_lab.score_function.without_rsample` raises instead of returning a
    log-density without the flow's gradient. The declaration survives Pyro's plate
    broadcasting (:meth:`expand`).

    :param base_distribution: the base ``N(m, diag(s^2))``.
    :param transforms: the flow steps.
    :param reason: the error to raise on score-function use (:func:`non_invertible_message`).

    Example::

        guide = PlanarGuide(make_encoder("mlp", 784, [400]), latent_dim=20)
        guide.get_posterior(x).rsample()  # pathwise: fine
        with ScoreFunction():  # vi_lab.score_function
            guide(x)  # NotImplementedError: PlanarGuide supports reparameterized sampling only ...
    """

    def __init__(self, base_distribution: dist.TorchDistribution, transforms: list, reason: str,
                 validate_args: bool | None = None) -> None:
        super().__init__(base_distribution, transforms, validate_args=validate_args)
        self.score_function_error = reason

    def expand(self, batch_shape, _instance=None) -> "ForwardOnlyFlow":
        new = self._get_checked_instance(ForwardOnlyFlow, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.score_function_error = self.score_function_error
        return new


def flow_posterior(family: type, base: dist.TorchDistribution, transforms: list) -> dist.TransformedDistribution:
    """``base`` pushed through ``transforms``: a :class:`ForwardOnlyFlow` unless ``family.invertible``.

    :param family: the guide class (its ``invertible`` flag and its name, for the error).
    """
    if getattr(family, "invertible", False):
        return dist.TransformedDistribution(base, transforms)
    return ForwardOnlyFlow(base, transforms, non_invertible_message(family.__name__))


class FlowGuide(AmortizedGuide):
    """Base of the flow families: a conditional diagonal-Normal base and ``flow_steps`` conditional steps.

    Subclasses say which step (:meth:`make_step`); :meth:`get_posterior` is shared.

    :param encoder: trunk ``x -> features`` (the flow's context).
    :param latent_dim: D.
    :param flow_steps: k, the number of flow steps (default: the family's ``default_steps``).
    :param flow_hidden: hidden widths of each step's network: the MADE of an IAF step
        (default ``[10 * D]``, Pyro's), or the hypernetwork of a planar/radial step
        (default none: a linear map of the features).

    Score-function (REINFORCE) training needs ``log q`` of a detached draw with
    gradients, i.e. the flow's inverse: IAF steps have one; planar and radial steps
    only score the draw they made themselves (their cache), so under
    :class:`vi_lab.score_function.ScoreFunction` those two families raise an error
    (:class:`ForwardOnlyFlow`) instead of returning a log-density without the flow's
    gradient.
    """

    options: tuple[str, ...] = ("flow_steps", "flow_hidden")
    default_steps: int = 4
    invertible: bool = False  # whether the steps have an inverse (needed to score a detached draw)

    def __init__(self, encoder: nn.Module, latent_dim: int, *, flow_steps: int | None = None,
                 flow_hidden: Sequence[int] | None = None, **kwargs) -> None:
        super().__init__(encoder, latent_dim, **kwargs)
        flow_steps = self.default_steps if flow_steps is None else flow_steps
        if not isinstance(flow_steps, int) or flow_steps < 1:
            raise ValueError(f"flow_steps must be a positive integer, got {flow_steps!r}")
        if flow_hidden is not None and any((not isinstance(h, int)) or h < 1 for h in flow_hidden):
            raise ValueError(f"flow_hidden must be a list of positive integers, got {flow_hidden!r}")
        self.flow_steps = flow_steps
        self.flow_hidden = None if flow_hidden is None else list(flow_hidden)
        self.base = DiagNormalHead(self.feature_dim, latent_dim)
        self.flows = nn.ModuleList([self.make_step(self.feature_dim) for _ in range(flow_steps)])

    def make_step(self, context_dim: int) -> ConditionalTransformModule:
        """One conditional flow step reading a context of ``context_dim`` features."""
        raise NotImplementedError

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        h = self.encoder(x)
        # Pyro's ConditionalTransformedDistribution(base, flows).condition(h), with the declaration
        return flow_posterior(type(self), self.base.condition(h), [step.condition(h) for step in self.flows])


class IAFGuide(FlowGuide):
    """Inverse autoregressive flow: ``z_t = mu_t(z_{t-1}, h) + sigma_t(z_{t-1}, h) * z_{t-1}``.

    Each step is Pyro's ``ConditionalAffineAutoregressive`` over a conditional MADE (its
    own random variable order); sampling is one pass per step, and the log-determinant
    is ``sum log sigma_t``.

    Example::

        guide = IAFGuide(make_encoder("mlp", 784, [400]), latent_dim=20, flow_steps=2)
        q = guide.get_posterior(torch.rand(8, 784))
        z = q.rsample()
        q.log_prob(z).shape  # torch.Size([8])
    """

    default_steps = 2
    invertible = True

    def make_step(self, context_dim: int) -> ConditionalTransformModule:
        return T.conditional_affine_autoregressive(self.latent_dim, context_dim, hidden_dims=self.flow_hidden)


class PlanarGuide(FlowGuide):
    """Planar flow steps ``z' = z + u_hat tanh(w^T z + b)`` with ``(b, u, w)`` read off the features.

    Example::

        guide = PlanarGuide(make_encoder("mlp", 784, [400]), latent_dim=20, flow_steps=8)
    """

    default_steps = 8

    def make_step(self, context_dim: int) -> ConditionalTransformModule:
        return T.ConditionalPlanar(hypernet(context_dim, self.flow_hidden, [1, self.latent_dim, self.latent_dim]))


class RadialGuide(FlowGuide):
    """Radial flow steps ``z' = z + beta h(alpha, r) (z - z0)``, ``r = |z - z0|``, parameters read off the features.

    Example::

        guide = RadialGuide(make_encoder("mlp", 784, [400]), latent_dim=20, flow_steps=8)
    """

    default_steps = 8

    def make_step(self, context_dim: int) -> ConditionalTransformModule:
        return T.ConditionalRadial(hypernet(context_dim, self.flow_hidden, [self.latent_dim, 1, 1]))
