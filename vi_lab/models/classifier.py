"""A small classifier p(y | x) written as a Pyro model: the judge of generated images.

``y ~ Categorical(logits = MLP(x))`` per datapoint, with no latent variable: its guide is
empty and its "ELBO" is the log-likelihood log p(y | x), so :func:`vi_lab.fit` trains it
by maximum likelihood (cross-entropy) in the same loop as every other model. Trained on
real images, it judges generated ones (:mod:`vi_lab.metrics`): whether a sample shows
the class it was generated for, and, through its last hidden layer
(:meth:`Classifier.features`), how far a set of samples lies from real data.
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from vi_lab.nets import MLP


class Classifier(nn.Module):
    """An MLP classifier ``x -> logits`` with a Pyro model ``model(x, y)`` for :func:`vi_lab.fit`.

    :param x_dim: flattened input size.
    :param num_classes: number of classes C.
    :param hidden: hidden widths of the MLP.
    :param name: prefix of its parameters in Pyro's param store.

    Example::

        clf = Classifier(784, 10, hidden=[256])
        vi_lab.fit(clf.model, clf.guide, (x_train, y_train), epochs=3, progress=False)
        (clf(x_test).argmax(-1) == y_test).float().mean()  # accuracy
    """

    def __init__(self, x_dim: int = 784, num_classes: int = 10, hidden: int | Sequence[int] = (256,), *,
                 name: str = "classifier") -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.x_dim, self.num_classes, self.name = x_dim, num_classes, name
        self.net = MLP(x_dim, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, C)`` of inputs ``(B, x_dim)``."""
        return self.net(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer's activations ``(B, hidden[-1])`` (the input itself without hidden layers)."""
        return self.net.net[:-1](x)

    def model(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """p(y | x): one categorical label per datapoint, observed."""
        pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=self(x)), obs=y)

    def guide(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Nothing to infer: the model has no latent variable."""
