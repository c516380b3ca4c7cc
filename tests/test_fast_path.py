"""The fast training path (issue 13): the sync-free objective, one Adam, validation once, and capture.

Everything here runs on the CPU. The captured mode is tested up to the capture call: a
stand-in recorder replays a step by running it again, so fit's captured loop (static
inputs, ragged batches, losses read back in bulk, divergence found afterwards) is
exercised without a GPU, and :class:`vi_lab.capture.SyncAudit` checks on the CPU that a
step would not stall or break a CUDA graph.
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.util import is_validation_enabled

import vi_lab
from vi_lab import capture
from vi_lab.capture import CaptureUnavailable, SyncAudit, SyncError, audit
from vi_lab.estimators import prepare
from vi_lab.infer import TrainingDiverged, training_step
from vi_lab.objectives import SyncFreeTrace_ELBO, training_objective
from vi_lab.optim import Adam

D, H = 4, [32]


def pair(name: str = "", latent: int = D):
    model = vi_lab.VAE(latent, H, name=f"{name}model")
    guide = vi_lab.make_guide("mean_field", latent_dim=latent, hidden=H, name=f"{name}guide")
    return model, guide


@pytest.fixture
def x():
    return torch.bernoulli(torch.rand(300, 784, generator=torch.Generator().manual_seed(0)))


def params_of(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


# --------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("estimator,num_particles", [("reparam", 1), ("reparam", 3), ("reinforce", 1),
                                                     ("reinforce", 3)])
def test_sync_free_elbo_equals_pyro_trace_elbo_in_value_and_gradient(x, estimator, num_particles):
    torch.manual_seed(0)
    model, guide = pair()
    m, g = training_objective(model), prepare(training_objective(guide), estimator).guide
    out = []
    for elbo in (Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1),
                 SyncFreeTrace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)):
        pyro.set_rng_seed(1)
        for p in [*model.parameters(), *guide.parameters()]:
            p.grad = None
        loss = elbo.differentiable_loss(m, g, x[:32])
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in [*model.parameters(), *guide.parameters()]]))
    (pyro_loss, pyro_grads), (ours, our_grads) = out
    assert torch.is_tensor(ours) and ours.shape == ()
    assert torch.allclose(ours, pyro_loss.float(), rtol=1e-6)
    for a, b in zip(pyro_grads, our_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_the_flagship_step_passes_the_sync_audit_and_a_scalar_prior_would_not(x):
    model, guide = pair()
    step = training_step(model, guide, x_dim=784)
    step(x[:64])  # the validated first step reads values back (Pyro's checks); later steps must not
    loss = audit(step, x[64:128])
    assert torch.isfinite(loss)

    class ScalarPrior(vi_lab.VAE):
        def prior(self, x):  # dist.Normal(0, 1.0): broadcast_all copies 1.0 onto the data's device
            return dist.Normal(x.new_zeros(()), 1.0).expand([x.shape[0], self.latent_dim]).to_event(1)

    bad = training_step(ScalarPrior(D, H, name="scalar"), pair("scalar_")[1], x_dim=784)
    bad(x[:64])
    with pytest.raises(SyncError, match=r"torch.tensor\(<Python data>\) on the data's device.*test_fast_path.py"):
        audit(bad, x[64:128])


def test_sync_audit_names_each_kind_of_read_back_and_host_copy():
    t = torch.ones(3)
    offenders = {
        "item": lambda: t[0].item(), "__bool__": lambda: bool(t[0] > 0), "tolist": lambda: t.tolist(),
        "__float__": lambda: float(t[0]), "cpu": lambda: t.cpu(), "nonzero": lambda: t.nonzero(),
        "boolean mask": lambda: t[t > 0], "torch.tensor": lambda: torch.tensor(2.0, device=t.device),
        "torch.new_tensor": lambda: t.new_tensor([1.0]),
    }
    for what, fn in offenders.items():
        with SyncAudit(), pytest.raises(SyncError, match=what.replace("(", r"\(")):
            fn()
    with SyncAudit():  # what a graph can hold: kernels, and CPU tensors made without a device (Pyro's plates)
        t.new_ones(()) * 2 + torch.full((3,), 1.0, device=t.device)
        torch.tensor(())
        torch.where(t > 0, t, 0.0)


# --------------------------------------------------------------------------- one Adam


def test_vi_lab_adam_makes_torch_adams_update():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = Adam(0.01, betas=(0.8, 0.99))
    ours.bind([("w", a[0]), ("b", a[1])])
    ref = torch.optim.Adam(b, lr=0.01, betas=(0.8, 0.99), foreach=False)
    for _ in range(5):
        g = [torch.randn_like(p) for p in a]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)


def test_adam_state_moves_both_ways_between_pyro_optim_and_vi_lab(x):
    """A checkpoint's optimizer state from pyro.optim.Adam resumes in vi_lab's Adam, and back."""

    def run(optim_then, optim_now, steps_then=3):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model, guide = pair()
        svi = SVI(training_objective(model), training_objective(guide), optim_then, SyncFreeTrace_ELBO())
        for i in range(steps_then):
            svi.step(x[64 * i:64 * i + 64])
        state = optim_then.get_state()
        names = sorted(state)
        svi_now = SVI(training_objective(model), training_objective(guide), optim_now, SyncFreeTrace_ELBO())
        optim_now.set_state(state)
        pyro.set_rng_seed(5)
        svi_now.step(x[200:264])
        return params_of(model, guide), names

    same, names_a = run(pyro.optim.Adam({"lr": 0.01}), pyro.optim.Adam({"lr": 0.01}))
    moved, names_b = run(pyro.optim.Adam({"lr": 0.01}), Adam(0.01))
    back, names_c = run(Adam(0.01), pyro.optim.Adam({"lr": 0.01}))
    assert names_a == names_b == names_c
    for a, b, c in zip(same, moved, back):
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)


def test_adam_refuses_bad_learning_rates_and_options():
    with pytest.raises(ValueError, match="learning rate guide must be a finite number"):
        Adam(1e-3, module_lrs={"guide": float("nan")})
    with pytest.raises(TypeError, match="unknown options.*momentum"):
        Adam(1e-3, momentum=0.9)
    optim = Adam(1e-3)
    optim.bind([("w", torch.nn.Parameter(torch.zeros(2)))])
    with pytest.raises(ValueError, match="state of w is a learning-rate scheduler's"):
        optim.set_state({"w": {"scheduler": {}, "optimizer": {}}})  # pyro.optim's format for a scheduler


def test_fit_refuses_an_optimizer_it_cannot_drive(x):
    model, guide = pair()
    with pytest.raises(TypeError, match="optimizer must be vi_lab.optim.Adam.*got SGD"):
        vi_lab.fit(model, guide, x, epochs=1, progress=False,
                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


# --------------------------------------------------------------------------- validation once


def test_validation_runs_on_the_first_step_only(x):
    seen = []

    class Watched(vi_lab.VAE):
        def forward(self, x, *args, **kwargs):
            seen.append(is_validation_enabled())
            return super().forward(x)

    torch.manual_seed(0)
    model, guide = Watched(D, H), pair()[1]
    with pyro.validation_enabled(True):
        vi_lab.fit(model, guide, x, epochs=1, batch_size=100, progress=False)
        assert is_validation_enabled()  # the caller's setting is back
    # the door's contract check, then three steps: the first validated
    assert seen[-3:] == [True, False, False]


def test_a_nan_loss_is_still_caught_without_validation(x):
    torch.manual_seed(0)
    model, guide = pair()
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step \d+ of 5"):
        vi_lab.fit(model, guide, x, epochs=1, batch_size=64, lr=1e20, progress=False)


# --------------------------------------------------------------------------- capture


@pytest.fixture
def stand_in_recorder(monkeypatch):
    """Record on the CPU by running the step again at every replay: all of capture but the capture call."""
    monkeypatch.setitem(capture.RECORDERS, "cpu", capture._replay_by_calling)


def fit_pair(x, **kwargs):
    torch.manual_seed(0)
    model, guide = pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = vi_lab.fit(model, guide, x, epochs=3, batch_size=64, progress=False, **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, CaptureUnavailable)]
    return result, params_of(model, guide), messages


def test_capture_on_the_cpu_warns_once_and_trains_exactly_as_eager(x):
    eager, eager_params, none = fit_pair(x)
    result, params, messages = fit_pair(x, capture=True)
    assert none == [] and len(messages) == 1 and "needs a CUDA device, and this run is on cpu" in messages[0]
    assert result.captured_steps == 0
    assert [h["train_elbo"] for h in result.history] == [h["train_elbo"] for h in eager.history]
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params))


def test_captured_loop_replays_full_batches_runs_ragged_ones_eagerly_and_matches_eager(x, stand_in_recorder):
    eager, eager_params, _ = fit_pair(x)
    result, params, messages = fit_pair(x, capture=True)
    assert messages == []
    # 300 rows in batches of 64: 4 full and one ragged batch a epoch, 15 steps; 5 before the capture
    # (validated, audited, 3 warm-up), the ragged batches of epochs 2 and 3 eagerly: 8 replays
    assert result.captured_steps == 8
    assert [h["train_elbo"] for h in result.history] == [h["train_elbo"] for h in eager.history]
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params))


def test_captured_losses_are_read_back_per_record_not_per_step(x, stand_in_recorder, monkeypatch):
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or original(t))
    result, _, _ = fit_pair(x, capture=True)
    assert result.captured_steps == 8
    # epochs 2 and 3: one read each, of 4 replays and the ragged batch's eager step; epoch 1 ran eagerly
    assert reads == [torch.Size([5]), torch.Size([5])]


def test_capture_refuses_what_it_cannot_capture_with_one_warning_each(x, stand_in_recorder):
    _, _, messages = fit_pair(x, capture=True, loss="meanfield")
    assert len(messages) == 1 and "TraceMeanField_ELBO reads values back" in messages[0]
    _, _, messages = fit_pair(x, capture=True, optimizer=pyro.optim.Adam({"lr": 1e-3}))
    assert len(messages) == 1 and "pyro.optim optimizer" in messages[0]

    class Syncing(vi_lab.VAE):
        def forward(self, x, *args, **kwargs):
            z = super().forward(x)
            self.last = float(z.mean())  # a read-back in the model: a graph cannot hold it
            return z

    torch.manual_seed(0)
    model, guide = Syncing(D, H), pair()[1]
    eager_model, eager_guide = Syncing(D, H), pair()[1]
    eager_model.load_state_dict(model.state_dict())
    eager_guide.load_state_dict(guide.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = vi_lab.fit(model, guide, x, epochs=2, batch_size=64, progress=False, capture=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, CaptureUnavailable)]
    assert len(messages) == 1 and "Tensor.__float__() reads a value back" in messages[0]
    assert "test_fast_path.py" in messages[0] and "self.last = float(z.mean())" in messages[0]
    assert result.captured_steps == 0 and len(result.history) == 2


def test_divergence_in_captured_steps_names_the_step(x, stand_in_recorder):
    torch.manual_seed(0)
    model, guide = pair()
    calls = {"n": 0}
    original = vi_lab.VAE.forward

    def poisoned(self, x, *args, **kwargs):  # the 9th step's model (replayed) returns a NaN log-likelihood
        calls["n"] += 1
        if calls["n"] == 10:  # the door's check is call 1
            x = x * float("nan")
        return original(self, x, *args, **kwargs)

    vi_lab.VAE.forward = poisoned
    try:
        with pytest.raises(TrainingDiverged, match=r"at epoch 2, step 4 of 5: the loss became nan"):
            vi_lab.fit(model, guide, x, epochs=3, batch_size=64, progress=False, capture=True)
    finally:
        vi_lab.VAE.forward = original
