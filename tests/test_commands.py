"""The commands (``vi-lab gaps``, ``em``, ``autoencoders``, ``wake-sleep``, ``cvae``, ``estimators``) run
in-process with the smallest settings and write their outputs; on your own vectors (``--data``, not
images) the networks follow the data's size and the pictures are left out. (``train``, ``eval`` and
``compare``: tests/test_cli.py.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vi_lab.cli import main


def test_gaps_writes_its_outputs_and_refuses_a_checkpoint_of_another_seed(tmp_path, tiny_args, example_args):
    out = tmp_path / "x"
    args = ["gaps", *tiny_args, "--guides", "mean_field", "--num-points", "3", "--local-steps", "10",
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


def test_em_writes_its_outputs(tmp_path, tiny_args, example_args):
    out = tmp_path / "x"
    assert main(["em", *tiny_args, "--classes", "2", "--em-iters", "2", "--restarts", "1", "--hidden", "16",
                 *example_args, "--out", str(out)]) == 0
    for name in ("em.json", "templates.png", "em_curve.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "em.json").read_text())
    assert {(r["method"], r["K"]) for r in report["results"]} == {("em", 2), ("svi", 2), ("vae", None)}
    assert all(np.isfinite(r["test_log_likelihood_sem"]) for r in report["results"])


def test_em_on_vectors_sizes_the_models_by_the_data_and_draws_no_templates(tmp_path, tiny_args, vectors, example_args):
    out = tmp_path / "x"
    assert main(["em", *tiny_args, "--data", str(vectors), "--classes", "2", "--em-iters", "2", "--restarts", "1",
                 "--hidden", "8", "--latent-dim", "2", *example_args, "--out", str(out)]) == 0
    assert (out / "em.json").is_file() and (out / "em_curve.png").is_file()
    assert not (out / "templates.png").exists()
    report = json.loads((out / "em.json").read_text())
    assert report["dataset"] == str(vectors)
    em_row = next(r for r in report["results"] if r["method"] == "em")
    assert em_row["parameters"] < 100  # K (D + 1) values for D = 10, not for 784 pixels


def test_autoencoders_writes_its_outputs_with_the_examples_keys(tmp_path, tiny_args, example_args):
    out = tmp_path / "x"
    assert main(["autoencoders", *tiny_args, "--hidden", "32", "--latent-dim", "4", "--num-samples", "4",
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


def test_autoencoders_on_unlabelled_vectors_skips_pictures_and_distances(tmp_path, tiny_args, vectors, example_args, capsys):
    out = tmp_path / "x"
    assert main(["autoencoders", *tiny_args, "--data", str(vectors), "--hidden", "8", "--latent-dim", "2",
                 *example_args, "--out", str(out)]) == 0
    assert (out / "metrics.json").is_file()
    assert not (out / "random_latents.png").exists() and not (out / "reconstructions.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frechet_distance_to_real_test_digits"] == {}
    assert "no Frechet distances" in capsys.readouterr().out


@pytest.fixture
def labelled_vectors(tmp_path):
    """Vectors of 10 values in [0, 1] in three classes, with their own train and test splits."""
    rng = np.random.default_rng(0)
    path = tmp_path / "labelled.npz"
    y_train, y_test = rng.integers(0, 3, 150), rng.integers(0, 3, 30)
    np.savez(path, x_train=rng.random((150, 10), dtype=np.float32), y_train=y_train,
             x_test=rng.random((30, 10), dtype=np.float32), y_test=y_test)
    return path


def test_wake_sleep_trains_every_algorithm_in_the_one_loop_and_writes_its_outputs(tmp_path, tiny_args, capsys, example_args):
    out = tmp_path / "x"
    assert main(["wake-sleep", *tiny_args, "--latent-dims", "2", "--hidden", "16", "--batch-size", "10",
                 "--eval-points", "3", "--algorithms", "aevb", "wake_sleep", "rws", *example_args,
                 "--out", str(out)]) == 0
    for name in ("wake_sleep_vs_aevb.json", "wake_sleep_vs_aevb.png", "samples_by_latent_dim.png",
                 "samples_by_latent_dim_wake_sleep.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "wake_sleep_vs_aevb.json").read_text())
    assert summary["eval_at"] == [100, 141, 200]  # log-spaced from ten batches to the end
    results = {r["algorithm"]: r for r in summary["results"]}
    assert set(results) == {"aevb", "wake_sleep", "rws"}
    for algo, r in results.items():
        # fit records at the command's schedule of samples seen (record_at): after the batch reaching each mark
        seen = [h["samples_seen"] for h in r["history"]]
        assert len(seen) == 3 and all(m <= s < m + 10 for s, m in zip(seen, summary["eval_at"])), (algo, seen)
        assert math.isfinite(r["test_elbo"]) and math.isfinite(r["test_log_likelihood_sem"])
    # the wake-sleep losses report each network's loss; AEVB's ELBO does not
    assert "model_loss" in results["wake_sleep"]["history"][-1] and "guide_loss" in results["rws"]["history"][-1]
    assert "model_loss" not in results["aevb"]["history"][-1]
    assert summary["config"]["algorithms"] == ["aevb", "wake_sleep", "rws"] and summary["dataset"] == "mnist"
    printed = capsys.readouterr().out
    assert "--- reweighted wake-sleep, D = 2" in printed and "epoch 1, 200 samples: train ELBO" in printed


def test_wake_sleep_on_vectors_sizes_the_networks_by_the_data_and_draws_no_samples(tmp_path, tiny_args, vectors, capsys,
                                                                                    example_args):
    out = tmp_path / "x"
    assert main(["wake-sleep", *tiny_args, "--data", str(vectors), "--latent-dims", "2", "--hidden", "8",
                 "--guide-lr", "0.003", *example_args, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"wake_sleep_vs_aevb.json", "wake_sleep_vs_aevb.png"}
    assert not list(out.glob("samples_by_latent_dim*.png"))
    summary = json.loads((out / "wake_sleep_vs_aevb.json").read_text())
    assert summary["dataset"] == str(vectors) and summary["train_size"] == 180  # a tenth held out
    assert summary["config"]["guide_lr"] == 0.003
    assert "no sample pictures: the data are not square grey images" in capsys.readouterr().out


def test_cvae_writes_its_outputs_and_judges_the_samples_with_a_classifier(tmp_path, tiny_args, example_args):
    out = tmp_path / "x"
    assert main(["cvae", *tiny_args, "--hidden", "32", "--digits", "3", "7", "--samples-per-digit", "4", *example_args,
                 "--out", str(out)]) == 0
    for name in ("metrics.json", "class_grid.png", "digits.png", "latent_scatter.png", "curves.png", "last.pt",
                 "metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("train_elbo", "test_elbo", "test_log_likelihood", "class_agreement", "class_agreement_mean",
                "classifier_real_test_accuracy", "classifier_train_size", "eval_samples", "seconds_per_epoch",
                "data_source", "device", "units", "date", "command", "config", "history"):
        assert key in metrics, key
    assert set(metrics["class_agreement"]) == {str(c) for c in range(10)}
    assert metrics["classifier_train_size"] == 1000 and metrics["classifier_real_test_accuracy"] > 0.3
    assert metrics["config"]["digits"] == [3, 7]


def test_cvae_on_labelled_vectors_follows_their_classes_and_refuses_data_without_labels(tmp_path, tiny_args, labelled_vectors,
                                                                                         vectors, example_args):
    out = tmp_path / "x"
    assert main(["cvae", *tiny_args, "--data", str(labelled_vectors), "--hidden", "8", *example_args,
                 "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "latent_scatter.png", "curves.png"}
    assert not (out / "class_grid.png").exists() and not (out / "digits.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_classes"] == 3 and set(metrics["class_agreement"]) == {"0", "1", "2"}
    with pytest.raises(SystemExit, match="needs labels of at least two classes"):
        main(["cvae", *tiny_args, "--data", str(vectors), "--hidden", "8", *example_args, "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match=r"--digits must lie in 0\.\.2"):
        main(["cvae", *tiny_args, "--data", str(labelled_vectors), "--digits", "5", *example_args,
              "--out", str(tmp_path / "z")])


def test_estimators_writes_its_outputs(tmp_path, tiny_args, example_args):
    out = tmp_path / "x"
    assert main(["estimators", *tiny_args, "--models", "gaussian", "categorical", "--hidden", "16", "--latent-dim", "4",
                 "--categories", "4", "--grad-draws", "3", "--grad-batch", "16", "--baseline-warmup", "2",
                 *example_args, "--out", str(out)]) == 0
    for name in ("estimators.json", "variance.png", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    table = json.loads((out / "estimators.json").read_text())
    assert set(table["models"]) == {"gaussian", "categorical"}
    for family in table["models"].values():
        for r in family["training"]:
            # log p(x) and the ELBO from the same draws: the importance-sampled bound is the tighter
            assert r["final_test_log_likelihood"] >= r["final_test_elbo"] - 1e-4, r["estimator"]
    assert {r["estimator"] for r in table["models"]["categorical"]["gradients"]} >= {"enum", "reinforce"}


def test_estimators_on_vectors_sizes_the_networks_by_the_data(tmp_path, tiny_args, vectors, example_args):
    out = tmp_path / "x"
    assert main(["estimators", *tiny_args, "--data", str(vectors), "--models", "sbn", "--hidden", "8", "--sbn-units", "4",
                 "--grad-draws", "3", "--grad-batch", "16", "--baseline-warmup", "2", *example_args,
                 "--out", str(out)]) == 0
    table = json.loads((out / "estimators.json").read_text())
    assert table["dataset"] == str(vectors) and table["train_size"] == 180
    decoder = next(r for r in table["models"]["sbn"]["gradients"] if r["group"] == "decoder")
    assert decoder["num_params"] < 500  # an 8-unit MLP into 10 values, not into 784 pixels
