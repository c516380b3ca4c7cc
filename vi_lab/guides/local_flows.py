"""Local (per-datapoint) flow guides: every datapoint gets its own base Normal and its own flow.

An amortized flow guide computes, for each datapoint, a base ``N(m, diag(s^2))`` and the
parameters of every step from the encoder's features. The local families here hold those
per-datapoint quantities as free tensors, so :meth:`init_from` can start exactly where the
amortized guide is for the same points, and optimization then moves each datapoint's
flow on its own:

* planar / radial: the step parameters ``(b, u, w)`` / ``(z0, alpha', beta')``, shape
  ``(k, N, ...)``, fed to Pyro's ``ConditionedPlanar`` / ``ConditionedRadial``;
* iaf: one masked autoregressive network (MADE) per datapoint (:class:`BatchedMADE`),
  fed to Pyro's ``AffineAutoregressive``. Starting from a ``ConditionalAffineAutoregressive``
  step, every datapoint's network is a copy of the shared one with the context's
  contribution folded into its first-layer bias, so it computes the same function.

Started from any other posterior (a mean-field guide's, say), the base takes its mean and
marginal scales and every step starts at the identity map.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.distributions.transforms.radial import ConditionedRadial
from pyro.nn.auto_reg_nn import ConditionalAutoRegressiveNN, create_mask
from torch import nn
from torch.nn.functional import relu, softplus

from vi_lab.guides.flows import flow_posterior
from vi_lab.guides.local_base import MIN_SCALE, LocalGuide, inv_softplus, moments

# softplus(alpha) = 1 makes a planar step the identity (u_hat = 0 when u is parallel to w)
_PLANAR_IDENTITY_ALPHA = math.log(math.e - 1.0)


def _flow_parts(q: dist.Distribution) -> tuple[dist.Distribution, list] | None:
    """``(base, transforms)`` of a transformed distribution, else None."""
    if isinstance(q, dist.TransformedDistribution):
        return q.base_dist, list(q.transforms)
    return None


def _base_normal(base: dist.Distribution) -> dist.Normal | None:
    inner = base.base_dist if isinstance(base, dist.Independent) else None
    return inner if isinstance(inner, dist.Normal) else None


class LocalFlow(LocalGuide):
    """Base of the local flow families: a free diagonal Normal per datapoint and ``flow_steps`` steps.

    Subclasses provide :meth:`transforms` (the k steps as Pyro transforms, per-datapoint
    parameters in their batch dimension), :meth:`_matches` / :meth:`_copy_step` (copy a step
    of the amortized family) and :meth:`_identity_steps`.

    :param num_data: N.
    :param latent_dim: D.
    :param flow_steps: k.
    """

    default_steps: int = 4
    invertible: bool = False  # whether the steps have an inverse (see FlowGuide, ForwardOnlyFlow)

    def __init__(self, num_data: int, latent_dim: int, *, flow_steps: int | None = None, **kwargs) -> None:
        super().__init__(num_data, latent_dim, **kwargs)
        flow_steps = self.default_steps if flow_steps is None else flow_steps
        if not isinstance(flow_steps, int) or flow_steps < 1:
            raise ValueError(f"flow_steps must be a positive integer, got {flow_steps!r}")
        self.flow_steps = flow_steps
        self.loc = nn.Parameter(torch.zeros(num_data, latent_dim))
        self.raw_scale = nn.Parameter(torch.full((num_data, latent_dim), float(inv_softplus(torch.tensor(1.0)))))

    def transforms(self) -> list:
        """The k flow steps, freshly built (each sample must be scored by the steps that drew it)."""
        raise NotImplementedError

    def get_posterior(self, x: torch.Tensor, *args, **kwargs) -> dist.TorchDistribution:
        base = dist.Normal(self.loc, softplus(self.raw_scale) + MIN_SCALE).to_event(1)
        return flow_posterior(type(self), base, self.transforms())

    @classmethod
    def _matches(cls, transform: Any) -> bool:
        raise NotImplementedError

    def _copy_step(self, i: int, transform: Any) -> None:
        raise NotImplementedError

    def _identity_steps(self) -> None:
        raise NotImplementedError

    @classmethod
    def options_from(cls, q: dist.Distribution) -> dict[str, Any]:
        parts = _flow_parts(q)
        if parts is None or not parts[1] or not all(cls._matches(t) for t in parts[1]):
            return {}
        return {"flow_steps": len(parts[1])}

    @torch.no_grad()
    def init_from(self, q: dist.Distribution) -> "LocalFlow":
        self._check_init(q)
        parts = _flow_parts(q)
        base = _base_normal(parts[0]) if parts is not None else None
        if base is not None and len(parts[1]) == self.flow_steps and all(self._matches(t) for t in parts[1]):
            # the same family: copy the base and every step's per-datapoint parameters
            self.loc.copy_(base.loc.expand_as(self.loc))
            self.raw_scale.copy_(inv_softplus((base.scale - MIN_SCALE).clamp_min(MIN_SCALE)).expand_as(self.loc))
            for i, t in enumerate(parts[1]):
                self._copy_step(i, t)
            return self
        if parts is not None and parts[1] and all(self._matches(t) for t in parts[1]):
            raise ValueError(f"the posterior to start from has {len(parts[1])} flow steps but this local guide has "
                             f"{self.flow_steps}; build it with flow_steps={len(parts[1])}")
        mean, cov = moments(q)
        self.loc.copy_(mean)
        std = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(4 * MIN_SCALE**2).sqrt()
        self.raw_scale.copy_(inv_softplus(std - MIN_SCALE))
        self._identity_steps()
        return self


def _step_params(transform: Any) -> tuple[torch.Tensor, ...]:
    params = transform._params
    return tuple(params() if callable(params) else params)


class LocalPlanar(LocalFlow):
    """Per-datapoint planar flows: free ``b (k, N, 1)``, ``u (k, N, D)``, ``w (k, N, D)``.

    Example::

        local = make_local_guide("planar", init_from=planar_guide, x=x[:100])
    """

    default_steps = 8

    def __init__(self, num_data: int, latent_dim: int, **kwargs) -> None:
        super().__init__(num_data, latent_dim, **kwargs)
        k, n, d = self.flow_steps, num_data, latent_dim
        self.bias = nn.Parameter(torch.zeros(k, n, 1))
        self.u = nn.Parameter(torch.zeros(k, n, d))
        self.w = nn.Parameter(torch.zeros(k, n, d))
        self._identity_steps()

    def transforms(self) -> list:
        return [ConditionedPlanar((self.bias[i], self.u[i], self.w[i])) for i in range(self.flow_steps)]

    @classmethod
    def _matches(cls, transform: Any) -> bool:
        return isinstance(transform, ConditionedPlanar)

    def _copy_step(self, i: int, transform: Any) -> None:
        bias, u, w = _step_params(transform)
        self.bias[i].copy_(bias.expand_as(self.bias[i]))
        self.u[i].copy_(u.expand_as(self.u[i]))
        self.w[i].copy_(w.expand_as(self.w[i]))

    @torch.no_grad()
    def _identity_steps(self) -> None:
        # w random (w = 0 divides by zero in u_hat), u parallel to w with u.w = log(e - 1)
        w = torch.randn_like(self.w) / math.sqrt(self.latent_dim)
        self.w.copy_(w)
        self.u.copy_(w * _PLANAR_IDENTITY_ALPHA / w.pow(2).sum(-1, keepdim=True))
        self.bias.zero_()


class LocalRadial(LocalFlow):
    """Per-datapoint radial flows: free ``z0 (k, N, D)``, ``alpha' (k, N, 1)``, ``beta' (k, N, 1)``.

    Example::

        local = make_local_guide("radial", init_from=radial_guide, x=x[:100])
    """

    default_steps = 8

    def __init__(self, num_data: int, latent_dim: int, **kwargs) -> None:
        super().__init__(num_data, latent_dim, **kwargs)
        k, n, d = self.flow_steps, num_data, latent_dim
        self.x0 = nn.Parameter(torch.zeros(k, n, d))
        self.alpha_prime = nn.Parameter(torch.zeros(k, n, 1))
        self.beta_prime = nn.Parameter(torch.zeros(k, n, 1))
        self._identity_steps()

    def transforms(self) -> list:
        return [ConditionedRadial((self.x0[i], self.alpha_prime[i], self.beta_prime[i]))
                for i in range(self.flow_steps)]

    @classmethod
    def _matches(cls, transform: Any) -> bool:
        return isinstance(transform, ConditionedRadial)

    def _copy_step(self, i: int, transform: Any) -> None:
        x0, alpha_prime, beta_prime = _step_params(transform)
        self.x0[i].copy_(x0.expand_as(self.x0[i]))
        self.alpha_prime[i].copy_(alpha_prime.expand_as(self.alpha_prime[i]))
        self.beta_prime[i].copy_(beta_prime.expand_as(self.beta_prime[i]))

    @torch.no_grad()
    def _identity_steps(self) -> None:
        # beta = -softplus(alpha') + softplus(beta') is 0 when beta' = alpha'; centre each step on the base mean
        self.x0.copy_(self.loc.detach().expand_as(self.x0))
        self.alpha_prime.zero_()
        self.beta_prime.zero_()


class BatchedMADE(nn.Module):
    """N masked autoregressive networks, one per datapoint, evaluated together.

    The architecture and output layout of Pyro's ``AutoRegressiveNN`` with
    ``param_dims=[1, 1]`` (ReLU hidden layers, no skip connections): ``forward(z)`` maps
    ``(..., N, D)`` to ``(mean, log_scale)``, each ``(..., N, D)``, where row n of every
    weight belongs to datapoint n. It exposes ``permutation`` like Pyro's networks, so
    ``AffineAutoregressive`` can invert it.

    :param num_data: N.
    :param input_dim: D.
    :param hidden_dims: hidden widths (each at least D).
    :param permutation: variable order (random by default, as in Pyro).
    """

    def __init__(self, num_data: int, input_dim: int, hidden_dims: Sequence[int],
                 permutation: torch.Tensor | None = None) -> None:
        super().__init__()
        hidden_dims = list(hidden_dims)
        if not hidden_dims or any(h < input_dim for h in hidden_dims):
            raise ValueError(f"hidden_dims must be non-empty widths >= input_dim={input_dim}, got {hidden_dims}")
        perm = torch.randperm(input_dim) if permutation is None else permutation.long()
        masks, _ = create_mask(input_dim, 0, hidden_dims, perm, 2)
        sizes = [input_dim, *hidden_dims, 2 * input_dim]
        self.input_dim, self.hidden_dims, self.num_layers = input_dim, hidden_dims, len(sizes) - 1
        self.register_buffer("permutation", perm)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            bound = 1.0 / math.sqrt(a)  # nn.Linear's default initialization, independently per datapoint
            self.weights.append(nn.Parameter(torch.empty(num_data, b, a).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_data, b).uniform_(-bound, bound)))
            self.register_buffer(f"mask_{i}", masks[i])

    def get_permutation(self) -> torch.Tensor:
        return self.permutation

    def mask(self, i: int) -> torch.Tensor:
        return getattr(self, f"mask_{i}")

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = z
        for i in range(self.num_layers):
            w = self.weights[i] * self.mask(i)  # (N, out, in)
            h = torch.einsum("noi,...ni->...no", w, h) + self.biases[i]
            if i < self.num_layers - 1:
                h = relu(h)
        out = h.reshape(*h.shape[:-1], 2, self.input_dim)  # (..., N, 2, D): Pyro's layout, mean first
        return out[..., 0, :], out[..., 1, :]

    @torch.no_grad()
    def zero_output(self) -> None:
        """Make the network output 0 (an identity affine step)."""
        self.weights[-1].zero_()
        self.biases[-1].zero_()

    @torch.no_grad()
    def copy_from(self, arn: ConditionalAutoRegressiveNN, context: torch.Tensor) -> None:
        """Become ``arn(., context_n)`` for datapoint n: shared weights, context folded into the first bias.

        :param arn: Pyro's conditional MADE (``param_dims=[1, 1]``, ReLU, no skip connections).
        :param context: ``(N, C)`` the context each datapoint's copy is conditioned on.
        """
        if arn.skip_layer is not None or list(arn.param_dims) != [1, 1] or not isinstance(arn.f, nn.ReLU):
            raise ValueError("can only copy a ConditionalAutoRegressiveNN with param_dims=[1, 1], ReLU and no "
                             "skip connections")
        if list(arn.hidden_dims) != self.hidden_dims or arn.input_dim != self.input_dim:
            raise ValueError(f"the network to copy has hidden dims {list(arn.hidden_dims)} and input {arn.input_dim}; "
                             f"this one has {self.hidden_dims} and {self.input_dim}: build it with flow_hidden="
                             f"{list(arn.hidden_dims)}")
        c = arn.context_dim
        n = self.weights[0].shape[0]
        for i, layer in enumerate(arn.layers):
            w = layer.weight * layer.mask  # (out, in)
            bias = layer.bias.expand(n, -1)
            mask = layer.mask
            if i == 0:  # input is cat([context, z]): the context part becomes a per-datapoint bias
                bias = bias + context @ w[:, :c].T  # (N, out)
                w, mask = w[:, c:], mask[:, c:]
            self.weights[i].copy_(w.expand_as(self.weights[i]))
            self.biases[i].copy_(bias)
            self.mask(i).copy_(mask)
        self.permutation.copy_(arn.permutation)


class LocalIAF(LocalFlow):
    """Per-datapoint inverse autoregressive flows: one MADE per datapoint and step (:class:`BatchedMADE`).

    :param flow_hidden: hidden widths of each MADE (default ``[10 * D]``, as the amortized IAF).
    :param transform_kwargs: ``AffineAutoregressive`` options (clipping of log-scales, ``stable``).

    Parameters: ``N * k * (H * D + 2 * D * H)`` for one hidden layer of width H, so keep N
    to the few hundred points a gap study uses.

    Example::

        local = make_local_guide("iaf", init_from=iaf_guide, x=x[:100])  # same function as the encoder's
    """

    default_steps = 2
    invertible = True

    def __init__(self, num_data: int, latent_dim: int, *, flow_hidden: Sequence[int] | None = None,
                 **kwargs) -> None:
        kwargs_transform = {k: kwargs.pop(k) for k in ("log_scale_min_clip", "log_scale_max_clip", "sigmoid_bias",
                                                        "stable") if k in kwargs}
        super().__init__(num_data, latent_dim, **kwargs)
        self.flow_hidden = [10 * latent_dim] if flow_hidden is None else list(flow_hidden)
        self.transform_kwargs = kwargs_transform
        self.mades = nn.ModuleList([BatchedMADE(num_data, latent_dim, self.flow_hidden)
                                    for _ in range(self.flow_steps)])
        self._identity_steps()

    def transforms(self) -> list:
        return [T.AffineAutoregressive(made, **self.transform_kwargs) for made in self.mades]

    @classmethod
    def _matches(cls, transform: Any) -> bool:
        arn = getattr(transform, "arn", None)
        return (isinstance(transform, T.AffineAutoregressive) and isinstance(arn, partial)
                and isinstance(arn.func, ConditionalAutoRegressiveNN))

    @classmethod
    def options_from(cls, q: dist.Distribution) -> dict[str, Any]:
        options = super().options_from(q)
        if options:
            options["flow_hidden"] = list(q.transforms[0].arn.func.hidden_dims)
        return options

    def _copy_step(self, i: int, transform: Any) -> None:
        self.mades[i].copy_from(transform.arn.func, transform.arn.keywords["context"])
        self.transform_kwargs = {"log_scale_min_clip": transform.log_scale_min_clip,
                                 "log_scale_max_clip": transform.log_scale_max_clip,
                                 "sigmoid_bias": transform.sigmoid_bias, "stable": transform.stable}

    @torch.no_grad()
    def _identity_steps(self) -> None:
        for made in self.mades:
            made.zero_output()
            if self.transform_kwargs.get("stable"):
                # the stable variant scales by sigmoid(logit + sigmoid_bias): a large logit is ~ the identity
                made.biases[-1][:, self.latent_dim:] = 10.0 - self.transform_kwargs.get("sigmoid_bias", 2.0)
