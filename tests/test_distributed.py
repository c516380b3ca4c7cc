"""Data-parallel training under torchrun: 2 processes on the CPU with gloo (vi_lab.distributed).

Each test launches ``torchrun --nproc_per_node=2`` in a subprocess (tests/ranks.py) on a
script of tests/ranked/ or on the ``vi-lab train`` command, and compares what the ranks
saved with one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

import ranks
import vi_lab
from vi_lab import checkpoint

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE / "ranked"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _one_process(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(SCRIPTS / script), *args], check=True, env=ranks.env(), capture_output=True,
                   timeout=240)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_ranks_take_the_step_one_process_takes_on_the_whole_batch(tmp_path):
    """2 x 64 rows (and a last batch of 1 row: rank 1 idle) give one process's update on 128, to float tolerance."""
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    ranks.torchrun(2, str(SCRIPTS / "exact_step.py"), str(two), "257", "1")
    _one_process("exact_step.py", str(one), "257", "1")
    r0, r1 = ranks.rank_results(two, 2)
    (single,) = ranks.rank_results(one, 1)
    for pair in ("gaussian", "enum"):
        assert _max_diff(r0[pair], r1[pair]) == 0.0  # the ranks hold one model
        # each rank started from its own random weights: fit took rank 0's everywhere
        assert _max_diff(r0[pair], single[pair]) < 1e-5, pair
    assert r0["history"][0]["train_elbo"] == pytest.approx(single["history"][0]["train_elbo"], abs=1e-5)
    assert (r0["world_size"], r0["backend"], single["world_size"], single["backend"]) == (2, "gloo", 1, None)


def test_every_estimator_trains_one_model_on_two_ranks(tmp_path):
    """Every loss and estimator of fit: identical parameters on both ranks; per-position baselines checkpointed whole."""
    ranks.torchrun(2, str(SCRIPTS / "estimators.py"), str(tmp_path))
    r0, r1 = ranks.rank_results(tmp_path, 2)
    (different, too_few), other = r0.pop("refusals"), r1.pop("refusals")
    assert "different training data" in different and "rank 1: [192, 16]" in different
    assert "fewer than the 2 processes" in too_few and [different, too_few] == other
    assert len(r0) == 11  # 9 losses and estimators of the ELBO, then iwae and dreg (with KL warm-up)
    assert r0["dreg"]["history"][0]["kl_weight"] == 1.0 and "train_bound" in r0["iwae"]["history"][0]
    for name in r0:
        shared = {k: v for k, v in r0[name]["params"].items() if not k.startswith("__baseline_avg")}
        other = {k: v for k, v in r1[name]["params"].items() if not k.startswith("__baseline_avg")}
        assert _max_diff(shared, other) == 0.0, name
        assert all(torch.isfinite(v).all() for v in shared.values()), name
        # the global numbers, on every rank
        assert r0[name]["history"] == [{**h, "seconds": g["seconds"], "cpu_seconds": g["cpu_seconds"]}
                                       for h, g in zip(r1[name]["history"], r0[name]["history"])]
        for k, shape in r0[name]["checkpoint_shapes"].items():
            if k.startswith("__baseline_avg"):  # one value per position of the 63-row batch, the ranks' 32 + 31 joined
                assert shape == (63,), name
                assert (tuple(r0[name]["params"][k].shape), tuple(r1[name]["params"][k].shape)) == ((32,), (31,))
    assert any(k.startswith("__baseline_avg") for k in r0["trace-reinforce_baseline-nn"]["checkpoint_shapes"])


def _small_run(where: Path, epochs: int, resume: bool = False) -> vi_lab.infer.FitResult:
    """What tests/ranked/resume.py trains, in this process."""
    torch.manual_seed(0)
    x = torch.rand(300, 16)
    model = vi_lab.VAE(4, [8], x_dim=16)
    guide = vi_lab.make_guide("mean_field", latent_dim=4, hidden=[8], x_dim=16)
    return vi_lab.fit(model, guide, x, epochs=epochs, batch_size=50, lr=1e-2, binarize="dynamic", seed=7,
                      checkpoint_dir=where, resume=resume, progress=False)


def test_resume_is_exact_on_as_many_ranks_and_works_on_any_number(tmp_path):
    single = _small_run(tmp_path / "single", 2)  # one process's checkpoint, continued on two below
    ranks.torchrun(2, str(SCRIPTS / "resume.py"), str(tmp_path))
    for r in ranks.rank_results(tmp_path, 2):
        assert _max_diff(r["straight"]["params"], r["resumed"]["params"]) == 0.0
        assert [h["train_elbo"] for h in r["straight"]["history"]] == [h["train_elbo"] for h in r["resumed"]["history"]]
        elbos = [h["train_elbo"] for h in r["from_single"]["history"]]
        assert len(elbos) == 3 and elbos[:2] == [h["train_elbo"] for h in single.history]
    assert checkpoint.load(tmp_path / "single" / "last.pt")["world_size"] == 2  # rewritten by the 2 processes
    # a checkpoint of two processes continues in one
    state = checkpoint.load(tmp_path / "stopped" / "last.pt")
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    result = _small_run(tmp_path / "stopped", 4, resume=True)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4] and result.world_size == 1
    assert result.history[3]["train_elbo"] > result.history[0]["train_elbo"]


def _train(out: Path, nproc: int, seed: int, tiny: list[str]) -> dict:
    args = ["-m", "vi_lab", "train", *tiny, "--out", str(out), "--seed", str(seed)]
    if nproc == 1:
        subprocess.run([sys.executable, *args], check=True, env=ranks.env(), capture_output=True, timeout=300,
                       cwd=ranks.ROOT)
    else:
        proc = ranks.torchrun(nproc, *args, timeout=300)
        assert proc.stdout.count("evaluating ") == 1  # rank 0 alone prints
    return json.loads((out / "metrics.json").read_text())


def test_two_processes_end_within_noise_of_one(tmp_path):
    """`torchrun -m vi_lab train` with the same global batch and seed lands where one process does."""
    tiny = ["--epochs", "3", "--train-size", "1000", "--eval-size", "200", "--eval-samples", "20", "--batch-size", "100",
            "--threads", "1", "--no-progress", "--hidden", "64", "--latent-dim", "8"]
    two = _train(tmp_path / "two", 2, 0, tiny)
    one = _train(tmp_path / "one", 1, 0, tiny)
    other_seed = _train(tmp_path / "seed1", 1, 1, tiny)
    assert (two["world_size"], two["backend"], one["world_size"], one["backend"]) == (2, "gloo", 1, None)
    assert len(two["history"]) == 3 and len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 3
    noise = abs(other_seed["test_elbo"] - one["test_elbo"])  # what another seed alone changes
    assert abs(two["test_elbo"] - one["test_elbo"]) < 3 * max(noise, 0.5), (two["test_elbo"], one["test_elbo"], noise)
    assert two["test_elbo"] - two["history"][0]["test_elbo"] > 0  # it learned


def _rank_pid(tag: str, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"VI_LAB_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env and \
                b"TORCHELASTIC_RUN_ID" in b"".join(e[:19] for e in env):
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process in /proc (Linux)")
def test_a_killed_rank_ends_the_run_with_a_clear_error_and_an_intact_checkpoint(tmp_path):
    out, tag = tmp_path / "run", uuid.uuid4().hex
    args = ["examples/vae_mnist.py", "--epochs", "200", "--train-size", "400", "--eval-size", "20", "--eval-samples",
            "10", "--threads", "1", "--no-progress", "--hidden", "32", "--latent-dim", "4", "--out", str(out)]
    proc = subprocess.Popen(ranks.launch_args(2, *args), cwd=ranks.ROOT, env=ranks.env(VI_LAB_TEST_TAG=tag),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        victim = _rank_pid(tag, 1)
        assert victim is not None and proc.poll() is None, "the run ended or never checkpointed"
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)  # bounded: the survivors stop on their own
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    said = stdout + stderr
    assert "another process of this run stopped" in said or "was stopped (SIGTERM)" in said, said[-3000:]
    assert "--resume" in said
    checkpoint.verify(out / "last.pt")  # intact
    state = checkpoint.load(out / "last.pt")
    assert 1 <= state["epoch"] < 200
    # and it continues, in one process
    again = [a for a in args if a not in ("--out", str(out))]
    again[again.index("--epochs") + 1] = str(state["epoch"] + 1)
    done = subprocess.run([sys.executable, *again, "--resume", str(out)], cwd=ranks.ROOT, env=ranks.env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["epochs"] == state["epoch"] + 1


@pytest.mark.parametrize("command", ["compare", "estimators", "em", "wake-sleep", "cvae", "autoencoders"])
def test_single_process_commands_refuse_a_torchrun_launch(command, monkeypatch, tmp_path):
    from vi_lab import cli

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node=2 sets
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=f"vi-lab {command} runs in one process, but torchrun started 2"):
        cli.main([command, str(tmp_path)] if command == "compare" else [command, "--epochs", "1"])
    assert list(tmp_path.iterdir()) == []  # nothing written
