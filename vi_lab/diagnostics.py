"""How noisy a gradient estimator is: moments of M independent ELBO gradient estimates.

:func:`gradient_stats` draws M independent gradient estimates of the per-datapoint ELBO
at fixed parameters (paired seeds across estimators, so two estimators see the same
noise stream) and reports, per parameter group (the guide's ``encoder``, the model's
``decoder``), the mean, the variance (trace of the covariance) and the signal-to-noise
ratio (:class:`GradientStats`); :func:`stats_table` lays them out for
:func:`vi_lab.reporting.format_table`.

Built on the estimator registry (:mod:`vi_lab.estimators`) and the objective layer
(:mod:`vi_lab.objectives`); nothing below imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.ops.provenance import detach_provenance

from vi_lab import checkpoint
from vi_lab.contract import check_pair
from vi_lab.estimators import DECAYING_AVG_PREFIX, Estimator, PreparedEstimator, prepare
from vi_lab.objectives import training_objective


@dataclass
class GradientStats:
    """Moments of M independent gradient estimates of one parameter group.

    Gradients are of the ELBO in nats per datapoint (ascent direction), flattened.

    :ivar mean: ``(P,)`` sample mean.
    :ivar var: ``(P,)`` per-coordinate sample variance (unbiased).
    :ivar num_draws: M.
    :ivar samples: ``(M, P)`` when kept.
    """

    estimator: str
    group: str
    mean: torch.Tensor
    var: torch.Tensor
    num_draws: int
    samples: torch.Tensor | None = None

    @property
    def num_params(self) -> int:
        return self.mean.numel()

    @property
    def variance(self) -> float:
        """Trace of the covariance: the expected squared distance from the mean."""
        return self.var.sum().item()

    @property
    def mean_norm(self) -> float:
        """``||sample mean||``; biased upwards by noise (see :attr:`mean_norm_debiased`)."""
        return self.mean.norm().item()

    @property
    def mean_norm_debiased(self) -> float:
        """``sqrt(max(||mean||^2 - tr(Cov) / M, 0))``: unbiased for ``||E g||^2`` before the root."""
        return math.sqrt(max(self.mean_norm**2 - self.variance / self.num_draws, 0.0))

    @property
    def snr(self) -> float:
        """Signal-to-noise ratio ``||E g|| / sqrt(tr Cov g)`` (debiased mean)."""
        return self.mean_norm_debiased / math.sqrt(self.variance) if self.variance > 0 else math.inf

    @property
    def stderr(self) -> torch.Tensor:
        """``(P,)`` standard error of each coordinate of the mean."""
        return (self.var / self.num_draws).sqrt()

    def bias_z(self, reference: torch.Tensor) -> float:
        """``||mean - reference|| / sqrt(tr(Cov) / M)``: about 1 for an unbiased estimator.

        :param reference: the exact gradient (e.g. from ``enum``), flattened ``(P,)``.
        """
        noise = math.sqrt(self.variance / self.num_draws)
        dist_ = (self.mean - reference.to(self.mean)).norm().item()
        return dist_ / noise if noise > 0 else (0.0 if dist_ == 0 else math.inf)

    def snr_given(self, reference: torch.Tensor) -> float:
        """``||reference|| / sqrt(tr Cov)``: the SNR with ``E g`` taken from a better estimate.

        Unbiased estimators share ``E g``; with few draws of a noisy one, its own debiased
        mean is dominated by noise, so the exact gradient (``enum``) or the mean of the
        least noisy unbiased estimator measures the signal better.

        :param reference: ``(P,)`` estimate of ``E g``.
        """
        norm = reference.norm().item()
        return norm / math.sqrt(self.variance) if self.variance > 0 else math.inf

    def as_dict(self) -> dict[str, Any]:
        return {"estimator": self.estimator, "group": self.group, "num_draws": self.num_draws,
                "num_params": self.num_params, "mean_norm": self.mean_norm,
                "mean_norm_debiased": self.mean_norm_debiased, "variance": self.variance, "snr": self.snr}


def param_groups(model: Callable, guide: Callable, x: torch.Tensor, *args, **kwargs) -> dict[str, list[str]]:
    """Param-store names of the guide's parameters (``encoder``) and the model's (``decoder``).

    Found by running each once and recording its ``pyro.param``/``pyro.module`` calls. A side
    with no learnable parameters (a fixed model whose guide alone is learned) has no group.

    :param x: a batch of data (the pair's first argument).
    """
    groups = {}
    with torch.no_grad(), poutine.block():
        for label, fn in (("encoder", guide), ("decoder", model)):
            tr = poutine.trace(fn, param_only=True).get_trace(x, *args, **kwargs)
            names = [name for name, site in tr.nodes.items() if site["type"] == "param"]
            if names:
                groups[label] = names
    return groups


def gradient_stats(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *args,
    estimator: str | Estimator | PreparedEstimator = "reparam",
    num_draws: int = 100,
    seed: int = 0,
    groups: dict[str, Iterable[str]] | None = None,
    warmup: int = 0,
    warmup_data: torch.Tensor | None = None,
    baseline_lr: float = 1e-3,
    keep_samples: bool = False,
    **kwargs,
) -> dict[str, GradientStats]:
    """Draw ``num_draws`` independent gradient estimates of the ELBO at fixed parameters.

    Draw ``i`` is made after ``pyro.set_rng_seed(seed + i)``, so two estimators called
    with the same seed see the same noise stream (paired draws). The objective is the
    one :func:`vi_lab.fit` optimizes: per datapoint (the batch mean), with the model's
    ``site_scales``. Nothing is trained and the caller's RNG state is restored.

    Baselines first get ``warmup`` steps at the fixed parameters: Pyro's decaying
    average starts from zero and updates itself, and the ``nn`` baseline network takes
    Adam steps on its own parameters (model and guide untouched); then their state is
    frozen so the draws are identically distributed. Warm up on random batches of
    ``warmup_data`` to see the baselines training sees: on the fixed batch alone, Pyro's
    average (kept per batch position) becomes a per-datapoint baseline, which shuffled
    training batches never give it. The draws run in a scope of Pyro's
    param store that is put back afterwards (the baseline network of a
    :class:`~vi_lab.estimators.PreparedEstimator` passed in keeps what warm-up taught it).

    :param model: Pyro model.
    :param guide: Pyro guide with the model's arguments.
    :param x: a fixed batch ``(B, ...)``.
    :param estimator: a name, an :class:`~vi_lab.estimators.Estimator`, or a
        :class:`~vi_lab.estimators.PreparedEstimator` (e.g. with a trained baseline network).
    :param num_draws: M.
    :param seed: seed of draw 0.
    :param groups: ``{group: param-store names}``; default :func:`param_groups`.
    :param warmup: baseline warm-up steps.
    :param warmup_data: data ``(N, ...)`` whose random batches (of ``x``'s size) the
        warm-up uses instead of ``x``; only without extra model arguments.
    :param baseline_lr: Adam learning rate of the baseline network during warm-up.
    :param keep_samples: keep every draw (``(M, P)`` per group) for paired comparisons.
    :returns: ``{group: GradientStats}``.

    Example::

        stats = gradient_stats(model, guide, x[:100], estimator="reinforce", num_draws=100)
        stats["encoder"].variance, stats["encoder"].snr
    """
    if not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"num_draws must be an integer >= 2 (a variance needs two draws), got {num_draws!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    if warmup_data is not None and (args or kwargs):
        raise ValueError("warmup_data cannot be sliced alongside extra model arguments; warm up on x instead")
    if warmup_data is not None and warmup_data.shape[1:] != x.shape[1:]:
        raise ValueError(f"warmup_data rows must be shaped like x's, {tuple(x.shape[1:])}, "
                         f"got {tuple(warmup_data.shape[1:])}")
    rng = checkpoint.rng_state()
    store = pyro.get_param_store()
    state = store.get_state()
    # An isolated store: modules register their live parameters afresh (a stale entry under
    # the same name, e.g. from another model trained since, would take the gradients), the
    # running averages start from Pyro's zero, and everything is put back afterwards.
    keep = [n for n in state["params"] if "$$$" not in n and not n.startswith(DECAYING_AVG_PREFIX)]
    with store.scope({"params": {n: state["params"][n] for n in keep},
                      "constraints": {n: state["constraints"][n] for n in keep}}):
        try:
            sums, kept, label = _draw(model, guide, x, args, kwargs, estimator, num_draws, seed, groups, warmup,
                                      warmup_data, baseline_lr, keep_samples)
        finally:
            _zero_grads(store)
            checkpoint.set_rng_state(rng)
    out = {}
    for g, (s1, s2) in sums.items():
        mean = s1 / num_draws
        var = ((s2 - num_draws * mean * mean) / (num_draws - 1)).clamp_min(0.0)
        out[g] = GradientStats(label, g, mean.cpu(), var.cpu(), num_draws,
                               torch.stack(kept[g]) if keep_samples else None)
    return out


def _draw(model, guide, x, args, kwargs, estimator, num_draws, seed, groups, warmup, warmup_data, baseline_lr,
          keep_samples):
    """The loop of :func:`gradient_stats`: running sums of the draws per group."""

    store = pyro.get_param_store()
    prepared = estimator if isinstance(estimator, PreparedEstimator) else prepare(
        guide, estimator, x_dim=x[0].numel(), device=x.device)
    scales = getattr(model, "site_scales", None)
    m_fn, g_fn = training_objective(model, scales), training_objective(prepared.guide, scales)
    elbo = prepared.loss
    # a guessed plate nesting would cost a guide run inside draw 0 and break the pairing
    elbo.max_plate_nesting = check_pair(model, guide, x, *args, enumerated_ok=isinstance(elbo, TraceEnum_ELBO),
                                        **kwargs).nesting
    names = {k: list(v) for k, v in (groups or param_groups(model, guide, x, *args, **kwargs)).items()}
    empty = [g for g, ns in names.items() if not ns]
    if empty or not names:
        what = f"group {empty[0]!r} names no parameters" if empty else "neither the model nor the guide has a " \
            "learnable parameter (pyro.param or pyro.module)"
        raise ValueError(f"gradient_stats: {what}; there is no gradient to estimate. Pass groups= with at least "
                         f"one param-store name per group, e.g. {{'encoder': [...]}}.")
    if warmup:
        pyro.set_rng_seed(seed + num_draws + 1)
        opt = None
        for _ in range(warmup):
            xb = x
            if warmup_data is not None:
                xb = warmup_data[torch.randint(len(warmup_data), (x.shape[0],), device=warmup_data.device)]
            _zero_grads(store)
            elbo.loss_and_grads(m_fn, g_fn, xb, *args, **kwargs)
            if prepared.baseline_net is not None:
                opt = opt or torch.optim.Adam(prepared.baseline_net.parameters(), lr=baseline_lr)
                opt.step()
    frozen = {n: detach_provenance(store[n]).detach().clone() for n in store.keys()
              if n.startswith(DECAYING_AVG_PREFIX)}
    sums: dict[str, list[torch.Tensor]] = {}
    kept: dict[str, list[torch.Tensor]] = {g: [] for g in names}
    for i in range(num_draws):
        for n in [n for n in store.keys() if n.startswith(DECAYING_AVG_PREFIX)]:
            if n in frozen:
                store[n] = frozen[n].clone()
            else:
                del store[n]  # not warmed up: every draw starts from Pyro's zero average
        _zero_grads(store)
        pyro.set_rng_seed(seed + i)
        elbo.loss_and_grads(m_fn, g_fn, x, *args, **kwargs)
        params = dict(store.named_parameters())
        for g, ns in names.items():
            missing = [n for n in ns if n not in params]
            if missing:
                raise ValueError(f"group {g!r} names parameters not in Pyro's param store: {missing}")
            # the ELBO's gradient is minus the loss's; a parameter the estimate does not reach has 0
            flat = torch.cat([(-params[n].grad if params[n].grad is not None
                               else torch.zeros_like(params[n])).reshape(-1) for n in ns]).double()
            s = sums.setdefault(g, [torch.zeros_like(flat), torch.zeros_like(flat)])
            s[0] += flat
            s[1] += flat * flat
            if keep_samples:
                kept[g].append(flat.cpu())
    return sums, kept, prepared.estimator.label


def _zero_grads(store) -> None:
    for _, p in store.named_parameters():
        p.grad = None


def stats_table(stats: dict[str, dict[str, GradientStats]], reference: dict[str, torch.Tensor] | None = None
                ) -> list[tuple]:
    """Rows for :func:`vi_lab.reporting.format_table`: estimator, group, ||mean||, variance, SNR.

    :param stats: ``{estimator label: gradient_stats(...)}``.
    :param reference: ``{group: reference gradient}`` (exact, or the mean of the least
        noisy unbiased estimator) to add ``SNR (ref)`` (:meth:`GradientStats.snr_given`)
        and ``bias z`` (:meth:`GradientStats.bias_z`, about 1 when unbiased) columns.
    """
    header = ["estimator", "group", "params", "||mean||", "variance (tr Cov)", "SNR"]
    if reference is not None:
        header += ["SNR (ref)", "bias z"]
    rows: list[tuple] = [tuple(header)]
    for label, by_group in stats.items():
        for g, s in by_group.items():
            row = [label, g, s.num_params, f"{s.mean_norm_debiased:.4g}", f"{s.variance:.4g}", f"{s.snr:.3g}"]
            if reference is not None:
                row += ([f"{s.snr_given(reference[g]):.3g}", f"{s.bias_z(reference[g]):.2f}"] if g in reference
                        else ["", ""])
            rows.append(tuple(row))
    return rows


__all__ = ["GradientStats", "gradient_stats", "param_groups", "stats_table"]
