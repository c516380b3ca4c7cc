"""Tests for vi_lab.gaps: the inference-gap decomposition against probabilistic PCA's exact answers.

On PPCA the posterior p(z | x) is Gaussian with a known precision L, so log p(x), every
Gaussian guide's ELBO (log p(x) - KL(q || p(z | x))) and the best mean-field gap
0.5 * (sum_i log L_ii - log det L) are known in closed form.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from vi_lab import fit, viz
from vi_lab.gaps import (
    KHAT_THRESHOLD,
    GapReport,
    gap_table,
    guide_family,
    inference_gaps,
    pareto_khat,
    refine,
    refinement_curve,
)
from vi_lab.guides import GUIDES, make_guide
from vi_lab.models.ppca import PPCA

ROOT = Path(__file__).resolve().parents[1]
LOCAL = dict(lr=(0.02, 0.002), num_particles=32, max_steps=3000)


def _as_mvn(q: dist.Distribution) -> dist.MultivariateNormal:
    """A diagonal or full Gaussian posterior as a MultivariateNormal, for closed-form KLs."""
    if isinstance(q, dist.MultivariateNormal):
        return q
    base = q.base_dist if isinstance(q, dist.Independent) else q
    return dist.MultivariateNormal(base.loc, scale_tril=torch.diag_embed(base.scale))


def _exact_elbo(model: PPCA, q: dist.Distribution, x: torch.Tensor) -> torch.Tensor:
    """L[q] = log p(x) - KL(q || p(z | x)), per datapoint, in closed form."""
    return model.log_marginal(x) - kl_divergence(_as_mvn(q), model.posterior(x))


def _train(model: PPCA, name: str, x_train: torch.Tensor) -> torch.nn.Module:
    guide = make_guide(name, latent_dim=model.latent_dim, hidden=[16], x_dim=model.x_dim)
    fit(model, guide, x_train, epochs=5, batch_size=64, lr=1e-2, progress=False, seed=0)
    guide.eval()
    return guide


@pytest.fixture(scope="module")
def ppca(device):
    """A PPCA model, 32 test points and an amortized mean-field guide trained on 2000 others, on ``device``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)  # module fixtures run before the per-test seeding of conftest
    # W from a CPU generator: the same model on every device
    model = PPCA(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), sigma=0.7).to(device)
    x_train, x = model.sample(2000), model.sample(32)
    guide = _train(model, "mean_field", x_train)
    return model, guide, x, x_train


@pytest.fixture(scope="module")
def report(ppca) -> GapReport:
    model, guide, x, _ = ppca
    pyro.set_rng_seed(1)
    return inference_gaps(model, guide, x, num_samples=2000, **LOCAL)


def test_mean_field_decomposition_matches_exact_ppca(ppca, report):
    model, guide, x, _ = ppca
    exact = model.log_marginal(x)
    # log p̂(x) per datapoint within 0.05 nats of the exact marginal
    assert (report.log_px - exact).abs().max() < 0.05
    # the approximation gap of mean-field q* is the closed-form optimal mean-field gap
    assert abs(report.approximation_gap.mean().item() - model.optimal_mean_field_gap()) < 0.05
    assert (report.approximation_gap - model.optimal_mean_field_gap()).abs().max() < 0.05
    assert report.fits["q_star"].converged and report.fits["q_star_rich"].converged


def test_amortization_gap_equals_independent_exact_difference(ppca, report):
    model, guide, x, _ = ppca
    with torch.no_grad():
        exact_q = _exact_elbo(model, guide.get_posterior(x), x)
        exact_q_star = _exact_elbo(model, report.local_guides["q_star"].get_posterior(x), x)
    exact_gap = exact_q_star - exact_q
    assert exact_gap.mean() > 0.1  # the encoder is really suboptimal here: the check has something to find
    assert abs(report.amortization_gap.mean().item() - exact_gap.mean().item()) < 0.02
    assert (report.amortization_gap - exact_gap).abs().max() < 0.1
    # and each ELBO on its own matches its closed form
    assert (report.elbo_amortized - exact_q).abs().max() < 0.1
    assert (report.elbo_optimal - exact_q_star).abs().max() < 0.1


def test_gaps_add_up_and_rich_full_cov_closes_the_approximation_gap(ppca, report):
    model, _, x, _ = ppca
    torch.testing.assert_close(report.approximation_gap + report.amortization_gap, report.inference_gap)
    # full covariance contains the exact posterior: L[q*_rich] reaches log p(x)
    assert abs((model.log_marginal(x) - report.elbo_rich).mean().item()) < 0.02
    assert report.proposal == "q_star_rich"  # the highest-ELBO proposal gives log p̂(x)


@pytest.mark.skipif("full_cov" not in GUIDES, reason="no amortized full_cov guide registered")
def test_full_cov_family_has_no_approximation_gap(ppca):
    model, _, x, x_train = ppca
    guide = _train(model, "full_cov", x_train)
    rep = inference_gaps(model, guide, x, rich_family=None, num_samples=1000, **LOCAL)
    assert rep.family == "full_cov" and rep.elbo_rich is None
    assert abs(rep.approximation_gap.mean().item()) < 0.02
    assert (model.log_marginal(x) - rep.log_px).abs().max() < 0.02


def test_family_override_full_cov_on_a_mean_field_guide(ppca):
    model, guide, x, _ = ppca
    rep = inference_gaps(model, guide, x, family="full_cov", rich_family=None, num_samples=1000, **LOCAL)
    # full-cov q* from a mean-field encoder: its gap to log p(x) is ~0, the rest counts as amortization
    assert abs(rep.approximation_gap.mean().item()) < 0.02
    assert rep.amortization_gap.mean() > model.optimal_mean_field_gap()


def test_pareto_khat_recovers_known_tail_index(device):
    # w = U^(-xi) has a Pareto tail with index 1/xi, so PSIS's k-hat estimates xi
    u = torch.rand(5000, 20, dtype=torch.float64, device=device)
    light, heavy = pareto_khat(-0.2 * u.log()), pareto_khat(-1.0 * u.log())
    assert abs(light.mean().item() - 0.2) < 0.1 and abs(heavy.mean().item() - 1.0) < 0.1
    assert (light < KHAT_THRESHOLD).all() and (heavy > KHAT_THRESHOLD).all()
    assert torch.isnan(pareto_khat(torch.zeros(100, 3, device=device))).all()  # exact proposal: k-hat undefined
    # weights that take two values (5% high) leave no tail to fit: NaN on both ArviZ generations
    two_valued = torch.zeros(1000, 4, dtype=torch.float64)
    two_valued[:50] = 3.0
    assert torch.isnan(pareto_khat(two_valued)).all()
    assert torch.isnan(pareto_khat(torch.randn(24, 3, dtype=torch.float64, device=device))).all()  # < 25 draws
    with pytest.raises(ValueError, match=r"\(K, N\)"):
        pareto_khat(torch.zeros(10, device=device))


def test_khat_share_and_json_round_trip(report, tmp_path):
    shares = report.khat_share_above()
    assert shares["q"] == (report.khat["q"] > KHAT_THRESHOLD).double().mean().item()
    path = report.save_json(tmp_path / "gaps.json")
    back = json.loads(path.read_text())
    assert back["num_points"] == 32 and back["num_samples"] == 2000
    assert back["local_fits"]["q_star"]["steps"] == report.fits["q_star"].steps
    assert back["per_datapoint"]["amortization_gap"] == pytest.approx(report.amortization_gap.tolist())
    assert back["summary"]["inference_gap"]["mean"] == pytest.approx(report.inference_gap.double().mean().item())
    assert gap_table([back]) == report.table()
    table = report.table()
    for row in ("log p̂(x)", "L[q*_rich]", "L[q*]", "L[q]", "approximation gap", "amortization gap", "inference gap"):
        assert row in table
    assert f"{report.approximation_gap.double().mean().item():.2f} ±" in table


def test_refine_starts_at_the_encoder_and_the_curve_closes_the_gap(ppca, report):
    model, guide, x, _ = ppca
    local, fit0 = refine(model, guide, x, steps=0)
    assert fit0.steps == 0
    q, q0 = guide.get_posterior(x), local.get_posterior(x)
    torch.testing.assert_close(q0.base_dist.loc, q.base_dist.loc.detach())
    torch.testing.assert_close(q0.base_dist.scale, q.base_dist.scale.detach(), atol=1e-5, rtol=1e-4)
    _, fit20 = refine(model, guide, x, steps=20)
    assert fit20.steps == 20  # exactly the budget: no early stop

    curve = refinement_curve(model, guide, x, steps=(300, 0, 5), report=report, num_samples=500, lr=0.02,
                             num_particles=32)
    assert curve.steps == [0, 5, 300]
    left = [g.mean().item() for g in curve.remaining_gap()]
    assert abs(left[0] - report.amortization_gap.mean().item()) < 0.05  # t = 0 is the amortized guide
    assert left[0] > left[1] > left[2]
    assert left[2] < 0.1 * left[0]
    d = curve.to_dict()
    assert [p["mean"] for p in d["amortization_gap"]] == pytest.approx(left)


def test_bad_input_gives_clear_errors(ppca):
    model, guide, x, _ = ppca
    with pytest.raises(ValueError, match="valid local families"):
        inference_gaps(model, guide, x, family="no_such_family")
    with pytest.raises(ValueError, match="unknown proposal"):
        inference_gaps(model, guide, x, proposal="best")
    with pytest.raises(ValueError, match="pass family="):
        guide_family(lambda x: None)
    with pytest.raises(ValueError, match="steps must be"):
        refine(model, guide, x, steps=-1)


def test_gap_figures_are_written(report, tmp_path):
    curve_dict = {"label": "mean_field", "steps": [0, 10], "amortization_gap": [
        {"mean": 0.3, "sem": 0.05}, {"mean": 0.1, "sem": 0.02}]}
    for out in (viz.save_gap_bars([report, report.to_dict()], tmp_path / "bars.png"),
                viz.save_refinement_curve([curve_dict], tmp_path / "curve.png")):
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one"):
        viz.save_gap_bars([], tmp_path / "none.png")


def test_example_smoke_and_checkpoint_reuse(tmp_path, example_args):
    out = tmp_path / "run"
    tiny = ["--epochs", "1", "--train-size", "200", "--eval-size", "20", "--eval-samples", "10", "--threads", "1",
            "--no-progress", "--guides", "mean_field", "--num-points", "4", "--local-steps", "20",
            "--refine-steps", "0,5", "--refine-samples", "5", *example_args]
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "guide_swap_gaps.py"), *tiny, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("gaps.json", "gaps.png", "refinement.png", "mean_field/last.pt", "mean_field/metrics.jsonl"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    record = json.loads((out / "gaps.json").read_text())
    assert [r["label"] for r in record["reports"]] == ["mean_field"]
    assert record["num_points"] == 4 and record["eval_samples"] == 10
    assert record["training"]["mean_field"]["checkpoint"] == "trained"
    assert "approximation gap" in proc.stdout and "amortization gap" in proc.stdout

    # a second run (the same command, in-process) loads the first one's checkpoint instead of training again
    from vi_lab.commands import gaps as example
    cfg = example.parse_args([*tiny, "--threads", str(torch.get_num_threads()), "--out", str(tmp_path / "again"),
                              "--checkpoints", str(out)])
    again = example.main(cfg)
    assert again["training"]["mean_field"]["checkpoint"] == "loaded"
    assert again["training"]["mean_field"]["train_elbo"] == pytest.approx(record["training"]["mean_field"]["train_elbo"])
    # a checkpoint trained on other data is not reused as if it fitted these settings
    other = example.parse_args([*tiny, "--train-size", "100", "--threads", str(torch.get_num_threads()),
                                "--out", str(tmp_path / "other"), "--checkpoints", str(out)])
    with pytest.raises(ValueError, match=r"data cannot change on resume"):
        example.main(other)
    with pytest.raises(SystemExit):
        example.parse_args(["--guides", "no_such_guide"])
