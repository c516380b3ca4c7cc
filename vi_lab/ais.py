"""Annealed importance sampling (AIS) of log p(x) per datapoint, and BDMC bounds around it.

AIS (Neal, 2001) moves K chains per datapoint through a sequence of distributions
from a start density f_0 (the guide q(z | x), or the prior p(z)) to the unnormalized
posterior f_1 = p(x, z), along the geometric path::

    log f_beta(z) = (1 - beta) log f_0(z) + beta log p(x, z),    0 = beta_0 < ... < beta_T = 1

Each chain starts from f_0, gains ``log f_beta_t(z) - log f_beta_{t-1}(z)`` at each
temperature and then moves by Hamiltonian Monte Carlo (HMC) leaving f_beta_t invariant.
``exp(log w)`` is an unbiased estimate of p(x), so ``logsumexp_k log w_k - log K``
is a stochastic lower bound on log p(x) (Jensen), which tightens as T grows: with
T = 1 it is importance sampling with K draws from f_0. Run in reverse from an exact
posterior sample (which data simulated from the model provide: the z that made x),
the same machinery gives a stochastic *upper* bound; the two sandwich log p(x)
(bidirectional Monte Carlo, Grosse et al., 2015; Wu et al., 2017).

Latents are all of the guide's sample sites (with ``start="prior"``, all of the model's
latents), continuous; a site with a constrained support is moved in unconstrained space
(``biject_to``); the Jacobian enters the HMC target, and cancels in the weights. Log
densities come from the pair's own traces: the model and the guide are run under
``poutine.condition`` on the chains' current z, with the chains in a particle plate
left of the pair's plates, as :func:`vi_lab.evaluate.log_weight_terms` runs its draws,
so any pair that keeps the per-datapoint contract works.

HMC step sizes are one per datapoint, shared by its chains, adapted towards an
acceptance rate (:data:`TARGET_ACCEPT`) from the acceptance of a few extra *adaptation chains* whose
weights are thrown away. A chain's step size then never depends on that chain's own
past, so each transition leaves its target invariant whatever the adaptation did and
the weights stay exactly unbiased; adapting a chain from its own acceptance would make
the kernel depend on the chain's state, which biases AIS (by a little, but with no bound).

Everything is vectorized over chains and datapoints, and cut into chunks by the
evaluators' memory budget (:func:`vi_lab.evaluate.chunk_budget`); under ``torchrun``
the datapoints are split across the processes (:func:`vi_lab.evaluate.split_datapoints`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import biject_to
from tqdm.auto import tqdm

from vi_lab import evaluate
from vi_lab.contract import ContractError, check_data, check_pair, check_row_shape, check_support, site_log_prob
from vi_lab.device import check_modules_on
from vi_lab.guides.local_base import LocalGuide

#: where an annealing path may start
STARTS = ("guide", "prior")
#: acceptance rate the step sizes are adapted towards: higher than the 0.65 of long HMC runs (Neal,
#: 2011), because each temperature gets one short transition and a rejected chain does not move
#: (on PPCA, 0.65 left BDMC 1-3 nats wide at T = 30-100 where 0.9 closed it to 0.1)
TARGET_ACCEPT = 0.9
#: a chunk's working memory per (chain, datapoint) pair, in units of one forward pass (the
#: probe's): the backward pass keeps the forward's activations and adds their gradients
GRAD_FACTOR = 3
#: how fast the step sizes follow the acceptance rate: log step += gain * (rate - target) per transition
ADAPT_GAIN = 0.2


def _sigmoid_schedule(num_steps: int, device, dtype, delta: float = 4.0) -> torch.Tensor:
    """Grosse et al.'s (2015) sigmoid path: denser near both ends, where the targets change fastest."""
    s = torch.sigmoid(delta * torch.linspace(-1.0, 1.0, num_steps + 1, device=device, dtype=torch.float64))
    return ((s - s[0]) / (s[-1] - s[0])).to(dtype)


def _linear_schedule(num_steps: int, device, dtype) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, num_steps + 1, device=device, dtype=torch.float64).to(dtype)


#: beta schedules by name: ``(num_steps, device, dtype) -> (num_steps + 1,)`` from 0 to 1
SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {"sigmoid": _sigmoid_schedule, "linear": _linear_schedule}


def schedule(num_steps: int, kind: str = "sigmoid", device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse temperatures ``beta_0 = 0 < ... < beta_T = 1`` of ``num_steps`` = T transitions.

    :param num_steps: T, the number of intermediate distributions (>= 1).
    :param kind: ``"sigmoid"`` (Grosse et al., 2015) or ``"linear"``.
    :returns: ``(T + 1,)`` tensor.

    Example::

        schedule(4, "linear")  # tensor([0.00, 0.25, 0.50, 0.75, 1.00])
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
    _positive_int(num_steps, "num_steps", "the number of intermediate distributions, e.g. 1000")
    return SCHEDULES[kind](num_steps, device, dtype)


def _positive_int(value: Any, name: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer ({what}), got {value!r}")


def _elementwise(support):
    while hasattr(support, "base_constraint"):  # independent(...) wraps an elementwise constraint
        support = support.base_constraint
    return support


@dataclass(frozen=True)
class _Latent:
    """One latent site as the chains move it: its transform to unconstrained space and its event rank."""

    name: str
    transform: Any  # biject_to(support), or None when the support is the real line
    event_dim: int
    event_shape: tuple[int, ...] = ()


def _to_pairs(t: torch.Tensor, event_dim: int) -> torch.Tensor:
    """``(C, ..., b, *event)`` -> ``(C, b)``: sum the event dims and the plates between chains and batch."""
    if event_dim:
        t = t.sum(tuple(range(-event_dim, 0)))
    return t.reshape(t.shape[0], -1, t.shape[-1]).sum(1)  # (C, inner plates, b) -> (C, b)


def _per_site(v: torch.Tensor, event_dim: int, nesting: int) -> torch.Tensor:
    """A ``(C, b)`` or ``(b,)`` tensor shaped to broadcast against a site's ``(C, ..., b, *event)`` values."""
    if v.dim() == 1:
        v = v.unsqueeze(0)  # (1, b)
    return v.reshape(v.shape[0], *([1] * (nesting - 1)), v.shape[-1], *([1] * event_dim))


class _Target:
    """The start density and p(x, z) of one chunk of datapoints, at the chains' current (unconstrained) z."""

    def __init__(self, model, guide, x, args, kwargs, nesting: int, latents: list[_Latent], start: str) -> None:
        self.model, self.guide, self.x, self.args, self.kwargs = model, guide, x, args, kwargs
        self.nesting, self.latents, self.start = nesting, latents, start

    @torch.no_grad()
    def draw(self, chains: int) -> dict[str, torch.Tensor]:
        """``chains`` draws per datapoint from the start density, unconstrained: ``{site: (chains, ..., b, ...)}``."""
        source = self.guide if self.start == "guide" else self.model
        with evaluate.particle_plate(chains, self.nesting):
            trace = poutine.trace(source).get_trace(self.x, *self.args, **self.kwargs)
        values = {}
        for lat in self.latents:
            z = trace.nodes[lat.name]["value"]
            values[lat.name] = z if lat.transform is None else lat.transform.inv(z)
        return values

    def terms(self, u: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log f_0, log p(x, z), log |det dz/du|)`` at unconstrained ``u``, each ``(C, b)``."""
        chains = next(iter(u.values())).shape[0]
        z, log_jac = {}, 0.0
        for lat in self.latents:
            if lat.transform is None:
                z[lat.name] = u[lat.name]
                continue
            z[lat.name] = lat.transform(u[lat.name])
            ladj = lat.transform.log_abs_det_jacobian(u[lat.name], z[lat.name])
            log_jac = log_jac + _to_pairs(ladj, lat.event_dim - lat.transform.domain.event_dim)
        with evaluate.particle_plate(chains, self.nesting):
            model_trace = poutine.trace(poutine.condition(self.model, data=z)).get_trace(
                self.x, *self.args, **self.kwargs)
            guide_trace = None
            if self.start == "guide":
                guide_trace = poutine.trace(poutine.condition(self.guide, data=z)).get_trace(
                    self.x, *self.args, **self.kwargs)
        log_joint = log_prior = 0.0
        for name, site in prune_subsample_sites(model_trace).nodes.items():
            if site["type"] != "sample":
                continue
            lp = site_log_prob(site, self.nesting + 1)
            log_joint = log_joint + lp
            if name in z:
                log_prior = log_prior + lp
        if guide_trace is None:
            log_start = log_prior
        else:
            log_start = 0.0
            for name, site in prune_subsample_sites(guide_trace).nodes.items():
                if site["type"] != "sample":
                    continue
                try:
                    log_start = log_start + site_log_prob(site, self.nesting + 1)
                except (NotImplementedError, KeyError):  # a flow without inverse: Pyro's cache misses
                    raise ValueError(
                        f"the guide's site {name!r} ({type(site['fn']).__name__}) gives no log q(z | x) at a z it "
                        f"did not draw itself (e.g. a planar or radial flow, which has no inverse), and AIS from "
                        f"the guide needs it at every chain's z; use start='prior'") from None
        zero = self.x.new_zeros(chains, self.x.shape[0])
        return log_start + zero, log_joint + zero, log_jac + zero


@dataclass
class _State:
    """Chains at their current point: values, the two log densities, the Jacobian, and their gradients."""

    u: dict[str, torch.Tensor]  # unconstrained values (C, ..., b, *event)
    log_start: torch.Tensor  # (C, b)
    log_joint: torch.Tensor  # (C, b)
    log_jac: torch.Tensor  # (C, b)
    grad_start: dict[str, torch.Tensor]  # d/du (log f_0 + log jac)
    grad_joint: dict[str, torch.Tensor]  # d/du (log p(x, z) + log jac)

    def log_f(self, beta: float) -> torch.Tensor:
        return (1 - beta) * self.log_start + beta * self.log_joint + self.log_jac

    def grad(self, beta: float) -> dict[str, torch.Tensor]:
        return {k: (1 - beta) * self.grad_start[k] + beta * self.grad_joint[k] for k in self.u}

    def select(self, keep: torch.Tensor, other: "_State", latents: list[_Latent], nesting: int) -> "_State":
        """Per chain and datapoint, ``self`` where ``keep`` (C, b) is true, else ``other``."""
        ev = {lat.name: lat.event_dim for lat in latents}

        def pick(a, b, name):
            return torch.where(_per_site(keep, ev[name], nesting), a, b)

        return _State({k: pick(self.u[k], other.u[k], k) for k in self.u},
                      torch.where(keep, self.log_start, other.log_start),
                      torch.where(keep, self.log_joint, other.log_joint),
                      torch.where(keep, self.log_jac, other.log_jac),
                      {k: pick(self.grad_start[k], other.grad_start[k], k) for k in self.u},
                      {k: pick(self.grad_joint[k], other.grad_joint[k], k) for k in self.u})


def _evaluate(target: _Target, u: dict[str, torch.Tensor]) -> _State:
    """The state at ``u``, with the gradients of both ends of the path (two backward passes, one graph)."""
    with torch.enable_grad():
        u = {k: v.detach().requires_grad_(True) for k, v in u.items()}
        log_start, log_joint, log_jac = target.terms(u)
        names, leaves = list(u), list(u.values())
        # the start density's graph is small (an encoder ran once per datapoint, not per chain):
        # its own backward is cheap beside the decoder's
        g_start = torch.autograd.grad((log_start + log_jac).sum(), leaves, retain_graph=True, allow_unused=True)
        g_joint = torch.autograd.grad((log_joint + log_jac).sum(), leaves, allow_unused=True)

    def fill(grads):
        return {n: (torch.zeros_like(u[n]) if g is None else g.detach()) for n, g in zip(names, grads)}

    return _State({k: v.detach() for k, v in u.items()}, log_start.detach(), log_joint.detach(), log_jac.detach(),
                  fill(g_start), fill(g_joint))


def _cat(states: list[_State]) -> _State:
    if len(states) == 1:
        return states[0]
    return _State({k: torch.cat([s.u[k] for s in states]) for k in states[0].u},
                  torch.cat([s.log_start for s in states]), torch.cat([s.log_joint for s in states]),
                  torch.cat([s.log_jac for s in states]),
                  {k: torch.cat([s.grad_start[k] for s in states]) for k in states[0].u},
                  {k: torch.cat([s.grad_joint[k] for s in states]) for k in states[0].u})


def _slice(state: _State, idx: slice) -> _State:
    return _State({k: v[idx] for k, v in state.u.items()}, state.log_start[idx], state.log_joint[idx],
                  state.log_jac[idx], {k: v[idx] for k, v in state.grad_start.items()},
                  {k: v[idx] for k, v in state.grad_joint.items()})


def _hmc(target: _Target, state: _State, beta: float, step: torch.Tensor, momentum: dict[str, torch.Tensor],
         log_u: torch.Tensor, leapfrog_steps: int) -> tuple[_State, torch.Tensor]:
    """One HMC transition leaving f_beta invariant, per chain and datapoint: ``(state, acceptance probability)``.

    Leapfrog written out rather than Pyro's ``velocity_verlet``, which takes one step size for
    all chains and returns the summed potential, where every (chain, datapoint) needs its own.

    :param step: ``(b,)`` step sizes, one per datapoint.
    :param momentum: ``{site: (C, ..., b, *event)}`` standard normal draws.
    :param log_u: ``(C, b)`` log uniforms of the accept/reject decision.
    """
    lats, nest = target.latents, target.nesting
    eps = {lat.name: _per_site(step, lat.event_dim, nest) for lat in lats}
    ev = {lat.name: lat.event_dim for lat in lats}

    def kinetic(p):
        return sum(_to_pairs(0.5 * v * v, ev[k]) for k, v in p.items())  # (C, b)

    h0 = -state.log_f(beta) + kinetic(momentum)
    g = state.grad(beta)
    p = {k: momentum[k] + 0.5 * eps[k] * g[k] for k in momentum}
    new = state
    for i in range(leapfrog_steps):
        u = {k: new.u[k] + eps[k] * p[k] for k in p}
        new = _evaluate(target, u)
        g = new.grad(beta)
        half = 0.5 if i == leapfrog_steps - 1 else 1.0
        p = {k: p[k] + half * eps[k] * g[k] for k in p}
    h1 = -new.log_f(beta) + kinetic(p)
    log_accept = (h0 - h1).nan_to_num(nan=-math.inf).clamp(max=0.0)  # (C, b); diverged: rejected
    accept = log_u < log_accept
    finite = torch.isfinite(new.log_f(beta))
    accept = accept & finite
    return new.select(accept, state, lats, nest), log_accept.exp()


def _anneal(target: _Target, betas: torch.Tensor, num_chains: int, adapt_chains: int, pieces: int,
            leapfrog_steps: int, step_size: float, start: dict[str, torch.Tensor] | None,
            bar: Any) -> torch.Tensor:
    """Run ``num_chains + adapt_chains`` chains along ``betas``; the log weights of the first ``num_chains``.

    Random draws come for all chains at once at each temperature and the chains then move in
    pieces of ``pieces``: cutting the chains by memory leaves the numbers as they were.

    :param start: unconstrained ``{site: (C, ..., b, ...)}`` to start from (reverse AIS); None: draw from f_0.
    :returns: ``(num_chains, b)`` log weights.
    """
    chains = num_chains + adapt_chains
    b = target.x.shape[0]
    cuts = [slice(c, min(c + pieces, chains)) for c in range(0, chains, pieces)]
    # the starts are drawn for all chains at once (small: the latents only), so a cut leaves them as they were
    start = start if start is not None else target.draw(chains)
    states = [_evaluate(target, {k: v[cut] for k, v in start.items()}) for cut in cuts]
    state = _cat(states)
    bad = ~torch.isfinite(state.log_f(float(betas[0])))
    if bool(bad.any()):
        raise ValueError(f"{int(bad.sum())} of the chains start where the log density at beta={float(betas[0]):g} "
                         f"is not finite (e.g. a start outside the support, or an underflowing likelihood)")
    log_w = target.x.new_zeros(chains, b)
    step = target.x.new_full((b,), float(step_size))  # (b,): one per datapoint, shared by its chains
    for t in range(1, len(betas)):
        prev, beta = float(betas[t - 1]), float(betas[t])
        log_w = log_w + (beta - prev) * (state.log_joint - state.log_start)  # log f_t(z) - log f_{t-1}(z)
        if t == len(betas) - 1:
            break  # the last transition would not change any weight
        momentum = {k: torch.randn_like(v) for k, v in state.u.items()}
        log_u = torch.rand_like(log_w).log()
        moved, accepted = [], []
        for cut in cuts:
            s, a = _hmc(target, _slice(state, cut), beta, step, {k: v[cut] for k, v in momentum.items()},
                        log_u[cut], leapfrog_steps)
            moved.append(s)
            accepted.append(a)
        state = _cat(moved)
        if adapt_chains:
            rate = torch.cat(accepted)[num_chains:].mean(0)  # (b,): the adaptation chains' alone
            # multiplicative update towards the target rate; the next transition uses it, never this one
            step = step * torch.exp(ADAPT_GAIN * (rate - TARGET_ACCEPT))
        bar.update(1)
    return log_w[:num_chains]


def _latents(model, guide, x, args, kwargs, start: str):
    """The pair's contract check and the sites the chains move, each checked to be continuous."""
    pair = check_pair(model, guide, x, *args, **kwargs)
    # off a forked random stream: the chains' first draws are those the evaluators would make
    with torch.no_grad(), poutine.block(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        guide_trace = prune_subsample_sites(poutine.trace(guide).get_trace(x, *args, **kwargs))
        model_trace = prune_subsample_sites(
            poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, *args, **kwargs))
    if start == "guide":
        aux = [n for n, s in guide_trace.nodes.items()
               if s["type"] == "sample" and not s["is_observed"] and n not in pair.latents]
        if aux or pair.prior_latents:
            raise ContractError(
                f"AIS from the guide needs the guide to sample every model latent and nothing else; "
                f"model latents drawn from their prior: {list(pair.prior_latents)}, guide sites the model lacks: "
                f"{aux}. Use start='prior' (which moves all of the model's latents), or a guide over all of them.")
        names, trace = pair.latents, guide_trace
    else:
        names, trace = (*pair.latents, *pair.prior_latents), model_trace
    latents = []
    for name in names:
        site = trace.nodes[name]
        support = site["fn"].support
        if support.is_discrete or getattr(_elementwise(support), "is_discrete", False):
            raise ValueError(
                f"AIS moves the latents by Hamiltonian Monte Carlo, which needs continuous latents; site {name!r} "
                f"has the discrete support {support}. Estimate log p(x) by importance sampling instead "
                f"(vi_lab.log_likelihood), or sum the discrete latent out of the model.")
        real = _elementwise(support) is constraints.real
        try:
            transform = None if real else biject_to(support)
        except NotImplementedError:
            raise ValueError(f"site {name!r} has the support {support}, which has no bijection to unconstrained "
                             f"space (torch.distributions.biject_to); AIS needs real-valued latents or one of "
                             f"the supports biject_to knows") from None
        latents.append(_Latent(name, transform, len(site["fn"].event_shape), tuple(site["fn"].event_shape)))
    return pair, latents


def _exact_start(z: torch.Tensor | Mapping[str, torch.Tensor], latents: list[_Latent], chains: int, n: int,
                 nesting: int) -> dict[str, torch.Tensor]:
    """Exact posterior draws (constrained), one per datapoint or one per chain, as unconstrained chain states.

    :returns: ``{site: (chains, ..., n, *event)}``.
    """
    if torch.is_tensor(z):
        if len(latents) != 1:
            raise ValueError(f"z_exact is one tensor but the chains move {len(latents)} latent sites "
                             f"{[lat.name for lat in latents]}: pass a dict of them")
        z = {latents[0].name: z}
    missing = sorted({lat.name for lat in latents} - set(z))
    if missing:
        raise ValueError(f"z_exact lacks the latent sites {missing}; it must give every one of "
                         f"{[lat.name for lat in latents]}")
    out = {}
    for lat in latents:
        v = z[lat.name]
        given = tuple(v.shape)
        full = nesting + lat.event_dim  # a site's dims without the chains
        if v.dim() < full + 1:  # one draw per datapoint: the chains share it
            v = v.reshape(*([1] * (full + 1 - v.dim())), *v.shape)
        if (v.dim() != full + 1 or v.shape[0] not in (1, chains) or v.shape[-(lat.event_dim + 1)] != n
                or tuple(v.shape[v.dim() - lat.event_dim:]) != lat.event_shape):
            raise ValueError(f"z_exact[{lat.name!r}] has shape {given}; expected one exact posterior draw "
                             f"per datapoint (the site's value for the {n} datapoints, batch at dim "
                             f"{-(lat.event_dim + 1)}, event shape {lat.event_shape}) or one per chain ({chains} of them, first)")
        v = v.expand(chains, *v.shape[1:])
        out[lat.name] = v if lat.transform is None else lat.transform.inv(v)
    return out


def _check_settings(num_chains, num_steps, leapfrog_steps, adapt_chains, step_size, start, kind, batch_size) -> None:
    _positive_int(num_chains, "num_chains", "independent AIS chains per datapoint, e.g. 16")
    _positive_int(num_steps, "num_steps", "intermediate distributions between the start and the posterior, e.g. 1000")
    _positive_int(leapfrog_steps, "leapfrog_steps", "leapfrog steps per HMC transition, e.g. 10")
    if isinstance(adapt_chains, bool) or not isinstance(adapt_chains, int) or adapt_chains < 0:
        raise ValueError(f"adapt_chains must be a non-negative integer (extra chains that adapt the step sizes; "
                         f"0: keep step_size fixed), got {adapt_chains!r}")
    if not (isinstance(step_size, (int, float)) and not isinstance(step_size, bool) and step_size > 0
            and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a positive number (the first HMC step size), got {step_size!r}")
    if start not in STARTS:
        raise ValueError(f"unknown start {start!r}; valid: {', '.join(STARTS)}")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None (the memory budget decides), "
                         f"got {batch_size!r}")


@torch.no_grad()
def _run(model, guide, x, args, kwargs, *, num_chains, num_steps, leapfrog_steps, adapt_chains, step_size,
         start, kind, batch_size, memory_budget, progress, z_exact=None) -> torch.Tensor:
    """AIS log weights ``(num_chains, N)`` in one process, chunked by memory; reverse from ``z_exact`` if given."""
    _check_settings(num_chains, num_steps, leapfrog_steps, adapt_chains, step_size, start, kind, batch_size)
    check_data(x)
    check_modules_on(x, model, guide)
    check_row_shape(model, guide, x)  # on all of x: cut into chunks, a missing batch dimension would hide
    n = x.shape[0]
    whole = isinstance(guide, LocalGuide)  # its parameters cover exactly its batch
    first = slice(0, n if whole else min(n, batch_size or evaluate.CHECK_POINTS))
    a, kw = evaluate._slice_args(args, kwargs, n, first)
    pair, latents = _latents(model, guide, x[first], a, kw, start)
    check_support(pair, x)
    if not whole and batch_size is None:  # any batch will do for the cost probe
        first = slice(0, min(n, evaluate.PROBE_POINTS))
        a, kw = evaluate._slice_args(args, kwargs, n, first)
    pair_bytes, point_bytes = evaluate._probe(model, guide, x[first], a, kw, pair.nesting)
    chains = num_chains + adapt_chains
    plan = evaluate.plan_chunks(n, chains, GRAD_FACTOR * pair_bytes, point_bytes,
                                evaluate.chunk_budget(x.device, memory_budget), batch_size=batch_size,
                                whole_batch=whole)
    betas = schedule(num_steps, kind, x.device, x.dtype)
    exact = None
    if z_exact is not None:  # reverse AIS: from the posterior (beta = 1) back to the start (beta = 0)
        betas = betas.flip(0)
        exact = _exact_start(z_exact, latents, chains, n, pair.nesting)
    bar = tqdm(total=max(0, num_steps - 1) * -(-n // plan.points), disable=not progress, leave=False, unit="T",
               desc=progress if isinstance(progress, str) else ("reverse AIS" if exact else "AIS"))
    out = []
    validated = False
    for p0 in range(0, n, plan.points):
        idx = slice(p0, min(p0 + plan.points, n))
        a, kw = evaluate._slice_args(args, kwargs, n, idx)
        target = _Target(model, guide, x[idx], a, kw, pair.nesting, latents, start)
        init = None if exact is None else {
            lat.name: exact[lat.name][(Ellipsis, idx, *([slice(None)] * lat.event_dim))] for lat in latents}
        # Pyro's validation on the first chunk as the caller set it; then off (the same code runs on)
        with pyro.validation_enabled(False) if validated else contextlib.nullcontext():
            out.append(_anneal(target, betas, num_chains, adapt_chains, plan.samples, leapfrog_steps, step_size,
                               init, bar))
        validated = True
    bar.close()
    return torch.cat(out, dim=-1)  # (K, N)


def ais_log_weights(
    model: Callable, guide: Callable, x: torch.Tensor, *args, num_chains: int = 16, num_steps: int = 1000,
    leapfrog_steps: int = 10, step_size: float = 0.1, adapt_chains: int = 4, start: str = "guide",
    schedule: str = "sigmoid", batch_size: int | None = None, memory_budget: int | str | None = None,
    progress: bool | str = False, **kwargs,
) -> torch.Tensor:
    """The AIS log weights of ``num_chains`` chains per datapoint, ``(num_chains, N)``.

    Each ``exp(log w)`` is an unbiased estimate of p(x); :func:`ais_log_likelihood` is their
    log-mean-exp. Arguments as :func:`ais_log_likelihood`'s.

    Example::

        lw = ais_log_weights(model, guide, x, num_chains=16, num_steps=500)  # (16, N)
    """
    settings = dict(num_chains=num_chains, num_steps=num_steps, leapfrog_steps=leapfrog_steps,
                    adapt_chains=adapt_chains, step_size=step_size, start=start, kind=schedule,
                    batch_size=batch_size, memory_budget=memory_budget)
    _check_settings(num_chains, num_steps, leapfrog_steps, adapt_chains, step_size, start, schedule, batch_size)
    bar = evaluate.share_progress(progress, "AIS", evaluate.world_of(x))

    def run(xs, /, *a, **kw):
        return _run(model, guide, xs, a, kw, progress=bar, **settings)

    return evaluate.split_datapoints(run, x, args, kwargs, whole=isinstance(guide, LocalGuide), what="AIS")


def ais_log_likelihood(
    model: Callable, guide: Callable, x: torch.Tensor, *args, num_chains: int = 16, num_steps: int = 1000,
    leapfrog_steps: int = 10, step_size: float = 0.1, adapt_chains: int = 4, start: str = "guide",
    schedule: str = "sigmoid", batch_size: int | None = None, memory_budget: int | str | None = None,
    progress: bool | str = False, **kwargs,
) -> torch.Tensor:
    """Annealed importance sampling of log p(x) per datapoint: ``logsumexp_k log w_k - log K``.

    A stochastic lower bound on log p(x) (its exponent is unbiased) that tightens as
    ``num_steps`` grows; with ``num_steps=1`` it is importance sampling with ``num_chains``
    draws from the start density. Like :func:`vi_lab.log_likelihood`, per datapoint in
    nats, chunked by the same memory budget, split across processes under torchrun (a
    local guide: process 0 alone).

    Cost: about ``num_steps * leapfrog_steps * (num_chains + adapt_chains)`` forward and
    backward passes of the model per datapoint.

    :param model: Pyro model keeping the data-plate contract, latents continuous.
    :param guide: Pyro guide with the same arguments; the path starts from it (``start="guide"``),
        so it must give ``log q(z | x)`` at any z (a planar or radial flow cannot: use
        ``start="prior"``, for which the guide is only checked against the model).
    :param x: data, shape ``(N, ...)``; tensor arguments with first dimension N are sliced alongside.
    :param num_chains: K, independent chains per datapoint.
    :param num_steps: T, intermediate distributions (HMC transitions) from the start to the posterior.
    :param leapfrog_steps: leapfrog steps per HMC transition.
    :param step_size: the first HMC step size of every datapoint.
    :param adapt_chains: extra chains per datapoint whose acceptance adapts the step sizes
        towards :data:`TARGET_ACCEPT` and whose weights are dropped (0: ``step_size`` stays fixed). They
        keep the estimate unbiased; see the module docstring.
    :param start: ``"guide"`` (q(z | x), the usual choice) or ``"prior"`` (p(z)).
    :param schedule: ``"sigmoid"`` (Grosse et al., 2015) or ``"linear"`` in beta.
    :param batch_size: datapoints per chunk (None: the memory budget decides).
    :param memory_budget: bytes of working memory per chunk, or a size such as ``"2GiB"``
        (default: :func:`vi_lab.evaluate.chunk_budget`); beyond it the chains' states,
        a few floats per latent, chain and datapoint.
    :param progress: a progress bar over the temperatures (a string names it).
    :returns: tensor ``(N,)`` in nats.

    Example::

        ll = vi_lab.ais_log_likelihood(model, guide, x_test[:100], num_chains=16, num_steps=1000)
        ll.mean()  # >= vi_lab.log_likelihood(model, guide, x_test[:100], num_samples=5000).mean(), within noise
    """
    lw = ais_log_weights(model, guide, x, *args, num_chains=num_chains, num_steps=num_steps,
                         leapfrog_steps=leapfrog_steps, step_size=step_size, adapt_chains=adapt_chains, start=start,
                         schedule=schedule, batch_size=batch_size, memory_budget=memory_budget, progress=progress,
                         **kwargs)
    return lw.logsumexp(0) - math.log(num_chains)  # (K, N) -> (N,)


@dataclass
class BDMCResult:
    """Bidirectional Monte Carlo bounds on log p(x), per datapoint ``(N,)`` in nats.

    :ivar lower: forward AIS, a stochastic lower bound.
    :ivar upper: reverse AIS from an exact posterior sample, a stochastic upper bound.
    :ivar num_chains: chains per datapoint in each direction.
    :ivar num_steps: intermediate distributions.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    num_chains: int
    num_steps: int

    @property
    def width(self) -> torch.Tensor:
        """upper - lower per datapoint: how far from log p(x) either bound can be (in expectation)."""
        return self.upper - self.lower


def bdmc(
    model: Callable, guide: Callable, x: torch.Tensor, z_exact: torch.Tensor | Mapping[str, torch.Tensor], *args,
    num_chains: int = 16, num_steps: int = 1000, **kwargs,
) -> BDMCResult:
    """Sandwich log p(x) between forward AIS and reverse AIS (Grosse, Ghahramani & Adams, 2015).

    Reverse AIS starts at beta = 1 from an exact posterior draw ``z_exact`` and anneals back to
    the start density; its weights estimate 1 / p(x) without bias, so minus their
    log-mean-exp is a stochastic upper bound on log p(x). For data simulated from the model
    (:func:`simulate`), the z that generated x is an exact posterior draw. The gap between
    the bounds shrinks to zero as ``num_steps`` grows.

    Under torchrun process 0 runs it all and the others receive the result.

    :param x: the N datapoints.
    :param z_exact: the latent values, constrained, one per datapoint (``(N, ...)`` for a
        single site, with the batch where the site puts it) or one per chain (with the
        ``num_chains + adapt_chains`` chains first); a dict by site for several sites.
    :param num_chains: chains per datapoint in each direction.
    :param num_steps: intermediate distributions in each direction.
    :param kwargs: the other settings of :func:`ais_log_likelihood` (``leapfrog_steps``,
        ``adapt_chains``, ``start``, ...), and the model's keyword arguments.
    :returns: :class:`BDMCResult`.

    Example::

        x, z = simulate(model, x_test[:100])
        bounds = bdmc(model, guide, x, z, num_chains=4, num_steps=1000)
        bounds.width.mean()  # nats between the two bounds
    """
    names = ("leapfrog_steps", "step_size", "adapt_chains", "start", "schedule", "batch_size", "memory_budget",
             "progress")
    opts = {k: kwargs.pop(k) for k in names if k in kwargs}
    settings = dict(num_chains=num_chains, num_steps=num_steps, leapfrog_steps=opts.get("leapfrog_steps", 10),
                    step_size=opts.get("step_size", 0.1), adapt_chains=opts.get("adapt_chains", 4),
                    start=opts.get("start", "guide"), kind=opts.get("schedule", "sigmoid"),
                    batch_size=opts.get("batch_size"), memory_budget=opts.get("memory_budget"))
    progress = opts.get("progress", False)

    def both(xs, /, *a, **kw):
        lower = _run(model, guide, xs, a, kw, progress=progress, **settings).logsumexp(0) - math.log(num_chains)
        rev = _run(model, guide, xs, a, kw, progress=progress, z_exact=z_exact, **settings)
        return lower, -(rev.logsumexp(0) - math.log(num_chains))

    lower, upper = evaluate.split_datapoints(both, x, args, kwargs, whole=True, what="BDMC")
    return BDMCResult(lower=lower, upper=upper, num_chains=num_chains, num_steps=num_steps)


@torch.no_grad()
def simulate(model: Callable, x_like: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Data drawn from the model itself, with the latents that generated it: ``(x, {site: z})``.

    The model runs with its observed site un-conditioned (``poutine.uncondition``), so z comes
    from the prior and x from p(x | z): each z is an exact draw from p(z | x), what
    :func:`bdmc` needs.

    :param model: a model with one observed site, whose data is ``x_like`` (maybe reshaped).
    :param x_like: data of the shape to simulate (its values are not used).
    :returns: ``(x, z)``: ``x`` shaped like ``x_like``, ``z`` by latent site, without a chain dimension.

    Example::

        x, z = simulate(vae, torch.zeros(100, 784))
    """
    with poutine.block(), torch.random.fork_rng(devices=[x_like.device] if x_like.device.type == "cuda" else []):
        plain = poutine.trace(model).get_trace(x_like, *args, **kwargs)  # which sites observe the data
    observed = [n for n, s in plain.nodes.items() if s["type"] == "sample" and s["is_observed"]]
    if len(observed) != 1:
        raise ValueError(f"simulate needs a model with exactly one observed site (the data), found {observed}")
    with poutine.block():
        trace = prune_subsample_sites(poutine.trace(poutine.uncondition(model)).get_trace(x_like, *args, **kwargs))
    latents = {n: s["value"] for n, s in trace.nodes.items() if s["type"] == "sample" and n not in observed}
    value = trace.nodes[observed[0]]["value"]
    return value.reshape(x_like.shape).to(x_like.dtype), latents


__all__ = ["BDMCResult", "SCHEDULES", "STARTS", "ais_log_likelihood", "ais_log_weights", "bdmc", "schedule",
           "simulate"]
