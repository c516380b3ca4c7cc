"""``vi-lab gaps``, ``vi-lab em`` and ``vi-lab autoencoders`` run in-process with the smallest settings and
write their outputs; on your own vectors (``--data``, not images) the models follow the data's size and
the pictures are left out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vi_lab.cli import main

TINY = ["--epochs", "1", "--train-size", "200", "--eval-size", "20", "--eval-samples", "10", "--threads", "1",
        "--no-progress"]


@pytest.fixture
def vectors(tmp_path):
    """200 vectors of 10 values in [0, 1], no labels: data that are not images."""
    path = tmp_path / "vectors.npy"
    np.save(path, np.random.default_rng(0).random((200, 10), dtype=np.float32))
    return path


def test_gaps_writes_its_outputs_and_refuses_a_checkpoint_of_another_seed(tmp_path, example_args):
    out = tmp_path / "x"
    args = ["gaps", *TINY, "--guides", "mean_field", "--num-points", "3", "--local-steps", "10",
            "--refine-steps", "0,3", "--refine-samples", "4", "--rich-family", "none", *example_args]
    assert main([*args, "--out", str(out)]) == 0
    for name in ("gaps.json", "gaps.png", "refinement.png", "mean_field/last.pt", "mean_field/metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    record = json.loads((out / "gaps.json").read_text())
    assert record["training"]["mean_field"]["checkpoint"] == "trained"
    assert record["config"]["guides"] == ["mean_field"] and record["dataset"] == "mnist"
    # fit() lets the seed change on resume; the comparison does not (every family starts from one decoder)
    with pytest.raises(SystemExit, match=r"--seed 0 \(this run: 1\)"):
        main([*args, "--seed", "1", "--checkpoints", str(out), "--out", str(tmp_path / "y")])


def test_em_writes_its_outputs(tmp_path, example_args):
    out = tmp_path / "x"
    assert main(["em", *TINY, "--classes", "2", "--em-iters", "2", "--restarts", "1", "--hidden", "16",
                 *example_args, "--out", str(out)]) == 0
    for name in ("em.json", "templates.png", "em_curve.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "em.json").read_text())
    assert {(r["method"], r["K"]) for r in report["results"]} == {("em", 2), ("svi", 2), ("vae", None)}
    assert all(np.isfinite(r["test_log_likelihood_sem"]) for r in report["results"])


def test_em_on_vectors_sizes_the_models_by_the_data_and_draws_no_templates(tmp_path, vectors, example_args):
    out = tmp_path / "x"
    assert main(["em", *TINY, "--data", str(vectors), "--classes", "2", "--em-iters", "2", "--restarts", "1",
                 "--hidden", "8", "--latent-dim", "2", *example_args, "--out", str(out)]) == 0
    assert (out / "em.json").is_file() and (out / "em_curve.png").is_file()
    assert not (out / "templates.png").exists()
    report = json.loads((out / "em.json").read_text())
    assert report["dataset"] == str(vectors)
    em_row = next(r for r in report["results"] if r["method"] == "em")
    assert em_row["parameters"] < 100  # K (D + 1) values for D = 10, not for 784 pixels


def test_autoencoders_writes_its_outputs_with_the_examples_keys(tmp_path, example_args):
    out = tmp_path / "x"
    assert main(["autoencoders", *TINY, "--hidden", "32", "--latent-dim", "4", "--num-samples", "4",
                 *example_args, "--out", str(out)]) == 0
    for name in ("random_latents.png", "reconstructions.png", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("AE", "DAE"):
        last = metrics["histories"][name][-1]
        assert "train_elbo" not in last and last["train_loss"] > 0
    # the last epoch's test loss is the AE's clean reconstruction loss of the same test images
    assert metrics["histories"]["AE"][-1]["test_loss"] == pytest.approx(metrics["test_reconstruction_loss"]["AE"],
                                                                         rel=1e-4)
    assert "train_elbo" in metrics["histories"]["VAE"][-1]
    assert "real digits (training set)" in metrics["frechet_distance_to_real_test_digits"]


def test_autoencoders_on_unlabelled_vectors_skips_pictures_and_distances(tmp_path, vectors, example_args, capsys):
    out = tmp_path / "x"
    assert main(["autoencoders", *TINY, "--data", str(vectors), "--hidden", "8", "--latent-dim", "2",
                 *example_args, "--out", str(out)]) == 0
    assert (out / "metrics.json").is_file()
    assert not (out / "random_latents.png").exists() and not (out / "reconstructions.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frechet_distance_to_real_test_digits"] == {}
    assert "no Frechet distances" in capsys.readouterr().out
