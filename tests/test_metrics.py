"""Measures of generated samples: the Fréchet distance against its closed form, the judging classifier learns."""

from __future__ import annotations

import pyro
import pytest
import torch

from vi_lab import runs
from vi_lab.metrics import frechet_distance, train_classifier
from vi_lab.models.classifier import Classifier


def _whitened(n: int, d: int, device) -> torch.Tensor:
    """n points in d dimensions whose sample mean is exactly 0 and sample covariance exactly I."""
    x = torch.randn(n, d, dtype=torch.float64, device=device)
    x = x - x.mean(0)
    return x @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T))).T  # (n, d)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def test_frechet_distance_of_a_set_with_itself_is_zero(device):
    x = torch.randn(300, 5, device=device) @ torch.randn(5, 5, device=device)
    assert abs(frechet_distance(identity, x, x)) < 1e-6


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift(device):
    x = _whitened(400, 4, device) @ torch.tensor([[2.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 3]],
                                                 dtype=torch.float64, device=device)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64, device=device)
    # same covariance: the trace term vanishes and the distance is ||mu_1 - mu_2||^2
    assert frechet_distance(identity, x, x + shift) == pytest.approx(shift.pow(2).sum().item(), abs=1e-8)


def test_frechet_distance_of_scaled_gaussians_matches_the_closed_form(device):
    # N(0, I) against N(mu, diag(s^2)): ||mu||^2 + sum_i (1 - s_i)^2
    x = _whitened(500, 3, device)
    s = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, device=device)
    mu = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64, device=device)
    expected = mu.pow(2).sum() + (1 - s).pow(2).sum()
    assert frechet_distance(identity, x, x * s + mu) == pytest.approx(expected.item(), abs=1e-8)
    assert frechet_distance(identity, x[:1], x) != frechet_distance(identity, x[:1], x)  # NaN: one point


def test_the_classifier_learns_mnist_digits_and_its_features_feed_the_distance(device):
    d = runs.load_data("mnist", train_size=2000, eval_size=500, binarization="none", device=device)
    kept = pyro.param("callers_param", torch.ones(3, device=device))
    with torch.no_grad():  # callable from evaluation code
        clf = train_classifier(d.x_train, d.y_train)
    assert list(pyro.get_param_store().keys()) == ["callers_param"]  # the caller's store, as it was
    assert pyro.param("callers_param") is kept
    with torch.no_grad():
        accuracy = (clf(d.x_test).argmax(-1) == d.y_test).float().mean().item()
        assert isinstance(clf, Classifier) and not clf.training
        assert accuracy > 0.8, accuracy
        assert clf.features(d.x_test[:7]).shape == (7, 256)
        real = frechet_distance(clf.features, d.x_test[:250], d.x_test[250:])
        noise = frechet_distance(clf.features, d.x_test[:250], torch.rand(250, 784, device=device))
    assert 0 < real < noise


def test_classifier_model_is_the_categorical_likelihood_of_the_labels(device):
    clf = Classifier(6, 3, hidden=[4]).to(device)
    x, y = torch.rand(5, 6, device=device), torch.tensor([0, 2, 1, 1, 0], device=device)
    trace = pyro.poutine.trace(clf.model).get_trace(x, y)
    expected = torch.log_softmax(clf(x), -1)[torch.arange(5, device=device), y]
    assert torch.allclose(trace.nodes["y"]["fn"].log_prob(y), expected, atol=1e-6)
    assert trace.nodes["y"]["is_observed"]


def test_bad_labels_are_a_clear_error(device):
    x = torch.rand(4, 6, device=device)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        train_classifier(x, torch.tensor([0, 1, 3, 0], device=device), num_classes=3)
