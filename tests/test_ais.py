"""AIS and BDMC against probabilistic PCA's exact log p(x); chunking, bad input, the commands' AIS options."""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import vi_lab
from vi_lab import ais, evaluate
from vi_lab.models.ppca import PPCA, PPCAPosteriorGuide

from test_evaluate import ShiftedPosterior

# few leapfrog steps: PPCA's posterior is Gaussian and HMC mixes fast; the tests stay cheap
FAST = dict(leapfrog_steps=3, step_size=0.1)


def PoorGuide(ppca: PPCA) -> ShiftedPosterior:
    """The exact posterior shifted by about two posterior sds and shrunk: IS from it is off by nats."""
    return ShiftedPosterior(ppca, shift=0.4, inflate=0.5)


@pytest.fixture
def ppca(device):
    torch.manual_seed(0)
    model = PPCA(torch.randn(8, 3), mu=torch.randn(8), sigma=0.5).to(device)
    return model, model.sample(12)


def test_error_shrinks_with_the_number_of_intermediate_distributions(ppca):
    model, x = ppca
    guide, exact = PoorGuide(model), model.log_marginal(x)
    errors = []
    for steps in (1, 10, 60):
        ll = ais.ais_log_likelihood(model, guide, x, num_chains=6, num_steps=steps, **FAST)
        assert ll.shape == (12,)
        errors.append((ll - exact).abs().mean().item())
    assert errors[0] > 3 * errors[1] and errors[1] > 1.5 * errors[2]  # measured: about 9, 2.4, 1.1 nats
    assert errors[2] < 0.2 * errors[0]


def test_one_step_is_importance_sampling_on_the_same_draws(ppca):
    model, x = ppca
    guide = PoorGuide(model)
    pyro.set_rng_seed(4)
    got = ais.ais_log_likelihood(model, guide, x, num_chains=7, num_steps=1, adapt_chains=0)
    pyro.set_rng_seed(4)
    assert torch.allclose(got, evaluate.log_likelihood(model, guide, x, num_samples=7), atol=1e-5)


def test_ais_beats_importance_sampling_from_the_same_poor_guide_at_similar_cost(ppca):
    model, x = ppca
    guide, exact = PoorGuide(model), model.log_marginal(x)
    # 8 + 4 chains x 20 temperatures x 3 leapfrog steps: about 720 model evaluations per datapoint
    annealed = ais.ais_log_likelihood(model, guide, x, num_chains=8, num_steps=20, **FAST)
    sampled = evaluate.log_likelihood(model, guide, x, num_samples=1000)
    assert (exact - annealed).mean() < 0.5 * (exact - sampled).mean()  # measured: about 1.3 against 4.8 nats


def test_start_from_the_prior_also_converges(ppca):
    model, x = ppca
    exact = model.log_marginal(x)
    errors = [(ais.ais_log_likelihood(model, PoorGuide(model), x, num_chains=6, num_steps=steps, start="prior",
                                      **FAST) - exact).abs().mean() for steps in (1, 30)]
    assert errors[0] > 5 * errors[1]  # measured: about 60 and 3 nats


def test_bdmc_sandwiches_the_exact_log_likelihood_and_narrows_with_steps(ppca):
    model, _ = ppca
    pyro.set_rng_seed(1)
    x, z = ais.simulate(model, torch.zeros(12, 8, device=model.W.device))
    assert x.shape == (12, 8) and z["z"].shape == (12, 3)
    exact = model.log_marginal(x)
    guide = PoorGuide(model)
    widths = []
    for steps in (5, 40):
        bounds = ais.bdmc(model, guide, x, z, num_chains=4, num_steps=steps, **FAST)
        assert bounds.lower.shape == bounds.upper.shape == (12,)
        # stochastic bounds: on average, within noise (three standard errors over the datapoints)
        below, above = bounds.lower - exact, bounds.upper - exact
        assert below.mean() < 3 * below.std() / 12**0.5 + 0.05
        assert above.mean() > -3 * above.std() / 12**0.5 - 0.05
        widths.append(bounds.width.mean().item())
    assert widths[0] > 3 * widths[1] and widths[1] < 0.5  # measured: about 0.9 and 0.1


def test_reverse_ais_from_the_exact_posterior_is_an_upper_bound(ppca):
    model, x = ppca
    pyro.set_rng_seed(2)
    z = model.posterior(x).sample()  # an exact draw for real data too
    bounds = ais.bdmc(model, PoorGuide(model), x, {"z": z}, num_chains=4, num_steps=3, **FAST)
    exact = model.log_marginal(x)
    # few steps: loose on both sides (measured: about +0.7 and -0.2 nats)
    assert (bounds.upper - exact).mean() > 0.2 and (bounds.upper - bounds.lower).mean() > 0.5


def test_cutting_the_chains_by_memory_gives_the_same_estimator(ppca, device):
    if device.type != "cpu":
        pytest.skip("the draws are reproduced across cuts on the CPU generator only")
    model, x = ppca
    guide = PoorGuide(model)
    results = []
    for budget in (1, 2**30):  # one chain at a time, all at once
        pyro.set_rng_seed(3)
        results.append(ais.ais_log_likelihood(model, guide, x, num_chains=5, num_steps=6, batch_size=12,
                                              memory_budget=budget, **FAST))
    # cut or not, the same draws: the same numbers, datapoint by datapoint
    assert results[0].shape == results[1].shape == (12,)
    assert torch.allclose(results[0], results[1], atol=1e-4)
    pyro.set_rng_seed(3)  # datapoints cut too
    cut = ais.ais_log_likelihood(model, guide, x, num_chains=5, num_steps=6, batch_size=5, **FAST)
    assert cut.shape == (12,) and abs(cut.mean() - results[1].mean()) < 1.0


def test_a_constrained_latent_moves_in_unconstrained_space(device):
    # z ~ Gamma(3, 1), x | z ~ Normal(0, 1/sqrt(z)): p(x) is a Student-t with 6 degrees of freedom, scaled
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(x.new_tensor(3.0), 1.0))
            pyro.sample("x", dist.Normal(0.0, z.rsqrt()), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Gamma(x.new_tensor(3.0), 1.0).expand([x.shape[0]]))

    x = torch.tensor([0.1, 1.0, 2.5], device=device)
    exact = dist.StudentT(6.0, 0.0, (1 / 3) ** 0.5).log_prob(x)
    ll = ais.ais_log_likelihood(model, guide, x, num_chains=16, num_steps=50, **FAST)
    assert torch.allclose(ll, exact, atol=0.15)  # measured: within 0.1


@pytest.mark.parametrize("setting, value, words", [
    ("num_chains", 0, "num_chains must be a positive integer"),
    ("num_steps", -1, "num_steps must be a positive integer"),
    ("num_steps", 2.5, "num_steps must be a positive integer"),
    ("leapfrog_steps", 0, "leapfrog_steps must be a positive integer"),
    ("adapt_chains", -1, "adapt_chains must be a non-negative integer"),
    ("step_size", 0.0, "step_size must be a positive number"),
    ("start", "posterior", "unknown start 'posterior'; valid: guide, prior"),
    ("schedule", "cosine", "unknown schedule 'cosine'; valid: sigmoid, linear"),
])
def test_bad_settings_are_refused_clearly(ppca, setting, value, words):
    model, x = ppca
    with pytest.raises(ValueError, match=words):
        ais.ais_log_likelihood(model, PPCAPosteriorGuide(model), x, **{setting: value})


def test_discrete_latents_and_flows_without_inverse_are_refused_clearly(device):
    from vi_lab.guides import BernoulliGuide
    from vi_lab.models.discrete import SigmoidBeliefVAE

    x = torch.bernoulli(torch.full((4, 10), 0.5, device=device))
    model = SigmoidBeliefVAE(latent_dim=3, hidden=[8], x_dim=10).to(device)
    discrete = BernoulliGuide.make(latent_dim=3, hidden=[8], x_dim=10).to(device)
    with pytest.raises(ValueError, match=r"needs continuous latents; site 'z' has the discrete support"):
        ais.ais_log_likelihood(model, discrete, x, num_chains=2, num_steps=2)
    vae = vi_lab.VAE(latent_dim=3, hidden=[8], x_dim=10).to(device)
    planar = vi_lab.make_guide("planar", latent_dim=3, hidden=[8], x_dim=10).to(device)
    with pytest.raises(ValueError, match="gives no log q.*use start='prior'"):
        ais.ais_log_likelihood(vae, planar, x, num_chains=2, num_steps=2)
    assert ais.ais_log_likelihood(vae, planar, x, num_chains=2, num_steps=2, start="prior").shape == (4,)


def test_bdmc_refuses_an_exact_sample_of_the_wrong_shape(ppca):
    model, x = ppca
    with pytest.raises(ValueError, match=r"z_exact\['z'\] has shape \(12, 5\)"):
        ais.bdmc(model, PPCAPosteriorGuide(model), x, torch.zeros(12, 5, device=x.device), num_chains=2, num_steps=2)
    with pytest.raises(ValueError, match=r"z_exact lacks the latent sites \['z'\]"):
        ais.bdmc(model, PPCAPosteriorGuide(model), x, {"w": x}, num_chains=2, num_steps=2)


def test_exported_beside_log_likelihood():
    assert vi_lab.ais_log_likelihood is ais.ais_log_likelihood
    betas = ais.schedule(10)
    assert betas[0] == 0 and betas[-1] == 1 and (betas.diff() > 0).all()


def test_gaps_can_take_log_px_from_ais(ppca):
    from vi_lab import gaps

    x = ppca[1]  # for its device
    torch.manual_seed(0)
    model = vi_lab.VAE(latent_dim=2, hidden=[8], x_dim=10).to(x.device)
    guide = vi_lab.make_guide("mean_field", latent_dim=2, hidden=[8], x_dim=10).to(x.device)
    xb = torch.bernoulli(torch.full((5, 10), 0.5, device=x.device))
    report = gaps.inference_gaps(model, guide, xb, rich_family=None, num_samples=20, max_steps=20, window=5,
                                 log_px="ais", ais={"num_chains": 3, "num_steps": 10, "leapfrog_steps": 2})
    assert report.log_px_estimator.startswith("AIS")
    assert torch.equal(report.log_px, report.log_px_by_proposal["ais"])
    assert report.to_dict(per_datapoint=False)["log_px_estimator"] == report.log_px_estimator
    default = gaps.inference_gaps(model, guide, xb, rich_family=None, num_samples=20, max_steps=20, window=5)
    assert default.log_px_estimator.startswith("IS") and "ais" not in default.log_px_by_proposal
    with pytest.raises(ValueError, match="log_px must be 'is' or 'ais'"):
        gaps.inference_gaps(model, guide, xb, log_px="exact")


def test_eval_command_prints_and_writes_ais_beside_is(tmp_path, tiny_args, example_args, capsys):
    from vi_lab.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", *tiny_args, "--latent-dim", "2", "--hidden", "16", "--out", str(run_dir),
                 *example_args]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--eval-size", "4", "--eval-samples", "5", "--ais-chains", "2",
                 "--ais-steps", "3", "--ais-leapfrog", "2", "--no-progress", "--threads", "1", *example_args]) == 0
    out = capsys.readouterr().out
    assert "AIS log p(x), 2 chains x 3 steps" in out
    scored = json.loads(next(run_dir.glob("eval_mnist_test_N4_K5_s0_ais2x3.json")).read_text())
    assert math.isfinite(scored["ais_log_likelihood"]["mean"])
    assert scored["ais"] == {"num_chains": 2, "num_steps": 3, "leapfrog_steps": 2, "start": "guide"}
    with pytest.raises(SystemExit):
        main(["eval", str(run_dir), "--ais-steps", "-1"])
