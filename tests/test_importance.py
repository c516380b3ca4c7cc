"""The importance-weighted objectives (IWAE, DReG) and KL warm-up, against exact answers."""

from __future__ import annotations

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import vi_lab
from vi_lab import evaluate
from vi_lab.cli import main
from vi_lab.importance import ImportanceWeighted
from vi_lab.models.ppca import PPCA
from vi_lab.objectives import SyncFreeTrace_ELBO
from vi_lab.optim import Adam
from vi_lab.step import TrainStep

from test_evaluate import ShiftedPosterior


class GaussianToy(nn.Module):
    """z ~ N(mu_b, I), x | z ~ N(z, I): p(x) = N(mu, 2I), p(z | x) = N((mu + x) / 2, I / 2).

    Every datapoint has its own mu_b, and the guide its own (loc_b, log_scale_b), so with B copies
    of one x the gradient of each row is an independent draw of the per-datapoint estimator.
    """

    def __init__(self, mu: torch.Tensor) -> None:
        super().__init__()
        self.mu = nn.Parameter(mu.clone())

    def forward(self, x):
        pyro.module("toy", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(self.mu, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


class LocalGaussian(nn.Module):
    def __init__(self, loc: torch.Tensor, log_scale: torch.Tensor) -> None:
        super().__init__()
        self.loc, self.log_scale = nn.Parameter(loc.clone()), nn.Parameter(log_scale.clone())

    def forward(self, x):
        pyro.module("local", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.loc, self.log_scale.exp()).to_event(1))


def _row_gradients(model, guide, x, loss) -> dict[str, torch.Tensor]:
    """Each datapoint's gradient of its own bound (the loss is minus the batch mean)."""
    value = loss(model, guide, x)
    params = {"mu": model.mu, "loc": guide.loc, "log_scale": guide.log_scale}
    grads = torch.autograd.grad(value, list(params.values()))
    return {k: -g * x.shape[0] for k, g in zip(params, grads)}


def _toy(device, rows: int, shift: float, widen: float):
    torch.manual_seed(0)
    x = torch.tensor([[1.0, -0.5]], device=device).expand(rows, 2).contiguous()
    mu = torch.tensor([[0.3, 0.2]], device=device).expand(rows, 2)
    post_loc, post_scale = (mu + x) / 2, torch.full_like(x, 0.5 ** 0.5)
    return GaussianToy(mu), LocalGaussian(post_loc + shift, (post_scale * widen).log()), x


def test_dreg_is_exact_zero_at_the_posterior_and_both_give_the_fisher_gradient_of_the_model(device):
    model, guide, x = _toy(device, 4000, shift=0.0, widen=1.0)
    iwae = _row_gradients(model, guide, x, ImportanceWeighted(5))
    dreg = _row_gradients(model, guide, x, ImportanceWeighted(5, dreg=True))
    # at q = p(z | x) every log weight is log p(x), whatever z: DReG's guide gradient is 0 draw by draw,
    # while plain IWAE's still carries the score function's noise
    assert dreg["loc"].abs().max() < 1e-5 and dreg["log_scale"].abs().max() < 1e-5
    assert iwae["loc"].std() > 0.1 and iwae["log_scale"].std() > 0.1
    exact = ((x - model.mu) / 2).mean(0)  # d log N(x; mu, 2I) / d mu
    for est in (iwae, dreg):
        mean, se = est["mu"].mean(0), est["mu"].std(0) / math.sqrt(x.shape[0])
        assert ((mean - exact).abs() < 4 * se + 1e-4).all(), (mean, exact, se)


@pytest.mark.parametrize("K", [1, 10])
def test_dreg_has_the_iwae_gradients_mean_and_less_variance_for_the_guide(device, K):
    model, guide, x = _toy(device, 20000, shift=0.5, widen=1.3)
    iwae = _row_gradients(model, guide, x, ImportanceWeighted(K))
    dreg = _row_gradients(model, guide, x, ImportanceWeighted(K, dreg=True))
    n = x.shape[0]
    for name in ("mu", "loc", "log_scale"):
        diff = iwae[name].mean(0) - dreg[name].mean(0)
        se = (iwae[name].var(0) / n + dreg[name].var(0) / n).sqrt()
        assert (diff.abs() < 4.5 * se).all(), (name, diff, se)
    for name in ("loc", "log_scale"):
        assert (dreg[name].var(0) < 0.8 * iwae[name].var(0)).all(), (name, dreg[name].var(0), iwae[name].var(0))
    if K == 1:  # the ELBO's gradient in closed form: E_q[log N(z; mu, 1) + log N(x; z, 1)] + entropy
        loc, s, mu = guide.loc[0], guide.log_scale[0].exp(), model.mu[0]
        exact = {"loc": (mu - loc) + (x[0] - loc), "log_scale": 1 - 2 * s**2, "mu": loc - mu}
        for name, value in exact.items():
            for est in (iwae, dreg):
                se = est[name].std(0) / math.sqrt(n)
                assert ((est[name].mean(0) - value).abs() < 4.5 * se + 1e-4).all(), (name, est[name].mean(0), value)


def test_iwae_bound_rises_with_k_toward_the_exact_log_likelihood_on_ppca(device):
    torch.manual_seed(2)
    model = PPCA(torch.randn(6, 3), mu=torch.randn(6), sigma=0.6).to(device)
    x = model.sample(40)
    guide = ShiftedPosterior(model, shift=0.4, inflate=2.5)  # a guide whose bounds are loose
    exact = model.log_marginal(x).mean().item()
    with torch.no_grad():
        reps = {k: -torch.stack([ImportanceWeighted(k)(model, guide, x) for _ in range(30)]) for k in (1, 5, 50, 1000)}
        elbo = evaluate.elbo(model, guide, x, num_samples=20000).mean().item()
    bounds = {k: r.mean().item() for k, r in reps.items()}
    assert abs(bounds[1] - elbo) < 4 * reps[1].std().item() / math.sqrt(30)  # K = 1 is the ELBO
    assert bounds[1] < bounds[5] < bounds[50] < bounds[1000] < exact + 0.01, (bounds, exact)
    assert exact - bounds[1] > 1.0 and exact - bounds[1000] < 0.05


def _pair(device, beta: float = 1.0):
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = vi_lab.VAE(latent_dim=4, hidden=[16], x_dim=12, beta=beta).to(device)
    guide = vi_lab.make_guide("mean_field", latent_dim=4, hidden=[16], x_dim=12).to(device)
    x = torch.rand(32, 12, device=device).bernoulli()
    return model, guide, x


@pytest.mark.parametrize("beta, weight", [(1.0, 1.0), (2.0, 0.3)])
def test_iwae_with_one_particle_is_the_elbo_objective_value_and_gradient(device, beta, weight):
    results = []
    for loss in (SyncFreeTrace_ELBO(), ImportanceWeighted(1)):
        model, guide, x = _pair(device, beta)
        step = TrainStep(model, guide, loss, Adam(1e-3), getattr(model, "site_scales", None))
        step.latent_weight.value = weight
        if isinstance(loss, ImportanceWeighted):  # its first call checks the pair, drawing random numbers
            loss(step.model, step.guide, x)
        pyro.set_rng_seed(5)
        value = step.gradients(x)
        results.append((value, {n: p.grad.clone() for n, p in zip(step.names, step.params)}))
    (elbo_loss, elbo_grads), (iwae_loss, iwae_grads) = results
    assert torch.allclose(elbo_loss, iwae_loss, rtol=1e-6, atol=1e-5)
    assert elbo_grads.keys() == iwae_grads.keys() and len(elbo_grads) >= 4
    for name in elbo_grads:
        assert torch.allclose(elbo_grads[name], iwae_grads[name], rtol=1e-4, atol=1e-6), name


def test_a_latent_weight_of_zero_leaves_the_reconstruction_alone(device):
    model, guide, x = _pair(device)
    step = TrainStep(model, guide, SyncFreeTrace_ELBO(), Adam(1e-3))
    step.latent_weight.value = 0.0
    pyro.set_rng_seed(3)
    value = step.evaluate(x)
    pyro.set_rng_seed(3)
    recon = evaluate.log_weight_terms(model, guide, x, num_samples=1, nesting=1).log_lik.mean().item()
    assert value == pytest.approx(-recon, rel=1e-6)
    step.latent_weight.value = 1.0
    pyro.set_rng_seed(3)
    value = step.evaluate(x)
    pyro.set_rng_seed(3)
    assert value == pytest.approx(-evaluate.log_weight_terms(model, guide, x, nesting=1).log_weight.mean().item(),
                                  rel=1e-6)


@pytest.mark.parametrize("objective", ["iwae", "dreg"])
def test_fit_trains_with_the_bound_and_the_warm_up_schedule(device, objective):
    model, guide, x = _pair(device)
    x = torch.rand(96, 12, device=device).bernoulli()
    before = [p.detach().clone() for p in guide.parameters()]
    result = vi_lab.fit(model, guide, x, objective=objective, num_particles=4, kl_warmup=2, epochs=3,
                        batch_size=32, progress=False, eval_data=x[:16])
    weights = [h["kl_weight"] for h in result.history]
    assert weights == pytest.approx([0.5, 1.0, 1.0])  # 3 steps per epoch, linear over 6 steps
    assert all(h["train_bound"] >= h["train_elbo"] for h in result.history)
    assert any(not torch.equal(b, p) for b, p in zip(before, guide.parameters()))
    plain = vi_lab.fit(*_pair(device)[:2], x, epochs=1, batch_size=32, progress=False)
    assert "kl_weight" not in plain.history[0] and "train_bound" not in plain.history[0]


def test_the_objective_cannot_change_on_resume(device, tmp_path):
    model, guide, x = _pair(device)
    vi_lab.fit(model, guide, x, objective="iwae", num_particles=2, epochs=1, batch_size=16, progress=False,
               checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="objective='iwae' then, objective='elbo' now"):
        vi_lab.fit(model, guide, x, num_particles=2, epochs=2, batch_size=16, progress=False,
                   checkpoint_dir=tmp_path, resume=True)


def test_bad_objectives_and_warm_ups_are_refused_clearly(device):
    model, guide, x = _pair(device)
    with pytest.raises(ValueError, match="unknown objective 'renyi'; valid: elbo, iwae, dreg"):
        vi_lab.fit(model, guide, x, objective="renyi", epochs=1, progress=False)
    with pytest.raises(ValueError, match="leave loss .* estimator .* at their defaults"):
        vi_lab.fit(model, guide, x, objective="iwae", estimator="reinforce", epochs=1, progress=False)
    for bad in (-1, float("inf"), "2", True):
        with pytest.raises(ValueError, match="kl_warmup must be a number of epochs >= 0"):
            vi_lab.fit(model, guide, x, kl_warmup=bad, epochs=1, progress=False)
    with pytest.raises(ValueError, match="has no KL term to warm up"):
        vi_lab.fit(model, guide, x, loss="wake_sleep", kl_warmup=1, epochs=1, progress=False)
    with pytest.raises(ValueError, match="num_particles must be a positive integer"):
        ImportanceWeighted(0)


def test_a_guide_that_is_not_reparameterized_is_refused(device):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=x.new_zeros(3)))
            pyro.sample("x", dist.Normal(c.float(), 1.0), obs=x)

    def guide(x):
        logits = pyro.param("logits", x.new_zeros(3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Categorical(logits=logits))

    with pytest.raises(ValueError, match="site 'c' \\(Categorical\\) is not"):
        vi_lab.fit(model, guide, torch.randn(8, device=device), objective="dreg", num_particles=2, epochs=1,
                   progress=False)


def test_vi_lab_train_takes_objective_and_kl_warmup(tmp_path, tiny_args, example_args, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_args, "--hidden", "16", "--latent-dim", "4", "--objective", "iwae",
                 "--num-particles", "3", "--kl-warmup", "2", "--out", str(out), *example_args]) == 0
    printed = capsys.readouterr().out
    assert "train iwae bound, K=3 (last epoch)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["objective"] == "iwae" and metrics["history"][0]["kl_weight"] == pytest.approx(0.5)
    with pytest.raises(SystemExit):
        main(["train", *tiny_args, "--objective", "renyi"])


def test_dreg_refuses_a_flow_without_inverse_and_iwae_trains_it(device):
    model, _, x = _pair(device)
    planar = vi_lab.make_guide("planar", latent_dim=4, hidden=[16], x_dim=12).to(device)
    with pytest.raises(ValueError, match="cannot score a z it did not draw itself .* use objective='iwae'"):
        vi_lab.fit(model, planar, x, objective="dreg", num_particles=2, epochs=1, progress=False)
    assert vi_lab.fit(model, planar, x, objective="iwae", num_particles=2, epochs=1, progress=False).history


def test_the_bound_ignores_scales_other_than_the_latent_weights(device):
    # a pair's own poutine.scale (a subsampling factor N/B, say) must not enter the log-sum-exp
    model, guide, x = _pair(device)
    for dreg in (False, True):
        values = []
        for m in (model, pyro.poutine.scale(model, scale=7.0)):
            pyro.set_rng_seed(1)
            values.append(ImportanceWeighted(3, dreg=dreg)(m, pyro.poutine.scale(guide, scale=7.0)
                                                           if m is not model else guide, x))
        assert torch.allclose(values[0], values[1])
