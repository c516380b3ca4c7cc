"""Discrete-latent VAEs against exact sums over their latent space."""

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

import vi_lab
from vi_lab import evaluate
from vi_lab.infer import training_objective
from vi_lab.guides.discrete import MAX_ENUM_BITS, BernoulliGuide, BinaryVector, CategoricalGuide
from vi_lab.models.discrete import CategoricalVAE, SigmoidBeliefVAE


def small_sbn(device, units=3):
    return (SigmoidBeliefVAE(units, (5,), x_dim=6).to(device),
            BernoulliGuide.make(units, hidden=(5,), x_dim=6).to(device))


def small_categorical(device, k=4):
    return CategoricalVAE(k, (5,), x_dim=6).to(device), CategoricalGuide.make(k, hidden=(5,), x_dim=6).to(device)


def all_states(model, device):
    """Every latent value, shape (S, D), on ``device``: all binary vectors, or all one-hot vectors."""
    d = model.latent_dim
    if isinstance(model, CategoricalVAE):
        return torch.eye(d, device=device)
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), device=device)


@torch.no_grad()
def exact_log_joint(model, x):
    """log p(x, z) for every z, shape (S, B), by brute force."""
    zs = all_states(model, x.device)
    out = []
    for z in zs:
        zb = z.expand(x.shape[0], -1)
        out.append(model.likelihood(model.decoder(zb)).log_prob(x) + model.prior(x).log_prob(zb))
    return torch.stack(out)


@torch.no_grad()
def exact_elbo(model, guide, x):
    """sum_z q(z | x) [log p(x, z) - log q(z | x)], shape (B,)."""
    q = guide.get_posterior(x)
    zs = all_states(model, x.device)
    log_q = torch.stack([q.log_prob(z.expand(x.shape[0], -1)) for z in zs])  # (S, B)
    return (log_q.exp() * (exact_log_joint(model, x) - log_q)).sum(0)


@pytest.mark.parametrize("make", [small_sbn, small_categorical], ids=["sbn", "categorical"])
def test_enumerated_elbo_equals_brute_force_sum(make, device):
    model, guide = make(device)
    x = torch.rand(5, 6, device=device).bernoulli()
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(
        training_objective(model), training_objective(lambda x: _enumerated(guide, x)), x)
    assert -loss == pytest.approx(exact_elbo(model, guide, x).mean().item(), abs=1e-5)


def _enumerated(guide, x):
    from vi_lab.estimators import DeclareInfer

    with DeclareInfer("enumerate", lambda msg: "parallel"):
        return guide(x)


@pytest.mark.parametrize("make", [small_sbn, small_categorical], ids=["sbn", "categorical"])
def test_monte_carlo_evaluators_match_exact_sums(make, device):
    model, guide = make(device)
    x = torch.rand(4, 6, device=device).bernoulli()
    exact_ll = exact_log_joint(model, x).logsumexp(0)  # log p(x) = log sum_z p(x, z)
    elbo_hat = evaluate.elbo(model, guide, x, num_samples=4000)
    ll_hat = evaluate.log_likelihood(model, guide, x, num_samples=4000)
    assert torch.allclose(elbo_hat, exact_elbo(model, guide, x), atol=0.06)
    assert torch.allclose(ll_hat, exact_ll, atol=0.03)
    assert (exact_elbo(model, guide, x) <= exact_ll + 1e-6).all()


def test_sbn_prior_is_the_learned_factorized_bernoulli(device):
    model, _ = small_sbn(device, units=4)
    with torch.no_grad():
        model.prior_logits.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0], device=device))
    x = torch.zeros(2, 6, device=device)
    z = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]], device=device)
    expected = (z * torch.nn.functional.logsigmoid(model.prior_logits)
                + (1 - z) * torch.nn.functional.logsigmoid(-model.prior_logits)).sum(-1)
    assert torch.allclose(model.prior(x).log_prob(z), expected)
    draws = model.prior(torch.zeros(20000, 6, device=device)).sample()
    assert torch.allclose(draws.mean(0), torch.sigmoid(model.prior_logits).detach(), atol=0.015)


def test_binary_vector_lists_every_state_once(device):
    q = BinaryVector(dist.Bernoulli(logits=torch.randn(7, 4, device=device)), 1)
    support = q.enumerate_support(expand=False)
    assert support.shape == (16, 1, 4)
    assert len({tuple(v.tolist()) for v in support.reshape(16, 4)}) == 16
    assert support.device.type == device.type
    assert torch.allclose(q.log_prob(support).exp().sum(0), torch.ones(7, device=device))  # a full partition
    big = torch.zeros(2, MAX_ENUM_BITS + 1, device=device)
    assert not BinaryVector(dist.Bernoulli(logits=big), 1).has_enumerate_support


def test_samples_and_prototypes_are_pictures(device):
    model, _ = small_categorical(device, k=3)
    assert model.prototypes().shape == (3, 6)
    for m in (model, small_sbn(device)[0]):
        pics = m.sample(5)
        assert pics.shape == (5, 6) and ((pics >= 0) & (pics <= 1)).all()
    with pytest.raises(ValueError, match="num_categories must be an integer >= 2"):
        CategoricalVAE(1)


def test_enum_training_recovers_two_prototypes(device):
    """Two binary patterns, two categories: the optimum is log p(x) = log 1/2 with q exact."""
    a, b = torch.tensor([1.0, 1, 1, 0, 0, 0], device=device), torch.tensor([0.0, 0, 0, 1, 1, 1], device=device)
    x = torch.stack([a, b] * 16)
    model, guide = CategoricalVAE(2, (8,), x_dim=6), CategoricalGuide.make(2, hidden=(8,), x_dim=6)
    vi_lab.fit(model, guide, x, estimator="enum", epochs=15, batch_size=8, lr=0.05, progress=False)
    elbo = exact_elbo(model, guide, x).mean().item()
    assert elbo > -0.693 - 0.1  # within 0.1 nat of the best possible ELBO, log(1/2)
    protos = model.prototypes()
    assert {tuple(p.round().tolist()) for p in protos} == {tuple(a.tolist()), tuple(b.tolist())}
