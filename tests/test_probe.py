"""Linear probes (vi_lab.probe): the probe, PCA codes and posterior means against known answers."""

import pyro.distributions as dist
import pytest
import torch

from vi_lab.guides import make_guide
from vi_lab.probe import L2_GRID, encode, fit_pca, has_exact_mean, linear_probe, pca_codes, posterior_mean

D = 3


def blobs(n: int, num_classes: int, dim: int, spread: float, device, seed: int = 0):
    """Labelled Gaussian blobs around class centres ``spread`` apart: linearly separable for a large spread."""
    g = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(num_classes, dim, generator=g)
    y = torch.arange(n) % num_classes
    x = centres[y] + torch.randn(n, dim, generator=g)
    return x.to(device), y.to(device)


def perturbed_guide(name: str, device, scale: float = 0.1):
    """A small guide whose parameters are pushed off their initialization, so posteriors differ per image."""
    guide = make_guide(name, latent_dim=D, hidden=[16])
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(scale * torch.randn_like(p))
    return guide.to(device)


# --- the probe ---------------------------------------------------------------------------------------------------

def test_probe_reads_separable_classes_perfectly_and_random_labels_at_chance(device):
    x, y = blobs(600, 4, 8, spread=6.0, device=device)
    r = linear_probe(x[:300], y[:300], x[300:], y[300:])
    assert r.accuracy == 1.0 and r.train_accuracy == 1.0 and r.num_features == 8

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 20, generator=g).to(device)
    y = torch.randint(0, 10, (4000,), generator=g).to(device)  # no relation to x
    r = linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], l2=1e-4)
    assert 0.07 < r.accuracy < 0.13  # chance is 0.10; the standard error of 2000 test labels is 0.007
    assert r.train_accuracy > r.accuracy + 0.03  # it did fit the training labels: chance on test is not a no-op


def test_probe_is_deterministic_and_blind_to_feature_scales(device):
    x, y = blobs(400, 3, 5, spread=1.0, device=device)  # overlapping: accuracy strictly between chance and 1
    first = linear_probe(x[:200], y[:200], x[200:], y[200:])
    again = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert first == again
    assert 0.4 < first.accuracy < 1.0
    scale = torch.tensor([1e-3, 1.0, 1e3, 5.0, 1e2], device=device)
    shift = torch.tensor([100.0, -3.0, 0.0, 7.0, 1e4], device=device)
    moved = linear_probe(x[:200] * scale + shift, y[:200], x[200:] * scale + shift, y[200:])
    assert moved.accuracy == first.accuracy and moved.l2 == first.l2  # standardized: the same problem


def test_probe_chooses_l2_on_a_validation_split_and_keeps_a_constant_feature_harmless(device):
    x, y = blobs(300, 3, 4, spread=1.5, device=device)
    x = torch.cat([x, torch.full_like(x[:, :1], 3.0)], 1)  # a constant feature: its std is 0
    r = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert set(r.validation) == set(L2_GRID) and r.l2 in L2_GRID
    assert r.validation[r.l2] == max(r.validation.values())
    one = linear_probe(x[:200], y[:200], x[200:], y[200:], l2=0.5)
    assert one.l2 == 0.5 and one.validation == {}
    assert 0.0 < one.accuracy <= 1.0


@pytest.mark.parametrize("case, message", [
    ("lengths", "train_labels must have one label per feature row: shape (50,), got (49,)"),
    ("float_labels", "train_labels must be a tensor of integer class indices 0 .. C-1, got torch.float32; "
                     "convert with .long()"),
    ("widths", "test_features have 3 features per row but train_features have 4"),
    ("negative", "must be class indices 0 .. C-1, got a negative label -1"),
    ("nan", "train_features has non-finite entries"),
    ("num_classes", "num_classes must be an integer >= 2 that covers every label (largest label 2), got 2"),
    ("one_d", "train_features must be a 2-D float tensor (N, num_features), got (50,)"),
])
def test_probe_bad_input_says_what_is_wrong_and_what_is_right(case, message, device):
    x, y = blobs(100, 3, 4, spread=2.0, device=device)
    xt, yt, xs, ys, kw = x[:50], y[:50], x[50:], y[50:], {}
    if case == "lengths":
        yt = yt[:49]
    elif case == "float_labels":
        yt = yt.float()
    elif case == "widths":
        xs = xs[:, :3]
    elif case == "negative":
        ys = ys.clone()
        ys[0] = -1
    elif case == "nan":
        xt = xt.clone()
        xt[3, 1] = float("nan")
    elif case == "num_classes":
        kw = {"num_classes": 2}
    elif case == "one_d":
        xt = xt[:, 0]
    with pytest.raises(ValueError) as err:
        linear_probe(xt, yt, xs, ys, **kw)
    assert message in str(err.value)


# --- PCA ---------------------------------------------------------------------------------------------------------

def correlated_rows(n: int, dim: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * torch.logspace(0, -2, dim)  # decaying variances, mixed
    return (torch.randn(n, dim, generator=g) @ mix.T + 5.0).to(device)


def test_pca_codes_are_decorrelated_ordered_and_fitted_on_the_training_rows_only(device):
    x = correlated_rows(800, 12, device)
    train, test = x[:500], x[500:]
    c_train, c_test = pca_codes(train, test, 6)
    assert c_train.shape == (500, 6) and c_test.shape == (300, 6)
    cov = torch.cov(c_train.double().T)  # (6, 6)
    pca = fit_pca(train, 6)
    assert torch.allclose(cov.diagonal(), pca.variances.double(), rtol=1e-4)
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 1e-4 * cov.diagonal().max()  # decorrelated
    assert (pca.variances[:-1] >= pca.variances[1:]).all()  # by decreasing variance
    exact = torch.linalg.eigvalsh(torch.cov(train.double().T)).flip(0)[:6]
    assert torch.allclose(pca.variances.double(), exact, rtol=1e-4)
    assert torch.allclose(c_train.mean(0), torch.zeros(6, device=device), atol=1e-4)  # centred on the training mean
    other = correlated_rows(300, 12, device, seed=3)
    assert torch.equal(pca_codes(train, other, 6)[0], c_train)  # the test rows do not move the components


def test_pca_reconstructs_better_with_more_components_and_exactly_with_all(device):
    x = correlated_rows(600, 10, device)
    train, test = x[:400], x[400:]
    errors = []
    for d in range(1, 11):
        pca = fit_pca(train, d)
        assert torch.allclose(pca.components @ pca.components.T, torch.eye(d, device=device), atol=1e-5)
        errors.append((pca.decode(pca.encode(test)) - test).pow(2).sum(1).mean().item())
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-8 * errors[0]


def test_pca_bad_sizes_say_what_would_be_right(device):
    x = torch.rand(50, 784, device=device)
    with pytest.raises(ValueError, match=r"d = 785 components is more than the 784 features per row; pick d <= 784"):
        fit_pca(x, 785)
    with pytest.raises(ValueError, match=r"d = 60 components need at least 61 training rows, got 50; pick d <= 49"):
        fit_pca(x, 60)
    with pytest.raises(ValueError, match="d must be a positive integer"):
        fit_pca(x, 0)
    with pytest.raises(ValueError, match="x_test must have rows of the training rows' width 784"):
        pca_codes(x, x[:, :100], 5)


# --- posterior means ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mean_field", "full_cov", "low_rank"])
def test_encode_gives_the_closed_form_mean_of_the_gaussian_families(name, device):
    guide = perturbed_guide(name, device)
    x = torch.rand(25, 784, device=device)
    with torch.no_grad():
        q = guide.get_posterior(x)
    assert has_exact_mean(q)
    before = torch.get_rng_state()
    z = encode(guide, x, batch_size=7)  # in 4 chunks
    assert torch.equal(torch.get_rng_state(), before)  # no draws for a closed form
    assert z.shape == (25, D) and z.device == x.device
    assert torch.allclose(z, q.mean, atol=1e-6)


def test_encode_gives_the_exact_mixture_mean(device):
    guide = perturbed_guide("mixture", device, scale=0.3)
    x = torch.rand(6, 784, device=device)
    with torch.no_grad():
        q = guide.get_posterior(x)
        draws = q.sample((20000,))  # (S, 6, D)
    assert isinstance(q, dist.MixtureOfDiagNormals) and has_exact_mean(q)
    z = encode(guide, x)
    # the draws' mean agrees within 5 standard errors, the exact mean is not itself a draw
    se = draws.std(0) / 20000 ** 0.5
    assert ((z - draws.mean(0)).abs() < 5 * se).all()
    weights = q.component_logits.softmax(-1)
    assert not torch.allclose(z, q.locs[torch.arange(6), weights.argmax(-1)], atol=1e-3)  # not the top component


def test_encode_of_a_flow_is_a_seeded_monte_carlo_mean_close_to_the_true_mean(device):
    guide = perturbed_guide("iaf", device)
    x = torch.rand(6, 784, device=device)
    with torch.no_grad():
        q = guide.get_posterior(x)
        reference = q.sample((40000,))  # (S, 6, D)
    assert not has_exact_mean(q)
    before = torch.get_rng_state()
    z = encode(guide, x, num_samples=400, seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is untouched
    assert torch.equal(z, encode(guide, x, num_samples=400, seed=3))
    assert not torch.equal(z, encode(guide, x, num_samples=400, seed=4))
    se = reference.std(0) / 400 ** 0.5  # the error of a 400-draw mean; the reference's is 10 times smaller
    assert ((z - reference.mean(0)).abs() < 5 * se).all()
    with torch.no_grad(), pytest.raises(ValueError, match="num_samples must be a positive integer, got 0"):
        posterior_mean(guide.get_posterior(x), num_samples=0)


def test_encode_refuses_images_that_are_not_flat(device):
    guide = perturbed_guide("mean_field", device)
    with pytest.raises(ValueError, match=r"x must be a 2-D batch of flattened observations \(N, x_dim\), "
                                         r"got shape \(2, 28, 28\)"):
        encode(guide, torch.rand(2, 28, 28, device=device))
