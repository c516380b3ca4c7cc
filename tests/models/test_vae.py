"""The VAE model keeps the data-plate contract and its likelihoods are real densities."""

import pyro
import pyro.poutine as poutine
import pytest
import torch

from vi_lab.guides import make_guide
from vi_lab.models import LIKELIHOODS, VAE, make_likelihood


def test_model_sites_have_the_batch_rightmost(device):
    model = VAE(3, [16]).to(device)
    x = torch.bernoulli(torch.full((7, 784), 0.3, device=device))
    trace = poutine.trace(model).get_trace(x)
    trace.compute_log_prob()
    assert trace.nodes["z"]["log_prob"].shape == (7,)
    assert trace.nodes["x"]["log_prob"].shape == (7,)
    assert trace.nodes["x"]["is_observed"]


def test_prior_is_standard_normal(device):
    model = VAE(3, [16]).to(device)
    prior = model.prior(torch.zeros(4, 784, device=device))
    z = torch.randn(4, 3, device=device)
    expected = torch.distributions.Normal(z.new_tensor(0.0), 1.0).log_prob(z).sum(-1)
    assert torch.allclose(prior.log_prob(z), expected)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_likelihoods_are_normalized_on_one_pixel(name, device):
    # integrate / sum the density of a single pixel over its support: a real density sums to 1
    lik = make_likelihood(name, 1).to(device)
    out = torch.tensor([[0.4]], device=device)
    if name == "bernoulli":
        total = sum(lik(out).log_prob(out.new_tensor([[v]])).exp() for v in (0.0, 1.0))
    else:
        lo, hi, steps = (-3, 4, 70001) if name == "gaussian" else (1e-6, 1 - 1e-6, 20001)
        grid = torch.linspace(lo, hi, steps, device=device)[:, None]
        dens = lik(out.expand(len(grid), 1)).log_prob(grid).exp()
        total = torch.trapezoid(dens, grid[:, 0])
    assert total.item() == pytest.approx(1.0, abs=2e-3)


def test_beta_is_declared_as_a_site_scale():
    assert VAE(3, [16]).site_scales == {}
    assert VAE(3, [16], beta=4.0).site_scales == {"z": 4.0}


@pytest.mark.parametrize("kwargs, message", [
    ({"likelihood": "poisson"}, "unknown likelihood 'poisson'; valid"),
    ({"beta": -1.0}, "beta must be >= 0"),
    ({"latent_dim": 0}, "latent_dim must be a positive integer"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAE(**{"latent_dim": 3, "hidden": [16], **kwargs})


def test_unknown_guide_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown guide 'gaussian'; valid names: .*mean_field"):
        make_guide("gaussian", latent_dim=3)
