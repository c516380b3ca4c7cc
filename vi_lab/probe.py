"""Linear probes: how much of the class a representation makes linearly readable.

A linear probe is multinomial logistic regression trained on frozen features and scored
by its test accuracy. Here the features are an encoder's posterior means E_q[z | x]
(:func:`encode`), principal-component codes of the same size (:func:`pca_codes`) or the
pixels themselves; the same probe (:func:`linear_probe`) reads each, so the accuracies
compare representations, not classifiers.

The probe is convex, so it is trained to its optimum (full-batch L-BFGS from zero
weights) rather than for a number of steps: its accuracy then depends on the features
and the L2 strength alone, and the same inputs give the same number. Features are
standardized with the training set's mean and standard deviation, so one L2 strength
means the same thing for pixels, PCA codes and latent means.

Example::

    from vi_lab import probe

    z_train, z_test = probe.encode(guide, x_train), probe.encode(guide, x_test)  # (N, D)
    probe.linear_probe(z_train, y_train, z_test, y_test).accuracy                # a fraction
    p_train, p_test = probe.pca_codes(x_train, x_test, 20)
    probe.linear_probe(p_train, y_train, p_test, y_test).accuracy
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from vi_lab.models.classifier import Classifier

#: default L2 strengths tried on a validation split (per datapoint, on standardized features)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)

#: draws of the Monte Carlo mean for posteriors without a closed-form mean (flows)
MEAN_SAMPLES = 100


def posterior_mean(q: dist.Distribution, *, num_samples: int = MEAN_SAMPLES) -> torch.Tensor:
    """The mean of q(z | x) for a batch, ``(B, D)``: exact where the family has one, else Monte Carlo.

    Exact for the Gaussian families (their ``loc``) and for a mixture of diagonal Normals
    (``sum_k pi_k mu_k``: the mean of a mixture is the weighted mean of its components);
    a flow's mean has no closed form, so it is the average of ``num_samples`` draws, whose
    error shrinks as ``1 / sqrt(num_samples)`` times q's standard deviation.

    :param q: batch shape ``(B,)``, event shape ``(D,)``.
    :param num_samples: draws when the mean has no closed form.

    Example::

        posterior_mean(guide.get_posterior(x))  # (B, D)
    """
    if isinstance(q, dist.MixtureOfDiagNormals):
        weights = q.component_logits.softmax(-1)  # (B, m)
        return (weights.unsqueeze(-1) * q.locs).sum(-2)  # (B, m, D) -> (B, D)
    if has_exact_mean(q):
        return q.mean
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    return q.sample((num_samples,)).mean(0)  # (S, B, D) -> (B, D)


def has_exact_mean(q: dist.Distribution) -> bool:
    """Whether :func:`posterior_mean` of ``q`` is exact (Gaussians, mixtures) rather than Monte Carlo (flows).

    :param q: a posterior of any guide family.

    Example::

        has_exact_mean(guide.get_posterior(x[:1]))  # False for iaf
    """
    if isinstance(q, dist.MixtureOfDiagNormals):
        return True
    try:
        q.mean
    except NotImplementedError:  # TransformedDistribution: no closed form
        return False
    return True


@torch.no_grad()
def encode(guide: nn.Module, x: torch.Tensor, *, num_samples: int = MEAN_SAMPLES, batch_size: int = 1000,
           seed: int = 0) -> torch.Tensor:
    """Posterior means E_q[z | x] of every row of ``x``: the encoder's representation, ``(N, D)``.

    See :func:`posterior_mean` for which families are exact and which are Monte Carlo.
    The Monte Carlo draws come from a generator seeded with ``seed`` inside a forked RNG,
    so the same call gives the same codes and the caller's random stream is untouched.

    :param guide: an amortized guide with ``get_posterior(x)`` (any family of
        :data:`vi_lab.guides.GUIDES`).
    :param x: observations ``(N, x_dim)``, as the guide was trained on them (e.g. binarized).
    :param num_samples: Monte Carlo draws per datapoint for the flows.
    :param batch_size: rows encoded at once (bounds the memory of ``num_samples`` draws).
    :param seed: seed of the Monte Carlo draws.
    :returns: a tensor on ``x``'s device.

    Example::

        z = encode(guide, x_test)  # (N, D), the closed-form mean for mean_field
    """
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D batch of flattened observations (N, x_dim), got shape {tuple(x.shape)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    devices = [x.device] if x.device.type == "cuda" else []
    was_training = guide.training
    guide.eval()  # dropout or batch norm in an encoder would make the codes random or batch-dependent
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return torch.cat([posterior_mean(guide.get_posterior(x[i:i + batch_size]), num_samples=num_samples)
                              for i in range(0, len(x), batch_size)])
    finally:
        guide.train(was_training)


@dataclass(frozen=True)
class PCA:
    """Principal components of a training set: ``encode`` projects, ``decode`` reconstructs.

    :param mean: the training rows' mean ``(x_dim,)``.
    :param components: orthonormal rows ``(d, x_dim)``, by decreasing variance.
    :param variances: the variance along each component ``(d,)``.
    """

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes ``(N, d)`` of rows ``(N, x_dim)``."""
        return (x - self.mean) @ self.components.T

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The rows ``(N, x_dim)`` that codes ``(N, d)`` stand for (the projection onto the components)."""
        return codes @ self.components + self.mean


def fit_pca(x: torch.Tensor, d: int) -> PCA:
    """The first ``d`` principal components of rows ``x``, from the eigendecomposition of their covariance.

    Computed in double precision (the covariance of 784 pixels has eigenvalues over many
    orders of magnitude); each component's sign is fixed so that its largest entry is
    positive, so the same data give the same codes on any machine.

    :param x: training rows ``(N, x_dim)``.
    :param d: number of components, at most ``min(x_dim, N - 1)``.

    Example::

        pca = fit_pca(x_train, 20)
        pca.decode(pca.encode(x_test))  # (N, 784), the best rank-20 linear reconstruction
    """
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D batch of rows (N, x_dim), got shape {tuple(x.shape)}")
    n, x_dim = x.shape
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    if d > x_dim:
        raise ValueError(f"d = {d} components is more than the {x_dim} features per row; pick d <= {x_dim}")
    if d > n - 1:
        raise ValueError(f"d = {d} components need at least {d + 1} training rows, got {n}; pick d <= {n - 1} "
                         f"or more rows")
    xd = x.double()
    mean = xd.mean(0)
    c = xd - mean
    evals, evecs = torch.linalg.eigh(c.T @ c / (n - 1))  # ascending
    evals, evecs = evals.flip(0)[:d], evecs.flip(1)[:, :d]  # (d,), (x_dim, d)
    big = evecs.abs().argmax(0)  # (d,)
    evecs = evecs * evecs[big, torch.arange(d, device=x.device)].sign()
    return PCA(mean.to(x.dtype), evecs.T.contiguous().to(x.dtype), evals.clamp_min(0).to(x.dtype))


def pca_codes(x_train: torch.Tensor, x_test: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA codes of size ``d`` for a training and a test set, the components fitted on the training set only.

    :param x_train: rows ``(N, x_dim)`` the components are fitted on.
    :param x_test: rows ``(M, x_dim)`` projected onto the same components.
    :param d: code size.
    :returns: ``(N, d)`` and ``(M, d)`` codes.

    Example::

        c_train, c_test = pca_codes(x_train, x_test, 20)
    """
    if x_test.dim() != 2 or x_test.shape[-1] != x_train.shape[-1]:
        raise ValueError(f"x_test must have rows of the training rows' width {x_train.shape[-1]}, "
                         f"got shape {tuple(x_test.shape)}")
    pca = fit_pca(x_train, d)
    return pca.encode(x_train), pca.encode(x_test)


@dataclass(frozen=True)
class ProbeResult:
    """What a linear probe measured.

    :param accuracy: fraction of test rows classified correctly.
    :param train_accuracy: the same on the training rows.
    :param l2: the L2 strength used (the validation split's choice when several were given).
    :param validation: validation accuracy of each L2 strength tried (empty when one was given).
    :param num_features: the feature size.
    """

    accuracy: float
    train_accuracy: float
    l2: float
    validation: dict[float, float] = field(default_factory=dict)
    num_features: int = 0


def _check_labels(labels: torch.Tensor, n: int, what: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        dtype = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{what} must be a tensor of integer class indices 0 .. C-1, got {dtype}; "
                         f"convert with .long() if they are whole numbers")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{what} must have one label per feature row: shape ({n},), got {tuple(labels.shape)}")
    if n and labels.min() < 0:
        raise ValueError(f"{what} must be class indices 0 .. C-1, got a negative label {int(labels.min())}")


def _check_features(features: torch.Tensor, what: str) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.dtype.is_floating_point:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{what} must be a 2-D float tensor (N, num_features), got {shape}")
    if features.shape[0] < 1:
        raise ValueError(f"{what} has no rows")
    if not torch.isfinite(features).all():
        raise ValueError(f"{what} has non-finite entries (NaN or inf); a probe needs finite features")


def _train(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int) -> Classifier:
    """Minimize mean cross-entropy + l2/2 |W|^2 from zero weights with full-batch L-BFGS (a convex problem)."""
    clf = Classifier(x.shape[-1], num_classes, hidden=[], name="probe").to(device=x.device, dtype=x.dtype)
    linear = clf.net.net[0]
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        # the bias is not penalized: a class's base rate is not a complexity
        loss = -dist.Categorical(logits=clf(x)).log_prob(y).mean() + 0.5 * l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return clf.eval()


def _accuracy(clf: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (clf(x).argmax(-1) == y).double().mean().item()


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    l2: float | Sequence[float] = L2_GRID,
    num_classes: int | None = None,
    validation_fraction: float = 0.2,
    max_iter: int = 200,
    seed: int = 0,
) -> ProbeResult:
    """Multinomial logistic regression on frozen features, scored by test accuracy.

    The features are standardized with the training rows' mean and standard deviation
    (a constant feature becomes 0), the model is a linear
    :class:`~vi_lab.models.classifier.Classifier` (no hidden layer) trained to the optimum
    of mean cross-entropy plus ``l2 / 2`` times the squared weights (not the biases) by
    full-batch L-BFGS in double precision from zero weights. With several ``l2`` values,
    each is trained on a random ``1 - validation_fraction`` of the training rows and scored
    on the rest; the best (the larger on a tie) is then trained on all training rows. The
    result depends on ``seed`` only through that split.

    :param train_features: ``(N, F)`` float.
    :param train_labels: ``(N,)`` integer class indices.
    :param test_features: ``(M, F)`` float.
    :param test_labels: ``(M,)`` integer class indices.
    :param l2: one L2 strength, or several to choose from on the validation split.
    :param num_classes: C (default: the largest label seen plus one).
    :param validation_fraction: share of the training rows held out to choose ``l2``.
    :param max_iter: most L-BFGS iterations.
    :param seed: seeds the validation split.
    :returns: a :class:`ProbeResult`.

    Example::

        linear_probe(encode(guide, x_train), y_train, encode(guide, x_test), y_test).accuracy
    """
    _check_features(train_features, "train_features")
    _check_features(test_features, "test_features")
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"test_features have {test_features.shape[1]} features per row but train_features have "
                         f"{train_features.shape[1]}; both must come from the same representation")
    _check_labels(train_labels, train_features.shape[0], "train_labels")
    _check_labels(test_labels, test_features.shape[0], "test_labels")
    seen = int(max(train_labels.max(), test_labels.max())) + 1
    num_classes = seen if num_classes is None else num_classes
    if not isinstance(num_classes, int) or num_classes < max(2, seen):
        raise ValueError(f"num_classes must be an integer >= 2 that covers every label (largest label "
                         f"{seen - 1}), got {num_classes!r}")
    grid = [float(l2)] if isinstance(l2, (int, float)) else [float(v) for v in l2]
    if not grid or any(v < 0 for v in grid):
        raise ValueError(f"l2 must be a strength >= 0 or a non-empty sequence of them, got {l2!r}")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")

    x_train, x_test = train_features.double(), test_features.double()
    mean, std = x_train.mean(0), x_train.std(0)
    std = torch.where(std > 1e-8 * std.max().clamp_min(1e-300), std, torch.ones_like(std))
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train, y_test = train_labels.long(), test_labels.long()

    validation: dict[float, float] = {}
    if len(grid) > 1:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(x_train), generator=g).to(x_train.device)
        n_val = max(1, int(round(validation_fraction * len(x_train))))
        val, fit_rows = order[:n_val], order[n_val:]
        for v in grid:
            clf = _train(x_train[fit_rows], y_train[fit_rows], num_classes, v, max_iter)
            validation[v] = _accuracy(clf, x_train[val], y_train[val])
        best = max(grid, key=lambda v: (validation[v], v))
    else:
        best = grid[0]
    clf = _train(x_train, y_train, num_classes, best, max_iter)
    return ProbeResult(_accuracy(clf, x_test, y_test), _accuracy(clf, x_train, y_train), best, validation,
                       x_train.shape[1])


__all__ = ["L2_GRID", "MEAN_SAMPLES", "PCA", "ProbeResult", "encode", "fit_pca", "has_exact_mean", "linear_probe",
           "pca_codes", "posterior_mean"]
