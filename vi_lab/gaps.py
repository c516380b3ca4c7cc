"""The inference gap log p(x) - L[q] split into approximation and amortization gaps.

For a trained model, an amortized guide q(z | x) and datapoints x (Cremer, Li &
Duvenaud, "Inference Suboptimality in Variational Autoencoders", ICML 2018)::

    log p(x) - L[q] = (log p(x) - L[q*])  +  (L[q*] - L[q])
    inference gap      approximation gap     amortization gap

where L[q] is the amortized guide's ELBO and q* the best guide *of the same family*
for each datapoint on its own, found by optimizing a local (per-datapoint) guide that
starts from the encoder's output until it converges. The approximation gap is what the
family cannot do; the amortization gap is what the encoder fails to do. A richer local
family (``rich_family``, full covariance by default) gives L[q*_rich], how far a better
family would go. log p(x) is the importance-sampled estimate log p̂(x) with K draws
from the best available proposal (q*, or q*_rich, is a better proposal than q), and
Pareto-smoothed importance sampling's k-hat (ArviZ's: ``arviz_stats`` of ArviZ 1.x, or
``arviz`` 0.x) says per datapoint whether it can be trusted (k-hat > 0.7: the estimate
is unreliable; Vehtari et al., 2024).

Semi-amortized inference (:func:`refine`, :func:`refinement_curve`) runs the same local
optimization at test time for a fixed number of steps, closing part of the amortization
gap; the curve shows how much each step budget buys.

Everything is per datapoint in nats (higher ELBO is better, smaller gaps are better);
means come with standard errors over the datapoints.

Under ``torchrun`` (:mod:`vi_lab.distributed`) :func:`score_proposal`,
:func:`inference_gaps` and :func:`refinement_curve` split the datapoints across the
processes: each runs the whole analysis on its contiguous share, alone, and every process
gets the per-datapoint results of all of them in data order
(:func:`vi_lab.evaluate.split_datapoints`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from vi_lab import ais as ais_module
from vi_lab import distributed, evaluate
from vi_lab.contract import check_pair
from vi_lab.guides import GUIDES
from vi_lab.guides.local import LOCAL_GUIDES, LocalFit, LocalGuide, make_local_guide, optimize_local
from vi_lab.reporting import format_table, mean_sem, write_json  # noqa: F401 (gaps.mean_sem)

#: k-hat above which PSIS (and plain importance sampling) estimates are unreliable
KHAT_THRESHOLD = 0.7

#: the proposals log p̂(x) can be computed with, in the order they are tried
PROPOSALS = ("q", "q_star", "q_star_rich")

#: how log p̂(x) can be estimated: importance sampling (the default) or annealed importance sampling
LOG_PX_ESTIMATORS = ("is", "ais")
#: settings of :func:`vi_lab.ais.ais_log_likelihood` that ``inference_gaps(..., ais=...)`` passes on
AIS_SETTINGS = ("num_chains", "num_steps", "leapfrog_steps", "step_size", "adapt_chains", "start", "schedule")

#: row labels of the Cremer-shaped table, keyed by the summary entry they show
TABLE_ROWS = (
    ("log_px", "log p̂(x)"),
    ("elbo_rich", "L[q*_rich]"),
    ("elbo_optimal", "L[q*]"),
    ("elbo_amortized", "L[q]"),
    ("approximation_gap", "approximation gap"),
    ("amortization_gap", "amortization gap"),
    ("inference_gap", "inference gap"),
)


def _stat(values: torch.Tensor) -> dict[str, float | None]:
    """``{"mean", "sem"}`` for JSON: non-finite numbers (a single point's sem) become None."""
    return {k: (v if math.isfinite(v) else None) for k, v in zip(("mean", "sem"), mean_sem(values))}


def _fmt(stat: dict | None) -> str:
    if stat is None or stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.2f}" + (f" ± {stat['sem']:.2f}" if stat.get("sem") is not None else "")


def pareto_khat(log_weights: torch.Tensor) -> torch.Tensor:
    """PSIS k-hat of the importance weights of each datapoint, with ArviZ's ``psislw``.

    :param log_weights: ``(K, N)``: K log importance weights for each of N datapoints
        (as :func:`vi_lab.evaluate.log_weights` returns them).
    :returns: ``(N,)`` k-hat values, float64 on the CPU. Below 0.5 the weights have a
        finite variance; above 0.7 the importance-sampled estimate is unreliable. When
        all K weights of a datapoint are equal (up to 1e-6 nats), the proposal is the
        exact posterior and k-hat is not defined: NaN is returned for that point, and
        for a point whose tail cannot be fitted (:func:`_tail_unfit`; always with fewer
        than 25 draws), whatever the ArviZ version says about it. ArviZ 0.x and 1.x round the tail length
        differently, so between K = 226 and 1000 their k-hats of the same weights can
        differ by about 0.1; elsewhere by about 0.01.

    Example::

        lw = vi_lab.evaluate.log_weights(model, guide, x, num_samples=5000)
        (pareto_khat(lw) > 0.7).float().mean()  # share of untrustworthy estimates
    """
    if log_weights.dim() != 2:
        raise ValueError(f"log_weights must be (K, N), got shape {tuple(log_weights.shape)}")
    lw = log_weights.detach().double().cpu().T.contiguous().numpy()  # (N, K): ArviZ wants samples last
    khat = np.full(lw.shape[0], np.nan)
    fitted = (lw.max(1) - lw.min(1) >= 1e-6) & ~_tail_unfit(lw)  # else k-hat is undefined: NaN
    if fitted.any():
        khat[fitted] = _psis_khat(lw[fitted])
    return torch.from_numpy(khat)


@lru_cache(maxsize=1)
def psis_backend() -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """The installed PSIS implementation: ``(name, khat_of)`` with ``khat_of((N, K) log weights) -> (N,)``.

    ArviZ 1.x keeps ``psislw`` in ``arviz_stats`` (``array_stats.psislw``), which takes
    log-*likelihoods* and smooths the weights ``exp(-x)``: it is given minus the log
    weights. ArviZ 0.x has ``arviz.psislw``, which takes the log weights themselves; its
    import prints a once-a-day ``FutureWarning`` banner about the 1.x refactor that says
    nothing about vi_lab's use, so it is silenced for that import only.
    """
    try:
        import arviz_stats
        from arviz_stats.base import array_stats

        if int(arviz_stats.__version__.split(".")[0]) >= 1:
            return f"arviz_stats {arviz_stats.__version__}", lambda lw: array_stats.psislw(-lw, r_eff=1.0, axis=-1)[1]
    except ImportError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning)
            import arviz
    except ImportError:
        raise ImportError("PSIS k-hat needs ArviZ: pip install 'arviz-stats>=1' (Python >= 3.12) or "
                          "'arviz>=0.17,<1'") from None
    if not hasattr(arviz, "psislw"):  # arviz 1.x without arviz_stats >= 1 cannot happen through pip
        raise ImportError(f"arviz {arviz.__version__} has no psislw; pip install 'arviz-stats>=1'")
    return f"arviz {arviz.__version__}", lambda lw: arviz.psislw(lw.copy(), normalize=False)[1]


def _tail_unfit(lw: np.ndarray) -> np.ndarray:
    """Rows of ``(N, K)`` log weights whose largest weights give no Pareto tail to fit.

    arviz_stats's rule, applied for both ArviZ generations (0.x fits such a tail and
    answers a meaningless k-hat, e.g. -5 for weights that take two values): the first
    quartile of the tail's exceedances over the cutoff is not above the smallest one.
    The tail is the largest ``3 sqrt(K)`` weights (``K / 5`` for K <= 225); under 5 of
    them (K < 25) arviz_stats refuses to fit and ArviZ 0.x answers inf or, rounding the
    length up, fits 5 draws: no row is fitted.
    """
    k = lw.shape[1]
    m = int(3 * k**0.5) if k > 225 else k // 5
    if m < 5:
        return np.ones(lw.shape[0], dtype=bool)
    top = np.sort(lw, axis=1)[:, -(m + 1):]  # (N, m + 1): the cutoff, then the tail ascending
    w = np.exp(top - top[:, -1:])
    exceed = w[:, 1:] - w[:, :1]  # (N, m)
    return exceed[:, int(m / 4 + 0.5) - 1] <= exceed[:, 0]


def _psis_khat(lw: np.ndarray) -> np.ndarray:
    """k-hat per row of ``(N, K)`` log weights whose tails can be fitted (:func:`_tail_unfit`)."""
    _, khat_of = psis_backend()
    return np.asarray(khat_of(lw), dtype=np.float64).reshape(-1)


def guide_family(guide: Any) -> str:
    """The :data:`vi_lab.guides.GUIDES` name of an amortized guide's class.

    :raises ValueError: when the class is not registered (pass ``family=`` explicitly).
    """
    for name, cls in GUIDES.items():
        if type(guide) is cls:
            return name
    raise ValueError(f"cannot tell the family of a {type(guide).__name__}: it is not a class in "
                     f"vi_lab.guides.GUIDES; pass family= (one of {', '.join(sorted(LOCAL_GUIDES))})")


def check_family(name: str, what: str = "family") -> str:
    """``name`` when it is a family with a local (per-datapoint) guide, whose L[q*] can be found.

    :param name: a guide family, e.g. ``"mean_field"``.
    :param what: how the caller calls it in the error (``"family"``, ``"--rich-family"``).
    :raises ValueError: naming ``name`` and the valid local families.

    Example::

        check_family("iaf")  # "iaf"; check_family("spline") raises, listing the valid names
    """
    if name not in LOCAL_GUIDES:
        raise ValueError(f"{what} {name!r} has no local (per-datapoint) guide; valid local families: "
                         f"{', '.join(sorted(LOCAL_GUIDES))}")
    return name


@dataclass
class ProposalResult:
    """What K importance draws from one proposal give, per datapoint ``(N,)``."""

    elbo: torch.Tensor  # mean of the K log weights: L[proposal]
    log_px: torch.Tensor  # log-mean-exp of the K log weights: log p̂(x)
    khat: torch.Tensor  # PSIS k-hat of the K weights


@torch.no_grad()
def score_proposal(model: Callable, guide: Callable, x: torch.Tensor, *args, num_samples: int = 5000,
                   batch_size: int | None = None, progress: bool | str = False,
                   memory_budget: int | str | None = None, **kwargs) -> ProposalResult:
    """ELBO, importance-sampled log p̂(x) and PSIS k-hat from the same K draws of one guide.

    The ELBO is the mean of the log weights, log p̂(x) their log-mean-exp; sharing the
    draws makes their difference (a gap) less noisy than two independent estimates.

    Under torchrun each process scores its share of the datapoints (k-hat included) and every
    process returns all of them in data order; a local guide is scored by process 0 alone.

    :param model: Pyro model keeping the data-plate contract.
    :param guide: the proposal, amortized or local (a local guide gets its full batch).
    :param x: the N datapoints.
    :param num_samples: K draws per datapoint.
    :param batch_size: datapoints per chunk of draws (None: all at once, which a local guide needs;
        either way the K draws are cut so that a chunk stays within the memory budget).
    :param progress: a progress bar over the chunks (its label, or True).
    :param memory_budget: bytes of working memory per chunk, or a size such as ``"2GiB"``
        (default: :func:`vi_lab.evaluate.chunk_budget`).
    :returns: :class:`ProposalResult` of ``(N,)`` tensors.
    """
    bar = evaluate.share_progress(progress, "weights", evaluate.world_of(x))

    def score(xs, /, *a, **kw):
        lw = evaluate.log_weights(model, guide, xs, *a, num_samples=num_samples, memory_budget=memory_budget,
                                  batch_size=batch_size or max(1, xs.shape[0]), progress=bar, **kw)  # (K, n)
        return lw.mean(0), lw.logsumexp(0) - math.log(num_samples), pareto_khat(lw).to(lw.device)

    elbo, log_px, khat = evaluate.split_datapoints(score, x, args, kwargs, whole=isinstance(guide, LocalGuide),
                                                   what="the scoring of a proposal")
    return ProposalResult(elbo=elbo, log_px=log_px, khat=khat)


@dataclass
class GapReport:
    """The inference-gap decomposition for one model/guide pair on N datapoints.

    Per-datapoint tensors ``(N,)`` in nats; gaps are properties computed from them, so
    ``approximation_gap + amortization_gap == inference_gap`` holds by construction (up to float rounding).

    :ivar label: name of the column (usually the guide family used in training).
    :ivar log_px: log p̂(x), importance-sampled with ``num_samples`` draws from ``proposal``
        (or by AIS: ``log_px_estimator`` says which).
    :ivar elbo_amortized: L[q], the amortized guide's ELBO.
    :ivar elbo_optimal: L[q*], the ELBO of the locally optimized guide of ``family``.
    :ivar elbo_rich: L[q*_rich] of ``rich_family`` (None when not computed).
    :ivar khat: PSIS k-hat per proposal name (``"q"``, ``"q_star"``, ``"q_star_rich"``).
    :ivar log_px_by_proposal: log p̂(x) under each proposal (and ``"ais"``'s when AIS ran).
    :ivar proposal: the proposal ``log_px`` comes from.
    :ivar family: local family of q* (the amortized guide's own family).
    :ivar rich_family: local family of q*_rich.
    :ivar fits: :class:`~vi_lab.guides.local.LocalFit` per local optimization
        (``"q_star"``, ``"q_star_rich"``): steps used and the convergence criterion. Under
        data parallelism each process optimizes its own share, and the convergence rule
        applies to each share's mean loss: ``fits`` then says the most steps any share took
        and ``converged`` when every share's run met the rule (``losses`` is empty: the
        shares' traces are in ``shard_fits``).
    :ivar num_samples: K, draws per datapoint for every ELBO and log p̂(x) here.
    :ivar local_guides: the optimized local guides (not serialized), e.g. to reuse q*. Under
        data parallelism: this process's own, for its rows
        :func:`vi_lab.distributed.shard_bounds` of the N datapoints (with fewer datapoints than
        processes: process 0's for all of them; the others have none).
    :ivar log_px_estimator: the estimator behind ``log_px``, e.g. ``"IS, K=5000 draws from q_star"``
        or ``"AIS, 16 chains x 1000 steps from q"``.
    :ivar shard_fits: under data parallelism, every process's own ``fits`` in rank order
        (process ``r`` had the datapoints :func:`vi_lab.distributed.shard_bounds` gives it);
        empty in one process.
    """

    label: str
    log_px: torch.Tensor
    elbo_amortized: torch.Tensor
    elbo_optimal: torch.Tensor
    elbo_rich: torch.Tensor | None
    khat: dict[str, torch.Tensor]
    log_px_by_proposal: dict[str, torch.Tensor]
    proposal: str
    family: str
    rich_family: str | None
    fits: dict[str, LocalFit]
    num_samples: int
    seconds: float = float("nan")
    log_px_estimator: str = ""
    local_guides: dict[str, LocalGuide] = field(default_factory=dict, repr=False)
    shard_fits: list[dict[str, LocalFit]] = field(default_factory=list, repr=False)

    @property
    def num_points(self) -> int:
        return self.log_px.shape[0]

    @property
    def approximation_gap(self) -> torch.Tensor:
        """log p̂(x) - L[q*] per datapoint: what the family cannot represent."""
        return self.log_px - self.elbo_optimal

    @property
    def amortization_gap(self) -> torch.Tensor:
        """L[q*] - L[q] per datapoint: what the encoder leaves on the table."""
        return self.elbo_optimal - self.elbo_amortized

    @property
    def inference_gap(self) -> torch.Tensor:
        """log p̂(x) - L[q] per datapoint: the sum of the two."""
        return self.log_px - self.elbo_amortized

    def per_datapoint(self) -> dict[str, torch.Tensor]:
        """Every per-datapoint quantity by name (the keys of :data:`TABLE_ROWS` and k-hats)."""
        out = {
            "log_px": self.log_px,
            "elbo_amortized": self.elbo_amortized,
            "elbo_optimal": self.elbo_optimal,
            "approximation_gap": self.approximation_gap,
            "amortization_gap": self.amortization_gap,
            "inference_gap": self.inference_gap,
        }
        if self.elbo_rich is not None:
            out["elbo_rich"] = self.elbo_rich
        out.update({f"khat_{k}": v for k, v in self.khat.items()})
        out.update({f"log_px_{k}": v for k, v in self.log_px_by_proposal.items()})
        return out

    def khat_share_above(self, threshold: float = KHAT_THRESHOLD) -> dict[str, float]:
        """Share of datapoints whose k-hat exceeds ``threshold``, per proposal (NaN k-hat counts as below)."""
        return {k: (v > threshold).double().mean().item() for k, v in self.khat.items()}

    def summary(self) -> dict[str, dict[str, float | None]]:
        """``{name: {"mean": ..., "sem": ...}}`` over datapoints for every per-datapoint quantity
        (None where undefined, e.g. the sem of one point or the mean of all-NaN k-hats)."""
        return {k: _stat(v) for k, v in self.per_datapoint().items()}

    def to_dict(self, per_datapoint: bool = True) -> dict[str, Any]:
        """JSON-ready dict: settings, convergence of each local fit, summary, and (optionally) per-datapoint lists."""
        d: dict[str, Any] = {
            "label": self.label,
            "units": "nats per datapoint (ELBO and log p(x): higher is better; gaps: smaller is better)",
            "num_points": self.num_points,
            "num_samples": self.num_samples,
            "proposal": self.proposal,
            "log_px_estimator": self.log_px_estimator,
            "family": self.family,
            "rich_family": self.rich_family,
            "seconds": self.seconds,
            "local_fits": {k: self._fit_record(k) for k in self.fits},
            "khat_threshold": KHAT_THRESHOLD,
            "khat_share_above": self.khat_share_above(),
            "summary": self.summary(),
        }
        if per_datapoint:
            d["per_datapoint"] = {k: [None if not math.isfinite(x) else x for x in v.detach().double().cpu().tolist()]
                                  for k, v in self.per_datapoint().items()}
        return d

    def _fit_record(self, name: str) -> dict[str, Any]:
        """A local fit for JSON; under data parallelism with each share's, and the final loss of all the datapoints."""
        def record(f: LocalFit) -> dict[str, Any]:
            return {"steps": f.steps, "converged": f.converged, "criterion": f.criterion,
                    "final_loss": f.losses[-1] if f.losses else None}

        out = record(self.fits[name])
        if self.shard_fits:
            sizes = distributed.shard_sizes(self.num_points, len(self.shard_fits))
            shares = [{"datapoints": n, **record(fits[name])} for n, fits in zip(sizes, self.shard_fits)]
            if all(s["final_loss"] is not None for s in shares):  # each a mean over its share's datapoints
                out["final_loss"] = sum(s["datapoints"] * s["final_loss"] for s in shares) / self.num_points
            out["shares"] = [{k: v for k, v in s.items() if k != "criterion"} for s in shares]
        return out

    def save_json(self, path: str | Path, per_datapoint: bool = True) -> Path:
        """Write :meth:`to_dict` to ``path``."""
        return write_json(path, self.to_dict(per_datapoint))

    def table(self) -> str:
        """This report as a one-column :func:`gap_table`."""
        return gap_table([self])


def _summary_of(report: GapReport | dict) -> tuple[str, dict, dict]:
    d = report.to_dict(per_datapoint=False) if isinstance(report, GapReport) else report
    return d["label"], d["summary"], d.get("khat_share_above", {})


def gap_table(reports: Sequence[GapReport | dict]) -> str:
    """A text table in the shape of Cremer et al.'s Table 2: rows log p̂(x), L[q*_rich], L[q*], L[q]
    and the three gaps, one column per report; entries ``mean ± sem`` in nats per datapoint,
    plus the share of datapoints with k-hat > 0.7 under q and under q*.

    :param reports: :class:`GapReport` objects or their :meth:`GapReport.to_dict` form
        (e.g. read back from ``gaps.json``).

    Example::

        print(gap_table([report_mean_field, report_full_cov]))
    """
    cols = [_summary_of(r) for r in reports]
    rows: list[tuple[str, ...]] = [("nats per datapoint", *[label for label, _, _ in cols])]
    for key, name in TABLE_ROWS:
        rows.append((name, *[_fmt(summary.get(key)) for _, summary, _ in cols]))
    for prop, name in (("q", "k-hat > 0.7 under q"), ("q_star", "k-hat > 0.7 under q*")):
        rows.append((name, *[f"{100 * share[prop]:.0f}%" if prop in share else "-" for _, _, share in cols]))
    return format_table(rows)


def _as_lrs(lr: float | Sequence[float]) -> tuple[float, ...]:
    lrs = (float(lr),) if isinstance(lr, (int, float)) else tuple(float(v) for v in lr)
    if not lrs or any(not (v > 0 and math.isfinite(v)) for v in lrs):
        raise ValueError(f"lr must be a positive number or a sequence of them (stages), got {lr!r}")
    return lrs


def optimize_in_stages(
    model: Callable,
    local: LocalGuide,
    x: torch.Tensor,
    *args,
    lr: float | Sequence[float] = (1e-2, 1e-3),
    max_steps: int = 5000,
    num_particles: int = 16,
    window: int = 100,
    tol: float = 1e-3,
    **kwargs,
) -> LocalFit:
    """:func:`~vi_lab.guides.local.optimize_local` once per learning rate, each stage to convergence.

    Adam at a constant learning rate stops *near* the optimum, jittering by about one
    step in every parameter; for a tight posterior that jitter costs a visible part of
    a nat. A second stage at a tenth of the rate removes most of it, which matters when
    L[q*] is compared with exact values or small gaps.

    :param lr: one learning rate or a decreasing sequence of them (one stage each).
    :param max_steps: budget over all stages together.
    :returns: one :class:`~vi_lab.guides.local.LocalFit` for all stages (``converged``:
        the last stage met the window rule).
    """
    lrs = _as_lrs(lr)
    losses: list[float] = []
    converged = False
    for stage_lr in lrs:
        left = max_steps - len(losses)
        if left <= 0:
            converged = False
            break
        fit = optimize_local(model, local, x, *args, max_steps=left, lr=stage_lr, num_particles=num_particles,
                             window=window, tol=tol, **kwargs)
        losses.extend(fit.losses)
        converged = fit.converged
    criterion = (f"Adam with lr {' then '.join(f'{v:g}' for v in lrs)}, each stage until the mean -ELBO over a "
                 f"{window}-step window improves by < {tol:g} nats per datapoint ({num_particles} draws per step); "
                 f"{max_steps} steps at most")
    return LocalFit(steps=len(losses), converged=converged, criterion=criterion, losses=losses)


def _local(family: str, guide: Any, x: torch.Tensor, *, label: str) -> LocalGuide:
    local = make_local_guide(family, init_from=guide, x=x)
    # its own param-store prefix: optimize_local clears the prefix, so q* and q*_rich must not share one
    local.name = label
    return local


def inference_gaps(
    model: Callable,
    guide: nn.Module,
    x: torch.Tensor,
    *args,
    family: str | None = None,
    rich_family: str | None = "full_cov",
    num_samples: int = 5000,
    proposal: str = "auto",
    max_steps: int = 5000,
    lr: float | Sequence[float] = (1e-2, 1e-3),
    num_particles: int = 16,
    window: int = 100,
    tol: float = 1e-3,
    label: str | None = None,
    log_px: str = "is",
    ais: dict[str, Any] | None = None,
    **kwargs,
) -> GapReport:
    """Decompose the inference gap of an amortized guide on datapoints ``x``.

    Steps: L[q] from K draws of the amortized guide; q* = a local guide of ``family``
    initialized from the guide's output for ``x`` and optimized (model fixed, Adam,
    ``num_particles`` draws per step) until the mean -ELBO over a ``window``-step window
    improves by less than ``tol`` nats per datapoint, or ``max_steps``; the same for
    ``rich_family``; then K draws from each proposal give its ELBO, log p̂(x) and k-hat.

    :param model: trained Pyro model (not updated).
    :param guide: trained amortized guide with ``get_posterior(x)`` (any vi_lab guide).
    :param x: the N datapoints, already in the form the model scores (e.g. binarized).
    :param family: local family of q*; default: the guide's own family (:func:`guide_family`).
    :param rich_family: a richer local family for L[q*_rich], or None to skip it; when it
        equals ``family``, q* is reused.
    :param num_samples: K draws per datapoint for every ELBO, log p̂(x) and k-hat.
    :param proposal: which guide's draws give the reported log p̂(x): ``"q"``,
        ``"q_star"``, ``"q_star_rich"``, or ``"auto"`` (the one with the highest mean
        ELBO, i.e. closest to the posterior in KL(q || p); every proposal's estimate is
        kept in ``log_px_by_proposal``).
    :param max_steps: step budget of each local optimization (all stages together).
    :param lr: Adam learning rate of the local optimizations, or a decreasing sequence
        of rates run one after the other, each to convergence (:func:`optimize_in_stages`).
    :param num_particles: ELBO draws per optimization step.
    :param window: convergence window in steps.
    :param tol: convergence threshold, nats per datapoint per window.
    :param label: the report's column name (default: the guide's family).
    :param log_px: the estimator of the reported log p̂(x): ``"is"`` (importance sampling from
        ``proposal``) or ``"ais"`` (:func:`vi_lab.ais.ais_log_likelihood` from the amortized
        guide; every proposal's IS estimate is still kept). ``log_px_estimator`` says which ran.
    :param ais: settings of the AIS run (keys of :data:`AIS_SETTINGS`, e.g.
        ``{"num_chains": 16, "num_steps": 1000}``); its defaults otherwise.
    :returns: :class:`GapReport`.

    Under torchrun each process runs all of the above on its contiguous share of the
    datapoints, alone (its local optimizations stop by the window rule on its share's mean
    loss), and every process gets the same report: per-datapoint results in data order,
    the ``"auto"`` proposal chosen by the mean ELBO over all datapoints, ``fits`` and
    ``shard_fits`` as :class:`GapReport` says, ``seconds`` of the slowest process.

    Example::

        report = inference_gaps(vae, guide, x_test[:100], num_samples=5000)
        print(report.table())
        report.save_json("runs/gaps/mean_field.json")
    """
    if proposal not in ("auto", *PROPOSALS):
        raise ValueError(f"unknown proposal {proposal!r}; valid: auto, {', '.join(PROPOSALS)}")
    if log_px not in LOG_PX_ESTIMATORS:
        raise ValueError(f"log_px must be 'is' or 'ais' (the estimator of log p̂(x)), got {log_px!r}")
    unknown = sorted(set(ais or {}) - set(AIS_SETTINGS))
    if unknown:
        raise ValueError(f"unknown AIS settings {unknown}; valid: {', '.join(AIS_SETTINGS)}")
    if ais and log_px != "ais":
        raise ValueError("ais= settings were given but log_px is 'is': pass log_px='ais' to use them")
    ais_settings = dict(ais or {}) if log_px == "ais" else None
    settings = dict(family=family, rich_family=rich_family, num_samples=num_samples, proposal=proposal,
                    max_steps=max_steps, lr=lr, num_particles=num_particles, window=window, tol=tol, label=label,
                    ais_settings=ais_settings)
    return evaluate.split_datapoints(
        lambda xs, /, *a, **kw: _gaps(model, guide, xs, *a, **settings, **kw), x, args, kwargs,
        join=lambda local, gather: _join_reports(local, gather, proposal),
        ship=lambda report: dataclasses.replace(report, local_guides={}), what="the gap analysis")


def _estimator(proposal: str, num_samples: int, ais_settings: dict[str, Any] | None) -> str:
    """What gave log p̂(x), in words (:attr:`GapReport.log_px_estimator`)."""
    if ais_settings is None:
        return f"IS, K={num_samples} draws from {proposal}"
    defaults = {k: p.default for k, p in inspect.signature(ais_module.ais_log_likelihood).parameters.items()}
    s = {k: ais_settings.get(k, defaults[k]) for k in AIS_SETTINGS}
    start = "q" if s["start"] == "guide" else "the prior"
    return (f"AIS, {s['num_chains']} chains x {s['num_steps']} steps from {start} ({s['leapfrog_steps']} leapfrog "
            f"steps, {s['schedule']} schedule)")


def _best_proposal(elbos: dict[str, torch.Tensor]) -> str:
    """The proposal with the highest mean ELBO (the first of equals, in :data:`PROPOSALS` order)."""
    return max(elbos, key=lambda k: elbos[k].mean().item())


def _join_reports(local: GapReport, gather: Callable[[torch.Tensor], torch.Tensor], proposal: str) -> GapReport:
    """Every process's report of its share as one report of all the datapoints, the same on every process."""
    shares = distributed.all_gather_object((local.fits, local.seconds), "the gap analysis's local fits")
    elbos = {"q": gather(local.elbo_amortized), "q_star": gather(local.elbo_optimal)}
    if local.elbo_rich is not None:
        elbos["q_star_rich"] = gather(local.elbo_rich)
    log_px = {k: gather(v) for k, v in local.log_px_by_proposal.items()}
    chosen = _best_proposal({k: elbos[k] for k in log_px if k in elbos}) if proposal == "auto" else proposal
    by_ais = "ais" in log_px
    fits = {}
    for name, fit in local.fits.items():
        each = [share_fits[name] for share_fits, _ in shares]
        fits[name] = LocalFit(
            steps=max(f.steps for f in each), converged=all(f.converged for f in each), losses=[],
            criterion=f"{fit.criterion}; run by each of {len(each)} processes on its own share of the datapoints "
                      f"(steps: the most any share took; converged: every share met the rule)")
    return dataclasses.replace(
        local, log_px=log_px["ais" if by_ais else chosen], elbo_amortized=elbos["q"], elbo_optimal=elbos["q_star"],
        elbo_rich=elbos.get("q_star_rich"), khat={k: gather(v) for k, v in local.khat.items()},
        log_px_by_proposal=log_px, proposal=chosen, fits=fits, seconds=max(sec for _, sec in shares),
        shard_fits=[share_fits for share_fits, _ in shares],
        log_px_estimator=local.log_px_estimator if by_ais else _estimator(chosen, local.num_samples, None))


def _gaps(model: Callable, guide: nn.Module, x: torch.Tensor, *args, family: str | None, rich_family: str | None,
          num_samples: int, proposal: str, max_steps: int, lr: float | Sequence[float], num_particles: int,
          window: int, tol: float, label: str | None, ais_settings: dict[str, Any] | None = None,
          **kwargs) -> GapReport:
    """:func:`inference_gaps` in one process."""
    check_pair(model, guide, x, *args, **kwargs)  # the contract (and the data), before any optimization
    family = check_family(family or guide_family(guide), "family")
    if rich_family is not None:
        check_family(rich_family, "rich_family")
    if proposal == "q_star_rich" and rich_family is None:
        raise ValueError("proposal='q_star_rich' needs a rich_family")
    t0 = time.perf_counter()
    opt = dict(max_steps=max_steps, lr=_as_lrs(lr), num_particles=num_particles, window=window, tol=tol)

    local_guides: dict[str, LocalGuide] = {}
    fits: dict[str, LocalFit] = {}
    q_star = _local(family, guide, x, label="gaps_q_star")
    fits["q_star"] = optimize_in_stages(model, q_star, x, *args, **opt, **kwargs)
    local_guides["q_star"] = q_star
    if rich_family is not None:
        if rich_family == family:
            local_guides["q_star_rich"], fits["q_star_rich"] = q_star, fits["q_star"]
        else:
            rich = _local(rich_family, guide, x, label="gaps_q_star_rich")
            fits["q_star_rich"] = optimize_in_stages(model, rich, x, *args, **opt, **kwargs)
            local_guides["q_star_rich"] = rich

    scored = {"q": score_proposal(model, guide, x, *args, num_samples=num_samples, **kwargs)}
    for name, local in local_guides.items():
        if name == "q_star_rich" and local is q_star:
            scored[name] = scored["q_star"]
        else:
            scored[name] = score_proposal(model, local, x, *args, num_samples=num_samples, **kwargs)
    if proposal == "auto":
        proposal = _best_proposal({k: v.elbo for k, v in scored.items()})
    log_px_by_proposal = {k: v.log_px for k, v in scored.items()}
    if ais_settings is not None:  # annealed from the amortized guide: any start works, q is the one at hand
        log_px_by_proposal["ais"] = ais_module.ais_log_likelihood(model, guide, x, *args, **ais_settings, **kwargs)
    return GapReport(
        label=label or family,
        log_px=log_px_by_proposal["ais" if ais_settings is not None else proposal],
        elbo_amortized=scored["q"].elbo,
        elbo_optimal=scored["q_star"].elbo,
        elbo_rich=scored["q_star_rich"].elbo if "q_star_rich" in scored else None,
        khat={k: v.khat for k, v in scored.items()},
        log_px_by_proposal=log_px_by_proposal,
        proposal=proposal,
        family=family,
        rich_family=rich_family,
        fits=fits,
        num_samples=num_samples,
        seconds=time.perf_counter() - t0,
        log_px_estimator=_estimator(proposal, num_samples, ais_settings),
        local_guides=local_guides,
    )


def refine(
    model: Callable,
    guide: nn.Module,
    x: torch.Tensor,
    *args,
    steps: int = 100,
    family: str | None = None,
    lr: float = 1e-2,
    num_particles: int = 16,
    name: str = "refined_guide",
    **kwargs,
) -> tuple[LocalGuide, LocalFit]:
    """Semi-amortized inference: start from the encoder's q(z | x) and take ``steps`` local steps.

    The returned local guide is q(z | x) for exactly these N points, better than the
    amortized one by part of the amortization gap; it works with every evaluator
    (pass ``batch_size >= N``) and as a proposal for importance sampling.

    Under torchrun every process refines all N points itself (the guide is for exactly these
    points; evaluators then use process 0's); :func:`refinement_curve` splits the datapoints.

    :param model: trained Pyro model (not updated).
    :param guide: amortized guide with ``get_posterior(x)``.
    :param x: the N datapoints.
    :param steps: number of Adam steps (exactly this many: no early stop).
    :param family: local family (default: the guide's own).
    :param lr: Adam learning rate.
    :param num_particles: ELBO draws per step.
    :param name: param-store prefix of the refined guide.
    :returns: ``(local_guide, fit)``.

    Example::

        refined, _ = refine(vae, guide, x_test[:100], steps=200)
        vi_lab.evaluate.elbo(vae, refined, x_test[:100], num_samples=100, batch_size=100).mean()
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    family = check_family(family or guide_family(guide), "family")
    local = _local(family, guide, x, label=name)
    # tol = -inf: the window rule never fires, so exactly `steps` steps are taken
    fit = optimize_local(model, local, x, *args, max_steps=steps, lr=lr, num_particles=num_particles,
                         window=max(1, steps), tol=float("-inf"), **kwargs)
    return local, fit


@dataclass
class RefinementCurve:
    """L[q_t] after t refinement steps from the amortized q, per datapoint, for each t.

    :ivar label: curve name (guide family).
    :ivar steps: the step budgets t (0 is the amortized guide itself).
    :ivar elbo: per budget, ``(N,)`` ELBOs.
    :ivar elbo_optimal: L[q*] per datapoint when a :class:`GapReport` was given (then
        :meth:`remaining_gap` is the amortization gap left after t steps).
    :ivar log_px: log p̂(x) per datapoint when a report was given.
    """

    label: str
    steps: list[int]
    elbo: list[torch.Tensor]
    elbo_optimal: torch.Tensor | None = None
    log_px: torch.Tensor | None = None
    seconds: list[float] = field(default_factory=list)

    def remaining_gap(self) -> list[torch.Tensor]:
        """L[q*] - L[q_t] per budget: the amortization gap still open after t steps."""
        if self.elbo_optimal is None:
            raise ValueError("no L[q*] to compare with: build the curve with report=")
        return [self.elbo_optimal - e for e in self.elbo]

    def to_dict(self, per_datapoint: bool = False) -> dict[str, Any]:
        """JSON-ready: means and standard errors per budget (and per-datapoint ELBOs if asked)."""
        d: dict[str, Any] = {"label": self.label, "steps": self.steps, "seconds": self.seconds,
                             "units": "nats per datapoint",
                             "elbo": [_stat(e) for e in self.elbo]}
        if self.elbo_optimal is not None:
            d["amortization_gap"] = [_stat(g) for g in self.remaining_gap()]
        if self.log_px is not None:
            d["inference_gap"] = [_stat(self.log_px - e) for e in self.elbo]
        if per_datapoint:
            d["per_datapoint_elbo"] = [e.detach().double().cpu().tolist() for e in self.elbo]
        return d


def refinement_curve(
    model: Callable,
    guide: nn.Module,
    x: torch.Tensor,
    *args,
    steps: Sequence[int] = (0, 10, 30, 100, 300, 1000),
    report: GapReport | None = None,
    family: str | None = None,
    num_samples: int = 1000,
    lr: float = 1e-2,
    num_particles: int = 16,
    label: str | None = None,
    **kwargs,
) -> RefinementCurve:
    """The gap against the number of semi-amortized refinement steps.

    Each budget t is a fresh :func:`refine` run of t steps from the encoder's output (what
    a user with that budget would get), scored with ``num_samples`` draws per datapoint.
    Under torchrun each process runs the curve on its share of the datapoints, alone, and every
    process gets all the ELBOs in data order (``seconds``: the slowest process's, per budget).

    :param steps: step budgets, e.g. ``(0, 10, 100, 1000)``; 0 scores the amortized guide.
    :param report: the :class:`GapReport` of the same guide and points, for L[q*] and
        log p̂(x) (the curve then shows the remaining amortization and inference gaps).
    :param family: local family (default: the report's, else the guide's own).
    :param num_samples: draws per datapoint for each ELBO.
    :returns: :class:`RefinementCurve`.

    Example::

        curve = refinement_curve(vae, guide, x, steps=(0, 10, 100), report=report)
        [g.mean().item() for g in curve.remaining_gap()]  # shrinks towards 0
    """
    budgets = sorted({int(s) for s in steps})
    if not budgets or budgets[0] < 0:
        raise ValueError(f"steps must be non-negative integers, got {list(steps)!r}")
    family = family or (report.family if report is not None else None)
    if report is not None and report.num_points != x.shape[0]:
        raise ValueError(f"the report covers {report.num_points} datapoints but x has {x.shape[0]}")
    label = label or (report.label if report is not None else guide_family(guide))
    settings = dict(budgets=budgets, family=family, num_samples=num_samples, lr=lr, num_particles=num_particles,
                    label=label)
    curve = evaluate.split_datapoints(lambda xs, /, *a, **kw: _curve(model, guide, xs, *a, **settings, **kw),
                                      x, args, kwargs, join=_join_curves, what="the refinement curve")
    if report is None:
        return curve
    return dataclasses.replace(curve, elbo_optimal=report.elbo_optimal, log_px=report.log_px)


def _join_curves(local: RefinementCurve, gather: Callable[[torch.Tensor], torch.Tensor]) -> RefinementCurve:
    """Every process's curve of its share as one curve of all the datapoints, the same on every process."""
    seconds = distributed.all_gather_object(local.seconds, "the refinement curve's timings")
    return dataclasses.replace(local, elbo=[gather(e) for e in local.elbo], seconds=[max(s) for s in zip(*seconds)])


def _curve(model: Callable, guide: nn.Module, x: torch.Tensor, *args, budgets: list[int], family: str | None,
           num_samples: int, lr: float, num_particles: int, label: str, **kwargs) -> RefinementCurve:
    """:func:`refinement_curve` in one process, without a report."""
    elbos, seconds = [], []
    for t in budgets:
        t0 = time.perf_counter()
        local, _ = refine(model, guide, x, *args, steps=t, family=family, lr=lr, num_particles=num_particles,
                          **kwargs)
        q = guide if t == 0 else local
        elbos.append(evaluate.elbo(model, q, x, *args, num_samples=num_samples, batch_size=max(1, x.shape[0]),
                                   **kwargs))
        seconds.append(time.perf_counter() - t0)
    return RefinementCurve(label=label, steps=budgets, elbo=elbos, seconds=seconds)
