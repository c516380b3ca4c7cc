"""The `vi-lab` command: its help without heavy imports, train/eval/compare in-process, your own data."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vi_lab.cli import COMMANDS, main

def test_help_lists_every_command_and_imports_nothing_heavy():
    code = ("import sys; from vi_lab.cli import main; status = main(['--help']); "
            "heavy = sorted(m for m in ('torch', 'pyro', 'numpy', 'matplotlib') if m in sys.modules); "
            "print('HEAVY', heavy, status)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "HEAVY [] 0" in done.stdout
    for name in COMMANDS:
        assert f"  {name} " in done.stdout


def test_python_m_vi_lab_and_the_console_script_answer_help():
    done = subprocess.run([sys.executable, "-m", "vi_lab", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "commands:" in done.stdout, done.stderr
    scripts = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "vi-lab"]
    if not scripts:
        pytest.skip("vi_lab is not installed with its metadata here (pip install -e . declares vi-lab)")
    assert scripts[0].value == "vi_lab.cli:main"
    exe = Path(sys.executable).parent / "vi-lab"
    assert exe.is_file(), f"pip installed vi_lab but no {exe}"
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "commands:" in done.stdout


def test_no_command_and_unknown_command_are_usage_errors(capsys):
    assert main([]) == 2
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err and "compare" in err


def test_train_then_eval_then_compare(tmp_path, tiny_args, example_args, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *tiny_args, "--latent-dim", "2", "--hidden", "16", "--out", str(run_dir), *example_args]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["command"] and metrics["config"]["latent_dim"] == 2 and len(metrics["history"]) == 1
    assert {"samples.png", "reconstructions.png", "manifold.png", "last.pt", "config.json"} <= {
        p.name for p in run_dir.iterdir()}
    assert main(["eval", str(run_dir), "--eval-size", "30", "--eval-samples", "30", "--no-progress",
                 *example_args]) == 0
    scored = json.loads(next(run_dir.glob("eval_mnist_test_N30_K30_s0.json")).read_text())
    assert scored["eval_size"] == 30 and scored["log_likelihood"]["mean"] >= scored["elbo"]["mean"] - 1e-6
    assert scored["khat_mean"] is not None  # K = 30 draws: the tail is fitted
    capsys.readouterr()
    assert main(["compare", str(run_dir), "--out", str(tmp_path / "table.md")]) == 0
    out = capsys.readouterr().out
    assert out.count(str(run_dir)) == 2  # the training metrics and the eval
    assert (tmp_path / "table.md").read_text().startswith("| run | guide |")


def test_eval_and_compare_refuse_what_is_not_a_run(tmp_path):
    with pytest.raises(SystemExit, match="holds no run of vi-lab train: config.json is missing"):
        main(["eval", str(tmp_path)])
    with pytest.raises(SystemExit, match="holds no metrics.json or eval"):
        main(["compare", str(tmp_path)])


def _check_trained(run_dir: Path, x_dim: int, pictures: bool) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert np.isfinite(metrics["test_elbo"]) and len(metrics["history"]) == 2
    assert (run_dir / "samples.png").is_file() == pictures
    import torch

    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    assert state["settings"]["data"]["shape"][1] == x_dim  # the model's input size followed the data
    return metrics


def test_train_on_a_user_array(tmp_path, example_args):
    rng = np.random.default_rng(0)
    images = (rng.random((120, 10, 10)) < 0.3).astype(np.uint8) * 255  # (N, H, W) uint8
    np.save(tmp_path / "mine.npy", images)
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "mine.npy"), "--epochs", "2", "--eval-samples", "5",
                 "--threads", "1", "--no-progress", "--latent-dim", "2", "--hidden", "16", "--batch-size", "32",
                 "--out", str(run_dir), *example_args]) == 0
    metrics = _check_trained(run_dir, 100, pictures=True)
    assert metrics["train_size"] == 108 and metrics["eval_size"] == 12  # the held-out tenth


def test_train_on_a_folder_of_pngs_and_on_vectors(tmp_path, example_args):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in (("train", 40), ("test", 10)):
        for label in ("a", "b"):
            folder = tmp_path / "pngs" / split / label
            folder.mkdir(parents=True)
            for i in range(n // 2):
                Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "pngs"), "--epochs", "2", "--eval-samples", "5", "--threads",
                 "1", "--no-progress", "--latent-dim", "2", "--hidden", "8", "--batch-size", "10",
                 "--out", str(run_dir), *example_args]) == 0
    _check_trained(run_dir, 36, pictures=True)
    np.save(tmp_path / "vectors.npy", rng.normal(size=(50, 5)).astype(np.float32))
    run_dir = tmp_path / "run_vectors"
    assert main(["train", "--data", str(tmp_path / "vectors.npy"), "--likelihood", "gaussian", "--epochs", "2",
                 "--eval-samples", "5", "--threads", "1", "--no-progress", "--latent-dim", "2", "--hidden", "8",
                 "--batch-size", "10", "--out", str(run_dir), *example_args]) == 0
    _check_trained(run_dir, 5, pictures=False)  # vectors: no pictures, the numbers all the same


def test_eval_scores_the_run_on_its_own_binarization_and_compare_skips_other_commands(tmp_path, tiny_args,
                                                                                       example_args, capsys):
    run_dir = tmp_path / "seed3"
    assert main(["train", *tiny_args, "--seed", "3", "--latent-dim", "2", "--hidden", "16", "--eval-samples", "10",
                 "--out", str(run_dir), *example_args]) == 0
    trained = json.loads((run_dir / "metrics.json").read_text())
    # same test images, same K, same draws' seed: the run's seed (not eval's) binarizes the test set
    assert main(["eval", str(run_dir), "--eval-size", "20", "--eval-samples", "10", "--no-progress",
                 *example_args]) == 0
    scored = json.loads((run_dir / "eval_mnist_test_N20_K10_s0.json").read_text())
    assert scored["binarization_seed"] == 4 and scored["run_epochs"] == 1
    assert scored["elbo"]["mean"] == pytest.approx(trained["test_elbo"], abs=3.0)  # ELBO of 10 draws vs 1
    other = tmp_path / "cvae"
    assert main(["cvae", *tiny_args, "--hidden", "8", "--digits", "3", "--samples-per-digit", "2", "--out",
                 str(other), *example_args]) == 0
    capsys.readouterr()
    assert main(["compare", str(run_dir), str(other)]) == 0
    captured = capsys.readouterr()
    assert "skipped: " in captured.err and "was not written by vi-lab train" in captured.err
    assert str(other) not in captured.out


def test_clear_errors_for_combinations_that_cannot_work(tmp_path, tiny_args, example_args, capsys):
    with pytest.raises(SystemExit):  # argparse: one source of data
        main(["train", "--dataset", "fashion-mnist", "--data", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err
    np.save(tmp_path / "img10.npy", (np.random.default_rng(0).random((40, 10, 10)) * 255).astype(np.uint8))
    with pytest.raises(SystemExit, match="arch 'conv' reads each datapoint as a square grey image whose side is a "
                                         "multiple of 4"):
        main(["train", *tiny_args, "--data", str(tmp_path / "img10.npy"), "--arch", "conv", "--out",
              str(tmp_path / "conv"), *example_args])
    with pytest.raises(SystemExit, match="wake-sleep evaluates the guide's density at latents it did not just draw"):
        main(["train", *tiny_args, "--loss", "wake_sleep", "--guide", "planar", "--hidden", "8", "--out",
              str(tmp_path / "planar"), *example_args])
    assert main(["train", *tiny_args, "--loss", "rws", "--num-particles", "3", "--hidden", "8", "--latent-dim", "2",
                 "--out", str(tmp_path / "rws"), *example_args]) == 0
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"config": ')
    (tmp_path / "broken" / "last.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="config.json is not readable JSON"):
        main(["eval", str(tmp_path / "broken")])
