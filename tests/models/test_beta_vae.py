"""beta-VAE: beta is a scale on the latent site of model and guide, so the loss is
-E_q[log p(x|z)] + beta * E_q[log q(z|x) - log p(z)] on the very same draws."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from vi_lab import fit
from vi_lab.guides import make_guide
from vi_lab.infer import training_objective
from vi_lab.models import VAE


def pair(beta: float, device: torch.device):
    pyro.set_rng_seed(11)  # the same initial weights for every beta (made on the CPU, then moved)
    return (VAE(2, [8], x_dim=6, beta=beta).to(device),
            make_guide("mean_field", latent_dim=2, hidden=[8], x_dim=6).to(device))


X = torch.tensor([[1.0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 1, 1], [1, 1, 1, 0, 0, 1]])


def loss_and_grads(beta: float, device: torch.device, elbo=Trace_ELBO, scales: dict | None = None):
    model, guide = pair(beta, device)
    scales = model.site_scales if scales is None else scales
    pyro.set_rng_seed(5)
    loss = elbo().differentiable_loss(training_objective(model, scales), training_objective(guide, scales),
                                      X.to(device))
    params = [*model.parameters(), *guide.parameters()]
    return loss.item(), torch.autograd.grad(loss, params, allow_unused=True), model, guide


def test_beta_one_reproduces_the_plain_vae_exactly(device):
    plain, plain_grads, *_ = loss_and_grads(1.0, device)
    # force the scaling path with a scale of exactly 1: nothing may change
    scaled, scaled_grads, *_ = loss_and_grads(1.0, device, scales={"z": 1.0})
    assert scaled == plain
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, scaled_grads))


def test_beta_one_trains_exactly_like_the_plain_vae(device):
    x = torch.bernoulli(torch.full((60, 6), 0.4, device=device))
    runs = []
    for beta in (None, 1.0):
        pyro.set_rng_seed(11)
        model = VAE(2, [8], x_dim=6) if beta is None else VAE(2, [8], x_dim=6, beta=beta)
        guide = make_guide("mean_field", latent_dim=2, hidden=[8], x_dim=6)
        runs.append(fit(model, guide, x, epochs=2, batch_size=20, lr=0.01, progress=False))
    assert [h["train_elbo"] for h in runs[0].history] == [h["train_elbo"] for h in runs[1].history]


def test_beta_zero_leaves_only_the_reconstruction_term(device):
    loss, _, model, guide = loss_and_grads(0.0, device)
    x = X.to(device)
    # the same draw z ~ q(z | x), replayed
    pyro.set_rng_seed(5)
    z = guide.get_posterior(x).rsample()
    reconstruction = model.likelihood(model.decoder(z)).log_prob(x)  # (B,)
    assert loss == pytest.approx(-reconstruction.mean().item(), abs=1e-5)
    # and the prior no longer matters to the guide: its gradient is the reconstruction's alone
    kl_free = -reconstruction.mean()
    grads = torch.autograd.grad(kl_free, list(guide.parameters()))
    _, all_grads, _, _ = loss_and_grads(0.0, device)
    guide_grads = all_grads[len(list(model.parameters())):]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, guide_grads))


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO], ids=["monte_carlo_kl", "analytic_kl"])
def test_loss_is_linear_in_beta_on_the_same_draws(elbo, device):
    # loss(beta) = -reconstruction + beta * KL: the KL term is what beta weighs
    l0, l1, l4 = (loss_and_grads(b, device, elbo)[0] for b in (0.0, 1.0, 4.0))
    kl = l1 - l0
    if elbo is TraceMeanField_ELBO:
        assert kl > 0  # the analytic KL(q || p) of an encoder that is not the prior
    assert l4 == pytest.approx(l0 + 4 * kl, abs=1e-4)
