"""Conditional guides q(z | x, y): any amortized family made to read a class label.

:class:`ConditionalGuide` wraps an amortized guide of any family of
:data:`vi_lab.guides.GUIDES` so that its posterior reads ``[x, onehot(y)]``, the label
concatenated to the flattened image; :func:`make_conditional_guide` builds one by
family name. It is the guide of the conditional VAE (:class:`vi_lab.models.cvae.CVAE`)
and keeps the same call, ``guide(x, y)``.

Imported as ``vi_lab.guides.conditional`` (it builds on the registry in
``vi_lab.guides``, so that package does not import it back).

Example::

    guide = make_conditional_guide("mean_field", latent_dim=10, hidden=[400])
    q = guide.get_posterior(x, y)  # batch (B,), event (10,)
"""

from __future__ import annotations

from typing import Sequence

import torch

from vi_lab.guides import make_guide
from vi_lab.guides.base import AmortizedGuide
from vi_lab.labels import concat_label, one_hot


class ConditionalGuide(AmortizedGuide):
    """q(z | x, y): any amortized guide family reading ``[x, onehot(y)]``.

    The wrapped guide's networks are used as they are (shared, not copied), so every
    family of :data:`vi_lab.guides.GUIDES` becomes conditional; build the base with an
    input size ``x_dim + num_classes`` (:func:`make_conditional_guide` does).

    :param base: an amortized guide whose encoder reads ``x_dim + num_classes`` features.
    :param num_classes: C.

    Example::

        guide = ConditionalGuide(make_guide("mean_field", latent_dim=10, x_dim=794), 10)
        guide.get_posterior(x, y).batch_shape  # (B,)
    """

    def __init__(self, base: AmortizedGuide, num_classes: int) -> None:
        super().__init__(base.encoder, base.latent_dim, site=base.site, name=base.name)
        self.base, self.num_classes = base, num_classes

    def get_posterior(self, x: torch.Tensor, y: torch.Tensor | None = None, *args, **kwargs):
        if y is None:
            raise ValueError("a conditional guide is called as guide(x, y): pass the labels")
        if not torch.is_tensor(y) or y.shape[:1] != x.shape[:1]:
            raise ValueError(f"labels must have one entry per datapoint, shape ({x.shape[0]},); got "
                             f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}")
        return self.base.get_posterior(concat_label(x, one_hot(y, self.num_classes, x.dtype)), *args, **kwargs)


def make_conditional_guide(name: str, *, latent_dim: int, hidden: int | Sequence[int] = (400,),
                           num_classes: int = 10, x_dim: int = 784, **family_kwargs) -> ConditionalGuide:
    """A guide family of :data:`vi_lab.guides.GUIDES` made conditional on a label.

    The label is concatenated to the flattened image, so the encoder is an MLP.

    :param name: guide family, e.g. ``"mean_field"``.
    :param latent_dim: size of z.
    :param hidden: encoder hidden widths.
    :param num_classes: C.
    :param x_dim: flattened observation size (without the label).
    :param family_kwargs: family options, passed to :func:`vi_lab.guides.make_guide`.

    Example::

        guide = make_conditional_guide("mean_field", latent_dim=10, hidden=[400])
    """
    base = make_guide(name, latent_dim=latent_dim, hidden=hidden, arch="mlp", x_dim=x_dim + num_classes,
                      **family_kwargs)
    return ConditionalGuide(base, num_classes)


__all__ = ["ConditionalGuide", "make_conditional_guide"]
