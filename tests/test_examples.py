"""The examples run end to end through a subprocess with the smallest settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--train-size", "200", "--eval-size", "20", "--eval-samples", "10",
        "--threads", "1", "--no-progress"]


def run_example(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("latent_dim", ["2", "5"])
def test_vae_mnist_writes_every_output(tmp_path, latent_dim, example_args, device):
    out = tmp_path / "run"
    proc = run_example("vae_mnist.py", *TINY, "--latent-dim", latent_dim, "--hidden", "32", "--out", str(out),
                       *example_args)
    expected = {"metrics.json", "samples.png", "reconstructions.png", "curves.png", "last.pt", "metrics.jsonl",
                "interpolation.png", "traversals.png", "edits.png", "latent_scatter.png"}
    if latent_dim == "2":
        expected.add("manifold.png")
    assert expected <= {p.name for p in out.iterdir()}
    for png in out.glob("*.png"):
        assert png.stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("train_elbo", "test_elbo", "test_log_likelihood", "eval_samples", "epochs", "seconds_per_epoch",
                "dataset", "data_source", "device", "guide"):
        assert key in metrics
    assert metrics["eval_samples"] == 10 and metrics["epochs"] == 1 and metrics["guide"] == "mean_field"
    assert metrics["device"] == str(device)  # it ran on the device under test
    assert metrics["test_log_likelihood"] >= metrics["test_elbo"] - 1.0  # IS bound is tighter on average
    assert "test log-likelihood (K=10)" in proc.stdout


def test_vae_mnist_resume_continues_the_run(tmp_path, example_args):
    out = tmp_path / "run"
    run_example("vae_mnist.py", *TINY, "--hidden", "32", "--out", str(out), *example_args)
    more = [a if a != "1" or i != 1 else "2" for i, a in enumerate(TINY)]  # --epochs 2
    run_example("vae_mnist.py", *more, "--hidden", "32", "--resume", str(out), *example_args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]


def test_vae_mnist_rejects_an_unknown_guide(tmp_path, example_args):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "vae_mnist.py"), "--guide", "nope", *example_args],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert "unknown guide 'nope'; valid names" in proc.stderr
