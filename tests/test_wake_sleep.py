"""Tests for vi_lab.wake_sleep: which data each phase trains on, which network each loss moves,
agreement with Pyro's ReweightedWakeSleep, and wake-sleep as a loss of the one loop, fit()."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import ReweightedWakeSleep as PyroRWS
from torch import nn

import vi_lab
from vi_lab import runs
from vi_lab.guides import MeanFieldGuide
from vi_lab.models.ppca import PPCA
from vi_lab.infer import adam
from vi_lab.wake_sleep import ReweightedWakeSleep

ROOT = Path(__file__).resolve().parents[1]


class Identity(nn.Module):
    """Encoder trunk that passes x through: with it a MeanFieldGuide is linear-Gaussian in x."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, x):
        return x


def small_pair(device: torch.device, x_dim: int = 6, latent_dim: int = 2):
    model = vi_lab.VAE(latent_dim, [8], x_dim=x_dim).to(device)
    guide = vi_lab.make_guide("mean_field", latent_dim=latent_dim, hidden=[8], x_dim=x_dim).to(device)
    return model, guide


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def _moves(grads) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------- which data the sleep phase sees


def test_sleep_phase_learns_the_model_posterior_from_dreams_not_the_data(device):
    # Linear-Gaussian model with an exact posterior p(z | x) = N((x_1 + x_2) / 3, 1/3); the
    # training data come from elsewhere (mean 10). Trained on dreams (z, x~) ~ p, a
    # linear-Gaussian guide converges to p(z | x); trained on the data x with dreamed z
    # (independent of x) it would converge to p(z): zero slope, unit scale. The guide
    # starts with zero weights, N(0, softplus(0)^2), and must move away from there.
    ppca = PPCA(torch.tensor([[1.0], [1.0]]), sigma=1.0).to(device)
    guide = MeanFieldGuide(Identity(2), 1).to(device)
    with torch.no_grad():
        for p in guide.parameters():
            p.zero_()
    data = 10 + torch.randn(2000, 2, device=device)
    vi_lab.fit(ppca, guide, data, loss=ReweightedWakeSleep(1, 0.0), epochs=5, batch_size=100, lr=0.05, progress=False)
    assert torch.allclose(guide.loc.weight, torch.full((1, 2), 1 / 3, device=device), atol=0.08), guide.loc.weight
    x = ppca.sample(2000)
    q, p = guide.get_posterior(x), ppca.posterior(x)
    rms = (q.mean - p.mean).pow(2).mean().sqrt().item()
    assert rms < 0.1, f"guide mean is off the exact posterior mean by {rms:.3f} RMS"
    assert abs(q.base_dist.scale.mean().item() - 3**-0.5) < 0.08


def test_sleep_phase_feeds_the_guide_dreams_and_the_dreamed_latents(device):
    model, guide = small_pair(device)
    seen = {}

    def spy(x, *args):
        trace = pyro.poutine.trace(guide).get_trace(x, *args)
        seen["x"], seen["z"] = x, trace.nodes["z"]["value"]
        return seen["z"]

    data = torch.zeros(5, 6, device=device)
    with torch.no_grad():
        model.decoder.net[-1].bias.fill_(30.0)  # every dreamed pixel is 1, unlike the all-zero data
    ReweightedWakeSleep(num_particles=1, insomnia=0.0, num_sleep_particles=3).sleep(model, spy, data)
    assert seen["x"].shape == (15, 6) and bool((seen["x"] == 1).all())
    # the latents the guide is scored on are the model's own draws, not fresh guide samples
    ws = ReweightedWakeSleep(num_particles=1, insomnia=0.0, num_sleep_particles=3)
    ws.sleep(model, guide, data)  # the first call traces the plate nesting (one extra draw)
    pyro.set_rng_seed(1)
    loss = ws.sleep(model, guide, data)
    pyro.set_rng_seed(1)
    with torch.no_grad(), pyro.plate("p", 3, dim=-2):
        dream = pyro.poutine.trace(pyro.poutine.uncondition(model)).get_trace(data)
    z, x_dream = dream.nodes["z"]["value"].reshape(15, 2), dream.nodes["x"]["value"].reshape(15, 6)
    expected = -guide.get_posterior(x_dream).log_prob(z).mean()
    assert torch.allclose(loss, expected, atol=1e-5)


# ------------------------------------------------------------------- which network each loss moves


@pytest.mark.parametrize("objective", [ReweightedWakeSleep(1, 0.0), ReweightedWakeSleep(4, 0.5)],
                         ids=["wake_sleep", "rws"])
def test_wake_loss_moves_only_the_generator_and_guide_loss_only_the_recognition_network(objective, device):
    model, guide = small_pair(device)
    x = torch.bernoulli(torch.full((7, 6), 0.4, device=device))
    losses = objective.phases(model, guide, x)
    model_params, guide_params = list(model.parameters()), list(guide.parameters())
    assert _moves(_grads(losses.model_loss, model_params))
    assert not _moves(_grads(losses.model_loss, guide_params))
    assert _moves(_grads(losses.guide_loss, guide_params))
    assert not _moves(_grads(losses.guide_loss, model_params))


def test_the_elbo_moves_both_networks(device):
    # the contrast that shows the check above can fail: the ELBO's pathwise gradient reaches the guide
    model, guide = small_pair(device)
    loss = pyro.infer.Trace_ELBO().differentiable_loss(model, guide, torch.bernoulli(torch.full((7, 6), 0.4,
                                                                                                  device=device)))
    assert _moves(_grads(loss, list(guide.parameters())))
    assert _moves(_grads(loss, list(model.parameters())))


@pytest.mark.parametrize("insomnia", [1.0, 0.0, 0.5])
def test_one_backward_of_the_summed_loss_gives_each_network_its_own_phase(insomnia, device):
    # what fit() does (one backward of model_loss + guide_loss) equals two separate gradients
    model, guide = small_pair(device)
    x = torch.bernoulli(torch.full((9, 6), 0.4, device=device))
    model_params, guide_params = list(model.parameters()), list(guide.parameters())
    rws = ReweightedWakeSleep(3, insomnia)
    rws.phases(model, guide, x)  # the first call traces the plate nesting (extra draws)
    pyro.set_rng_seed(4)
    losses = rws.phases(model, guide, x)
    separate = _grads(losses.model_loss, model_params) + _grads(losses.guide_loss, guide_params)
    pyro.set_rng_seed(4)
    summed = rws(model, guide, x)
    summed.backward()
    assert set(rws.terms) == {"train_elbo", "model_loss", "guide_loss"}
    assert summed.item() == pytest.approx(rws.terms["model_loss"] + rws.terms["guide_loss"], rel=1e-6)
    for p, g in zip(model_params + guide_params, separate):
        assert torch.equal(p.grad, g), "the summed loss leaked a gradient into the other network"


def test_a_wake_step_leaves_the_guide_and_a_sleep_step_leaves_the_model(device):
    model, guide = small_pair(device)
    x = torch.bernoulli(torch.full((40, 6), 0.4, device=device))
    before_m = [p.detach().clone() for p in model.parameters()]
    before_g = [p.detach().clone() for p in guide.parameters()]
    vi_lab.fit(model, guide, x, loss="wake_sleep", epochs=1, batch_size=20, optimizer=adam(0.1, guide=0.0),
               progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before_g, guide.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before_m, model.parameters()))
    before_m = [p.detach().clone() for p in model.parameters()]
    vi_lab.fit(model, guide, x, loss="wake_sleep", epochs=1, batch_size=20, optimizer=adam(0.0, guide=0.1),
               progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before_m, model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before_g, guide.parameters()))


# ------------------------------------------------------------------- agreement with Pyro


@pytest.mark.parametrize("insomnia", [1.0, 0.0, 0.5])
def test_reweighted_wake_sleep_equals_pyros_on_one_datapoint(insomnia, device):
    model, guide = small_pair(device)
    x = torch.bernoulli(torch.full((1, 6), 0.5, device=device))

    def pyro_guide(x, observations=None):  # Pyro hands dreamed data to the guide by keyword
        return guide(observations["x"] if observations else x)

    params = list(model.parameters()) + list(guide.parameters())
    pyro.set_rng_seed(3)
    theirs = PyroRWS(num_particles=3, insomnia=insomnia, num_sleep_particles=1).loss_and_grads(model, pyro_guide, x)
    their_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    pyro.set_rng_seed(3)
    ours = ReweightedWakeSleep(3, insomnia, num_sleep_particles=1).phases(model, guide, x)
    (ours.model_loss + ours.guide_loss).backward()
    assert ours.model_loss.item() == pytest.approx(theirs[0], abs=1e-5)
    assert ours.guide_loss.item() == pytest.approx(theirs[1], abs=1e-5)
    for p, g in zip(params, their_grads):
        assert torch.allclose(p.grad, g, atol=1e-5)


def test_wake_theta_is_the_per_datapoint_importance_weighted_bound(device):
    # log w_kb = log p(x_b, z_kb) - log q(z_kb | x_b) per datapoint, then log-mean-exp over k:
    # not Pyro's weights of the whole batch
    model, guide = small_pair(device)
    x = torch.bernoulli(torch.full((3, 6), 0.5, device=device))
    rws = ReweightedWakeSleep(4, 1.0)
    rws.wake(model, guide, x)  # the first call traces the plate nesting (one extra draw)
    pyro.set_rng_seed(5)
    loss, _, log_w = rws.wake(model, guide, x)
    pyro.set_rng_seed(5)
    with pyro.plate("particles", 4, dim=-2):
        z = pyro.poutine.trace(guide).get_trace(x).nodes["z"]["value"].detach()  # (4, 3, 2): the same draws
    expected_w = (model.prior(x).log_prob(z) + model.likelihood(model.decoder(z)).log_prob(x)
                  - guide.get_posterior(x).log_prob(z))  # (4, 3)
    assert torch.allclose(log_w, expected_w, atol=1e-4)
    expected = -(expected_w.logsumexp(0) - torch.log(x.new_tensor(4.0))).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)


# ------------------------------------------------------------------- the training loop


def test_history_records_at_the_requested_sample_counts_and_the_end(device):
    model, guide = small_pair(device)
    x = torch.bernoulli(torch.full((200, 6), 0.3, device=device))
    result = vi_lab.fit(model, guide, x, loss="rws", num_particles=5, epochs=2, batch_size=50,
                        progress=False, eval_data=x[:20], record_at=[50, 120, 10_000])
    assert [h["samples_seen"] for h in result.history] == [50, 150, 400]
    assert all(set(h) >= {"epoch", "train_elbo", "model_loss", "guide_loss", "seconds", "test_elbo"}
               for h in result.history)
    default = vi_lab.fit(model, guide, x, loss="wake_sleep", epochs=2, batch_size=50, progress=False)
    assert [(h["epoch"], h["samples_seen"]) for h in default.history] == [(1, 200), (2, 400)]


def test_wake_sleep_improves_the_test_elbo_on_mnist(device):
    d = runs.load_data("mnist", train_size=1000, eval_size=200, device=device)
    model, guide = vi_lab.VAE(5, [64]), vi_lab.make_guide("mean_field", latent_dim=5, hidden=[64])
    result = vi_lab.fit(model, guide, d.x_train, loss="wake_sleep", epochs=3, batch_size=50, lr=3e-3,
                        progress=False, binarize="dynamic", eval_data=d.x_test, record_at=[50])
    first, last = result.history[0]["test_elbo"], result.history[-1]["test_elbo"]
    assert last > first + 50, f"test ELBO went from {first:.1f} to {last:.1f} nats"


# ------------------------------------------------------------------- errors


def test_errors_name_what_is_wrong():
    model = vi_lab.VAE(2, [8], x_dim=6)
    guide = vi_lab.make_guide("mean_field", latent_dim=2, hidden=[8], x_dim=6)
    with pytest.raises(ValueError, match="unknown loss 'sleepwalk'.*rws.*wake_sleep"):
        vi_lab.fit(model, guide, torch.zeros(4, 6), loss="sleepwalk", epochs=1, progress=False)
    with pytest.raises(ValueError, match="estimator='reinforce'.*apply to ELBO losses only"):
        vi_lab.fit(model, guide, torch.zeros(4, 6), loss="wake_sleep", estimator="reinforce", epochs=1,
                   progress=False)
    with pytest.raises(ValueError, match="rws needs num_particles >= 2"):
        vi_lab.fit(model, guide, torch.zeros(4, 6), loss="rws", epochs=1, progress=False)
    with pytest.raises(ValueError, match="insomnia=0"):
        ReweightedWakeSleep(num_particles=1, insomnia=0.5)
    with pytest.raises(ValueError, match=r"insomnia must be in \[0, 1\]"):
        ReweightedWakeSleep(num_particles=2, insomnia=1.5)
    model = vi_lab.VAE(2, [8], x_dim=6, beta=4.0)
    guide = vi_lab.make_guide("mean_field", latent_dim=2, hidden=[8], x_dim=6)
    with pytest.raises(ValueError, match="beta"):
        vi_lab.fit(model, guide, torch.zeros(4, 6), loss="wake_sleep", epochs=1, progress=False)
    with pytest.raises(ValueError, match="learning rate guide must be a finite number"):
        adam(1e-3, guide=float("nan"))


# ------------------------------------------------------------------- the example


def test_wake_sleep_vs_aevb_example_runs(tmp_path, example_args):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "examples" / "wake_sleep_vs_aevb.py"), "--epochs", "1", "--train-size", "200",
           "--eval-size", "20", "--eval-samples", "10", "--threads", "1", "--no-progress", "--out", str(out),
           "--latent-dims", "2", "3", "--hidden", "16", *example_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("wake_sleep_vs_aevb.json", "wake_sleep_vs_aevb.png", "samples_by_latent_dim.png"):
        assert (out / name).stat().st_size > 0, name
    assert "wake-sleep" in proc.stdout and "AEVB" in proc.stdout
    # --no-progress keeps fit's line per recorded point (one here: 200 samples are fewer than ten batches)
    assert "epoch 1, 200 samples: train ELBO" in proc.stdout


def test_adam_refuses_a_learning_rate_for_a_network_the_pair_does_not_have(device):
    model, guide = small_pair(device)
    x = torch.bernoulli(torch.full((20, 6), 0.4, device=device))
    with pytest.raises(ValueError, match=r"adam\(\) got learning rates for encoder, but the model and guide register "
                                         r"their networks as guide, model"):
        vi_lab.fit(model, guide, x, loss="wake_sleep", epochs=1, batch_size=10, optimizer=adam(0.1, encoder=0.0),
                   progress=False)
