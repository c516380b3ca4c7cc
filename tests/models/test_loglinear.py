"""Log-linear latent-class models: exact answers by brute-force enumeration, and Pyro's view.

Everything is checked in float64 against sums written out over every (x, z) pair, or
against pyro.distributions, never against the model's own formulas. Models and their data
sit on the device under test; the hand-written references are computed on the CPU.
"""

import itertools

import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from vi_lab.models.loglinear import BernoulliMixture, LogLinearLatentClass, empty_guide, enum_elbo

D64 = torch.float64


def small_general(device, seed=0, num_obs=7, K=3, d=4):
    """The model on ``device``; its F, w, prior as drawn, on the CPU (for the references)."""
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(num_obs, K, d, generator=g, dtype=D64)
    w = torch.randn(d, generator=g, dtype=D64)
    prior = torch.softmax(torch.randn(K, generator=g, dtype=D64), 0)
    return LogLinearLatentClass(F, w, prior=prior).to(device), F, w, prior


def small_mixture(device, seed=0, K=3, D=4):
    """The model on ``device``; its W and prior as drawn, on the CPU (for the references)."""
    g = torch.Generator().manual_seed(seed)
    W = 2 * torch.randn(K, D, generator=g, dtype=D64)
    prior = torch.softmax(torch.randn(K, generator=g, dtype=D64), 0)
    return BernoulliMixture(K, D, weights=W, prior=prior, dtype=D64).to(device), W, prior


def all_binary(D, device="cpu"):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=D)), dtype=D64, device=device)  # (2^D, D)


def brute_joint(F, w, prior, x):
    """log p(x, z) written out from the definition: exp(w.f(x,z)) / sum_x' exp(w.f(x',z)) * p(z)."""
    num_obs, K, _ = F.shape
    out = torch.empty(len(x), K, dtype=D64)
    for n, xn in enumerate(x.tolist()):
        for z in range(K):
            norm = sum(torch.exp(F[xp, z] @ w) for xp in range(num_obs))
            out[n, z] = F[xn, z] @ w - torch.log(norm) + torch.log(prior[z])
    return out


# ------------------------------------------------------------------ general model

def test_general_log_joint_posterior_and_marginal_match_the_definition(device):
    model, F, w, prior = small_general(device)
    x = torch.tensor([0, 3, 6, 3, 1], device=device)
    expected = brute_joint(F, w, prior, x)
    torch.testing.assert_close(model.log_joint(x).cpu(), expected)
    torch.testing.assert_close(model.log_marginal(x).cpu(), torch.log(expected.exp().sum(1)))
    torch.testing.assert_close(model.posterior(x).probs.cpu(), expected.exp() / expected.exp().sum(1, keepdim=True))


def test_general_marginal_sums_to_one_over_the_observation_space(device):
    model, *_ = small_general(device, num_obs=9)
    total = model.log_marginal(torch.arange(9, device=device)).exp().sum()
    assert abs(total.item() - 1.0) < 1e-12


def test_expected_features_are_the_model_feature_expectations(device):
    model, F, w, _ = small_general(device)
    p = torch.softmax(F @ w, dim=0)  # (|X|, K): p(x | z)
    expected = torch.stack([(p[:, z, None] * F[:, z]).sum(0) for z in range(F.shape[1])])
    torch.testing.assert_close(model.expected_features().cpu(), expected)


def test_expected_log_lik_gradient_is_data_counts_minus_model_counts(device):
    # the notes' M-step gradient: E[f(x, Z) | x] over the data minus N_z E[f(X, z) | z]
    model, F, _, _ = small_general(device)
    x = torch.tensor([0, 1, 1, 4, 6, 2, 2, 2], device=device)
    with torch.no_grad():
        resp = model.posterior(x).probs  # (B, K)
    stats = model.expected_stats(x, resp)
    model.expected_log_lik(stats).backward()
    data_counts = torch.einsum("nk,nkd->d", resp, F.to(device)[x])
    model_counts = torch.einsum("k,kd->d", resp.sum(0), model.expected_features().detach())
    torch.testing.assert_close(model.w.grad, data_counts - model_counts)


def test_from_function_builds_the_feature_tensor():
    words = ["a", "b", "c"]

    def f(x, z):
        return [float(x == "a" and z == 0), float(x == "b" and z == 1), float(z == 1)]

    model = LogLinearLatentClass.from_function(f, words, num_classes=2)
    assert model.features.shape == (3, 2, 3)
    assert model.features[0, 0].tolist() == [1.0, 0.0, 0.0]
    assert model.features[1, 1].tolist() == [0.0, 1.0, 1.0]
    assert model.features[2, 0].tolist() == [0.0, 0.0, 0.0]


def test_general_sampling_follows_the_model(device):
    model, *_ = small_general(device, num_obs=5, K=2)
    x, z = model.sample(40000, generator=torch.Generator(device=device).manual_seed(1))
    freq = torch.bincount(x, minlength=5).double() / len(x)
    exact = model.log_marginal(torch.arange(5, device=device)).exp().detach()
    assert (freq - exact).abs().max() < 0.01  # ~4 standard errors at n = 40000
    prior_freq = torch.bincount(z, minlength=2).double() / len(z)
    assert (prior_freq - model.log_prior().exp().detach()).abs().max() < 0.01


# ------------------------------------------------------------- factorized model

def test_mixture_equals_the_general_model_with_pixel_class_features(device):
    # f(x, z)_{k,d} = 1{z = k} x_d over all 2^D binary images: the general model with an
    # enumerated normalizer must give the same numbers as the factorized one
    K, D = 3, 4
    mix, W, prior = small_mixture(device, K=K, D=D)
    X = all_binary(D, device)  # (16, D)
    F = torch.einsum("zk,xd->xzkd", torch.eye(K, dtype=D64, device=device), X).reshape(len(X), K, K * D)
    general = LogLinearLatentClass(F, W.reshape(-1), prior=prior).to(device)
    torch.testing.assert_close(mix.log_joint(X), general.log_joint(torch.arange(len(X), device=device)))
    assert abs(mix.log_marginal(X).exp().sum().item() - 1.0) < 1e-12


def test_mixture_component_log_prob_equals_pyro_bernoulli(device):
    mix, W, _ = small_mixture(device, K=4, D=6)
    x = all_binary(6)[::5]
    expected = dist.Bernoulli(logits=W).to_event(1).log_prob(x[:, None, :])  # (B, K)
    torch.testing.assert_close(mix.component_log_prob(x.to(device)).cpu(), expected)


def test_mixture_expected_log_lik_equals_the_weighted_sum(device):
    mix, W, _ = small_mixture(device, K=3, D=5)
    x = all_binary(5)
    resp = torch.softmax(torch.randn(len(x), 3, dtype=D64), -1)
    brute = (resp * dist.Bernoulli(logits=W).to_event(1).log_prob(x[:, None, :])).sum()
    stats = mix.expected_stats(x.to(device), resp.to(device))
    torch.testing.assert_close(mix.expected_log_lik(stats).cpu(), brute)


def test_mixture_templates_and_sampling(device):
    mix, W, prior = small_mixture(device, K=2, D=3)
    torch.testing.assert_close(mix.templates().cpu(), torch.sigmoid(W))
    x, z = mix.sample(30000, generator=torch.Generator(device=device).manual_seed(2))
    for k in range(2):
        assert (x[z == k].mean(0).cpu() - torch.sigmoid(W[k])).abs().max() < 0.02


# ------------------------------------------------------------------ Pyro's view

@pytest.mark.parametrize("kind", ["general", "mixture"])
def test_trace_enum_elbo_equals_exact_log_likelihood(kind, device):
    if kind == "general":
        model = small_general(device)[0]
        x = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6, 2], device=device)
    else:
        model = small_mixture(device, K=3, D=6)[0]
        x = all_binary(6, device)[::3]
    exact = model.log_marginal(x).sum().item()
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model, empty_guide, x)
    assert abs(-loss - exact) < 1e-9 * abs(exact)
    assert abs(-enum_elbo().loss(model, empty_guide, x) - exact) < 1e-9 * abs(exact)


def test_pyro_gradients_equal_exact_gradients(device):
    # differentiable_loss of TraceEnum_ELBO and the enumeration give the same gradient
    model = small_mixture(device, K=3, D=5)[0]
    x = all_binary(5, device)[::2]
    g_pyro = torch.autograd.grad(TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, empty_guide, x),
                                 [model.W, model.prior_logits])
    g_exact = torch.autograd.grad(-model.log_marginal(x).sum(), [model.W, model.prior_logits])
    for a, b in zip(g_pyro, g_exact):
        torch.testing.assert_close(a, b)


def test_pyro_model_keeps_the_data_plate_contract(device):
    import pyro.poutine as poutine

    model = small_mixture(device, K=3, D=4)[0]
    x = all_binary(4, device)[:5]
    trace = poutine.trace(model).get_trace(x)
    for name in ("z", "x"):
        frames = trace.nodes[name]["cond_indep_stack"]
        assert [f.name for f in frames] == ["data"] and frames[0].dim == -1 and frames[0].size == 5
    assert trace.nodes["z"]["infer"]["enumerate"] == "parallel"


# -------------------------------------------------------------------- bad input

@pytest.mark.parametrize("features, match", [
    (torch.randn(5, 3), "shape \\(num_observations, num_classes, num_features\\)"),
    (torch.randn(5, 0, 2), "no empty dimension"),
    ([[1.0]], "features must be a tensor"),
    (torch.full((2, 2, 2), float("nan")), "finite"),
])
def test_bad_features_are_refused(features, match):
    with pytest.raises(ValueError, match=match):
        LogLinearLatentClass(features)


def test_bad_weights_and_prior_are_refused():
    F = torch.randn(4, 2, 3)
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
        LogLinearLatentClass(F, torch.zeros(4))
    with pytest.raises(ValueError, match="prior must be 2 non-negative probabilities summing to 1"):
        LogLinearLatentClass(F, prior=torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match=r"weights must have shape \(num_classes, x_dim\) = \(2, 3\)"):
        BernoulliMixture(2, 3, weights=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="fixed length d"):
        LogLinearLatentClass.from_function(lambda x, z: [1.0] * (z + 1), [0, 1], num_classes=2)


@pytest.mark.parametrize("x, match", [
    (torch.tensor([0, 7]), r"outside the observation space: indices must lie in \[0, 7\)"),
    (torch.tensor([-1, 2]), "outside the observation space"),
    (torch.tensor([0.5, 1.0]), "integer observation indices"),
    (torch.tensor([[0, 1]]), "1-D tensor of observation indices"),
])
def test_general_refuses_x_outside_the_observation_space(x, match, device):
    model = small_general(device)[0]
    with pytest.raises(ValueError, match=match):
        model.log_marginal(x.to(device))


@pytest.mark.parametrize("x, match", [
    (torch.full((2, 4), 0.5, dtype=D64), r"outside the observation space \{0, 1\}\^D"),
    (torch.zeros(2, 5, dtype=D64), r"must be a \(B, 4\) tensor"),
    (torch.zeros(4, dtype=D64), r"must be a \(B, 4\) tensor"),
])
def test_mixture_refuses_x_outside_the_observation_space(x, match, device):
    model = small_mixture(device, K=2, D=4)[0]
    with pytest.raises(ValueError, match=match):
        model.log_joint(x.to(device))
