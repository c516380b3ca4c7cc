"""EM for log-linear latent-class models: monotone, exact M-steps, recovers a known model.

Synthetic truths are small and float64; the MNIST slice is a few hundred images.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vi_lab
from vi_lab.data import binarize, load_dataset
from vi_lab.em import INNER_OPTIMIZERS, e_step, em, m_step
from vi_lab.models.loglinear import BernoulliMixture, LogLinearLatentClass, empty_guide, enum_elbo

D64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def general_truth(seed=0, num_obs=10, K=2, d=3):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(num_obs, K, d, generator=g, dtype=D64)
    w = 1.5 * torch.randn(d, generator=g, dtype=D64)
    return LogLinearLatentClass(F, w, prior=torch.tensor([0.35, 0.65], dtype=D64))


def mixture_truth(K=3, D=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = 3 * torch.randn(K, D, generator=g, dtype=D64)  # well separated templates
    prior = torch.tensor([0.2, 0.3, 0.5], dtype=D64)[:K]
    return BernoulliMixture(K, D, weights=W, prior=prior / prior.sum(), dtype=D64)


def sample_data(truth, n, seed, device):
    """``n`` draws of ``truth``, made on the CPU by a seeded generator (the same data on every
    device), then put on the device under test."""
    x, _ = truth.sample(n, generator=torch.Generator().manual_seed(seed))
    return x.to(device)


def assert_non_decreasing(lls, slack):
    diffs = torch.diff(torch.tensor(lls, dtype=D64))
    assert diffs.min().item() >= -slack, f"log-likelihood decreased by {-diffs.min().item():.3g}"


# ----------------------------------------------------------------- monotonicity

@pytest.mark.parametrize("inner_optimizer, inner_steps, inner_lr", [
    ("lbfgs", 5, None), ("adam", 3, 0.1), ("gd", 2, 50.0),  # gd with a reckless step: M-steps get rejected
])
def test_em_never_decreases_the_log_likelihood_on_synthetic_data(inner_optimizer, inner_steps, inner_lr, device):
    truth = general_truth()
    x = sample_data(truth, 1000, 1, device)
    model = LogLinearLatentClass(truth.features)
    result = em(model, x, max_iters=20, tol=0.0, inner_steps=inner_steps, inner_optimizer=inner_optimizer,
                inner_lr=inner_lr, restarts=2)
    for run in result.runs:
        assert len(run.log_likelihoods) >= 10  # tol=0: it stops only when the log-likelihood stops rising
        assert_non_decreasing(run.log_likelihoods, slack=1e-10)
        # it did move (with reckless gd steps mostly the closed-form prior update is accepted)
        assert run.log_likelihoods[-1] > run.log_likelihoods[0] + (0.0 if inner_optimizer == "gd" else 0.01)
    if inner_optimizer == "gd":
        assert sum(r.rejected_m_steps for r in result.runs) > 0  # the guard was exercised


def test_em_never_decreases_the_log_likelihood_on_a_mixture(device):
    truth = mixture_truth()
    x = sample_data(truth, 1000, 3, device)
    result = em(BernoulliMixture(3, 10, dtype=D64), x, max_iters=20, tol=0.0, inner_steps=3, restarts=2)
    for run in result.runs:
        assert_non_decreasing(run.log_likelihoods, slack=1e-10)


def test_em_never_decreases_the_log_likelihood_on_an_mnist_slice(device):
    images = load_dataset("mnist", "train", device=device).images[:300]
    x = binarize(images, "static", seed=0)
    result = em(BernoulliMixture(5, 784), x, max_iters=10, tol=0.0, inner_steps=10, restarts=1)
    lls = result.history
    assert len(lls) == 11
    # float32: the E-step sum over 300 images is exact to about 1e-6 relative
    assert_non_decreasing(lls, slack=1e-5 * abs(lls[-1]))
    assert lls[-1] > lls[0] + 10  # from a random start EM gains many nats


# -------------------------------------------------------------------- M-step

def test_m_step_reaches_the_closed_form_mixture_solution(device):
    # for a mixture of Bernoullis the expected-count equations have the closed form
    # sigmoid(W_k) = S_k / N_k and pi_k = N_k / N: L-BFGS must land on it
    truth = mixture_truth()
    x = sample_data(truth, 500, 4, device)
    model = BernoulliMixture(3, 10, dtype=D64).to(device)
    model.reset_parameters(torch.Generator().manual_seed(0), x)
    _, stats = e_step(model, x)
    assert m_step(model, stats, inner_steps=100)
    torch.testing.assert_close(model.templates(), stats["pixels"] / stats["counts"][:, None], atol=1e-6, rtol=0)
    torch.testing.assert_close(model.log_prior().exp(), stats["counts"] / len(x))


def test_m_step_matches_expected_feature_counts_in_the_general_model(device):
    truth = general_truth()
    x = sample_data(truth, 1000, 5, device)
    model = LogLinearLatentClass(truth.features).to(device)
    _, stats = e_step(model, x)

    @torch.no_grad()
    def mismatch():
        # data's expected counts sum_{x,z} C[x,z] f(x,z) against the model's sum_z N_z E[f(X,z)|z,w],
        # per datapoint: the gradient of the M-step objective
        data_counts = torch.einsum("xz,xzd->d", stats["table"], model.features)
        model_counts = stats["counts"] @ model.expected_features()
        return ((data_counts - model_counts) / len(x)).abs().max().item()

    assert mismatch() > 0.05  # at the start, w = 0
    assert m_step(model, stats, inner_steps=100)
    assert mismatch() < 1e-6


def test_unknown_inner_optimizer_lists_the_valid_ones(device):
    model = general_truth()
    x = torch.tensor([0, 1, 2], device=device)
    with pytest.raises(ValueError, match="unknown inner optimizer 'newton'; valid: " + str(sorted(INNER_OPTIMIZERS)).replace("[", r"\[").replace("]", r"\]")):
        em(model, x, inner_optimizer="newton")


# ----------------------------------------------------------------- recovery

def test_em_recovers_a_general_log_linear_model(device):
    truth = general_truth()
    x = sample_data(truth, 20000, 6, device)
    model = LogLinearLatentClass(truth.features)
    result = em(model, x, max_iters=300, tol=1e-10, restarts=2)
    truth.to(device)  # after sampling: its CPU generator draws on the CPU
    with torch.no_grad():
        ll_truth = truth.log_marginal(x).mean().item()
        # over the whole observation space: KL(p_truth || p_fit) is the population loss
        X = torch.arange(truth.num_obs, device=device)
        p = truth.log_marginal(X).exp()
        kl = (p * (truth.log_marginal(X) - model.log_marginal(X))).sum().item()
    # the maximum likelihood estimate beats the truth on its own training data, by about
    # (number of parameters) / (2 N) = 4 / 40000 nats
    assert ll_truth - 1e-9 <= result.log_likelihood <= ll_truth + 2e-3
    assert 0 <= kl < 2e-3
    assert (model.w - truth.w).abs().max() < 0.15
    assert (model.log_prior().exp() - truth.log_prior().exp()).abs().max() < 0.03


def test_em_recovers_mixture_templates_up_to_label_permutation(device):
    truth = mixture_truth()
    x = sample_data(truth, 4000, 7, device)
    model = BernoulliMixture(3, 10, dtype=D64)
    result = em(model, x, max_iters=200, tol=1e-8, restarts=2)
    truth.to(device)  # after sampling: its CPU generator draws on the CPU
    with torch.no_grad():
        ll_truth = truth.log_marginal(x).mean().item()
    assert ll_truth - 1e-9 <= result.log_likelihood <= ll_truth + 0.02
    fit, true_t = model.templates(), truth.templates()
    errs = {perm: (fit[list(perm)] - true_t).abs().max().item() for perm in itertools.permutations(range(3))}
    perm = min(errs, key=errs.get)
    assert errs[perm] < 0.07  # about 4 standard errors of a pixel frequency at N_k ~ 800
    torch.testing.assert_close(model.log_prior().exp()[list(perm)], truth.log_prior().exp(), atol=0.03, rtol=0)


def test_restarts_keep_the_best_and_the_model_holds_it(device):
    truth = mixture_truth()
    x = sample_data(truth, 300, 8, device)
    model = BernoulliMixture(3, 10, dtype=D64)
    result = em(model, x, max_iters=3, tol=0.0, restarts=4, seed=10)
    finals = [r.final for r in result.runs]
    assert [r.seed for r in result.runs] == [10, 11, 12, 13]
    assert len(set(finals)) == 4  # different seeds, different starts
    assert result.best == max(range(4), key=finals.__getitem__)
    with torch.no_grad():
        assert abs(model.log_marginal(x).mean().item() - result.log_likelihood) < 1e-10


def test_tolerance_stops_early_and_a_fixed_point_stays_put(device):
    truth = general_truth()
    x = sample_data(truth, 1000, 9, device)
    model = LogLinearLatentClass(truth.features)
    first = em(model, x, max_iters=500, tol=1e-11)
    assert first.runs[0].converged and first.iterations < 500
    again = em(model, x, max_iters=500, tol=1e-11, init=False)
    assert again.iterations <= 2 and abs(again.log_likelihood - first.log_likelihood) < 1e-8
    coarse = em(LogLinearLatentClass(truth.features), x, max_iters=500, tol=0.5)
    assert coarse.iterations == 1  # one step, then a relative gain below 50% stops it


def test_bad_arguments_are_refused(device):
    model = general_truth()
    x = torch.tensor([0, 1, 2], device=device)
    with pytest.raises(ValueError, match="restarts must be a positive integer"):
        em(model, x, restarts=0)
    with pytest.raises(ValueError, match="restarts > 1 needs init=True"):
        em(model, x, restarts=2, init=False)
    with pytest.raises(ValueError, match="inner_steps must be a positive integer"):
        em(model, x, inner_steps=0)
    with pytest.raises(ValueError, match="outside the observation space"):
        em(model, torch.tensor([0, 99], device=device))
    with pytest.raises(ValueError, match=r"binarize it first"):
        em(BernoulliMixture(2, 4), torch.rand(5, 4, device=device))


# -------------------------------------------------------- SVI cross-check

def test_svi_with_enumeration_reaches_the_em_optimum(device):
    truth = general_truth()
    x = sample_data(truth, 500, 11, device)
    em_model = LogLinearLatentClass(truth.features)
    em_result = em(em_model, x, max_iters=300, tol=1e-12, restarts=2)
    svi_model = LogLinearLatentClass(truth.features)
    fit = vi_lab.fit(svi_model, empty_guide, x, loss=enum_elbo(), epochs=100, batch_size=len(x), lr=0.1,
                     progress=False)
    with torch.no_grad():
        svi_ll = svi_model.log_marginal(x).mean().item()
    # full batch: fit()'s ELBO is the exact log-likelihood (of the parameters before the step)
    assert abs(fit.train_elbo - svi_ll) < 1e-3
    assert svi_ll <= em_result.log_likelihood + 1e-9
    assert em_result.log_likelihood - svi_ll < 1e-4


# --------------------------------------------------------------- the example

def test_example_runs_with_the_smallest_settings(tmp_path, example_args):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "examples" / "loglinear_em.py"), "--epochs", "1", "--train-size", "200",
           "--eval-size", "20", "--eval-samples", "10", "--threads", "1", "--no-progress", "--out", str(out),
           "--classes", "2", "3", "--em-iters", "3", "--restarts", "2", *example_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("em.json", "templates.png", "em_curve.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "em.json").read_text())
    rows = {(r["method"], r["K"]) for r in report["results"]}
    assert rows == {("em", 2), ("svi", 2), ("em", 3), ("svi", 3), ("vae", None)}
    assert report["train_size"] == 200 and report["eval_size"] == 20
    assert all(r["test_log_likelihood"] < 0 for r in report["results"])
    assert "test log-lik" in proc.stdout
    assert "epoch 1: train ELBO" in proc.stdout  # --no-progress keeps fit's line per epoch


def test_a_fixed_prior_stays_fixed(device):
    truth = general_truth()
    x = sample_data(truth, 500, 12, device)
    prior = torch.tensor([0.9, 0.1], dtype=D64, device=device)
    model = LogLinearLatentClass(truth.features, prior=prior, learn_prior=False)
    result = em(model, x, max_iters=20, tol=1e-10)
    torch.testing.assert_close(model.log_prior().exp(), prior)
    assert result.iterations > 1 and model.w.abs().sum() > 0.1
    assert "prior_logits" not in dict(model.named_parameters())
