"""The one score-function (REINFORCE) mechanism: a guide's latent sites with ``has_rsample`` off.

Pyro's ELBOs choose the gradient of a sample site from its distribution: a site with
``has_rsample`` takes the pathwise gradient, any other the score-function term
``log q(z) * (log p - log q)`` (``pyro/infer/trace_elbo.py``). REINFORCE on a
reparameterizable guide is therefore the *same* guide with ``has_rsample`` turned off,
never a second copy of the objective:

* :func:`without_rsample` turns it off on one distribution (Pyro's ``has_rsample_(False)``,
  or a :class:`ScoredDistribution` wrapper where the flag is derived, not stored);
* :class:`ScoreFunction` does it at every latent sample site of any guide, a vi_lab
  family or one a user wrote by hand.

A distribution whose detached draws cannot be scored with gradients (a flow without an
inverse scores only the draws it made itself, through its cache) declares so with a
``score_function_error`` attribute holding the reason; switching it raises
``NotImplementedError`` with that reason instead of giving a log-density without the
flow's gradient.

This module is on the objective floor (DESIGN.md): it imports nothing of vi_lab, and
the estimators and the guides both build on it.
"""

from __future__ import annotations

import copy

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

def is_latent(msg: dict) -> bool:
    """Whether a Pyro message is a latent sample site (not observed, not a subsample draw).

    :param msg: a Pyro message, as a messenger's ``_process_message`` receives it.
    """
    return msg["type"] == "sample" and not msg["is_observed"] and not isinstance(msg["fn"], _Subsample)


def check_scorable(d: torch.distributions.Distribution) -> None:
    """Raise the reason ``d`` gives, in its ``score_function_error`` attribute, why its draws cannot be scored.

    A distribution without the attribute (or with ``None``) can be scored.

    :param d: a distribution.
    :raises NotImplementedError: when ``d`` declares a reason.
    """
    reason = getattr(d, "score_function_error", None)
    if reason:
        raise NotImplementedError(reason)


class ScoredDistribution(dist.TorchDistribution):
    """``base`` with pathwise sampling off: draws are detached, so Pyro scores the site by REINFORCE.

    Needed where ``has_rsample`` cannot be set on the instance: ``Independent`` and
    ``TransformedDistribution`` derive it from their base (a property without a setter),
    and Pyro's plate broadcasting re-expands the distribution, which would drop a flag
    set on the base. Draws are fresh tensors, so a flow recomputes ``log_prob`` through
    its inverse (with gradients) rather than from a cache filled without them.

    :param base: any Pyro distribution whose draws can be scored (:func:`check_scorable`).
    :raises NotImplementedError: when ``base`` declares that they cannot.
    """

    has_rsample = False
    arg_constraints: dict = {}

    def __init__(self, base: dist.TorchDistribution) -> None:
        check_scorable(base)
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
    :raises NotImplementedError: when ``d`` declares that its draws cannot be scored
        (``score_function_error``), e.g. a planar or radial flow.

    Example::

        q = without_rsample(dist.Normal(loc, scale).to_event(1))
        q.has_rsample  # False
    """
    check_scorable(d)
    if not d.has_rsample:
        return d
    if isinstance(getattr(type(d), "has_rsample", None), property):
        return ScoredDistribution(d)
    return (d if inplace else copy.copy(d)).has_rsample_(False)


class ScoreFunction(Messenger):
    """Turn ``has_rsample`` off at every latent sample site of a guide (REINFORCE).

    The site's distribution is copied first, so a distribution object the guide keeps
    is not changed. A site whose distribution cannot be scored
    (``score_function_error``) raises its reason.

    Example::

        with ScoreFunction():
            guide(x)  # every latent site is scored, not reparameterized
    """

    def _process_message(self, msg: dict) -> None:
        if is_latent(msg):
            msg["fn"] = without_rsample(msg["fn"], inplace=False)


__all__ = ["ScoreFunction", "ScoredDistribution", "check_scorable", "is_latent",
           "without_rsample"]
