"""fit() under misuse and faults: runs are never overwritten, resume obeys, damage and divergence are named."""

import errno
import json
import os
import tempfile

import pyro
import pytest
import torch

from vi_lab import checkpoint, fit
from vi_lab.checkpoint import CheckpointDamaged, CheckpointWriteError
from vi_lab.guides import make_guide
from vi_lab.infer import TrainingDiverged, TrainingUnstable
from vi_lab.models import VAE

N, X_DIM = 96, 784


@pytest.fixture
def data(device):
    g = torch.Generator().manual_seed(0)
    # the draws from g, not the global generator: seeded alike, it would repeat p and give all zeros
    return torch.bernoulli(torch.rand(N, X_DIM, generator=g), generator=g).to(device)


def pair(device, seed=0):
    torch.manual_seed(seed)
    return VAE(3, [16]).to(device), make_guide("mean_field", latent_dim=3, hidden=[16]).to(device)


def train(data, out, device, **kw):
    model, guide = pair(device)
    args = dict(epochs=2, batch_size=32, progress=False, checkpoint_dir=out, seed=0)
    return model, guide, fit(model, guide, data, **{**args, **kw})


def epochs_logged(out):
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_run_into_a_directory_holding_one_is_refused_and_nothing_changes(data, tmp_path, device):
    train(data, tmp_path, device)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match=r"already holds a run \(last.pt, metrics.jsonl\); nothing was changed"):
        train(data, tmp_path, device)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_resume_uses_the_lr_given_now(data, tmp_path, device):
    train(data, tmp_path, device)
    saved = checkpoint.load(tmp_path / "last.pt")["param_store"]["params"]
    model, guide, _ = train(data, tmp_path, device, epochs=3, lr=0.0, resume=True)
    now = pyro.get_param_store()
    assert all(torch.equal(now[k].detach().cpu(), v) for k, v in saved.items())  # lr 0: nothing moved
    state = checkpoint.load(tmp_path / "last.pt")
    assert state["epoch"] == 3
    assert {g["lr"] for s in state["optim"].values() for g in s["param_groups"]} == {0.0}


@pytest.mark.parametrize("change, named", [
    ({"batch_size": 16}, "batch_size=32 then, batch_size=16 now"),
    ({"binarize": "dynamic"}, "binarize='none' then, binarize='dynamic' now"),
    ({"estimator": "reinforce"}, "estimator='reparam' then, estimator='reinforce' now"),
])
def test_resume_refuses_settings_that_cannot_change(data, tmp_path, device, change, named):
    train(data, tmp_path, device)
    with pytest.raises(ValueError, match=rf"cannot resume .*last.pt: \w+ cannot change on resume \({named}\)"):
        train(data, tmp_path, device, epochs=3, resume=True, **change)


def test_resume_refuses_other_data(data, tmp_path, device):
    train(data, tmp_path, device)
    with pytest.raises(ValueError, match=r"data cannot change on resume \(the training data was \[96, 784\]"):
        train(1 - data, tmp_path, device, epochs=3, resume=True)


def test_resume_cuts_the_log_back_to_the_checkpoint_and_removes_temporaries(data, tmp_path, device):
    train(data, tmp_path, device, epochs=2)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a line of an epoch the checkpoint never got, half written
        f.write(json.dumps({"epoch": 3, "train_elbo": -1.0}) + "\n" + '{"epoch": 4, "tr')
    (tmp_path / "last.pt.abc123.tmp").write_bytes(b"x" * 1000)  # a write killed mid-way
    train(data, tmp_path, device, epochs=4, resume=True)
    assert epochs_logged(tmp_path) == [1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.jsonl"]


def test_a_missing_metrics_line_is_restored_from_the_checkpoint(data, tmp_path, device):
    train(data, tmp_path, device, epochs=2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n")  # killed after the checkpoint, before the line
    train(data, tmp_path, device, epochs=3, resume=True)
    assert epochs_logged(tmp_path) == [1, 2, 3]


@pytest.mark.parametrize("where", ["tensor bytes", "pickle", "truncated"])
def test_a_damaged_checkpoint_is_reported_before_training(data, tmp_path, device, where):
    train(data, tmp_path, device)
    path = tmp_path / "last.pt"
    raw = bytearray(path.read_bytes())
    if where == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2 if where == "tensor bytes" else 100] ^= 0xFF  # torch.load alone takes the first
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointDamaged, match=rf"checkpoint {path} is damaged.*cannot be resumed"):
        train(data, tmp_path, device, epochs=3, resume=True)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointDamaged, match="damaged or not a checkpoint"):
        checkpoint.load(path)


def test_a_full_disk_is_one_line_naming_the_path_and_the_previous_checkpoint_survives(data, tmp_path, device,
                                                                                       monkeypatch):
    train(data, tmp_path, device)
    good = (tmp_path / "last.pt").read_bytes()
    real_mkstemp = tempfile.mkstemp

    def full_disk(*a, **kw):  # the checkpoint's temporary file is real; its writes go to /dev/full (ENOSPC)
        fd, name = real_mkstemp(*a, **kw)
        if not os.path.basename(name).startswith("last.pt."):
            return fd, name
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", full_disk)
    with pytest.raises(CheckpointWriteError) as err:
        train(data, tmp_path, device, epochs=3, resume=True)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"could not write checkpoint {tmp_path / 'last.pt'}: No space left on device "
                              f"(errno {errno.ENOSPC}); the previous one is intact")
    assert (tmp_path / "last.pt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.jsonl"]
    assert epochs_logged(tmp_path) == [1, 2]


def test_a_read_only_directory_is_one_line(data, tmp_path, device, monkeypatch):
    def refused(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", refused)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*last.pt: Permission denied "
                                                   r"\(errno 13\); there was no previous one"):
        train(data, tmp_path, device)


def test_an_overflowing_lr_is_divergence_not_a_distribution_error(data, tmp_path, device):
    with pyro.validation_enabled(True):
        with pytest.raises(TrainingDiverged, match=r"training diverged at epoch \d+, step \d+ of 3: "):
            train(data, tmp_path, device, epochs=3, lr=1e20)


def test_parameters_broken_before_training_are_not_called_divergence(data, device):
    _, guide = pair(device)
    bad = VAE(3, [16], likelihood="gaussian").to(device)
    bad.likelihood.raw_scale.data.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"VAE.likelihood.raw_scale hold NaN or infinite values before training"):
        fit(bad, guide, data, epochs=1, batch_size=32, progress=False)


def test_an_exploding_loss_is_warned_about_and_recorded(data, tmp_path, device):
    with pytest.warns(TrainingUnstable, match=r"far below the .* it reached before: the optimization is unstable "
                                              r"\(lr 10 is probably too large\)"):
        _, _, result = train(data, tmp_path, device, epochs=2, lr=10.0)
    assert any(h.get("unstable") for h in result.history)


def test_a_healthy_run_is_not_warned_about(data, tmp_path, device, recwarn):
    train(data, tmp_path, device, epochs=3, lr=1e-3)
    assert not [w for w in recwarn if issubclass(w.category, TrainingUnstable)]


def test_zero_epochs_write_no_checkpoint_and_say_so(data, tmp_path, device):
    _, _, result = train(data, tmp_path, device, epochs=0)
    assert result.checkpoint is None and not (tmp_path / "last.pt").exists()


def test_epochs_progress_prints_one_line_per_epoch_and_no_bar(data, device, capsys):
    model, guide = pair(device)
    fit(model, guide, data, epochs=2, batch_size=32, progress="epochs")
    out = capsys.readouterr()
    assert [line.split(":")[0] for line in out.out.splitlines()] == ["epoch 1", "epoch 2"]
    assert "it/s" not in out.err
    with pytest.raises(ValueError, match="progress must be True, False or 'epochs'"):
        fit(model, guide, data, epochs=1, progress="bars")


@pytest.mark.parametrize("auto", ["AutoDelta", "AutoNormal"])
def test_seed_fixes_a_lazily_initialised_guide_whatever_the_random_state_before(data, device, auto):
    import pyro.infer.autoguide as autoguide
    from pyro.infer.autoguide.initialization import init_to_sample

    init = {} if auto == "AutoDelta" else {"init_loc_fn": init_to_sample}  # both draw their starting values
    results = []
    for before in (1, 2):
        model, _ = pair(device)  # the same weights each time
        guide = getattr(autoguide, auto)(model, **init)
        torch.manual_seed(before)  # only the random state fit starts from differs
        pyro.clear_param_store()
        results.append(fit(model, guide, data[:32], epochs=2, batch_size=32, seed=0, progress=False).train_elbo)
    assert results[0] == results[1]


def test_an_autoguide_is_refused_on_minibatches(data, device):
    import pyro.infer.autoguide as autoguide

    model, _ = pair(device)
    with pytest.raises(ValueError, match=r"AutoNormal is not amortized: .* minibatches of 16 out of 96 datapoints"):
        fit(model, autoguide.AutoNormal(model), data, epochs=1, batch_size=16, progress=False)


def test_a_refused_fit_leaves_the_callers_param_store_and_rng_alone(data, device):
    kept = pyro.param("mine", torch.ones(3))
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    model, guide = pair(device)
    torch.manual_seed(123)
    with pytest.raises(ValueError, match="values outside the support"):
        fit(model, guide, data * 0.5, epochs=1, batch_size=32, progress=False)
    assert torch.equal(pyro.param("mine"), kept) and torch.equal(torch.rand(4), expected)


def test_binarizing_data_outside_the_unit_interval_is_named(data, device):
    from vi_lab.data import binarize

    model, guide = pair(device)
    with pytest.raises(ValueError, match=r"binarize='dynamic' reads data as pixel intensities in \[0, 1\], but its "
                                         r"values range over \[0, 255\] \(0-255 images\? divide them by 255\)"):
        fit(model, guide, data * 255, epochs=1, batch_size=32, binarize="dynamic", progress=False)
    with pytest.raises(ValueError, match=r"binarize='threshold' reads x .* \[-1, 1\]"):
        binarize(data * 2 - 1, "threshold")
    with pytest.raises(ValueError, match=r"binarize='dynamic' reads x .* \[0, 255\]"):
        binarize(data.cpu() * 255, "dynamic")
    with pytest.raises(ValueError, match=r"binarize='static' reads x .* \[0, 255\]"):
        binarize(data.cpu() * 255, "static")


def test_wake_sleep_divergence_names_the_loss(data, device):
    model, guide = pair(device)
    with pytest.raises(TrainingDiverged, match=r"training diverged at epoch \d+, step \d+ of 3: the (model|guide) "
                                               r"loss became (nan|inf|-inf)") as err:
        with pyro.validation_enabled(False):
            fit(model, guide, data, loss="wake_sleep", epochs=5, batch_size=32, lr=1e20, progress=False)
    assert not err.value.loss == err.value.loss or abs(err.value.loss) == float("inf")


def test_wake_sleep_checks_all_the_data_before_training(data, device):
    model, guide = pair(device)
    bad = data.clone()
    bad[70, 5] = float("nan")
    with pytest.raises(ValueError, match=r"^data holds 1 NaN values in 1 of its 96 rows \(first: row 70\)"):
        fit(model, guide, bad, loss="wake_sleep", epochs=1, batch_size=32, progress=False)
    with pytest.raises(ValueError, match=r"got data of shape \(784,\); it is one datapoint"):
        fit(model, guide, data[0], loss="wake_sleep", epochs=1, batch_size=32, progress=False)
