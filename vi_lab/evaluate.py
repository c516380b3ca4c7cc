"""Per-datapoint ELBO and importance-sampled log-likelihood for any model/guide pair.

Everything here rests on one quantity, the log importance weight of a draw
``z ~ q(z | x)``::

    log w = log p(x, z) - log q(z | x)

computed from Pyro traces (guide traced, model replayed against it) with K draws
vectorized in an outer ``pyro.plate`` left of the model's own plates. Because the
contract of DESIGN.md puts the data batch in the rightmost batch dimension of every
site, summing each site's log-density over the dimensions between the particle
dimension and the batch dimension gives a ``(K, B)`` tensor of log weights. Then

* ``elbo`` is the mean of log w over K draws (one per draw: ``E_q[log w]``);
* ``log_likelihood`` is ``logsumexp_k log w_k - log K`` per datapoint, a lower bound
  on log p(x) in expectation that tightens as K grows (Burda et al., 2016).

Site scales (e.g. beta of a beta-VAE) are ignored: evaluators report the true ELBO and
log p(x) in nats per datapoint. Pyro's ``RenyiELBO`` is deliberately not used: it
averages weights across the batch, which is wrong for per-datapoint latents.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm
from pyro.poutine.util import prune_subsample_sites

from vi_lab.contract import check_data, check_pair, check_row_shape, check_support, site_log_prob
from vi_lab.device import check_modules_on

#: elements of a (K, B, x_dim) tensor allowed per chunk: bounds memory for K = 5000
CHUNK_ELEMENTS = 2**23


class LogWeightTerms(NamedTuple):
    """Pieces of the log importance weight, each shaped ``(K, B)``."""

    log_lik: torch.Tensor  # sum of observed sites' log p(x | z)
    log_prior: torch.Tensor  # sum of latent sites' log p(z)
    log_q: torch.Tensor  # sum of guide sites' log q(z | x)

    @property
    def log_weight(self) -> torch.Tensor:
        return self.log_lik + self.log_prior - self.log_q


def max_plate_nesting(model: Callable, guide: Callable, x: torch.Tensor, *args, **kwargs) -> int:
    """How many plate dimensions the pair uses (so particles can go left of them).

    Checks the pair's contract on the way (:func:`vi_lab.contract.check_pair`).

    :param model: Pyro model.
    :param guide: Pyro guide with the model's arguments.
    :param x: a batch of data.
    """
    return check_pair(model, guide, x, *args, **kwargs).nesting


def log_weight_terms(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *args,
    num_samples: int = 1,
    nesting: int | None = None,
    **kwargs,
) -> LogWeightTerms:
    """Draw ``num_samples`` z per datapoint from the guide and score them under both sides.

    Differentiable (no ``no_grad``, no chunking): the building block for the evaluators
    below and for local optimization in :mod:`vi_lab.gaps`.

    :param model: Pyro model ``model(x, *args, **kwargs)``.
    :param guide: Pyro guide with the same arguments.
    :param x: batch of data, shape ``(B, ...)``.
    :param num_samples: K draws per datapoint, vectorized.
    :param nesting: the pair's plate nesting if known (found by a trace otherwise).
    :returns: :class:`LogWeightTerms` of ``(K, B)`` tensors.

    Example::

        terms = log_weight_terms(model, guide, x, num_samples=10)
        terms.log_weight.shape  # torch.Size([10, B])
    """
    if nesting is None:
        nesting = max_plate_nesting(model, guide, x, *args, **kwargs)
    batch = x.shape[0]
    # block outermost: the particle plate must see (and broadcast) every site inside it
    with poutine.block(), pyro.plate("_vi_lab_particles", num_samples, dim=-(nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(x, *args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, *args, **kwargs)
    # a plate's subsample site is bookkeeping, not a latent: Pyro's ELBOs prune it too (its
    # zero log-density is a CPU tensor, which would pull the weights off a GPU)
    guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
    zero = x.new_zeros(num_samples, batch)
    log_lik, log_prior, log_q = zero, zero, zero
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if not site["is_observed"] and name not in guide_trace.nodes:
            # drawn from the prior inside the model: the prior is its proposal, and
            # log p(z) - log q(z) cancels, so neither term enters the weight (check_pair has
            # refused latents marked for enumeration, which are not drawn)
            continue
        lp = site_log_prob(site, nesting + 1)
        if site["is_observed"]:
            log_lik = log_lik + lp
        else:
            log_prior = log_prior + lp
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"]:
            log_q = log_q + site_log_prob(site, nesting + 1)
    return LogWeightTerms(log_lik, log_prior, log_q)


def _slice_args(args: tuple, kwargs: dict, n: int, idx: slice) -> tuple[tuple, dict]:
    """Slice every tensor argument whose first dimension is the batch."""

    def cut(a):
        return a[idx] if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == n else a

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _check_inputs(x: torch.Tensor, num_samples: int) -> None:
    check_data(x)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")


@torch.no_grad()
def _chunked(model, guide, x, args, kwargs, num_samples, batch_size, reduce, progress=False) -> torch.Tensor:
    """Apply ``reduce(list_of_terms) -> (..., B)`` over batch and particle chunks; join on the batch dim.

    ``progress`` shows a bar counting the weights drawn (datapoints x K).
    """
    _check_inputs(x, num_samples)
    check_modules_on(x, model, guide)
    check_row_shape(model, guide, x)  # on all of x: cut into chunks, a missing batch dimension would hide
    n = x.shape[0]
    nesting = None
    out = []
    bar = tqdm(total=n * num_samples, disable=not progress, unit="w", unit_scale=True, leave=False,
               desc=progress if isinstance(progress, str) else "weights")
    for start in range(0, n, batch_size):
        idx = slice(start, min(start + batch_size, n))
        xb = x[idx]
        a, kw = _slice_args(args, kwargs, n, idx)
        if nesting is None:  # traced on a real chunk: local guides accept only their own batch
            pair = check_pair(model, guide, xb, *a, **kw)  # the contract, once per call
            check_support(pair, x)  # every row, not only the traced chunk's
            nesting = pair.nesting
        per_row = max(1, xb[0].numel())
        k_chunk = max(1, min(num_samples, CHUNK_ELEMENTS // (xb.shape[0] * per_row)))
        pieces = []
        for k0 in range(0, num_samples, k_chunk):
            k = min(k_chunk, num_samples - k0)
            pieces.append(log_weight_terms(model, guide, xb, *a, num_samples=k, nesting=nesting, **kw))
            bar.update(k * xb.shape[0])
        out.append(reduce(pieces))
    bar.close()
    return torch.cat(out, dim=-1)


def log_weights(
    model: Callable, guide: Callable, x: torch.Tensor, *args, num_samples: int = 1000,
    batch_size: int = 1000, progress: bool | str = False, **kwargs,
) -> torch.Tensor:
    """All log importance weights ``log p(x, z_k) - log q(z_k | x)``, shape ``(K, B)``.

    For diagnostics such as Pareto k-hat; memory is K x B floats.

    :param num_samples: K.
    :param batch_size: datapoints per chunk.
    """
    return _chunked(model, guide, x, args, kwargs, num_samples, batch_size,
                    progress=progress, reduce=lambda ps: torch.cat([p.log_weight for p in ps]))  # (K, B)


def elbo(
    model: Callable, guide: Callable, x: torch.Tensor, *args, num_samples: int = 1,
    batch_size: int = 1000, progress: bool | str = False, **kwargs,
) -> torch.Tensor:
    """Per-datapoint ELBO ``E_q[log p(x, z) - log q(z | x)]``, Monte Carlo over ``num_samples`` draws.

    :param model: Pyro model keeping the data-plate contract.
    :param guide: Pyro guide with the same arguments.
    :param x: data, shape ``(N, ...)``; extra tensor arguments with first dimension N
        (e.g. labels of a conditional model) are sliced alongside.
    :param num_samples: draws per datapoint.
    :param batch_size: datapoints per chunk (memory bound).
    :returns: tensor ``(N,)`` in nats, higher is better.

    Example::

        vi_lab.evaluate.elbo(model, guide, x_test, num_samples=10).mean()
    """
    return _chunked(model, guide, x, args, kwargs, num_samples, batch_size,
                    progress=progress, reduce=lambda ps: torch.cat([p.log_weight for p in ps]).mean(0))


def log_likelihood(
    model: Callable, guide: Callable, x: torch.Tensor, *args, num_samples: int = 1000,
    batch_size: int = 1000, progress: bool | str = False, **kwargs,
) -> torch.Tensor:
    """Importance-sampled ``log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k | x)``, z_k ~ q.

    The log-mean-exp of K weights per datapoint, vectorized over K and the batch and
    chunked so memory stays bounded (K = 5000 is fine). With K = 1 it equals the
    single-sample ELBO on the same draw.

    :param num_samples: K.
    :param batch_size: datapoints per chunk.
    :param progress: show a progress bar of the weights drawn (a string names it).
    :returns: tensor ``(N,)`` in nats.

    Example::

        vi_lab.evaluate.log_likelihood(model, guide, x_test[:1000], num_samples=1000).mean()
    """

    def reduce(pieces):
        lse = torch.stack([p.log_weight.logsumexp(0) for p in pieces])  # (chunks, B)
        return lse.logsumexp(0) - math.log(num_samples)

    return _chunked(model, guide, x, args, kwargs, num_samples, batch_size, reduce, progress)


def elbo_terms(
    model: Callable, guide: Callable, x: torch.Tensor, *args, num_samples: int = 1,
    batch_size: int = 1000, progress: bool | str = False, **kwargs,
) -> dict[str, torch.Tensor]:
    """The ELBO split as reconstruction minus KL, per datapoint (Monte Carlo).

    :returns: ``{"elbo", "reconstruction", "kl"}``, each ``(N,)`` in nats, with
        ``reconstruction = E_q[log p(x | z)]`` and ``kl = E_q[log q(z | x) - log p(z)]``.
    """

    def reduce(pieces):
        rec = torch.cat([p.log_lik for p in pieces]).mean(0)
        kl = torch.cat([p.log_q - p.log_prior for p in pieces]).mean(0)
        return torch.stack([rec, kl])  # (2, B): same draws for both terms

    rec, kl = _chunked(model, guide, x, args, kwargs, num_samples, batch_size, reduce, progress)
    return {"elbo": rec - kl, "reconstruction": rec, "kl": kl}
