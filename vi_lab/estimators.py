"""Gradient estimators for the ELBO: one registry of how a guide's latent sites are treated.

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

REINFORCE is obtained by turning ``has_rsample`` off, with the objective floor's one
mechanism (:class:`vi_lab.score_function.ScoreFunction`), so Pyro's ELBOs take their
score-function path (``score * (log p - log q)`` per datapoint); there is no second
copy of the objective. Trace_ELBO is :class:`vi_lab.objectives.SyncFreeTrace_ELBO`, Pyro's
estimator with its loss kept on the device. Baselines are declared the way ``pyro/infer/tracegraph_elbo.py``
reads them: ``decaying_avg`` is Pyro's ``use_decaying_avg_baseline``; ``nn`` adds an
input-dependent network ``b(x)`` (``nn_baseline``) on top of that running average,
the NVIL recipe (Mnih & Gregor, 2014).

:func:`prepare` makes an estimator concrete for one guide (the guide SVI runs and the
Pyro objective); how noisy each estimator is, is measured by
:func:`vi_lab.diagnostics.gradient_stats`.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any, Callable

import pyro
import torch
from pyro.infer import ELBO, TraceEnum_ELBO, TraceGraph_ELBO
from pyro.poutine.messenger import Messenger
from pyro.infer.util import is_validation_enabled
from torch import nn

from vi_lab.nets import MLP
from vi_lab.objectives import SyncFreeTrace_ELBO, make_loss
from vi_lab.relaxed import StraightThrough
from vi_lab.score_function import ScoreFunction, is_latent

#: Pyro's name for the decaying-average state of a baseline at site ``<name>``
DECAYING_AVG_PREFIX = "__baseline_avg_downstream_cost_"
#: name under which the ``nn`` baseline network is registered with ``pyro.module``
BASELINE_MODULE_NAME = "estimator_baseline"


# ---------------------------------------------------------------------------
# messengers applied to the guide


class DeclareInfer(Messenger):
    """Merge ``options(msg)`` into ``msg["infer"][key]`` at every latent site.

    :param key: the ``infer`` entry (``"baseline"``, ``"enumerate"``).
    :param options: ``msg -> value``; called per site.
    """

    def __init__(self, key: str, options: Callable[[dict], Any]) -> None:
        super().__init__()
        self.key, self.options = key, options

    def _process_message(self, msg: dict) -> None:
        if is_latent(msg):
            msg["infer"] = {**(msg["infer"] or {}), self.key: self.options(msg)}


class Relax(Messenger):
    """Draw discrete latent sites straight-through from their Gumbel-softmax relaxation.

    :param temperature: relaxation temperature.
    """

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def _process_message(self, msg: dict) -> None:
        if is_latent(msg):
            msg["fn"] = StraightThrough(msg["fn"], self.temperature)


class RequireReparameterizable(Messenger):
    """Refuse discrete latent sites: they have no pathwise gradient."""

    def _process_message(self, msg: dict) -> None:
        if is_latent(msg) and getattr(msg["fn"].support, "is_discrete", False):
            raise ValueError(
                f"estimator 'reparam' needs continuous latent sites, but guide site {msg['name']!r} is "
                f"{type(msg['fn']).__name__}; use one of 'reinforce', 'reinforce_baseline', 'relaxed', 'enum'")


class RequireEnumerable(Messenger):
    """Refuse latent sites whose support cannot be enumerated."""

    def _process_message(self, msg: dict) -> None:
        if is_latent(msg) and not msg["fn"].has_enumerate_support:
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
    """REINFORCE on the same guide: every latent site runs with ``has_rsample`` off (:class:`ScoreFunction`)."""
    return _wrap(guide, lambda args: ScoreFunction())


def _reparam(guide, est, net):
    checked = _wrap(guide, lambda args: RequireReparameterizable())

    def run(*args, **kwargs):
        # a check of the guide's structure: validated steps run it (fit's first step), the hot loop does not
        return checked(*args, **kwargs) if is_validation_enabled() else guide(*args, **kwargs)

    run.__wrapped__ = guide  # type: ignore[attr-defined]
    return run


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
                               lambda n: SyncFreeTrace_ELBO(num_particles=n, vectorize_particles=n > 1), _reinforce),
    # particles run one after another: a baseline's shape is one value per datapoint
    "reinforce_baseline": EstimatorSpec("score function with a baseline (TraceGraph_ELBO)",
                                        lambda n: TraceGraph_ELBO(num_particles=n, vectorize_particles=False),
                                        _reinforce_baseline, fixed_batch=True),
    "relaxed": EstimatorSpec("straight-through Gumbel-softmax (biased)",
                             lambda n: SyncFreeTrace_ELBO(num_particles=n, vectorize_particles=n > 1), _relaxed,
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


__all__ = [
    "BASELINES", "ESTIMATORS", "BaselineNet", "DeclareInfer", "Estimator", "PreparedEstimator", "Relax",
    "RequireEnumerable", "RequireReparameterizable", "make_estimator", "prepare",
]
