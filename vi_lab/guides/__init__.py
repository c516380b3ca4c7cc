"""Guides q(z | x), swappable by name.

``GUIDES`` maps a family name to its class; :func:`make_guide` builds one with an
encoder trunk made from the architecture arguments.
"""

from __future__ import annotations

from typing import Sequence

from vi_lab.guides.base import AmortizedGuide
from vi_lab.guides.mean_field import MeanFieldGuide
from vi_lab.nets import make_encoder

GUIDES: dict[str, type[AmortizedGuide]] = {
    "mean_field": MeanFieldGuide,
}


def make_guide(
    name: str,
    *,
    latent_dim: int,
    hidden: int | Sequence[int] = (400,),
    arch: str = "mlp",
    x_dim: int = 784,
    **family_kwargs,
) -> AmortizedGuide:
    """Build an amortized guide of family ``name`` with a fresh encoder trunk.

    :param name: a key of :data:`GUIDES`.
    :param latent_dim: size of z.
    :param hidden: encoder hidden widths; the last is the feature size the heads read.
    :param arch: ``"mlp"`` or ``"conv"``.
    :param x_dim: flattened observation size.
    :param family_kwargs: family options (e.g. ``rank`` for ``low_rank``), passed to the class.

    Example::

        guide = make_guide("mean_field", latent_dim=20, hidden=[400])
    """
    try:
        cls = GUIDES[name]
    except KeyError:
        raise ValueError(f"unknown guide {name!r}; valid names: {', '.join(sorted(GUIDES))}") from None
    return cls(make_encoder(arch, x_dim, hidden), latent_dim, **family_kwargs)


__all__ = ["GUIDES", "AmortizedGuide", "MeanFieldGuide", "make_guide"]
