"""The examples' run directories: a run is never replaced by accident, a resumed one keeps its options."""

import dataclasses
import json
import os

import pytest

from vi_lab import runs


@dataclasses.dataclass(frozen=True)
class Config(runs.CommonConfig):
    latent_dim: int = 20
    lr: float = 1e-3
    resume: str | None = None


def test_a_directory_holding_a_run_is_refused_untouched(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"a run")
    with pytest.raises(SystemExit, match=rf"error: {tmp_path} already holds files \(last.pt\); nothing was changed"):
        runs.out_dir(str(tmp_path))
    assert (tmp_path / "last.pt").read_bytes() == b"a run"
    assert runs.out_dir(str(tmp_path), str(tmp_path)) == tmp_path  # resumed in place
    (tmp_path / "notes.txt").write_text("mine")
    assert runs.out_dir(str(tmp_path), overwrite=True) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [".vi_lab.lock", "notes.txt"]  # the run's files go


def test_a_config_left_by_a_failed_start_does_not_block(tmp_path):
    runs.record_config(tmp_path, Config(), None)
    assert runs.out_dir(str(tmp_path)) == tmp_path


def test_resuming_into_another_directory_needs_it_empty_and_checks_the_resumed_config(tmp_path):
    first, branch = tmp_path / "first", tmp_path / "branch"
    first.mkdir()
    runs.record_config(first, Config(latent_dim=20), None)
    (first / "last.pt").write_bytes(b"a run")
    with pytest.raises(SystemExit, match=r"--resume continues a run and --overwrite replaces it"):
        runs.out_dir(None, str(first), overwrite=True)
    assert runs.out_dir(str(branch), str(first)) == branch
    with pytest.raises(SystemExit, match=r"cannot resume .*first: --latent-dim was 20, now 5"):
        runs.record_config(branch, Config(latent_dim=5, resume=str(first)), str(first))
    runs.record_config(branch, Config(lr=0.01, resume=str(first)), str(first))  # lr may change
    assert json.loads((branch / "config.json").read_text())["config"]["lr"] == 0.01
    assert json.loads((first / "config.json").read_text())["config"]["lr"] == 1e-3
    (branch / "last.pt").write_bytes(b"the branch")
    with pytest.raises(SystemExit, match="already holds files"):
        runs.out_dir(str(branch), str(first))


def test_two_live_runs_never_write_into_one_directory(tmp_path):
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / ".vi_lab.lock").write_text(str(other.pid))  # a live process holds it
        with pytest.raises(SystemExit, match=rf"another run \(pid {other.pid}\) is writing into {tmp_path}"):
            runs.out_dir(str(tmp_path))
    finally:
        other.kill()
        other.wait()
    assert runs.out_dir(str(tmp_path)) == tmp_path  # its process is gone: the lock is stale, taken over
    assert (tmp_path / ".vi_lab.lock").read_text() == str(os.getpid())


def test_resuming_nothing_is_refused_without_creating_anything(tmp_path):
    with pytest.raises(SystemExit, match="nothing to resume at"):
        runs.out_dir(None, str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()


def test_a_damaged_config_is_named_on_resume(tmp_path):
    (tmp_path / "config.json").write_text('{"config": {"lr": ')
    with pytest.raises(SystemExit, match=rf"cannot resume {tmp_path}: its config.json is not readable"):
        runs.record_config(tmp_path, Config(), str(tmp_path))


def test_only_errors_vi_lab_raises_itself_become_one_line():
    import torch

    from vi_lab.models.likelihoods import make_likelihood

    with pytest.raises(SystemExit, match="error: unknown likelihood 'nope'; valid"):
        with runs.user_errors():
            make_likelihood("nope", 784)
    with pytest.raises(ValueError, match="Expected parameter scale"):  # raised inside torch: keeps its traceback
        with runs.user_errors():
            torch.distributions.Normal(torch.tensor(0.0), torch.tensor(-1.0), validate_args=True)
