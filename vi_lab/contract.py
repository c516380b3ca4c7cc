"""The model/guide contract of DESIGN.md, checked at the door: one trace, errors that name the site.

vi_lab's objective and evaluators are per datapoint: they read each site's log-density
as a tensor whose rightmost batch dimension is the data batch, and they pair guide and
model sites by name. A pair that breaks this still runs in Pyro, and gives numbers that
are silently wrong (an ELBO off by the batch size, a log-likelihood above the truth, a
negative amortization gap). :func:`check_pair` traces the guide once and the model
against it and refuses such a pair before anything is trained or reported; the rules:

1. every guide sample site is a model site of the same name (or is marked
   ``infer={"is_auxiliary": True}``);
2. a model latent the guide does not sample is drawn from its prior inside the model
   (a site marked for enumeration is not drawn, so it cannot be weighed);
3. every site the evaluators weigh (guide sites, the model's latents the guide samples,
   its observed sites) lies inside a plate whose dimension -1 holds the data batch, and
   its batch shape ends with the batch size: not shared by all datapoints, not folded
   into the event shape;
4. an observed site's data has the distribution's full shape (batch and event), so a
   datapoint is never broadcast against the likelihood.

:func:`check_data` checks the data itself (a tensor with the batch first, finite values)
and :func:`check_support` that observed values lie in the likelihood's support.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites

PLATE_FIX = "declare it inside `with pyro.plate(\"data\", x.shape[0]):` (dim -1)"


class ContractError(ValueError):
    """A model/guide pair breaks the per-datapoint contract; the message names each site and the fix."""


@dataclass(frozen=True)
class PairCheck:
    """What :func:`check_pair` found in a pair that keeps the contract.

    :ivar nesting: plate dimensions the pair uses (particles go left of them).
    :ivar latents: model latent sites the guide samples (weighed by ``log p - log q``).
    :ivar prior_latents: model latent sites drawn from their prior inside the model.
    :ivar observed: observed sites, whose ``log p(x | z)`` is the likelihood.
    :ivar batch_size: the traced batch's size.
    """

    nesting: int
    latents: tuple[str, ...]
    prior_latents: tuple[str, ...]
    observed: tuple[str, ...]
    batch_size: int
    #: observed site whose data is x itself -> (support, shape of one datapoint's value), for :func:`check_support`
    supports: dict = field(default_factory=dict, compare=False, repr=False)


def trace_pair(model: Callable, guide: Callable, x: torch.Tensor, *args, **kwargs):
    """``(guide_trace, model_trace)``: the guide traced, the model replayed against it, no gradients.

    Plates' subsample sites are pruned (bookkeeping, not latents; Pyro's ELBOs prune them too).
    """
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(x, *args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, *args, **kwargs)
    return prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)


def _samples(trace) -> dict[str, dict]:
    return {name: site for name, site in trace.nodes.items() if site["type"] == "sample"}


def _shape(t) -> str:
    return str(tuple(t))


def _plate_problem(site: dict, side: str, batch: int) -> str | None:
    """Rule 3 for one site: ``None`` when its batch is rightmost, else what is wrong and the fix."""
    fn, name = site["fn"], site["name"]
    batch_shape, event_shape = tuple(fn.batch_shape), tuple(fn.event_shape)
    frames = [f for f in site["cond_indep_stack"] if f.vectorized and f.dim == -1 and f.size == batch]
    if batch_shape[-1:] == (batch,) and frames:
        return None
    where = f"{side} site {name!r} (batch shape {_shape(batch_shape)}, event shape {_shape(event_shape)})"
    if site["infer"].get("is_auxiliary") and name.startswith("_Auto"):
        return (f"{where} is the one vector into which a Pyro AutoContinuous guide (AutoDiagonalNormal, "
                f"AutoMultivariateNormal, AutoLowRankMultivariateNormal, ...) packs the latents of the whole batch, "
                f"so it has no density per datapoint. Fix: use an amortized guide (vi_lab.make_guide, or one of your own "
                f"with its sites inside the data plate); Pyro's AutoNormal/AutoDelta keep a site per latent but, "
                f"not amortized, train only on the whole data as one batch.")
    if len(event_shape) >= 2 and event_shape[0] == batch:  # (B, D) reinterpreted whole: the batch folded in
        return (f"{where} holds the data batch of {batch} in its event shape, so its log-density is one sum over "
                f"the whole batch instead of one number per datapoint (the ELBO comes out about {batch} times too "
                f"large). Fix: {PLATE_FIX} and reinterpret only the per-datapoint dimensions as the event, e.g. "
                f"`.to_event(1)` instead of `.to_event(2)`.")
    if batch_shape[-1:] == (batch,):
        return (f"{where} has the batch size rightmost but is not inside a plate at dim -1 of size {batch}. "
                f"Fix: {PLATE_FIX}.")
    return (f"{where} is not per datapoint: its batch shape does not end with the data batch of {batch}, so it "
            f"is shared by all datapoints (or its plate is not the rightmost batch dimension). The per-datapoint "
            f"ELBO, log-likelihood and gaps would add its log-density to every datapoint's weight. Fix: if each "
            f"datapoint has its own {name!r}, {PLATE_FIX}; a quantity shared by all datapoints belongs in a "
            f"parameter (pyro.param / pyro.module), not in a latent these evaluators weigh per datapoint.")


def check_pair(model: Callable, guide: Callable, x: torch.Tensor, *args, enumerated_ok: bool = False,
               what: str = "x", **kwargs) -> PairCheck:
    """Check that a model/guide pair keeps vi_lab's per-datapoint contract (see the module docstring).

    One trace of the guide and one of the model on ``x`` (no gradients, nothing recorded in
    any outer trace). :func:`vi_lab.fit`, the evaluators, the gap tools and
    :func:`vi_lab.diagnostics.gradient_stats` call it before they start.

    :param model: Pyro model ``model(x, *args, **kwargs)``.
    :param guide: Pyro guide with the same arguments.
    :param x: a batch of data, the batch first (two or more rows tell a per-datapoint
        latent from a shared one).
    :param enumerated_ok: accept model latents marked for enumeration that the guide does
        not sample (training with ``TraceEnum_ELBO`` sums them out; the evaluators cannot).
    :param what: the data's name in messages.
    :returns: :class:`PairCheck` (the plate nesting and the sites by role).
    :raises ContractError: listing every broken rule, each with its site and fix.

    Example::

        vi_lab.check_pair(model, guide, x_train[:16])  # raises ContractError or returns PairCheck
    """
    check_data(x, what)
    check_row_shape(model, guide, x, what)
    guide_trace, model_trace = trace_pair(model, guide, x, *args, **kwargs)
    batch = x.shape[0]
    guide_sites = {n: s for n, s in _samples(guide_trace).items() if not s["is_observed"]}
    model_sites = _samples(model_trace)
    model_latents = {n: s for n, s in model_sites.items() if not s["is_observed"]}
    problems: list[str] = []

    for name, site in guide_sites.items():  # rule 1
        if name not in model_sites and not site["infer"].get("is_auxiliary"):
            lacking = sorted(set(model_latents) - set(guide_sites))
            hint = f"; the model's latent sites the guide does not sample: {lacking}" if lacking else ""
            problems.append(
                f"guide site {name!r} has no model site of that name{hint}. Guide and model sites are paired by "
                f"name: unpaired, {name!r} gets no prior and the model's own latent is drawn from its prior, so "
                f"the weights, the ELBO and log p(x) are wrong. Fix: give the guide's site the model's name "
                f"(or mark it infer={{'is_auxiliary': True}} if it is an auxiliary variable).")
    prior_latents = []
    for name, site in model_latents.items():  # rule 2
        if name in guide_sites:
            continue
        if site["infer"].get("enumerate") and not enumerated_ok:
            problems.append(
                f"model site {name!r} is marked for enumeration and the guide does not sample it; these tools draw "
                f"latents from the guide (or from the prior inside the model), so they cannot weigh it. Fix: sum "
                f"it out exactly (TraceEnum_ELBO, or vi_lab.models.loglinear's log_marginal) or sample it in the "
                f"guide.")
        else:
            prior_latents.append(name)
    weighed = [("guide", s) for s in guide_sites.values()]
    weighed += [("model", s) for n, s in model_sites.items() if s["is_observed"] or n in guide_sites]
    for side, site in weighed:  # rule 3
        problem = _plate_problem(site, side, batch)
        if problem is not None:
            problems.append(problem)
    for name, site in model_sites.items():  # rule 4
        if site["is_observed"]:
            full, value = tuple(site["fn"].shape()), tuple(site["value"].shape)
            if value != full:
                problems.append(
                    f"observed site {name!r} gets data of shape {_shape(value)} but its distribution has shape "
                    f"{_shape(full)} (batch {_shape(site['fn'].batch_shape)} + event "
                    f"{_shape(site['fn'].event_shape)}), so the data is broadcast against it. If x is a single "
                    f"datapoint, give it the batch dimension: x.unsqueeze(0); otherwise reshape the data to the "
                    f"likelihood's event shape per datapoint.")
    if problems:
        head = f"the model/guide pair breaks vi_lab's per-datapoint contract ({len(problems)} problem" \
               f"{'s' if len(problems) > 1 else ''}):"
        raise ContractError("\n".join([head, *(f"- {p}" for p in problems)]))
    supports = {}
    for name, site in model_sites.items():  # the observed data lies in the likelihood's support
        if site["is_observed"]:
            value = site["value"]
            observes_x = _observes(value, x)
            _raise_outside(name, site["fn"].support, value, what if observes_x else f"the data observed at {name!r}")
            if observes_x:  # x itself, one row per datapoint: check_support checks every row
                supports[name] = (site["fn"].support, value.shape[1:])
    dims = [f.dim for tr in (guide_trace, model_trace) for s in _samples(tr).values()
            for f in s["cond_indep_stack"] if f.vectorized]
    return PairCheck(
        nesting=-min(dims) if dims else 0,
        latents=tuple(n for n in model_latents if n in guide_sites),
        prior_latents=tuple(prior_latents),
        observed=tuple(n for n, s in model_sites.items() if s["is_observed"]),
        batch_size=batch,
        supports=supports,
    )


def check_row_shape(model: Callable, guide: Callable, x: torch.Tensor, what: str = "x") -> None:
    """A model or guide that declares ``x_dim`` (vi_lab's own) takes flat rows ``(batch, x_dim)``.

    Called on all the data where it enters (before it is cut into batches, which would hide
    a missing batch dimension) and by :func:`check_pair`.
    """
    for obj in (model, guide):
        x_dim = getattr(obj, "x_dim", None)
        if not isinstance(x_dim, int) or tuple(x.shape[1:]) == (x_dim,):
            continue
        name = type(obj).__name__
        if x.dim() == 1 and x.numel() == x_dim:
            fix = f"it is one datapoint without its batch dimension: pass {what}.unsqueeze(0)"
        elif x[0].numel() == x_dim:
            fix = f"flatten each datapoint: {what}.reshape(len({what}), -1)"
        else:
            fix = f"its rows hold {x[0].numel()} values: is it the data this {name} was built for?"
        raise ContractError(f"the {name} takes data of shape (batch, {x_dim}), got {what} of shape {tuple(x.shape)}; "
                            f"{fix}")


def check_data(x, what: str = "x") -> None:
    """A non-empty tensor with the batch first and only finite values, else a ValueError saying what is wrong.

    :param x: the data.
    :param what: its name in the message (``"x"``, ``"eval_data"``).
    """
    if not torch.is_tensor(x):
        raise TypeError(f"{what} must be a torch.Tensor with the batch first, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{what} must hold at least one datapoint with the batch first, got shape {tuple(x.shape)}")
    if (x.is_floating_point() or x.is_complex()) and not x.is_meta:  # meta tensors have no values
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            rows = bad.reshape(x.shape[0], -1).any(1).nonzero().flatten()
            kinds = " and ".join(k for k, m in (("NaN", torch.isnan(x)), ("infinite", torch.isinf(x))) if bool(m.any()))
            raise ValueError(
                f"{what} holds {int(bad.sum())} {kinds} values in {len(rows)} of its {x.shape[0]} rows (first: row "
                f"{int(rows[0])}); the likelihood of a missing or infinite value is undefined. Drop or impute those "
                f"rows first, e.g. {what} = {what}[torch.isfinite({what}).reshape(len({what}), -1).all(1)].")


def _elementwise(support):
    while hasattr(support, "base_constraint"):  # constraints.independent(...) wraps an elementwise one
        support = support.base_constraint
    return support


def _observes(value: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether an observed site's value is the traced batch ``x`` itself (maybe reshaped per row)."""
    if value.dim() < 1 or value.shape[0] != x.shape[0] or value.numel() != x.numel() or value.is_meta:
        return False
    # compared in float64, where both sides are exact: a label 3 observed beside data 3.7 is not x
    return bool(torch.equal(value.reshape(x.shape[0], -1).double(), x.reshape(x.shape[0], -1).double()))


def check_support(pair: PairCheck, x: torch.Tensor, what: str = "x") -> None:
    """All of ``x`` lies in the support of each observed site whose data is ``x`` itself (one row per datapoint).

    :func:`check_pair` checks the traced batch; this checks every row, once, where the
    data enters (a site whose data the model transforms first is left to that check).

    :param pair: what :func:`check_pair` returned on a batch of ``x``.
    :param x: all the data, batch first.
    :param what: its name in the message.
    """
    for name, (support, row_shape) in pair.supports.items():
        if x[0].numel() == row_shape.numel():
            _raise_outside(name, support, x.reshape(x.shape[0], *row_shape), what)


def _raise_outside(name: str, support, values: torch.Tensor, what: str) -> None:
    support = _elementwise(support)
    if getattr(support, "event_dim", 0) != 0 or values.is_meta:
        return  # a joint constraint (simplex, ...): Pyro's own validation reports it
    ok = support.check(values)
    if bool(ok.all()):
        return
    bad = ~ok.reshape(values.shape[0], -1)
    rows = bad.any(1).nonzero().flatten()
    first = values.reshape(values.shape[0], -1)[rows[0]][bad[rows[0]]][0].item()
    hint = ""
    if str(support).startswith("Boolean"):
        hint = (" A Bernoulli likelihood needs binary data: binarize it (vi_lab.data.binarize, --binarize "
                "dynamic/static/threshold) or choose a likelihood for grey levels (continuous_bernoulli, gaussian).")
    raise ValueError(
        f"{what} has values outside the support {support} of the observed site {name!r} in {len(rows)} of its "
        f"{values.shape[0]} rows (first: row {int(rows[0])}, value {first:g}).{hint}")


__all__ = ["ContractError", "PairCheck", "check_data", "check_pair", "check_row_shape", "check_support", "trace_pair"]


def site_log_prob(site: dict, num_dims: int) -> torch.Tensor:
    """Unscaled, masked log-density of a trace site, reduced to ``(K, B)`` or broadcastable.

    :param site: a sample site of a Pyro trace run under a particle plate at ``-num_dims``.
    :param num_dims: plate nesting + 1 (the particle dimension).
    """
    log_p = site["fn"].log_prob(site["value"])
    log_p = scale_and_mask(log_p, mask=site["mask"])  # scale deliberately left out
    while log_p.dim() < num_dims:
        log_p = log_p.unsqueeze(0)
    if log_p.dim() > 2:  # nested plates sit between particles (left) and the batch (right)
        log_p = log_p.sum(dim=tuple(range(1, log_p.dim() - 1)))
    return log_p
