"""Measures of generated samples and of encoders, judged by a classifier trained on real data.

- :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to the
  features of two sets of images (Heusel et al., 2017, with a small digit classifier's
  last hidden layer in place of Inception's): how far generated images lie from real
  ones, lower is closer; the distance between two sets of real images is the floor.
- :func:`train_classifier`: that judge, a :class:`vi_lab.models.classifier.Classifier`
  trained by :func:`vi_lab.fit` on real images and labels.
- :func:`class_agreement`: per class c, how often the judge calls c the samples a
  conditional model generated for c (chance is 1 / C).

Example::

    clf = train_classifier(x_train[:5000], y_train[:5000])
    frechet_distance(clf.features, x_test[:1000], vae.sample(1000))  # classifier-feature units
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import pyro
import torch
from torch import nn

from vi_lab.infer import fit
from vi_lab.labels import one_hot
from vi_lab.models.classifier import Classifier

if TYPE_CHECKING:
    from vi_lab.models.cvae import CVAE


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix (negative round-off eigenvalues clipped)."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


@torch.no_grad()
def frechet_distance(features: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the features of two image sets (lower is closer).

    ``||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``, computed in float64.

    :param features: maps images ``(N, x_dim)`` to features ``(N, F)``, e.g. ``classifier.features``
        (the identity compares the images themselves).
    :param a: one set of images ``(N_a, x_dim)``.
    :param b: the other ``(N_b, x_dim)``.
    :returns: the distance, in squared feature units; NaN when a set has fewer than two
        images (no covariance to fit).

    Example::

        clf = train_classifier(x_train, y_train)
        frechet_distance(clf.features, x_test[:1000], model.sample(1000))
    """
    if min(len(a), len(b)) < 2:
        return float("nan")
    fa, fb = features(a).double(), features(b).double()  # (N_a, F), (N_b, F)
    ca, cb = torch.cov(fa.T), torch.cov(fb.T)  # (F, F)
    root = _sqrtm_psd(ca)
    cross = _sqrtm_psd(root @ cb @ root)
    return ((fa.mean(0) - fb.mean(0)).pow(2).sum() + torch.trace(ca + cb - 2 * cross)).item()


def train_classifier(x: torch.Tensor, y: torch.Tensor, *, num_classes: int = 10,
                     hidden: int | Sequence[int] = (256,), epochs: int = 3, batch_size: int = 128, lr: float = 1e-3,
                     seed: int = 0) -> Classifier:
    """A small MLP classifier trained on real images by :func:`vi_lab.fit`, to judge generated ones.

    Maximum likelihood of the labels (cross-entropy) with Adam. Callable from evaluation
    code that runs under ``torch.no_grad()``; seeds torch and Pyro with ``seed`` (initial
    weights, batch order) and leaves Pyro's param store as it found it (fit starts from an
    empty one), so the caller's models keep their registered parameters.

    :param x: images ``(N, x_dim)`` in [0, 1].
    :param y: integer labels ``(N,)`` in ``0 .. num_classes - 1``.
    :param num_classes: number of classes C.
    :param hidden: hidden widths of the MLP.
    :param epochs: passes over the data.
    :param batch_size: images per step.
    :param lr: Adam learning rate.
    :param seed: seeds the initial weights and the batch order.
    :returns: the trained :class:`~vi_lab.models.classifier.Classifier` in eval mode, on ``x``'s
        device; ``clf(x)`` gives logits ``(B, C)``, ``clf.features(x)`` its last hidden layer.

    Example::

        clf = train_classifier(x_train[:5000], y_train[:5000])
        (clf(x_test).argmax(-1) == y_test).float().mean()  # accuracy
    """
    one_hot(y, num_classes)  # a clear error for bad labels, before anything is built
    torch.manual_seed(seed)
    clf = Classifier(x.shape[-1], num_classes, hidden).to(x.device)
    store = pyro.get_param_store()
    before = store.get_state()
    try:
        with torch.enable_grad():
            fit(clf.model, clf.guide, (x, y.long()), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                progress=False)
    finally:
        pyro.clear_param_store()
        store.set_state(before)
    return clf.eval()


@torch.no_grad()
def class_agreement(model: CVAE, classifier: nn.Module, n_per_class: int = 100) -> torch.Tensor:
    """Per class c, the fraction of samples generated for c that ``classifier`` calls c.

    Chance is 1 / C; a decoder that ignores the label scores about that on average.

    :param model: a trained :class:`~vi_lab.models.cvae.CVAE`.
    :param classifier: maps images ``(B, x_dim)`` to logits ``(B, C)``.
    :param n_per_class: samples per class.
    :returns: tensor ``(C,)`` of rates in [0, 1].

    Example::

        class_agreement(cvae, train_classifier(x_train, y_train)).mean()  # chance: 0.1
    """
    device = next(model.parameters()).device
    labels = torch.arange(model.num_classes, device=device).repeat_interleave(n_per_class)  # (C*n,)
    predicted = classifier(model.sample(len(labels), labels=labels)).argmax(-1)
    return (predicted == labels).float().reshape(model.num_classes, n_per_class).mean(-1)
