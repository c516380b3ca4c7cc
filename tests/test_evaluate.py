"""Oracle tests of the evaluators on probabilistic PCA, whose log p(x) and posterior are exact."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from vi_lab import evaluate
from vi_lab.guides import make_guide
from vi_lab.models.ppca import PPCA, PPCAPosteriorGuide


class ShiftedPosterior(nn.Module):
    """The exact posterior's mean shifted and its covariance inflated: a deliberately wrong guide."""

    def __init__(self, ppca: PPCA, shift: float = 0.3, inflate: float = 1.5) -> None:
        super().__init__()
        self.ppca, self.shift, self.inflate = ppca, shift, inflate

    def forward(self, x):
        post = self.ppca.posterior(x)
        with pyro.plate("data", x.shape[0]):
            q = dist.MultivariateNormal(post.mean + self.shift, covariance_matrix=post.covariance_matrix * self.inflate)
            return pyro.sample("z", q)


@pytest.fixture
def ppca(device):
    torch.manual_seed(1)
    model = PPCA(torch.randn(6, 3), mu=torch.randn(6), sigma=0.6).to(device)
    return model, model.sample(40)


def test_exact_posterior_elbo_equals_log_marginal(ppca):
    model, x = ppca
    exact = model.log_marginal(x)
    # with q = p(z|x) every importance weight equals p(x): ELBO and IS are exact for any sample
    assert torch.allclose(evaluate.elbo(model, PPCAPosteriorGuide(model), x, num_samples=3), exact, atol=1e-4)
    assert torch.allclose(evaluate.log_likelihood(model, PPCAPosteriorGuide(model), x, num_samples=7), exact,
                          atol=1e-4)


def test_wrong_guide_elbo_is_a_lower_bound_and_is_converges(ppca):
    model, x = ppca
    guide = ShiftedPosterior(model)
    exact = model.log_marginal(x)
    elbo = evaluate.elbo(model, guide, x, num_samples=4000)
    # analytic ELBO = log p(x) - KL(q || p(z|x)) for this Gaussian pair
    q = dist.MultivariateNormal(model.posterior(x).mean + 0.3,
                                covariance_matrix=model.posterior(x).covariance_matrix * 1.5)
    kl = torch.distributions.kl_divergence(q, model.posterior(x))
    assert (elbo < exact).all()
    # per point: Monte Carlo error of 4000 draws (log-weight sd ~1.5 here -> se ~0.025)
    assert torch.allclose(elbo, exact - kl, atol=0.12)
    assert abs((elbo - (exact - kl)).mean()) < 0.03
    errors = [(exact - evaluate.log_likelihood(model, guide, x, num_samples=k)).mean().item()
              for k in (1, 10, 100, 3000)]
    assert errors[0] > errors[1] > errors[2] > abs(errors[3])
    assert abs(errors[3]) < 0.03


def test_k1_importance_sampling_equals_single_sample_elbo(ppca):
    model, x = ppca
    guide = ShiftedPosterior(model)
    pyro.set_rng_seed(123)
    ll = evaluate.log_likelihood(model, guide, x, num_samples=1)
    pyro.set_rng_seed(123)
    el = evaluate.elbo(model, guide, x, num_samples=1)
    assert torch.equal(ll, el)
    pyro.set_rng_seed(124)
    assert not torch.equal(evaluate.elbo(model, guide, x, num_samples=1), el)


def test_closed_form_gaussian_kl_matches_monte_carlo(ppca):
    model, x = ppca
    guide = make_guide("mean_field", latent_dim=3, hidden=[8], x_dim=6).to(x.device)
    terms = evaluate.elbo_terms(model, guide, x, num_samples=20000)
    q = guide.get_posterior(x)
    prior = dist.Normal(x.new_zeros(3), 1.0).to_event(1)
    analytic = torch.distributions.kl_divergence(q, prior).detach()
    assert torch.allclose(terms["kl"], analytic, atol=0.03)
    assert torch.allclose(terms["elbo"], terms["reconstruction"] - terms["kl"])


def test_chunking_does_not_change_the_estimate(ppca):
    model, x = ppca
    guide = ShiftedPosterior(model)
    pyro.set_rng_seed(5)
    whole = evaluate.log_weights(model, guide, x, num_samples=50)
    pyro.set_rng_seed(5)
    # 13 points a chunk, and a budget that cuts their 50 draws into pieces (tests/test_chunking.py sizes them)
    chunked = evaluate.log_weights(model, guide, x, num_samples=50, batch_size=13, memory_budget="128KiB")
    assert chunked.shape == (50, 40)
    # different chunking draws differently; the estimator must agree in distribution
    ll_whole = (whole.logsumexp(0) - torch.log(torch.tensor(50.0))).mean()
    ll_chunked = (chunked.logsumexp(0) - torch.log(torch.tensor(50.0))).mean()
    assert abs(ll_whole - ll_chunked) < 0.05


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_num_samples_is_a_clear_error(ppca, bad):
    model, x = ppca
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        evaluate.elbo(model, PPCAPosteriorGuide(model), x, num_samples=bad)


def test_latents_the_guide_does_not_sample_are_proposed_from_the_prior(ppca):
    model, x = ppca

    def empty_guide(x):
        pass

    # prior as proposal: a valid (loose) importance sampler of the exact log p(x)
    ll = evaluate.log_likelihood(model, empty_guide, x[:5], num_samples=200000)
    assert torch.allclose(ll, model.log_marginal(x[:5]), atol=0.1)


def test_enumerated_sites_without_a_guide_are_a_clear_error():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(torch.ones(3) / 3), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(z.float(), 1.0), obs=x)

    with pytest.raises(ValueError, match="marked for enumeration"):
        evaluate.elbo(model, lambda x: None, torch.zeros(4))
