"""fit(): it learns, its ELBO is per datapoint, resume is exact, divergence keeps the checkpoint."""

import json

import pyro
import pytest
import torch

import vi_lab
from vi_lab import checkpoint, evaluate, fit
from vi_lab.data import binarize, load_dataset
from vi_lab.guides import make_guide
from vi_lab.device import pick_device
from vi_lab.infer import TrainingDiverged
from vi_lab.models import VAE


@pytest.fixture(scope="module")
def mnist_slice(device):
    images = load_dataset("mnist", "train").images[:600]
    return binarize(images, "static", seed=0).to(device)


def small_pair(latent_dim=5, device="cpu"):
    return (VAE(latent_dim, [64]).to(device),
            make_guide("mean_field", latent_dim=latent_dim, hidden=[64]).to(device))


def test_fit_raises_the_elbo_on_real_mnist(mnist_slice, tmp_path, device):
    model, guide = small_pair(device=device)
    x_train, x_test = mnist_slice[:500], mnist_slice[500:]
    before = evaluate.elbo(model, guide, x_test, num_samples=5).mean().item()
    result = fit(model, guide, x_train, epochs=4, batch_size=50, lr=3e-3, progress=False,
                 eval_data=x_test, checkpoint_dir=tmp_path)
    after = evaluate.elbo(model, guide, x_test, num_samples=5).mean().item()
    assert after > before + 150  # untrained ~ -545 nats, a few epochs reach ~ -200
    assert result.history[-1]["train_elbo"] > result.history[0]["train_elbo"] + 50
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert all("test_elbo" in json.loads(line) for line in lines)


@pytest.mark.parametrize("batch_size", [32, 100])
def test_reported_elbo_is_per_datapoint_and_matches_full_data_evaluation(mnist_slice, batch_size, device):
    model, guide = small_pair(device=device)
    x = mnist_slice[:400]
    # lr = 0 freezes the parameters, so the epoch's running ELBO must equal a full-data evaluation
    result = fit(model, guide, x, epochs=1, batch_size=batch_size, lr=0.0, progress=False)
    full = evaluate.elbo(model, guide, x, num_samples=50).mean().item()
    assert abs(result.train_elbo - full) < 1.0, (result.train_elbo, full)


def test_resume_continues_exactly(mnist_slice, tmp_path):
    x = mnist_slice[:200]
    kwargs = dict(batch_size=40, lr=1e-3, progress=False, seed=3, binarize="dynamic")
    pyro.set_rng_seed(7)  # same initial weights for both runs
    model, guide = small_pair()
    straight = fit(model, guide, x, epochs=3, checkpoint_dir=tmp_path / "a", **kwargs)

    pyro.clear_param_store()
    pyro.set_rng_seed(7)
    model, guide = small_pair()
    fit(model, guide, x, epochs=2, checkpoint_dir=tmp_path / "b", **kwargs)
    state = checkpoint.load(tmp_path / "b" / "last.pt")
    assert {"model", "guide", "optim", "rng", "epoch", "history"} <= set(state)
    assert state["epoch"] == 2

    pyro.clear_param_store()
    pyro.set_rng_seed(999)  # whatever happened in between must not matter
    model, guide = small_pair()  # fresh weights: the checkpoint must restore them
    resumed = fit(model, guide, x, epochs=3, checkpoint_dir=tmp_path / "b", resume=True, **kwargs)
    assert len(resumed.history) == 3
    assert [h["train_elbo"] for h in resumed.history[:2]] == [h["train_elbo"] for h in straight.history[:2]]
    # the whole resumed epoch (its first step included) reproduces the uninterrupted run
    assert resumed.history[2]["train_elbo"] == pytest.approx(straight.history[2]["train_elbo"], abs=1e-9)


def test_resume_without_checkpoint_is_a_clear_error(mnist_slice, tmp_path):
    model, guide = small_pair()
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        fit(model, guide, mnist_slice[:50], epochs=1, checkpoint_dir=tmp_path, resume=True, progress=False)


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's own warning is the point here
@pytest.mark.parametrize("how", ["nan_loss", "nan_weights"])
def test_divergence_stops_with_epoch_and_step_and_keeps_the_checkpoint(mnist_slice, tmp_path, how):
    class ExplodingVAE(VAE):
        calls = 0

        def forward(self, x):
            self.calls += 1
            # one call for fit's contract check, then 5 steps per epoch: blows up at epoch 2, step 3
            blow_up = self.calls > 1 + 5 + 2
            if blow_up and how == "nan_weights":  # validation then rejects the decoder's logits
                self.decoder.net[0].weight.data.fill_(float("nan"))
            super().forward(x)
            if blow_up and how == "nan_loss":
                pyro.factor("boom", x.new_tensor(float("nan")))

    exploding_model, guide = ExplodingVAE(5, [64]), make_guide("mean_field", latent_dim=5, hidden=[64])

    with pyro.validation_enabled(how == "nan_weights"):
        with pytest.raises(TrainingDiverged, match=r"epoch 2, step 3 of 5") as err:
            fit(exploding_model, guide, mnist_slice[:200], epochs=3, batch_size=40, progress=False,
                checkpoint_dir=tmp_path)
    assert "intact" in str(err.value) and str(tmp_path / "last.pt") in str(err.value)
    state = checkpoint.load(tmp_path / "last.pt")
    assert state["epoch"] == 1
    fresh = VAE(5, [64])
    fresh.load_state_dict(state["model"])
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_invalid_data_is_not_mistaken_for_divergence(mnist_slice):
    model, guide = small_pair()
    grey = load_dataset("mnist", "train", device=mnist_slice.device).images[:40]  # not binary: Bernoulli's support check fails
    with pytest.raises(ValueError, match="support|constraint") as err:
        fit(model, guide, grey, epochs=1, batch_size=40, progress=False)
    assert not isinstance(err.value, TrainingDiverged)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = checkpoint.save_atomic({"epoch": 1}, tmp_path / "last.pt")

    def crash(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": -1}, "epochs must be"),
    ({"batch_size": 0}, "batch_size must be"),
    ({"lr": float("nan")}, "lr must be"),
    ({"loss": "elbo2"}, "unknown loss 'elbo2'; valid"),
    ({"binarize": "sometimes"}, "sometimes"),
])
def test_bad_arguments_are_clear_errors(mnist_slice, kwargs, message):
    model, guide = small_pair()
    with pytest.raises(ValueError, match=message):
        fit(model, guide, mnist_slice[:20], progress=False, **{"epochs": 1, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_missing_cuda_is_a_clear_error():
    assert pick_device(None).type == "cpu"
    with pytest.raises(ValueError, match="no GPU"):
        pick_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fit_runs_on_cuda(mnist_slice):
    model, guide = small_pair()
    result = fit(model, guide, mnist_slice[:100], epochs=1, batch_size=50, device="cuda", progress=False)
    assert result.device.startswith("cuda")
    assert next(model.parameters()).is_cuda


def test_resume_is_exact_for_hand_written_function_pairs(mnist_slice, tmp_path):
    """Modules hidden inside plain model/guide functions are restored through the param store."""

    x = mnist_slice[:120]

    def make_pair():
        decoder = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.ReLU(), torch.nn.Linear(32, 784))
        encoder = torch.nn.Linear(784, 6)
        decoder.to(x.device), encoder.to(x.device)  # plain functions: fit cannot move what it cannot see

        def model(x):
            pyro.module("dec", decoder)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", pyro.distributions.Normal(x.new_zeros(3), 1.0).to_event(1))
                pyro.sample("x", pyro.distributions.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

        def guide(x):
            pyro.module("enc", encoder)
            scale = pyro.param("scale_floor", x.new_tensor(0.01), constraint=pyro.distributions.constraints.positive)
            with pyro.plate("data", x.shape[0]):
                loc, raw = encoder(x).chunk(2, -1)
                pyro.sample("z", pyro.distributions.Normal(loc, torch.nn.functional.softplus(raw) + scale).to_event(1))

        return model, guide

    kwargs = dict(batch_size=40, lr=1e-2, progress=False, seed=1)
    pyro.set_rng_seed(11)
    straight = fit(*make_pair(), x, epochs=3, **kwargs)
    pyro.clear_param_store()
    pyro.set_rng_seed(11)
    fit(*make_pair(), x, epochs=2, checkpoint_dir=tmp_path, **kwargs)
    pyro.clear_param_store()
    resumed = fit(*make_pair(), x, epochs=3, checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert resumed.history[2]["train_elbo"] == pytest.approx(straight.history[2]["train_elbo"], abs=1e-9)


def test_fit_trains_where_the_data_is_unless_told(mnist_slice, device):
    model, guide = small_pair()  # built on the CPU
    result = fit(model, guide, mnist_slice[:40], epochs=1, batch_size=40, progress=False)
    assert result.device == str(mnist_slice.device)
    assert next(model.parameters()).device == mnist_slice.device == next(guide.parameters()).device
    result = fit(model, guide, mnist_slice[:40], epochs=1, batch_size=40, progress=False, device="cpu")
    assert result.device == "cpu" and next(model.parameters()).device.type == "cpu"


def test_evaluating_modules_on_another_device_than_the_data_is_a_clear_error():
    # "meta" stands in for a GPU here: a second device that any machine has
    model, guide = small_pair(device="meta")
    with pytest.raises(ValueError, match=r"x is on cpu but the VAE's parameters are on meta.*\.to\("):
        evaluate.elbo(model, guide, torch.zeros(3, 784))


def test_checkpoint_loads_onto_another_device_with_rng_states_on_the_cpu(mnist_slice, tmp_path):
    # the GPU failure "RNG state must be a torch.ByteTensor" came from map_location moving the
    # saved RNG states with the weights; "meta" reproduces it without a GPU
    model, guide = small_pair()
    fit(model, guide, mnist_slice[:40], epochs=1, batch_size=40, progress=False, checkpoint_dir=tmp_path)
    state = checkpoint.load(tmp_path / "last.pt", map_location="meta")
    assert all(v.device.type == "meta" for v in state["model"].values())
    assert all(v.device.type == "meta" for v in state["param_store"]["params"].values())
    before = torch.get_rng_state()
    torch.manual_seed(12345)
    checkpoint.set_rng_state(state["rng"])
    assert torch.equal(torch.get_rng_state(), torch.from_numpy(checkpoint.load(tmp_path / "last.pt")["rng"]["torch"]))
    torch.set_rng_state(before)


def test_rng_states_of_older_checkpoints_restore_from_tensors():
    # checkpoints written before RNG states were kept as NumPy arrays hold CPU tensors
    state = {**checkpoint.rng_state(), "torch": torch.get_rng_state()}
    expected = torch.rand(3)
    torch.rand(5)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


def test_resume_restores_the_optimizer_and_keeps_its_step_counts_on_the_cpu(mnist_slice, tmp_path):
    model, guide = small_pair()
    kwargs = dict(batch_size=20, lr=1e-3, progress=False, checkpoint_dir=tmp_path)
    fit(model, guide, mnist_slice[:40], epochs=1, **kwargs)
    optimizer = pyro.optim.Adam({"lr": 1e-3})
    fit(model, guide, mnist_slice[:40], epochs=2, resume=True, optimizer=optimizer, **kwargs)
    states = [opt.state_dict()["state"] for opt in optimizer.optim_objs.values()]
    assert states and all(s[0]["step"].item() == 4 for s in states)  # 2 steps per epoch, restored + continued
    assert all(s[0]["step"].device.type == "cpu" for s in states)
    assert all(s[0]["exp_avg"].device == mnist_slice.device for s in states)


def test_a_run_killed_mid_epoch_records_by_samples_seen_what_an_uninterrupted_run_records(tmp_path, device):
    # record_at: the averages since the last record live in the checkpoint, so the resumed
    # run's next record covers the same steps as the uninterrupted run's
    x = torch.bernoulli(torch.full((100, 6), 0.3, device=device))

    def pair():
        pyro.set_rng_seed(0)
        return (vi_lab.VAE(2, [8], x_dim=6).to(device),
                vi_lab.make_guide("mean_field", latent_dim=2, hidden=[8], x_dim=6).to(device))

    model, guide = pair()
    full = vi_lab.fit(model, guide, x, epochs=2, batch_size=25, record_at=[150], progress=False)

    class Killed(Exception):
        pass

    calls = {"n": 0}
    model, guide = pair()

    def dying_model(x_batch):
        calls["n"] += 1
        if calls["n"] > 1 + 4 + 1:  # the door, epoch 1's four steps, then the first step of epoch 2
            raise Killed
        return model(x_batch)

    with pytest.raises(Killed):
        vi_lab.fit(dying_model, guide, x, epochs=2, batch_size=25, record_at=[150], progress=False,
                   checkpoint_dir=tmp_path)
    model, guide = pair()
    resumed = vi_lab.fit(model, guide, x, epochs=2, batch_size=25, record_at=[150], progress=False,
                         checkpoint_dir=tmp_path, resume=True)
    assert [h["samples_seen"] for h in resumed.history] == [150, 200]
    for a, b in zip(full.history, resumed.history):
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], abs=1e-5)
    assert full.seconds_per_epoch == pytest.approx(sum(h["seconds"] for h in full.history) / 2)
