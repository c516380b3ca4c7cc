"""Deterministic autoencoders: the loss is reconstruction alone, the denoising one trains on
corrupted inputs against clean targets (and so denoises), and the random-code rules do what they say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyro.distributions as dist
import pytest
import torch

import vi_lab
from vi_lab import runs
from vi_lab.models.autoencoder import (
    CODE_SAMPLERS,
    CORRUPTIONS,
    RECONSTRUCTION_LOSSES,
    Autoencoder,
    random_codes,
    reconstruction_loss,
)

ROOT = Path(__file__).resolve().parents[2]


_X = torch.bernoulli(torch.full((5, 12), 0.4))


@pytest.fixture
def X(device):
    """Five binary 12-pixel images on the device under test."""
    return _X.to(device)


def test_bce_loss_is_the_bernoulli_negative_log_likelihood_of_the_reconstruction(X, device):
    ae = Autoencoder(3, [8], x_dim=12).to(device).eval()
    expected = -dist.Bernoulli(logits=ae(X)).to_event(1).log_prob(X)  # nats per image
    assert torch.allclose(ae.loss(X), expected, atol=1e-5)


def test_mse_loss_is_the_summed_squared_error_of_the_pixel_means(X, device):
    ae = Autoencoder(3, [8], x_dim=12, loss="mse").to(device).eval()
    assert torch.allclose(ae.loss(X), (ae.reconstruct(X) - X).pow(2).sum(-1), atol=1e-6)


def test_denoising_loss_reads_a_corrupted_input_and_scores_the_clean_one(X, device):
    dae = Autoencoder(3, [8], x_dim=12, corruption="masking", noise=0.5).to(device)
    torch.manual_seed(4)  # seeds the CUDA generators too: the same mask on any one device
    loss = dae.loss(X)  # training mode: corrupted
    torch.manual_seed(4)
    x_tilde = X * (torch.rand_like(X) >= 0.5)
    assert not torch.equal(x_tilde, X)
    assert torch.allclose(loss, -dist.Bernoulli(logits=dae(x_tilde)).to_event(1).log_prob(X), atol=1e-5)
    dae.eval()  # evaluation: no corruption
    assert torch.allclose(dae.loss(X), -dist.Bernoulli(logits=dae(X)).to_event(1).log_prob(X), atol=1e-5)


def test_gaussian_corruption_keeps_pixels_in_range(device):
    noisy = CORRUPTIONS["gaussian"](torch.full((1000,), 0.5, device=device), 0.3)
    assert noisy.device.type == device.type
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert noisy.std().item() == pytest.approx(0.3, abs=0.03)


def test_training_reduces_the_loss_and_the_denoising_autoencoder_denoises(device):
    d = runs.load_data("mnist", train_size=1000, eval_size=200, device=device)
    kw = dict(epochs=3, batch_size=50, lr=3e-3, binarize="dynamic", progress=False)  # trains on the data's device
    ae = Autoencoder(16, [128]).to(device)  # evaluated before training
    dae = Autoencoder(16, [128], corruption="masking", noise=0.7)
    untrained = reconstruction_loss(ae, d.x_test).mean().item()
    history = vi_lab.fit(ae.model, ae.guide, d.x_train, eval_data=d.x_test, **kw).history
    vi_lab.fit(dae.model, dae.guide, d.x_train, **kw)
    # an autoencoder's "ELBO" is minus its reconstruction loss
    assert history[-1]["test_elbo"] == pytest.approx(-reconstruction_loss(ae, d.x_test).mean().item(), abs=1e-3)
    assert -history[-1]["test_elbo"] < untrained - 200  # ~543 nats untrained (784 log 2)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    torch.manual_seed(0)
    masked = CORRUPTIONS["masking"](d.x_test, 0.7)
    with torch.no_grad():
        errors = {name: -dist.Bernoulli(logits=m(masked)).to_event(1).log_prob(d.x_test).mean().item()
                  for name, m in (("ae", ae), ("dae", dae))}
    assert errors["dae"] < errors["ae"] - 15, errors  # from digits with 70% of pixels masked, the DAE restores more


def test_random_code_rules(device):
    torch.manual_seed(0)
    codes = torch.randn(400, 3, device=device) @ torch.tensor([[2.0, 0, 0], [1, 1, 0], [0, 0, 0.5]], device=device) + 5
    box = random_codes(codes, 5000, "box")
    assert (box >= codes.min(0).values).all() and (box <= codes.max(0).values).all()
    assert box.std(0).min() > 0.5 * (codes.max(0).values - codes.min(0).values).min() / 12**0.5
    fitted = random_codes(codes, 20000, "fitted_gaussian")
    assert torch.allclose(fitted.mean(0), codes.mean(0), atol=0.08)
    assert torch.allclose(torch.cov(fitted.T), torch.cov(codes.T), atol=0.15)
    normal = random_codes(codes, 20000, "standard_normal")
    assert torch.allclose(normal.mean(0), torch.zeros(3, device=device), atol=0.05)  # ignores where the codes are
    with pytest.raises(ValueError, match="box.*fitted_gaussian.*standard_normal"):
        random_codes(codes, 5, "uniform")
    assert sorted(CODE_SAMPLERS) == ["box", "fitted_gaussian", "standard_normal"]


@pytest.mark.parametrize("kwargs, message", [
    ({"loss": "l1"}, r"unknown loss 'l1'; valid: \['bce', 'mse'\]"),
    ({"corruption": "salt"}, "unknown corruption 'salt'; valid"),
    ({"corruption": "masking", "noise": 0.0}, "noise > 0"),
    ({"corruption": "masking", "noise": 1.0}, r"noise must be in \[0, 1.0\)"),
    ({"latent_dim": 0}, "latent_dim must be a positive integer"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Autoencoder(**{"latent_dim": 3, "hidden": [8], "x_dim": 12, **kwargs})
    assert sorted(RECONSTRUCTION_LOSSES) == ["bce", "mse"]


def test_autoencoders_example_runs(tmp_path, example_args):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "examples" / "autoencoders.py"), "--epochs", "1", "--train-size", "200",
           "--eval-size", "20", "--eval-samples", "10", "--threads", "1", "--no-progress", "--out", str(out),
           "--hidden", "32", "--num-samples", "16", *example_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("random_latents.png", "reconstructions.png", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    assert "Frechet distance" in proc.stdout
    assert "epoch 1: train ELBO" in proc.stdout  # --no-progress keeps fit's line per epoch
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("AE", "DAE"):  # the example's keys: losses, minus fit's ELBOs
        assert {"epoch", "train_loss", "test_loss"} <= set(metrics["histories"][name][0]), name
        assert metrics["histories"][name][0]["test_loss"] > 0
