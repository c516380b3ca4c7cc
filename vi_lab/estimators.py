"""Gradient estimators for the ELBO, and diagnostics of how noisy each one is.

Every estimator here is one of Pyro's own objectives applied to the *same* model and
guide; what changes is what is done to the guide's latent sample sites:

==========================  ==================  ============================================
name                        Pyro objective      guide sites
==========================  ==================  ============================================
``reparam``                 fit's ``loss``      as they are: pathwise gradients
``reinforce``               Trace_ELBO          ``has_rsample`` off: score function
``reinforce_baseline``      TraceGraph_ELBO     ``has_rsample`` off, ``infer["baseline"]``
``relaxed`` (biased)        Trace_ELBO          discrete sites drawn straight-through from
                                                a Gumbel-softmax relaxation
``enum`` (exact)            TraceEnum_ELBO      ``infer["enumerate"] = "parallel"``
==========================  ==================  ============================================

REINFORCE is obtained by turning ``has_rsample`` off, so Pyro's ELBOs take their
score-function path (``score * (log p - log q)`` per datapoint); there is no second
copy of the objective. Baselines are declared the way ``pyro/infer/tracegraph_elbo.py``
reads them: ``decaying_avg`` is Pyro's ``use_decaying_avg_baseline``; ``nn`` adds an
input-dependent network ``b(x)`` (``nn_baseline``) on top of that running average,
the NVIL recipe (Mnih & Gregor, 2014).

:func:`gradient_stats` draws M independent gradient estimates at fixed parameters
(paired seeds across estimators) and reports per parameter group the mean, the
variance (trace of the covariance) and the signal-to-noise ratio.
"""

from __future__ import annotations

import copy
import math
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import RelaxedBernoulliStraightThrough, RelaxedOneHotCategoricalStraightThrough
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO
from pyro.ops.provenance import detach_provenance
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import nn

from vi_lab.contract import check_pair
from vi_lab.objectives import make_loss, training_objective
from vi_lab.nets import MLP

#: Pyro's name for the decaying-average state of a baseline at site ``<name>``
DECAYING_AVG_PREFIX = "__baseline_avg_downstream_cost_"
#: name under which the ``nn`` baseline network is registered with ``pyro.module``
BASELINE_MODULE_NAME = "estimator_baseline"


# ---------------------------------------------------------------------------
# distribution helpers


class ScoredDistribution(dist.TorchDistribution):
    """``base`` with pathwise sampling off: draws are detached, so Pyro scores the site by REINFORCE.

    Needed where ``has_rsample`` cannot be set on the instance: ``Independent`` and
    ``TransformedDistribution`` derive it from their base (a property without a setter),
    and Pyro's plate broadcasting re-expands the distribution, which would drop a flag
    set on the base. Draws are fresh tensors, so a flow recomputes ``log_prob`` through
    its inverse (with gradients) rather than from a cache filled without them.

    :param base: any Pyro distribution.
    """

    has_rsample = False
    arg_constraints: dict = {}

    def __init__(self, base: dist.TorchDistribution) -> None:
        self.base_dist = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base_dist.support

    @property
    def has_enumerate_support(self) -> bool:
        return self.base_dist.has_enumerate_support

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        return self.base_dist.enumerate_support(expand)

    @property
    def mean(self) -> torch.Tensor:
        return self.base_dist.mean

    @property
    def variance(self) -> torch.Tensor:
        return self.base_dist.variance

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.base_dist.sample(sample_shape).clone()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.base_dist.log_prob(value)

    def expand(self, batch_shape, _instance=None) -> "ScoredDistribution":
        return ScoredDistribution(self.base_dist.expand(batch_shape))


def without_rsample(d: dist.TorchDistribution, *, inplace: bool = True) -> dist.TorchDistribution:
    """``d`` with ``has_rsample`` off, so Pyro's ELBOs score it by REINFORCE.

    Pyro's ``has_rsample_(False)`` where the instance takes it; otherwise (``Independent``,
    ``TransformedDistribution``) a :class:`ScoredDistribution` wrapper.

    :param d: a distribution.
    :param inplace: switch ``d`` itself when it can be (cheap, for a distribution built
        per call); otherwise ``d`` is left as it was.
    :returns: the switched distribution.

    Example::

        q = without_rsample(dist.Normal(loc, scale).to_event(1))
        q.has_rsample  # False
    """
    if not d.has_rsample:
        return d
    if isinstance(getattr(type(d), "has_rsample", None), property):
        return ScoredDistribution(d)
    return (d if inplace else copy.copy(d)).has_rsample_(False)


def _unwrap_independent(d: torch.distributions.Distribution) -> tuple[torch.distributions.Distribution, int]:
    ndims = 0
    while isinstance(d, torch.distributions.Independent):
        ndims += d.reinterpreted_batch_ndims
        d = d.base_dist
    return d, ndims


#: discrete family -> Pyro's straight-through relaxation of it
RELAXATIONS: dict[type, type] = {
    torch.distributions.Bernoulli: RelaxedBernoulliStraightThrough,
    torch.distributions.OneHotCategorical: RelaxedOneHotCategoricalStraightThrough,
}


class StraightThrough(dist.TorchDistribution):
    """Hard samples of a discrete distribution with Gumbel-softmax (relaxed) gradients.

    ``rsample`` returns exact draws of ``discrete`` (a relaxed draw rounded, so
    ``P(z = 1) = sigmoid(logits)`` whatever the temperature) whose backward pass goes
    through the relaxed draw (Pyro's ``Relaxed*StraightThrough``). ``log_prob`` is the
    *discrete* log-probability, so the objective's value is a true single-sample ELBO;
    only its gradient is biased.

    :param discrete: ``Bernoulli`` or ``OneHotCategorical`` (possibly ``Independent``).
    :param temperature: relaxation temperature; lower is less biased and noisier.

    Example::

        q = StraightThrough(dist.Bernoulli(logits=logits).to_event(1), temperature=0.5)
        z = q.rsample()  # values in {0, 1}, differentiable w.r.t. logits
    """

    has_rsample = True
    arg_constraints: dict = {}

    def __init__(self, discrete: torch.distributions.Distribution, temperature: float) -> None:
        base, ndims = _unwrap_independent(discrete)
        relax = next((r for family, r in RELAXATIONS.items() if isinstance(base, family)), None)
        if relax is None:
            raise ValueError(f"the relaxed estimator needs Bernoulli or OneHotCategorical sites, got "
                             f"{type(base).__name__}; valid families: {[f.__name__ for f in RELAXATIONS]}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        temp = torch.as_tensor(float(temperature), dtype=base.logits.dtype, device=base.logits.device)
        relaxed = relax(temp, logits=base.logits)
        self.discrete, self.temperature = discrete, float(temperature)
        self.relaxed = relaxed.to_event(ndims) if ndims else relaxed
        super().__init__(discrete.batch_shape, discrete.event_shape, validate_args=False)

    @property
    def support(self):
        return self.discrete.support

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.relaxed.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.discrete.log_prob(value)

    def expand(self, batch_shape, _instance=None) -> "StraightThrough":
        return StraightThrough(self.discrete.expand(batch_shape), self.temperature)


# ---------------------------------------------------------------------------
# messengers applied to the guide


def _is_latent(msg: dict) -> bool:
    return msg["type"] == "sample" and not msg["is_observed"] and not isinstance(msg["fn"], _Subsample)


class ScoreFunction(Messenger):
    """Turn ``has_rsample`` off at every latent sample site of a guide (REINFORCE).

    The site's distribution is copied first, so a distribution object the guide keeps
    is not changed.

    Example::

        with ScoreFunction():
            guide(x)  # every latent site is scored, not reparameterized
    """

    def _process_message(self, msg: dict) -> None:
        if _is_latent(msg):
            msg["fn"] = without_rsample(msg["fn"], inplace=False)


class DeclareInfer(Messenger):
    """Merge ``options(msg)`` into ``msg["infer"][key]`` at every latent site.

    :param key: the ``infer`` entry (``"baseline"``, ``"enumerate"``).
    :param options: ``msg -> value``; called per site.
    """

    def __init__(self, key: str, options: Callable[[dict], Any]) -> None:
        super().__init__()
        self.key, self.options = key, options

    def _process_message(self, msg: dict) -> None:
        if _is_latent(msg):
            msg["infer"] = {**(msg["infer"] or {}), self.key: self.options(msg)}


class Relax(Messenger):
    """Draw discrete latent sites straight-through from their Gumbel-softmax relaxation.

    :param temperature: relaxation temperature.
    """

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def _process_message(self, msg: dict) -> None:
        if _is_latent(msg):
            msg["fn"] = StraightThrough(msg["fn"], self.temperature)


class RequireReparameterizable(Messenger):
    """Refuse discrete latent sites: they have no pathwise gradient."""

    def _process_message(self, msg: dict) -> None:
        if _is_latent(msg) and getattr(msg["fn"].support, "is_discrete", False):
            raise ValueError(
                f"estimator 'reparam' needs continuous latent sites, but guide site {msg['name']!r} is "
                f"{type(msg['fn']).__name__}; use one of 'reinforce', 'reinforce_baseline', 'relaxed', 'enum'")


class RequireEnumerable(Messenger):
    """Refuse latent sites whose support cannot be enumerated."""

    def _process_message(self, msg: dict) -> None:
        if _is_latent(msg) and not msg["fn"].has_enumerate_support:
            raise ValueError(
                f"estimator 'enum' needs guide sites with an enumerable support, but site {msg['name']!r} "
                f"is {type(msg['fn']).__name__}; use a categorical latent or a few binary units "
                "(vi_lab.guides.discrete.BinaryVector)")


# ---------------------------------------------------------------------------
# baselines


class BaselineNet(nn.Module):
    """NVIL's input-dependent baseline ``b(x)``: an MLP ``x -> one number per datapoint``.

    The output layer starts at zero, so before it has learned anything the baseline is
    the decaying average it is added to.

    :param x_dim: flattened observation size.
    :param hidden: hidden width (NVIL used 100).
    :param seed: seed of the initial weights (drawn from a private stream, so building
        the network does not move the global RNG).

    Example::

        b = BaselineNet(784)
        b(torch.rand(8, 784)).shape  # torch.Size([8])
    """

    def __init__(self, x_dim: int, hidden: int = 100, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)  # the CPU's only: torch.manual_seed seeds CUDA too
            self.net = MLP(x_dim, [hidden], 1, activation="tanh")
        last = self.net.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1)).squeeze(-1)  # (B, x_dim) -> (B,)


def _decaying_avg_options(est: "Estimator", net: nn.Module | None, x: torch.Tensor) -> dict[str, Any]:
    return {"use_decaying_avg_baseline": True, "baseline_beta": est.baseline_beta}


def _nn_options(est: "Estimator", net: nn.Module | None, x: torch.Tensor) -> dict[str, Any]:
    return {"use_decaying_avg_baseline": True, "baseline_beta": est.baseline_beta,
            "nn_baseline": net, "nn_baseline_input": x}


@dataclass(frozen=True)
class BaselineSpec:
    """A baseline kind: the ``infer["baseline"]`` options and whether it has a network."""

    description: str
    options: Callable[["Estimator", nn.Module | None, torch.Tensor], dict[str, Any]]
    network: bool


BASELINES: dict[str, BaselineSpec] = {
    "decaying_avg": BaselineSpec("Pyro's decaying average of the downstream cost", _decaying_avg_options, False),
    "nn": BaselineSpec("learned b(x) network on top of the decaying average (NVIL)", _nn_options, True),
}


# ---------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class EstimatorSpec:
    """How an estimator is built from Pyro pieces.

    :ivar objective: ``num_particles -> ELBO``; ``None`` means fit's own ``loss``.
    :ivar transform: ``(guide, estimator, baseline_net) -> guide callable`` for training.
    :ivar unbiased: False for estimators whose gradient is biased (``relaxed``).
    :ivar fixed_batch: needs every minibatch the same size (Pyro keeps the decaying
        average per position in the batch).
    """

    description: str
    objective: Callable[[int], ELBO] | None
    transform: Callable[[Callable, "Estimator", nn.Module | None], Callable]
    unbiased: bool = True
    fixed_batch: bool = False


def _wrap(guide: Callable, *messengers: Callable[[tuple], Messenger]) -> Callable:
    """A guide callable that runs ``guide`` inside messengers built per call from its arguments."""

    def wrapped(*args, **kwargs):
        with ExitStack() as stack:
            for make in messengers:
                stack.enter_context(make(args))
            return guide(*args, **kwargs)

    wrapped.__wrapped__ = guide  # type: ignore[attr-defined]
    return wrapped


def _score_function_guide(guide: Callable) -> Callable:
    """REINFORCE on the same guide: a vi_lab guide's ``reparameterized`` flag, else a messenger."""
    if isinstance(getattr(guide, "reparameterized", None), bool):
        def wrapped(*args, **kwargs):
            saved, guide.reparameterized = guide.reparameterized, False
            try:
                return guide(*args, **kwargs)
            finally:
                guide.reparameterized = saved

        wrapped.__wrapped__ = guide  # type: ignore[attr-defined]
        return wrapped
    return _wrap(guide, lambda args: ScoreFunction())


def _reparam(guide, est, net):
    return _wrap(guide, lambda args: RequireReparameterizable())


def _reinforce(guide, est, net):
    return _score_function_guide(guide)


def _reinforce_baseline(guide, est, net):
    options = BASELINES[est.baseline].options

    def declare(args):
        # baselines that take x (nn) read the guide's first argument, the data batch
        return DeclareInfer("baseline", lambda msg: options(est, net, args[0]))

    inner = _score_function_guide(guide)
    outer = _wrap(inner, declare)
    if net is None:
        return outer

    def with_net(*args, **kwargs):
        # registered so SVI's optimizer trains it; update_module_params: a network found in
        # the param store (restored from a checkpoint) replaces the fresh one
        pyro.module(BASELINE_MODULE_NAME, net, update_module_params=True)
        return outer(*args, **kwargs)

    with_net.__wrapped__ = guide  # type: ignore[attr-defined]
    return with_net


def _relaxed(guide, est, net):
    return _wrap(guide, lambda args: Relax(est.temperature))


def _enum(guide, est, net):
    return _wrap(guide, lambda args: DeclareInfer("enumerate", lambda msg: "parallel"),
                 lambda args: RequireEnumerable())


ESTIMATORS: dict[str, EstimatorSpec] = {
    "reparam": EstimatorSpec("pathwise (reparameterized) gradients", None, _reparam),
    "reinforce": EstimatorSpec("score function, no baseline",
                               lambda n: Trace_ELBO(num_particles=n, vectorize_particles=n > 1), _reinforce),
    # particles run one after another: a baseline's shape is one value per datapoint
    "reinforce_baseline": EstimatorSpec("score function with a baseline (TraceGraph_ELBO)",
                                        lambda n: TraceGraph_ELBO(num_particles=n, vectorize_particles=False),
                                        _reinforce_baseline, fixed_batch=True),
    "relaxed": EstimatorSpec("straight-through Gumbel-softmax (biased)",
                             lambda n: Trace_ELBO(num_particles=n, vectorize_particles=n > 1), _relaxed,
                             unbiased=False),
    "enum": EstimatorSpec("exact expectation over an enumerable latent (TraceEnum_ELBO)",
                          lambda n: TraceEnum_ELBO(num_particles=n, vectorize_particles=n > 1), _enum),
}


@dataclass(frozen=True)
class Estimator:
    """A gradient estimator and its options (see :data:`ESTIMATORS`, :data:`BASELINES`).

    :param name: a key of :data:`ESTIMATORS`.
    :param baseline: a key of :data:`BASELINES` (used by ``reinforce_baseline``).
    :param baseline_beta: decay of the running average (Pyro's ``baseline_beta``).
    :param baseline_hidden: hidden width of the ``nn`` baseline network.
    :param temperature: relaxation temperature of ``relaxed``.

    Example::

        est = Estimator("reinforce_baseline", baseline="nn")
        est.label  # 'reinforce_baseline (nn)'
    """

    name: str
    baseline: str = "decaying_avg"
    baseline_beta: float = 0.9
    baseline_hidden: int = 100
    temperature: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.name!r}; valid: {', '.join(ESTIMATORS)}")
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; valid: {', '.join(BASELINES)}")
        if not 0.0 <= self.baseline_beta < 1.0:
            raise ValueError(f"baseline_beta must be in [0, 1), got {self.baseline_beta!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")

    @property
    def spec(self) -> EstimatorSpec:
        return ESTIMATORS[self.name]

    @property
    def label(self) -> str:
        """Display name: the estimator, with its baseline or temperature when it has one."""
        if self.name == "reinforce_baseline":
            return f"{self.name} ({self.baseline})"
        if self.name == "relaxed":
            return f"{self.name} (T={self.temperature:g}, biased)"
        return self.name


def make_estimator(estimator: str | Estimator, **options) -> Estimator:
    """An :class:`Estimator` from a name (and options), or the one given.

    :param estimator: a key of :data:`ESTIMATORS` or an :class:`Estimator`.
    :param options: :class:`Estimator` fields, e.g. ``baseline="nn"``.

    Example::

        make_estimator("reinforce_baseline", baseline="nn")
    """
    if isinstance(estimator, Estimator):
        return replace(estimator, **options) if options else estimator
    if not isinstance(estimator, str):
        raise TypeError(f"estimator must be a name or an Estimator, got {type(estimator).__name__}")
    return Estimator(estimator, **options)


@dataclass
class PreparedEstimator:
    """An estimator made concrete for one guide: the training guide and the Pyro objective.

    :ivar guide: callable to give SVI in place of the guide (same arguments).
    :ivar loss: the Pyro ELBO to optimize.
    :ivar estimator: the :class:`Estimator`.
    :ivar baseline_net: the ``nn`` baseline network, if any (trained alongside).
    """

    guide: Callable
    loss: ELBO
    estimator: Estimator
    baseline_net: nn.Module | None = None

    @property
    def fixed_batch(self) -> bool:
        return self.estimator.spec.fixed_batch


def prepare(
    guide: Callable,
    estimator: str | Estimator = "reparam",
    *,
    loss: str | ELBO = "trace",
    num_particles: int = 1,
    baseline: str | None = None,
    x_dim: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    **options,
) -> PreparedEstimator:
    """Make an estimator concrete for ``guide``: the guide SVI runs, and the objective.

    :param guide: a Pyro guide (any callable keeping the data-plate contract).
    :param estimator: a key of :data:`ESTIMATORS` or an :class:`Estimator`.
    :param loss: fit's loss (``"trace"``, ``"meanfield"``, ``"tracegraph"`` or an ELBO);
        only ``reparam`` uses it, the others choose their Pyro objective themselves.
    :param num_particles: ELBO particles per step.
    :param baseline: a key of :data:`BASELINES` (``None``: the estimator's own, by
        default ``decaying_avg``).
    :param x_dim: flattened observation size (needed by the ``nn`` baseline).
    :param device: where the ``nn`` baseline network lives.
    :param seed: seed of the ``nn`` baseline network's initial weights.
    :param options: :class:`Estimator` fields (``baseline=``, ``temperature=``, ...).
    :returns: :class:`PreparedEstimator`.

    Example::

        prepared = prepare(guide, "reinforce_baseline", baseline="nn", x_dim=784)
        svi = SVI(model, prepared.guide, Adam({"lr": 1e-3}), prepared.loss)
    """
    est = make_estimator(estimator, **({} if baseline is None else {"baseline": baseline}), **options)
    if baseline is not None and est.name != "reinforce_baseline":
        raise ValueError(f"baseline={baseline!r} applies to estimator='reinforce_baseline' only, "
                         f"not {est.name!r}")
    spec = est.spec
    if spec.objective is None:
        elbo = make_loss(loss, num_particles)
    else:
        if not (isinstance(loss, str) and loss == "trace"):
            raise ValueError(f"estimator {est.name!r} chooses its own Pyro objective; leave loss='trace' "
                             f"(the default), or use estimator='reparam' with loss={loss!r}")
        elbo = spec.objective(num_particles)
    net = None
    if est.name == "reinforce_baseline" and BASELINES[est.baseline].network:
        if x_dim is None:
            raise ValueError("the 'nn' baseline needs x_dim (the flattened observation size)")
        net = BaselineNet(int(x_dim), est.baseline_hidden, seed=seed)
        if device is not None:
            net.to(device)
    return PreparedEstimator(spec.transform(guide, est, net), elbo, est, net)


# ---------------------------------------------------------------------------
# gradient diagnostics


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
    :class:`PreparedEstimator` passed in keeps what warm-up taught it).

    :param model: Pyro model.
    :param guide: Pyro guide with the model's arguments.
    :param x: a fixed batch ``(B, ...)``.
    :param estimator: a name, an :class:`Estimator`, or a :class:`PreparedEstimator`
        (e.g. with a trained baseline network).
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
    from vi_lab import checkpoint

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


__all__ = [
    "BASELINES", "ESTIMATORS", "BaselineNet", "Estimator", "GradientStats", "PreparedEstimator", "Relax",
    "ScoreFunction", "ScoredDistribution", "StraightThrough", "gradient_stats", "make_estimator", "param_groups",
    "prepare", "stats_table", "without_rsample",
]
