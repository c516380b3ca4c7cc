"""Guides q(z | x), swappable by name.

``GUIDES`` maps a family name to its amortized class; :func:`make_guide` builds one with
an encoder trunk made from the architecture arguments. ``LOCAL_GUIDES`` (in
:mod:`vi_lab.guides.local`) holds the per-datapoint counterpart of every family.

==============  ==============================================================  ======================
name            q(z | x)                                                        options
==============  ==============================================================  ======================
``mean_field``  diagonal Normal                                                 -
``full_cov``    MultivariateNormal, Cholesky factor from the encoder            -
``low_rank``    LowRankMultivariateNormal: ``W W^T + diag(d)``, W of rank r     ``rank`` (2)
``iaf``         diagonal Normal + k inverse autoregressive steps                ``flow_steps`` (2), ``flow_hidden``
``planar``      diagonal Normal + k planar steps                                ``flow_steps`` (8), ``flow_hidden``
``radial``      diagonal Normal + k radial steps                                ``flow_steps`` (8), ``flow_hidden``
``mixture``     mixture of m diagonal Normals (MixtureOfDiagNormals)            ``components`` (5)
==============  ==============================================================  ======================

Discrete latents have their own guides (:mod:`vi_lab.guides.discrete`:
:class:`BernoulliGuide`, :class:`CategoricalGuide`), and any family above becomes
conditional on a class label with :mod:`vi_lab.guides.conditional`.
"""

from __future__ import annotations

from typing import Sequence

from vi_lab.guides.base import AmortizedGuide
from vi_lab.guides.discrete import BernoulliGuide, CategoricalGuide
from vi_lab.guides.flows import FlowGuide, IAFGuide, PlanarGuide, RadialGuide
from vi_lab.guides.full_cov import FullCovGuide
from vi_lab.guides.local import LOCAL_GUIDES, LocalGuide, make_local_guide, optimize_local
from vi_lab.guides.low_rank import LowRankGuide
from vi_lab.guides.mean_field import MeanFieldGuide
from vi_lab.guides.mixture import MixtureGuide
from vi_lab.nets import make_encoder

GUIDES: dict[str, type[AmortizedGuide]] = {
    "mean_field": MeanFieldGuide,
    "full_cov": FullCovGuide,
    "low_rank": LowRankGuide,
    "iaf": IAFGuide,
    "planar": PlanarGuide,
    "radial": RadialGuide,
    "mixture": MixtureGuide,
}

#: keyword arguments every family accepts (those of :class:`AmortizedGuide`)
COMMON_OPTIONS = ("site", "name")


def guide_options(name: str) -> tuple[str, ...]:
    """The family options guide ``name`` takes (e.g. ``("rank",)`` for ``low_rank``).

    :param name: a key of :data:`GUIDES`.
    """
    return tuple(getattr(_lookup(name), "options", ()))


def _lookup(name: str) -> type[AmortizedGuide]:
    try:
        return GUIDES[name]
    except KeyError:
        raise ValueError(f"unknown guide {name!r}; valid names: {', '.join(sorted(GUIDES))}") from None


def make_guide(
    family: str,
    /,
    *,
    latent_dim: int,
    hidden: int | Sequence[int] = (400,),
    arch: str = "mlp",
    x_dim: int = 784,
    **family_kwargs,
) -> AmortizedGuide:
    """Build an amortized guide of family ``family`` with a fresh encoder trunk.

    :param family: a key of :data:`GUIDES` (positional: ``name=`` is the guide's param-store prefix).
    :param latent_dim: size of z.
    :param hidden: encoder hidden widths; the last is the feature size the heads read.
    :param arch: ``"mlp"`` or ``"conv"``.
    :param x_dim: flattened observation size.
    :param family_kwargs: family options (:func:`guide_options`: ``rank`` for ``low_rank``,
        ``flow_steps`` and ``flow_hidden`` for the flows, ``components`` for ``mixture``),
        plus ``site`` and ``name``; an option the family does not take is an error.

    Example::

        guide = make_guide("iaf", latent_dim=20, hidden=[400], flow_steps=2)
        q = guide.get_posterior(torch.rand(8, 784))  # batch (8,), event (20,)
    """
    cls = _lookup(family)
    allowed = guide_options(family) + COMMON_OPTIONS
    unknown = sorted(set(family_kwargs) - set(allowed))
    if unknown:
        takes = ", ".join(guide_options(family)) or "no family options"
        raise ValueError(f"guide {family!r} does not take {', '.join(unknown)}; it takes {takes} "
                         f"(and {', '.join(COMMON_OPTIONS)})")
    return cls(make_encoder(arch, x_dim, hidden), latent_dim, **family_kwargs)


__all__ = [
    "GUIDES", "LOCAL_GUIDES", "AmortizedGuide", "BernoulliGuide", "CategoricalGuide", "FlowGuide", "FullCovGuide",
    "IAFGuide", "LocalGuide", "LowRankGuide", "MeanFieldGuide", "MixtureGuide", "PlanarGuide", "RadialGuide",
    "guide_options", "make_guide", "make_local_guide", "optimize_local",
]
