"""EM for log-linear latent-class models (:mod:`vi_lab.models.loglinear`, :mod:`vi_lab.models.loglinear_pairwise`).

One iteration:

* **E-step**, exact: the posterior ``p(z | x_n, w)`` of every datapoint by enumerating
  the K classes, vectorized over the data (chunked), and from it the expected
  sufficient statistics (expected class counts and expected feature counts). The same
  pass gives the exact log-likelihood ``log p(x | w)`` of the current parameters.
* **M-step**: the prior in closed form (``p(z = k) = N_k / N``) when it is learned; the
  log-linear weights ``w`` by an inner optimizer (L-BFGS by default, or plain gradient
  steps) on the expected complete-data log-likelihood, which depends on the data only
  through the statistics, so an inner step costs ``O(K d)`` rather than ``O(N K d)``.
  Its gradient is the notes' "expected counts in the data minus the counts the model
  expects"; for :class:`~vi_lab.models.loglinear_pairwise.PairwiseMixture` the model's
  counts need a sum over all ``2^D`` observations, paid at every inner evaluation (the
  inner step then costs ``O(2^D K d)``). An inner result that lowers that objective is rejected (the old ``w`` is
  kept), so every iteration is a generalized EM step and the log-likelihood never
  decreases, whatever optimizer and step count are chosen.

EM stops when the relative improvement of the log-likelihood falls below ``tol`` (or
after ``max_iters``); several random restarts run and the best final log-likelihood
is kept.

Example::

    model = BernoulliMixture(10, 784)
    result = em(model, x_train, max_iters=100, restarts=3, seed=0)
    result.log_likelihood          # nats per datapoint, best restart
    model.log_marginal(x_test).mean()
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from vi_lab.device import resolve_device
from vi_lab.models.loglinear import CHUNK, LatentClassModel, Stats

logger = logging.getLogger("vi_lab.em")


def _lbfgs(params: list[torch.nn.Parameter], steps: int, lr: float) -> tuple[torch.optim.Optimizer, bool]:
    # one .step() runs up to `steps` iterations with a strong-Wolfe line search, which
    # only accepts points that increase the objective
    return torch.optim.LBFGS(params, lr=lr, max_iter=steps, line_search_fn="strong_wolfe",
                             tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20), True


#: inner optimizers of the M-step: name -> (params, steps, lr) -> (optimizer, whole_run_per_step)
INNER_OPTIMIZERS: dict[str, Callable[[list, int, float], tuple[torch.optim.Optimizer, bool]]] = {
    "lbfgs": _lbfgs,
    "adam": lambda params, steps, lr: (torch.optim.Adam(params, lr=lr), False),
    "gd": lambda params, steps, lr: (torch.optim.SGD(params, lr=lr), False),
}

#: default inner learning rates (L-BFGS scales its own steps by line search)
DEFAULT_INNER_LR = {"lbfgs": 1.0, "adam": 0.05, "gd": 1.0}


@dataclass
class EMRun:
    """One restart: its seed, log-likelihood per iteration (nats per datapoint), and outcome."""

    seed: int
    log_likelihoods: list[float] = field(default_factory=list)
    converged: bool = False
    rejected_m_steps: int = 0
    seconds: float = 0.0

    @property
    def final(self) -> float:
        return self.log_likelihoods[-1] if self.log_likelihoods else -math.inf


@dataclass
class EMResult:
    """What :func:`em` returns.

    :ivar model: the fitted model (the same object that was passed in, holding the best
        restart's parameters).
    :ivar runs: every restart, in order.
    :ivar best: index of the kept restart in :attr:`runs`.
    :ivar seconds: wall time of all restarts together.
    :ivar device: where EM ran.
    """

    model: LatentClassModel
    runs: list[EMRun]
    best: int
    seconds: float
    device: str

    @property
    def history(self) -> list[float]:
        """Training log-likelihood per iteration of the best restart, nats per datapoint.

        Entry ``t`` is ``(1/N) log p(x | w_t)``: entry 0 is the starting point, the last
        entry the returned parameters.
        """
        return self.runs[self.best].log_likelihoods

    @property
    def log_likelihood(self) -> float:
        """Final training log-likelihood of the best restart, nats per datapoint."""
        return self.runs[self.best].final

    @property
    def iterations(self) -> int:
        """M-steps taken by the best restart."""
        return len(self.history) - 1

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "log_likelihood": self.log_likelihood, "iterations": self.iterations, "best_restart": self.best,
            "seconds": self.seconds, "device": self.device,
            "restarts": [{"seed": r.seed, "final_log_likelihood": r.final, "iterations": len(r.log_likelihoods) - 1,
                          "converged": r.converged, "rejected_m_steps": r.rejected_m_steps, "seconds": r.seconds,
                          "log_likelihoods": r.log_likelihoods} for r in self.runs],
        }


@torch.no_grad()
def e_step(model: LatentClassModel, x: torch.Tensor, *, chunk: int = CHUNK, check: bool = True) -> tuple[float, Stats]:
    """Exact E-step over the whole dataset, in chunks.

    :param model: a log-linear latent-class model.
    :param x: the data, in the model's observation space.
    :param chunk: datapoints per chunk (memory bound).
    :param check: validate ``x`` first (:func:`em` checks once, not every iteration).
    :returns: ``(total log p(x), stats)``: the exact log-likelihood summed over the data
        (nats) and the expected sufficient statistics (summed over chunks).

    Example::

        total, stats = e_step(model, x)
        stats["counts"]  # expected class counts N_k, sums to len(x)
    """
    if check:
        model.check_x(x)
    total, stats = 0.0, None
    for xc in x.split(chunk):
        log_joint = model.component_log_prob(xc) + model.log_prior()  # (B, K)
        log_px = log_joint.logsumexp(-1, keepdim=True)  # (B, 1)
        total += log_px.sum().item()
        s = model.expected_stats(xc, (log_joint - log_px).exp())
        stats = s if stats is None else {k: stats[k] + v for k, v in s.items()}
    return total, stats


def m_step(model: LatentClassModel, stats: Stats, *, inner_steps: int = 20, inner_optimizer: str = "lbfgs",
           inner_lr: float | None = None) -> bool:
    """Maximize the expected complete-data log-likelihood given E-step statistics.

    The prior (when learned) is set in closed form to the expected class frequencies;
    the weights take ``inner_steps`` steps of the inner optimizer. A weight update that
    lowers the objective is undone, so the step never lowers the log-likelihood.

    :param model: the model, updated in place.
    :param stats: expected sufficient statistics from :func:`e_step`.
    :param inner_steps: inner optimizer iterations.
    :param inner_optimizer: a key of :data:`INNER_OPTIMIZERS`.
    :param inner_lr: inner learning rate (default :data:`DEFAULT_INNER_LR`).
    :returns: whether the weight update was accepted.
    """
    try:
        make_opt = INNER_OPTIMIZERS[inner_optimizer]
    except KeyError:
        raise ValueError(f"unknown inner optimizer {inner_optimizer!r}; valid: {sorted(INNER_OPTIMIZERS)}") from None
    if not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be a positive integer, got {inner_steps!r}")
    lr = DEFAULT_INNER_LR[inner_optimizer] if inner_lr is None else inner_lr
    counts = stats["counts"]
    n = counts.sum().clamp_min(1e-30)
    if model.learn_prior:
        with torch.no_grad():
            # the exact maximizer of sum_k N_k log pi_k; the floor keeps an emptied class finite
            model.prior_logits.copy_(torch.log((counts / n).clamp_min(1e-30)))

    params = model.weights()
    if not params:
        return True

    def objective() -> torch.Tensor:
        # per datapoint, so the inner optimizer's scale does not depend on N
        return -model.expected_log_lik(stats) / n

    with torch.no_grad():
        before = objective().item()
        saved = [p.detach().clone() for p in params]
    opt, whole_run = make_opt(params, inner_steps, lr)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    for _ in range(1 if whole_run else inner_steps):
        opt.step(closure)
    with torch.no_grad():
        after = objective().item()
        if not math.isfinite(after) or after > before:
            for p, s in zip(params, saved):
                p.copy_(s)
            return False
    return True


def _run_once(model: LatentClassModel, x: torch.Tensor, run: EMRun, *, max_iters: int, tol: float,
              m_kwargs: dict[str, Any], chunk: int, bar: tqdm | None) -> None:
    t0 = time.perf_counter()
    n = len(x)
    for it in range(max_iters + 1):
        total, stats = e_step(model, x, chunk=chunk, check=False)
        ll = total / n
        if not math.isfinite(ll):
            raise FloatingPointError(f"EM's log-likelihood became {ll} at iteration {it} (seed {run.seed})")
        prev = run.log_likelihoods[-1] if run.log_likelihoods else None
        run.log_likelihoods.append(ll)
        if bar is not None:
            bar.set_postfix(seed=run.seed, it=it, ll=f"{ll:.3f}")
        if prev is not None and ll - prev < tol * abs(prev):
            run.converged = True
            break
        if it == max_iters:
            break
        if not m_step(model, stats, **m_kwargs):
            run.rejected_m_steps += 1
    run.seconds = time.perf_counter() - t0


def em(
    model: LatentClassModel,
    x: torch.Tensor,
    *,
    max_iters: int = 100,
    tol: float = 1e-5,
    inner_steps: int = 20,
    inner_optimizer: str = "lbfgs",
    inner_lr: float | None = None,
    restarts: int = 1,
    seed: int = 0,
    init: bool = True,
    device: str | torch.device | None = None,
    chunk: int = CHUNK,
    progress: bool = False,
) -> EMResult:
    """Fit a log-linear latent-class model by EM, keeping the best of several restarts.

    :param model: a :class:`~vi_lab.models.loglinear.LatentClassModel`; it is updated in
        place with the best restart's parameters.
    :param x: the data, in the model's observation space (indices for
        :class:`~vi_lab.models.loglinear.LogLinearLatentClass`, binary ``(N, D)`` for
        :class:`~vi_lab.models.loglinear.BernoulliMixture` and
        :class:`~vi_lab.models.loglinear_pairwise.PairwiseMixture`).
    :param max_iters: M-steps per restart at most.
    :param tol: stop when ``ll_t - ll_{t-1} < tol * |ll_{t-1}|`` (relative improvement); ``0``
        runs all ``max_iters``.
    :param inner_steps: iterations of the inner optimizer per M-step.
    :param inner_optimizer: ``"lbfgs"`` (strong-Wolfe line search), ``"adam"`` or ``"gd"``.
    :param inner_lr: its learning rate (default :data:`DEFAULT_INNER_LR`).
    :param restarts: random restarts; restart ``r`` draws its start with seed ``seed + r``.
    :param seed: base seed.
    :param init: draw random starting parameters (``model.reset_parameters``); with
        ``False`` and ``restarts=1`` EM starts from the model's current parameters.
    :param device: ``None`` keeps the data's device, ``"auto"`` picks ``cuda`` when available, or a device.
    :param chunk: datapoints per E-step chunk.
    :param progress: show a progress bar.
    :returns: :class:`EMResult`; ``result.history`` is the training log-likelihood per
        iteration of the best restart (nats per datapoint, non-decreasing).

    Example::

        model = BernoulliMixture(10, 784)
        result = em(model, x_train, max_iters=100, tol=1e-5, inner_steps=20, restarts=3)
        print(result.log_likelihood, result.iterations)
    """
    if not isinstance(max_iters, int) or max_iters < 0:
        raise ValueError(f"max_iters must be a non-negative integer, got {max_iters!r}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive integer, got {restarts!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0 (a relative improvement), got {tol!r}")
    if not init and restarts > 1:
        raise ValueError("restarts > 1 needs init=True (every restart would start from the same parameters)")
    if inner_optimizer not in INNER_OPTIMIZERS:
        raise ValueError(f"unknown inner optimizer {inner_optimizer!r}; valid: {sorted(INNER_OPTIMIZERS)}")
    if len(x) == 0:
        raise ValueError("x is empty: EM needs at least one datapoint")
    dev = resolve_device(device, x)
    model.to(dev)
    x = x.to(dev)
    model.check_x(x)
    m_kwargs = {"inner_steps": inner_steps, "inner_optimizer": inner_optimizer, "inner_lr": inner_lr}

    t0 = time.perf_counter()
    start_state = copy.deepcopy(model.state_dict())
    runs: list[EMRun] = []
    best_state, best = None, -1
    bar = tqdm(total=restarts, desc="EM restarts", disable=not progress, leave=False)
    for r in range(restarts):
        model.load_state_dict(start_state)
        if init:
            model.reset_parameters(torch.Generator().manual_seed(seed + r), x)
        run = EMRun(seed=seed + r)
        _run_once(model, x, run, max_iters=max_iters, tol=tol, m_kwargs=m_kwargs, chunk=chunk,
                  bar=bar if progress else None)
        runs.append(run)
        logger.info("EM restart %d (seed %d): log-likelihood %.4f nats/datapoint after %d iterations%s",
                    r, run.seed, run.final, len(run.log_likelihoods) - 1, " (converged)" if run.converged else "")
        if best < 0 or run.final > runs[best].final:
            best, best_state = r, copy.deepcopy(model.state_dict())
        bar.update(1)
    bar.close()
    model.load_state_dict(best_state)
    return EMResult(model=model, runs=runs, best=best, seconds=time.perf_counter() - t0, device=str(dev))


__all__ = ["DEFAULT_INNER_LR", "EMResult", "EMRun", "INNER_OPTIMIZERS", "e_step", "em", "m_step"]
