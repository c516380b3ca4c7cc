"""The importance-weighted bound (IWAE) and its doubly-reparameterized gradient (DReG) as training losses.

For K draws ``z_1..z_K ~ q(z | x)`` per datapoint, with ``log w_k = log p(x, z_k) - log q(z_k | x)``,

    L_K(x) = log (1/K) sum_k w_k

is a lower bound on ``log p(x)`` that rises with K and reaches it as K grows (Burda et al.,
2016); ``L_1`` is the ELBO. :class:`ImportanceWeighted` is that bound as a loss of the one
training loop (``fit(..., objective="iwae", num_particles=K)``): per datapoint, the K draws
vectorized in a particle plate left of the pair's plates (the same traces the evaluators use,
:func:`vi_lab.evaluate.particle_traces`), averaged over the batch. Its plain gradient in the
guide's parameters gets noisier as K grows (Rainforth et al., 2018); ``dreg=True`` replaces it by
the doubly-reparameterized estimator of Tucker et al. (2019), whose guide gradient

    sum_k  w~_k^2  d log w_k / d z_k  d z_k / d phi       (w~ = normalized weights)

has the same expectation without the score-function term. The model's gradient is IWAE's
``sum_k w~_k d log w_k / d theta`` either way.

How DReG is built from one backward pass, for any guide with reparameterized sites (a
hierarchical guide too): the model is replayed against *hooked* copies of the draws, whose
hooks multiply the gradient reaching each draw from ``log p(x, z)`` by ``w~_k``; ``log q`` is
scored twice, at the draws (gradient through z and phi) and at detached draws with phi live
(gradient through phi only), and their difference keeps exactly the path through z.

Latent weights: a beta-VAE's ``site_scales`` and fit's KL warm-up weight multiply each latent
site's ``log p(z)`` and ``log q(z)`` inside the log weights (:meth:`ImportanceWeighted.weigh`,
called by :class:`vi_lab.step.TrainStep`). Other ``poutine.scale`` factors of a pair are left
out: a subsampling scale N/B, for one, does not belong inside a per-datapoint log-sum-exp. With
a weight ``beta != 1`` DReG's guide coefficient becomes ``(1 - beta) w~ + beta w~^2`` (the same
derivation), so warm-up and DReG combine; all latent sites must then share one weight.

DReG's cost over IWAE: one more pass of the guide, to score ``log q`` at the detached draws (for
IAF that is its autoregressive inverse); its guide must be able to score a z it did not draw, so
planar and radial flows, which have no inverse, are refused.

Pyro's ``RenyiELBO`` is not used: it forms the weights of the whole minibatch jointly, which
is wrong for per-datapoint latents (DESIGN.md).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pyro.poutine as poutine
import torch

from vi_lab.contract import check_pair, site_log_prob
from vi_lab.evaluate import latent_sums, particle_plate, particle_traces


class ImportanceWeighted:
    """The K-sample importance-weighted bound, mean over the batch, as a loss ``loss(model, guide, *args)``.

    :param num_particles: K draws per datapoint.
    :param dreg: use the doubly-reparameterized gradient estimator for the guide.

    Returns ``-mean_b L_K(x_b)`` (nats per datapoint) with the chosen gradient; leaves
    ``terms``: ``train_bound`` (the mean bound) and ``train_elbo`` (the mean of the same
    draws' log weights, the ELBO's estimate), both with the step's site weights.

    Example::

        loss = ImportanceWeighted(num_particles=5, dreg=True)
        fit(model, guide, x, loss=loss)  # or fit(model, guide, x, objective="dreg", num_particles=5)
    """

    def __init__(self, num_particles: int, dreg: bool = False) -> None:
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer (K draws per datapoint), got {num_particles!r}")
        self.num_particles, self.dreg = num_particles, dreg
        self.nesting: int | None = None  # the pair's plate nesting, found on its first call
        self._pair: tuple[int, int] | None = None  # the pair that nesting belongs to
        self.site_scales: dict[str, float] = {}
        self.latent_weight: Any = None  # an object with .value (vi_lab.objectives.LatentWeight), or None
        self.terms: dict[str, float] = {}

    def weigh(self, site_scales: dict[str, float] | None, latent_weight: Any = None) -> None:
        """Weigh latent sites by ``site_scales[name]`` (beta) times ``latent_weight.value`` (KL warm-up)."""
        self.site_scales, self.latent_weight = dict(site_scales or {}), latent_weight

    def _weight(self, name: str) -> float:
        w = self.site_scales.get(name, 1.0)
        return w if self.latent_weight is None else w * self.latent_weight.value

    def _common_weight(self, guide_trace: poutine.Trace) -> float:
        """The one weight (beta times the KL warm-up) on every latent site, as DReG's coefficient needs it."""
        weights = {name: self._weight(name) for name, _ in _latents(guide_trace)}
        if len(set(weights.values())) > 1:
            raise ValueError(f"objective='dreg' needs one weight on all latent sites (beta, KL warm-up), got "
                             f"{weights}; use objective='iwae', or the same site scale for every latent site")
        return next(iter(weights.values()), 1.0)

    def __repr__(self) -> str:
        return f"{'dreg' if self.dreg else 'iwae'}(K={self.num_particles})"

    def __call__(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        x = args[0]
        if self._pair != (id(model), id(guide)):
            self.nesting = check_pair(model, guide, *args, **kwargs).nesting
            self._pair = (id(model), id(guide))
        K, nesting = self.num_particles, self.nesting
        factor: dict[str, torch.Tensor] = {}  # filled after the forward pass, read by the hooks in backward
        hooked = (lambda tr: _hooked_draws(tr, factor, nesting)) if self.dreg else None
        guide_trace, model_trace = particle_traces(model, guide, *args, num_samples=K, nesting=nesting,
                                                   replay_with=hooked, expose_params=True, **kwargs)
        _check_reparameterized(guide_trace, "dreg" if self.dreg else "iwae")
        zero = x.new_zeros(K, x.shape[0])
        weight = None if not self.site_scales and self.latent_weight is None else self._weight
        log_lik, log_prior, log_q = latent_sums(model_trace, guide_trace, nesting, zero, weight)  # (K, B)
        log_w = log_lik + log_prior - log_q
        bound = torch.logsumexp(log_w, 0) - math.log(K)  # (B,)
        self.terms = {"train_bound": bound.detach().mean().item(), "train_elbo": log_w.detach().mean().item()}
        if not self.dreg:
            return -bound.mean()
        beta = self._common_weight(guide_trace)
        w = torch.softmax(log_w.detach(), 0)  # (K, B) normalized weights
        factor["h"] = (1 - beta) + beta * w  # the hooks turn w~ into w~ h on the path through log p(x, z)
        log_q_phi = _log_q_at_detached(guide, guide_trace, args, kwargs, K, nesting, zero, self._weight)
        surrogate = (w * (log_lik + log_prior) + w * factor["h"] * (log_q_phi - log_q)).sum(0)  # (B,)
        # the value of the bound, DReG's gradient
        return -(bound.detach() + surrogate - surrogate.detach()).mean()


def _latents(trace: poutine.Trace) -> list[tuple[str, dict]]:
    return [(name, site) for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]]


def _check_reparameterized(guide_trace: poutine.Trace, objective: str) -> None:
    for name, site in _latents(guide_trace):
        if not site["fn"].has_rsample:
            raise ValueError(
                f"objective={objective!r} needs a guide whose latent sites are reparameterized; site {name!r} "
                f"({type(site['fn']).__name__}) is not. Train it with objective='elbo' and a score-function "
                f"estimator (estimator='reinforce_baseline'), or with a reparameterizable guide")


def _per_draw(t: torch.Tensor, site: dict, nesting: int, name: str) -> torch.Tensor:
    """A ``(K, B)`` tensor shaped to broadcast against the site's value ``(K, ..., B) + event``."""
    value, event_dim = site["value"], site["fn"].event_dim
    batch_dims = value.dim() - event_dim
    shape = [1] * value.dim()
    k_dim, b_dim = batch_dims - (nesting + 1), batch_dims - 1
    if k_dim < 0 or value.shape[k_dim] != t.shape[0] or value.shape[b_dim] != t.shape[1]:
        raise ValueError(f"objective='dreg': the guide's site {name!r} has shape {tuple(value.shape)}, not (K, ..., "
                         f"batch) + event with K={t.shape[0]} and batch {t.shape[1]}: DReG weighs every draw of "
                         f"every datapoint, so each latent site must be drawn per datapoint inside the data plate")
    shape[k_dim], shape[b_dim] = t.shape
    return t.reshape(shape)


def _hooked_draws(guide_trace: poutine.Trace, factor: dict[str, torch.Tensor], nesting: int) -> poutine.Trace:
    """A copy of the guide trace whose draws, as the model sees them, scale their gradient by ``factor["h"]``."""
    replay = guide_trace.copy()
    for name, site in _latents(guide_trace):
        z = site["value"]
        if not z.requires_grad:
            continue
        seen = z.view_as(z)
        seen.register_hook(lambda g, site=site, name=name: g * _per_draw(factor["h"], site, nesting, name))
        replay.nodes[name] = {**site, "value": seen}
    return replay


def _log_q_at_detached(guide: Callable, guide_trace: poutine.Trace, args: tuple, kwargs: dict[str, Any], K: int,
                       nesting: int, zero: torch.Tensor, weight: Callable[[str], float]) -> torch.Tensor:
    """``log q(stop(z) | x)`` with the guide's parameters live: the score-function part of ``log q``, ``(K, B)``."""
    detached = guide_trace.copy()
    for name, site in _latents(guide_trace):
        detached.nodes[name] = {**site, "value": site["value"].detach()}
    with particle_plate(K, nesting, expose_params=True):
        again = poutine.trace(poutine.replay(guide, trace=detached)).get_trace(*args, **kwargs)
    log_q = zero
    for name, site in _latents(again):
        try:
            log_q = log_q + weight(name) * site_log_prob(site, nesting + 1)
        except (NotImplementedError, KeyError):  # a flow without inverse: Pyro's cache misses the detached z
            raise ValueError(
                f"objective='dreg' scores log q(z | x) at the guide's draws with their gradient stopped, and the "
                f"guide's site {name!r} ({type(site['fn']).__name__}) cannot score a z it did not draw itself "
                f"(a planar or radial flow has no inverse); use objective='iwae', or a guide with an inverse "
                f"(mean_field, full_cov, low_rank, iaf, mixture)") from None
    return log_q


#: objective names of :func:`vi_lab.fit` beside the ELBO (``objective="elbo"`` trains with ``loss``)
OBJECTIVES: dict[str, Callable[[int], ImportanceWeighted]] = {
    "iwae": lambda k: ImportanceWeighted(k),
    "dreg": lambda k: ImportanceWeighted(k, dreg=True),
}

__all__ = ["ImportanceWeighted", "OBJECTIVES"]
