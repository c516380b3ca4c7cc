"""The pairwise log-linear latent-class model: an exact normalizer by enumeration, and EM on it.

Exact answers: brute-force Python sums over {0,1}^d, the factorized mixture when the
pairwise weights are zero, autograd through an unchunked log-sum-exp, moment matching at
the (concave, K = 1) optimum.
"""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from vi_lab.data import binarize, load_dataset
from vi_lab.em import e_step, em
from vi_lab.models.loglinear import BernoulliMixture, empty_guide, enum_elbo
from vi_lab.models.loglinear_pairwise import (MAX_ENUMERATED_BITS, PairwiseMixture, all_pairs, binary_configurations,
                                              grid_edges, log_normalizer, random_patches)

D64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def pairwise_truth(K=2, d=6, edges="all", scale=1.5, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    model = PairwiseMixture(K, d, edges=edges)
    W = scale * torch.randn(model.W.shape, generator=g, dtype=D64)
    prior = torch.softmax(torch.randn(K, generator=g, dtype=D64), 0)
    return PairwiseMixture(K, d, edges=edges, weights=W.to(device), prior=prior.to(device))


def sample_data(truth, n, seed, device):
    x, _ = truth.sample(n, generator=torch.Generator().manual_seed(seed))
    return x.to(device)


def brute_force_log_z(W, edges, d):
    """log sum_x exp(W[k] . phi(x)) with a Python loop over every configuration."""
    out = []
    for w in W.tolist():
        scores = []
        for bits in itertools.product([0, 1], repeat=d):
            phi = list(bits) + [bits[i] * bits[j] for i, j in edges.tolist()]
            scores.append(sum(a * b for a, b in zip(w, phi)))
        top = max(scores)
        out.append(top + math.log(sum(math.exp(s - top) for s in scores)))
    return out


# ----------------------------------------------------------------- the normalizer

@pytest.mark.parametrize("d, edges", [(4, "all"), (4, "grid"), (5, "all"), (9, "grid")])
def test_normalizer_equals_a_brute_force_loop(d, edges, device):
    model = pairwise_truth(K=3, d=d, edges=edges, scale=3.0, device=device)
    expected = torch.tensor(brute_force_log_z(model.W.detach().cpu(), model.edges.cpu(), d), dtype=D64)
    torch.testing.assert_close(model.log_normalizer().detach().cpu(), expected, rtol=1e-12, atol=1e-10)
    # chunks that do not divide 2^d, and large weights: the streaming log-sum-exp stays exact
    with torch.no_grad():
        for chunk in (1, 3, 7):
            torch.testing.assert_close(log_normalizer(model.W, model.edges, d, chunk=chunk).cpu(), expected,
                                       rtol=1e-12, atol=1e-10)
        big = 200.0 * model.W
        assert torch.isfinite(log_normalizer(big, model.edges, d, chunk=5)).all()


def test_probabilities_sum_to_one_over_x(device):
    model = pairwise_truth(K=3, d=6, edges="all", device=device)
    configs = binary_configurations(6, device=device)  # (64, 6)
    with torch.no_grad():
        per_class = model.component_log_prob(configs)  # (64, 3)
        torch.testing.assert_close(per_class.logsumexp(0), torch.zeros(3, dtype=D64, device=device), atol=1e-12, rtol=0)
        assert abs(model.log_prob_table().logsumexp(0).item()) < 1e-12


def test_zero_pairwise_weights_give_the_bernoulli_mixture(device):
    g = torch.Generator().manual_seed(1)
    K, d = 3, 9
    U = 2 * torch.randn(K, d, generator=g, dtype=D64).to(device)
    prior = torch.tensor([0.2, 0.3, 0.5], dtype=D64, device=device)
    mixture = BernoulliMixture(K, d, weights=U, prior=prior, dtype=D64)
    x = binary_configurations(d, device=device)
    grid = PairwiseMixture(K, d, edges="grid", prior=prior,
                           weights=torch.cat([U, torch.zeros(K, len(grid_edges(d)), dtype=D64, device=device)], 1))
    unary = PairwiseMixture(K, d, edges="none", weights=U, prior=prior)
    with torch.no_grad():
        expected = mixture.log_marginal(x)
        torch.testing.assert_close(grid.log_marginal(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(unary.log_marginal(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grid.log_normalizer(), mixture.log_normalizer(), rtol=1e-12, atol=1e-12)


def test_the_cached_normalizer_follows_every_change_of_w(device):
    model = pairwise_truth(K=2, d=4, device=device)
    x = binary_configurations(4, device=device)
    with torch.no_grad():
        before = model.log_marginal(x)
        model.W.data.mul_(0.5)  # behind autograd's back: the version counter does not move
        after = model.log_marginal(x)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(model.log_normalizer(),
                                   torch.tensor(brute_force_log_z(model.W.cpu(), model.edges.cpu(), 4), dtype=D64,
                                                device=device))


# -------------------------------------------------------------------- M-step

def test_m_step_gradient_is_data_counts_minus_model_counts_and_equals_autograd(device):
    truth = pairwise_truth(K=3, d=5, device=device)
    x = sample_data(truth, 300, 2, device)
    model = pairwise_truth(K=3, d=5, seed=7, device=device)
    _, stats = e_step(model, x)
    model.zero_grad()
    model.expected_log_lik(stats).backward()
    analytic = model.W.grad.clone()

    # the reference: autograd through the plain definition, one unchunked log-sum-exp over
    # all 2^d configurations, the data scored one by one
    W = model.W.detach().clone().requires_grad_(True)
    configs = binary_configurations(5, device=device)  # (32, 5)
    i, j = model.edges.T
    phi_all = torch.cat([configs, configs[:, i] * configs[:, j]], 1)  # (32, F)
    log_z = (phi_all @ W.T).logsumexp(0)  # (K,)
    phi_x = torch.cat([x, x[:, i] * x[:, j]], 1)  # (N, F)
    with torch.no_grad():
        resp = (phi_x @ model.W.T - log_z.detach() + model.log_prior()).softmax(-1)  # (N, K)
    reference = (resp * (phi_x @ W.T - log_z)).sum()
    reference.backward()
    torch.testing.assert_close(analytic, W.grad, rtol=1e-10, atol=1e-10)
    # and it is the notes' "expected counts in the data minus the counts the model expects"
    counts = stats["features"] - stats["counts"][:, None] * model.expected_features()
    torch.testing.assert_close(analytic, counts, rtol=1e-10, atol=1e-10)


def test_a_single_class_fit_matches_the_datas_feature_means(device):
    # K = 1 is a fully visible pairwise model: its log-likelihood is concave, and at the
    # maximum the model's expected features equal the data's (moment matching)
    truth = pairwise_truth(K=1, d=6, device=device)
    x = sample_data(truth, 2000, 3, device)
    model = PairwiseMixture(1, 6, edges="all")
    em(model, x, max_iters=3, tol=0.0, inner_steps=50, restarts=1)
    data_means = model.features(x).mean(0)
    torch.testing.assert_close(model.expected_features()[0], data_means, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------- EM

def test_em_never_decreases_the_log_likelihood(device):
    truth = pairwise_truth(K=3, d=6, device=device)
    x = sample_data(truth, 1000, 4, device)
    result = em(PairwiseMixture(3, 6, edges="all"), x, max_iters=15, tol=0.0, inner_steps=5, restarts=2, seed=3)
    assert len(result.runs) == 2
    for run in result.runs:
        diffs = torch.diff(torch.tensor(run.log_likelihoods, dtype=D64))
        assert diffs.min().item() >= -1e-10, f"log-likelihood decreased by {-diffs.min().item():.3g}"
        assert run.log_likelihoods[-1] > run.log_likelihoods[0]
    assert result.log_likelihood == max(r.final for r in result.runs)
    # the kept parameters are the best restart's: its log-likelihood recomputed from scratch
    assert abs(result.model.log_marginal(x).mean().item() - result.log_likelihood) < 1e-10


def test_a_reckless_inner_step_is_rejected_and_the_log_likelihood_still_never_decreases(device):
    truth = pairwise_truth(K=2, d=5, device=device)
    x = sample_data(truth, 500, 5, device)
    result = em(PairwiseMixture(2, 5, edges="all"), x, max_iters=6, tol=0.0, inner_optimizer="gd", inner_steps=2,
                inner_lr=500.0, restarts=1)
    assert result.runs[0].rejected_m_steps > 0
    assert min(torch.diff(torch.tensor(result.history, dtype=D64))).item() >= -1e-10


def test_svi_with_enumeration_gives_the_exact_log_likelihood(device):
    # the model is a Pyro model: with z enumerated and an empty guide, TraceEnum's ELBO is log p(x)
    truth = pairwise_truth(K=3, d=4, device=device)
    x = sample_data(truth, 50, 6, device)
    pyro.clear_param_store()
    loss = enum_elbo().differentiable_loss(truth, empty_guide, x)
    torch.testing.assert_close(-loss.detach(), truth.log_marginal(x).sum().detach(), rtol=1e-10, atol=1e-8)


def test_samples_follow_the_enumerated_probabilities():
    truth = pairwise_truth(K=2, d=3)
    x, _ = truth.sample(40000, generator=torch.Generator().manual_seed(0))
    index = (x.long() * (2 ** torch.arange(3))).sum(1)
    freq = torch.bincount(index, minlength=8).double() / len(x)
    torch.testing.assert_close(freq, truth.log_prob_table().exp(), atol=0.01, rtol=0)


def test_pairwise_features_beat_the_factorized_model_on_held_out_mnist_patches(device):
    g = torch.Generator().manual_seed(0)
    train = random_patches(binarize(load_dataset("mnist", "train", device=device).images[:2000], "static", seed=0),
                           3, 4000, generator=g).double()
    test = random_patches(binarize(load_dataset("mnist", "test", device=device).images[:1000], "static", seed=1),
                          3, 2000, generator=g).double()
    held_out = {}
    for name, model in (("factorized", BernoulliMixture(2, 9, dtype=D64)), ("pairwise", PairwiseMixture(2, 9))):
        em(model, train, max_iters=20, restarts=1, seed=0)
        held_out[name] = model.log_marginal(test).mean().item()
    # neighbouring pixels of a stroke are strongly correlated: a fraction of a nat per 9 pixels
    assert held_out["pairwise"] > held_out["factorized"] + 0.05, held_out


def test_random_patches_are_the_images_own_pixels():
    images = torch.arange(2 * 16, dtype=D64).reshape(2, 16)  # two 4x4 "images" with distinct values
    patches = random_patches(images, 2, 50, generator=torch.Generator().manual_seed(0), image_shape=(4, 4))
    assert patches.shape == (50, 4)
    # each patch is [a, a+1, a+4, a+5] for its top-left pixel a
    a = patches[:, 0]
    torch.testing.assert_close(patches, torch.stack([a, a + 1, a + 4, a + 5], 1))


# ------------------------------------------------------------------ bad input

def test_bad_input_gets_a_clear_error(device):
    with pytest.raises(ValueError, match=rf"too large to enumerate.*2\^{MAX_ENUMERATED_BITS + 1}.*limit"):
        PairwiseMixture(2, MAX_ENUMERATED_BITS + 1, edges="none")
    with pytest.raises(ValueError, match="not a perfect square"):
        PairwiseMixture(2, 6, edges="grid")
    with pytest.raises(ValueError, match=r"unknown edges 'ring'; valid: \['all', 'grid', 'none'\]"):
        PairwiseMixture(2, 4, edges="ring")
    with pytest.raises(ValueError, match="distinct pixel pairs"):
        PairwiseMixture(2, 4, edges=torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="distinct pixel pairs"):
        PairwiseMixture(2, 4, edges=torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match=r"weights must have shape .* \(2, 10\)"):
        PairwiseMixture(2, 4, edges="all", weights=torch.zeros(2, 4))
    model = PairwiseMixture(2, 4, edges="all")
    with pytest.raises(ValueError, match=r"outside the observation space \{0, 1\}\^D: binarize"):
        em(model, torch.full((10, 4), 0.5, dtype=D64, device=device))
    with pytest.raises(ValueError, match=r"x must be a \(B, 4\) tensor"):
        model.log_marginal(torch.zeros(10, 5, dtype=D64, device=device))
    assert all_pairs(4).shape == (6, 2)


# --------------------------------------------------------------- the example

def test_example_runs_with_the_smallest_settings(tmp_path, example_args):
    out = tmp_path / "pairwise.json"
    cmd = [sys.executable, str(ROOT / "examples" / "loglinear_pairwise.py"), "--patch", "2", "--classes", "1", "2",
           "--train-size", "300", "--eval-size", "100", "--em-iters", "3", "--restarts", "1", "--threads", "1",
           "--out", str(out), *example_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["features"], r["K"]) for r in report["results"]}
    assert rows == {(f, k) for f in ("factorized", "grid", "all") for k in (1, 2)}
    assert all(r["test_log_likelihood"] < 0 for r in report["results"])
    assert report["units"].startswith("nats per patch") and "date" in report and "command" in report
    assert "held-out log-lik" in proc.stdout


def test_restarts_on_data_with_repeated_rows_start_from_distinct_classes():
    # small patches repeat (half of MNIST's are empty): two classes drawn at the same
    # datapoint would stay identical under EM forever, so repeats are nudged apart
    x = torch.zeros(100, 9, dtype=D64)
    x[0] = 1
    for model in (PairwiseMixture(4, 9), BernoulliMixture(4, 9, dtype=D64)):
        model.reset_parameters(torch.Generator().manual_seed(0), x)
        W = model.W.detach()[:, :9]
        assert all(not torch.equal(W[a], W[b]) for a in range(4) for b in range(a)), W
