"""Amortized guide families: registry, sample/log-density agreement, KL(q || prior) oracles, training in fit()."""

import json
import math

import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from torch.distributions import kl_divergence

import vi_lab
from vi_lab import evaluate
from vi_lab.data import binarize, load_dataset
from vi_lab.guides import GUIDES, guide_options, make_guide
from vi_lab.score_function import ScoreFunction, without_rsample

FAMILIES = ["mean_field", "full_cov", "low_rank", "iaf", "planar", "radial", "mixture"]
FLOWS = ["iaf", "planar", "radial"]
D = 3


#: parameter noise per family: enough to make the posterior clearly non-trivial (a non-linear
#: flow whose log-det varies from draw to draw, correlated Gaussians, separated components),
#: not so much that a flow folds the mass onto a thin curved sheet
NOISE = {"iaf": 0.1, "planar": 0.05, "radial": 0.1, "mixture": 0.1}


def small_guide(name: str, device: torch.device) -> torch.nn.Module:
    """A guide on 784-pixel inputs whose parameters are pushed off their initialization,
    so the oracles below would notice a wrong log-determinant or a wrong density.
    Built and perturbed on the CPU (the same values on every device), then moved to ``device``."""
    guide = make_guide(name, latent_dim=D, hidden=[16])
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(NOISE.get(name, 0.3) * torch.randn_like(p))
    return guide.to(device)


@pytest.fixture
def x(device):
    return torch.rand(4, 784, device=device)


def prior(device: torch.device) -> dist.Distribution:
    return dist.Normal(torch.zeros(D, device=device), 1.0).to_event(1)


def test_registry_holds_every_family_and_names_errors():
    assert sorted(GUIDES) == sorted(FAMILIES)
    with pytest.raises(ValueError, match="unknown guide 'nope'; valid names: full_cov, iaf, low_rank, mean_field"):
        make_guide("nope", latent_dim=2)
    with pytest.raises(ValueError, match="guide 'iaf' does not take rank; it takes flow_steps, flow_hidden"):
        make_guide("iaf", latent_dim=2, rank=2)
    with pytest.raises(ValueError, match="does not take components; it takes no family options"):
        make_guide("full_cov", latent_dim=2, components=3)
    assert guide_options("low_rank") == ("rank",) and guide_options("mixture") == ("components",)
    with pytest.raises(ValueError, match="rank must be an integer between 1 and latent_dim=3"):
        make_guide("low_rank", latent_dim=3, rank=4)
    with pytest.raises(ValueError, match="latent_dim >= 2"):
        make_guide("mixture", latent_dim=1)
    with pytest.raises(ValueError, match="flow_steps must be a positive integer"):
        make_guide("planar", latent_dim=2, flow_steps=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_options_reach_the_posterior(name, x):
    options = {"low_rank": {"rank": 2}, "mixture": {"components": 4}, "iaf": {"flow_steps": 3},
               "planar": {"flow_steps": 5}, "radial": {"flow_steps": 5}}.get(name, {})
    q = make_guide(name, latent_dim=D, hidden=[16], **options).to(x.device).get_posterior(x)
    assert q.batch_shape == (4,) and q.event_shape == (D,)
    if name == "low_rank":
        assert q.cov_factor.shape == (4, D, 2)
    if name == "mixture":
        assert q.locs.shape == (4, 4, D)
    if name in FLOWS:
        assert len(q.transforms) == options["flow_steps"]
    if name == "full_cov":  # starts as a mean-field posterior, and its correlations can be learned
        assert torch.equal(q.scale_tril.tril(-1), x.new_zeros(4, D, D))
        guide = make_guide(name, latent_dim=D, hidden=[16]).to(x.device)
        (guide.get_posterior(x).rsample() ** 3).sum().backward()
        assert guide.lower.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_samples_get_the_density_of_the_distribution_that_drew_them(name, x):
    # E_{z ~ q}[r(z) / q(z)] = 1 for any normalized density r: true only if log q(z) is the
    # log-density of the distribution that drew z (a wrong log-det or normalizer shifts it).
    # r: a Gaussian narrower than q (bounded weights), fitted to q's own draws.
    q = small_guide(name, x.device).get_posterior(x)
    with torch.no_grad():
        z = q.rsample((20000,))  # (S, B, D)
        log_q = q.log_prob(z)  # scored through the flow's cache: the draws' own log-density
        z64 = z.double()  # a correlated q: its sample covariance can be near-singular in float32
        mean, c = z64.mean(0), z64 - z64.mean(0)
        cov = torch.einsum("sbi,sbj->bij", c, c) / z.shape[0]
        r = dist.MultivariateNormal(mean, covariance_matrix=0.5 * cov)
        w = (r.log_prob(z64) - log_q.double()).exp().float()  # (S, B)
    se = w.std(0) / math.sqrt(w.shape[0])
    assert (se < 0.01).all()
    assert torch.allclose(w.mean(0), x.new_ones(4), atol=0.03), (w.mean(0), se)


def flow_log_density_by_autograd(q: dist.TransformedDistribution, eps: torch.Tensor) -> tuple:
    """z = f(eps) through q's transforms and log q(z) = log base(eps) - log|det df/deps|, Jacobian by autograd."""
    eps = eps.detach().requires_grad_(True)
    z = eps
    for t in q.transforms:
        z = t._call(z)  # bypass the cache: recompute from eps
    # the map acts on each (sample, datapoint) row separately: D backward passes give every block
    rows = [torch.autograd.grad(z[..., i].sum(), eps, retain_graph=True)[0] for i in range(z.shape[-1])]
    jac = torch.stack(rows, dim=-2)  # (..., D, D): jac[..., i, j] = dz_i / deps_j
    return z.detach(), (q.base_dist.log_prob(eps) - torch.linalg.slogdet(jac)[1]).detach()


@pytest.mark.parametrize("name", FLOWS)
def test_flow_log_density_is_the_change_of_variables_with_the_true_jacobian(name, x):
    q = small_guide(name, x.device).get_posterior(x)
    eps = q.base_dist.sample((50,))
    z = eps
    for t in q.transforms:
        z = t(z)
    log_q = q.log_prob(z)  # Pyro: base log-density minus each step's log_abs_det_jacobian
    z_ref, log_q_ref = flow_log_density_by_autograd(q, eps)
    assert torch.allclose(z, z_ref, atol=1e-5)
    assert torch.allclose(log_q, log_q_ref, atol=1e-4)
    log_det = q.base_dist.log_prob(eps) - log_q
    assert (log_det.std(0) > 0.05).all()  # a non-linear flow: its log-det changes from draw to draw
    if name == "iaf":  # an IAF can also score a tensor it did not draw, through its inverse
        assert torch.allclose(q.log_prob(z.clone()), log_q, atol=1e-4)


def independent_kl_estimate(name: str, q: dist.Distribution, num_samples: int,
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(q || prior) by a route that shares nothing with q's own rsample/log_prob: analytic, or MC with
    torch's MixtureSameFamily, or MC with an autograd Jacobian. Returns (estimate, standard error)."""
    if name in ("mean_field", "full_cov", "low_rank"):
        p = prior(device) if name == "mean_field" else \
            dist.MultivariateNormal(torch.zeros(D, device=device), torch.eye(D, device=device))
        return kl_divergence(q, p), torch.zeros(q.batch_shape, device=device)
    if name == "mixture":
        ref = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=q.component_logits),
            torch.distributions.Independent(torch.distributions.Normal(q.locs, q.coord_scale), 1))
        z = ref.sample((num_samples,))
        d = ref.log_prob(z) - prior(device).log_prob(z)
    else:
        z, log_q = flow_log_density_by_autograd(q, q.base_dist.sample((num_samples,)))
        d = log_q - prior(device).log_prob(z)
    return d.mean(0), d.std(0) / math.sqrt(num_samples)


@pytest.mark.parametrize("name", FAMILIES)
def test_monte_carlo_kl_to_the_prior_matches_an_independent_estimate(name, x):
    q = small_guide(name, x.device).get_posterior(x)
    n = 10000
    with torch.no_grad():
        z = q.rsample((n,))
        d = q.log_prob(z) - prior(x.device).log_prob(z)  # (S, B)
    mc, mc_se = d.mean(0), d.std(0) / math.sqrt(n)
    ref, ref_se = independent_kl_estimate(name, q, n, x.device)
    tol = 4 * (mc_se**2 + ref_se**2).sqrt() + 1e-3
    assert (mc > 0.3).all()  # posteriors far from the prior: a wrong density could not hide
    assert ((mc - ref).abs() < tol).all(), (mc, ref, tol)


@pytest.mark.parametrize("name", ["planar", "radial"])
def test_flows_without_an_inverse_refuse_score_function_training(name, x):
    guide = make_guide(name, latent_dim=D, hidden=[16]).to(x.device)
    with pytest.raises(NotImplementedError, match=f"{type(guide).__name__} supports reparameterized sampling only"):
        with ScoreFunction():
            guide(x)
    q = guide.get_posterior(x)
    with pytest.raises(NotImplementedError, match="supports reparameterized sampling only"):
        without_rsample(q.expand((2,) + q.batch_shape))  # the declaration survives plate broadcasting
    with pytest.raises(NotImplementedError, match="supports reparameterized sampling only"):
        vi_lab.fit(vi_lab.VAE(D, [16]).to(x.device), guide, x.bernoulli(), estimator="reinforce", epochs=1,
                   progress=False)
    guide(x)  # pathwise sampling is untouched


def test_an_invertible_flow_trains_by_score_function(x):
    guide = make_guide("iaf", latent_dim=D, hidden=[16]).to(x.device)
    with poutine.trace() as tr, ScoreFunction():
        z = guide(x)
    assert not z.requires_grad and not tr.trace.nodes["z"]["fn"].has_rsample
    log_q = tr.trace.nodes["z"]["fn"].log_prob(z)  # through the inverse: a fresh tensor, not the cache
    assert log_q.requires_grad and torch.allclose(log_q, guide.get_posterior(x).log_prob(z.clone()), atol=1e-5)


@pytest.fixture(scope="module")
def mnist_slice(device):
    images = load_dataset("mnist", "test", device=device).images[:256]  # the smaller file: faster to read
    return binarize(images, "static", seed=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_trains_inside_fit_and_raises_the_elbo(name, mnist_slice):
    x = mnist_slice
    model = vi_lab.VAE(4, [32]).to(x.device)  # evaluated before fit: on the data's device already
    options = {"flow_steps": 2} if name in ("planar", "radial") else {}
    guide = make_guide(name, latent_dim=4, hidden=[32], **options).to(x.device)
    before = evaluate.elbo(model, guide, x, num_samples=4).mean().item()
    result = vi_lab.fit(model, guide, x, epochs=2, batch_size=32, lr=3e-3, progress=False)
    after = evaluate.elbo(model, guide, x, num_samples=4).mean().item()
    assert math.isfinite(after)
    assert result.history[-1]["train_elbo"] > result.history[0]["train_elbo"]
    assert after > before + 100  # about -550 (untrained) to about -350 nats after 16 steps


def test_vae_mnist_passes_family_options_and_rejects_ones_that_do_not_apply(capsys):
    from vi_lab.commands import train as ex  # what examples/vae_mnist.py runs
    cfg = ex.parse_args(["--guide", "iaf", "--flow-steps", "3"])
    _, guide = ex.build(cfg)
    assert isinstance(guide, GUIDES["iaf"]) and len(guide.flows) == 3
    _, guide = ex.build(ex.parse_args(["--guide", "mixture", "--components", "2", "--latent-dim", "2"]))
    assert guide.components == 2
    _, guide = ex.build(ex.parse_args(["--guide", "low_rank", "--rank", "3"]))
    assert guide.rank == 3
    with pytest.raises(SystemExit):
        ex.parse_args(["--guide", "iaf", "--rank", "3"])
    assert "--rank does not apply to the iaf guide (it takes --flow-steps)" in capsys.readouterr().err


def test_vi_lab_train_runs_with_a_flow_guide(tmp_path, example_args):
    from vi_lab.cli import main

    out = tmp_path / "run"
    tiny = ["--epochs", "1", "--train-size", "200", "--eval-size", "20", "--eval-samples", "10", "--threads", "1",
            "--no-progress", "--hidden", "32"]
    assert main(["train", *tiny, "--guide", "iaf", "--flow-steps", "1", "--out", str(out), *example_args]) == 0
    for name in ("metrics.json", "metrics.jsonl", "samples.png", "reconstructions.png", "curves.png", "last.pt"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["guide"] == "iaf" and metrics["guide_options"] == {"flow_steps": 1}
    assert metrics["config"]["flow_steps"] == 1
    assert math.isfinite(metrics["test_elbo"]) and metrics["test_log_likelihood"] > metrics["test_elbo"] - 1.0
