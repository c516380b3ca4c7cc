"""Local (per-datapoint) guides: PPCA oracles, exact starts from amortized guides, errors."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from vi_lab import evaluate
from vi_lab.guides import make_guide
from vi_lab.guides.local import LOCAL_GUIDES, LocalFit, make_local_guide, optimize_local
from vi_lab.models.ppca import PPCA
from vi_lab.score_function import ScoreFunction

FAMILIES = ["mean_field", "full_cov", "low_rank", "iaf", "planar", "radial", "mixture"]
STAGES = (0.05, 0.005, 0.0005)  # Adam's jitter at a constant rate costs more than 0.01 nats: refine in stages
D = 3


@pytest.fixture
def ppca(device):
    torch.manual_seed(0)
    model = PPCA(torch.randn(8, D), mu=torch.randn(8), sigma=0.5).to(device)  # W, mu: the same on every device
    return model, model.sample(16)


def optimize(model, local, x) -> list[LocalFit]:
    return [optimize_local(model, local, x, lr=lr, num_particles=16, window=50, tol=1e-3, max_steps=1500)
            for lr in STAGES]


def as_mvn(q: dist.Distribution) -> dist.MultivariateNormal:
    if isinstance(q, dist.Independent):  # a diagonal Normal
        return dist.MultivariateNormal(q.base_dist.loc, scale_tril=torch.diag_embed(q.base_dist.scale))
    return q


def test_registry_lists_every_family():
    assert sorted(LOCAL_GUIDES) == sorted(FAMILIES)
    with pytest.raises(ValueError, match="unknown local guide 'nope'; valid names: full_cov, iaf, low_rank"):
        make_local_guide("nope", num_data=2, latent_dim=2)


def test_local_full_cov_reaches_the_exact_log_likelihood(ppca):
    model, x = ppca
    local = make_local_guide("full_cov", num_data=x.shape[0], latent_dim=D).to(x.device)
    fits = optimize(model, local, x)
    exact = model.log_marginal(x)
    with torch.no_grad():
        gap = kl_divergence(local.get_posterior(x), model.posterior(x))  # log p(x) - ELBO, in closed form
        elbo = evaluate.elbo(model, local, x, num_samples=2000)
    assert all(f.steps > 0 for f in fits)
    assert gap.mean() < 0.01
    assert -0.005 < (exact - elbo).mean() < 0.01  # the Monte Carlo ELBO says the same


def test_local_mean_field_leaves_the_optimal_mean_field_gap(ppca):
    model, x = ppca
    local = make_local_guide("mean_field", num_data=x.shape[0], latent_dim=D).to(x.device)
    optimize(model, local, x)
    optimal = model.optimal_mean_field_gap()  # 0.5 * (sum_i log L_ii - log det L)
    assert optimal > 0.05  # a correlated posterior: mean-field cannot close the gap
    with torch.no_grad():
        gap = kl_divergence(as_mvn(local.get_posterior(x)), model.posterior(x))
        elbo = evaluate.elbo(model, local, x, num_samples=2000)
    assert abs(gap.mean().item() - optimal) < 0.02
    assert abs((model.log_marginal(x) - elbo).mean().item() - optimal) < 0.02


def test_local_iaf_gets_closer_than_any_mean_field_guide(ppca):
    model, x = ppca
    local = make_local_guide("iaf", num_data=x.shape[0], latent_dim=D, flow_steps=2).to(x.device)
    optimize(model, local, x)
    with torch.no_grad():
        gap = (model.log_marginal(x) - evaluate.elbo(model, local, x, num_samples=2000)).mean().item()
    # the optimal mean-field gap bounds every mean-field guide's gap from below
    assert gap < model.optimal_mean_field_gap() - 0.03


@pytest.mark.parametrize("name", ["low_rank", "mixture", "planar", "radial"])
def test_other_local_families_train_with_optimize_local(ppca, name):
    model, x = ppca
    local = make_local_guide(name, num_data=x.shape[0], latent_dim=D).to(x.device)
    with torch.no_grad():
        before = evaluate.elbo(model, local, x, num_samples=200).mean().item()
    fit = optimize_local(model, local, x, lr=0.05, num_particles=8, max_steps=150, window=50)
    with torch.no_grad():
        after = evaluate.elbo(model, local, x, num_samples=200).mean().item()
    assert fit.steps > 0 and after > before + 5  # from the N(0, I) start, about 10-20 nats below log p(x)


def amortized(name: str, device: torch.device) -> torch.nn.Module:
    guide = make_guide(name, latent_dim=D, hidden=[16])
    with torch.no_grad():  # off its initialization, so a partial copy would show
        for p in guide.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return guide.to(device)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_local_guide_started_from_its_amortized_family_is_an_exact_copy(name, device):
    x = torch.rand(5, 784, device=device)
    guide = amortized(name, device)
    local = make_local_guide(name, init_from=guide, x=x)
    assert local.num_data == 5 and local.latent_dim == D
    for option in ("rank", "components", "flow_steps"):
        if hasattr(guide, option):
            assert getattr(local, option) == getattr(guide, option)  # read off the amortized guide
    pyro.set_rng_seed(3)
    q = guide.get_posterior(x)
    z = q.rsample((4,))
    log_q = q.log_prob(z)
    pyro.set_rng_seed(3)
    q_local = local.get_posterior(x)
    z_local = q_local.rsample((4,))
    assert torch.allclose(z_local, z, atol=1e-5)
    assert torch.allclose(q_local.log_prob(z_local), log_q, atol=1e-4)
    if name == "iaf":  # the per-datapoint networks invert too (the path a detached draw is scored by)
        assert torch.allclose(q_local.log_prob(z_local.clone()), log_q, atol=1e-4)


@pytest.mark.parametrize("name", ["iaf", "planar", "radial"])
def test_a_local_flow_started_from_another_family_starts_at_the_identity(name, device):
    x = torch.rand(5, 784, device=device)
    mean_field = amortized("mean_field", device)
    q = mean_field.get_posterior(x)
    local = make_local_guide(name, init_from=mean_field, x=x, flow_steps=3)
    q_local = local.get_posterior(x)
    z = q_local.rsample((10,))
    assert local.flow_steps == 3
    assert torch.allclose(q_local.log_prob(z), q.log_prob(z), atol=1e-4)  # same density: the steps do nothing
    assert torch.allclose(q_local.base_dist.base_dist.loc, q.base_dist.loc)


@pytest.mark.parametrize("name", ["full_cov", "low_rank", "mixture"])
def test_other_local_families_match_the_moments_of_a_different_start(name, device):
    x = torch.rand(5, 784, device=device)
    full_cov = amortized("full_cov", device)
    q = full_cov.get_posterior(x)
    local = make_local_guide(name, init_from=q, rank=D) if name == "low_rank" else \
        make_local_guide(name, init_from=q)
    q_local = local.get_posterior(x)
    if name == "mixture":  # components at the mean, a tenth of a standard deviation apart
        weights = q_local.component_logits.softmax(-1).unsqueeze(-1)
        assert torch.allclose((weights * q_local.locs).sum(-2), q.mean, atol=0.1 * q.stddev.max().item())
    else:
        assert torch.allclose(q_local.mean, q.mean, atol=1e-5)
        assert torch.allclose(q_local.covariance_matrix, q.covariance_matrix, atol=1e-3)


def test_local_guides_reject_the_wrong_points_and_mismatched_starts(device):
    x = torch.rand(5, 784, device=device)
    local = make_local_guide("mean_field", num_data=5, latent_dim=D).to(device)
    with pytest.raises(ValueError, match="holds parameters for 5 datapoints but got a batch of 4"):
        local(x[:4])
    iaf = amortized("iaf", device)
    with pytest.raises(ValueError, match="has 2 flow steps but this local guide has 3; build it with flow_steps=2"):
        make_local_guide("iaf", init_from=iaf, x=x, flow_steps=3)
    with pytest.raises(ValueError, match=r"needs batch \(6,\) and event \(3,\)"):
        make_local_guide("full_cov", num_data=6, init_from=iaf, x=x)
    planar = make_local_guide("planar", num_data=5, latent_dim=D).to(device)
    with pytest.raises(NotImplementedError, match="LocalPlanar supports reparameterized sampling only"), \
            ScoreFunction():
        planar(x)
