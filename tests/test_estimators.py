"""Gradient estimators against exact answers.

The toy: B identical datapoints x = 2, p(z) = N(0, 1), p(x | z) = N(z, 1), and a shared
guide q(z) = N(m, s^2) (s stored as log s by Pyro's positive constraint). Its per-datapoint
ELBO has the closed-form gradient

    d ELBO / dm = x - 2m,        d ELBO / d log s = 1 - 2 s^2,

and every single draw of each estimator has a closed form in eps = (z - m) / s.
"""

import math
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from torch.distributions import constraints

import vi_lab
from vi_lab import estimators
from vi_lab.diagnostics import gradient_stats
from vi_lab.estimators import ESTIMATORS, Estimator, prepare
from vi_lab.guides import BernoulliGuide, CategoricalGuide, make_guide, make_local_guide
from vi_lab.models.discrete import CategoricalVAE, SigmoidBeliefVAE
from vi_lab.relaxed import StraightThrough
from vi_lab.score_function import ScoredDistribution, ScoreFunction, without_rsample

ROOT = Path(__file__).resolve().parents[1]
X, M0, S0 = 2.0, 0.0, 0.5
EXACT = {"m": X - 2 * M0, "s": 1 - 2 * S0**2}
GROUPS = {"m": ["m"], "s": ["s"]}


def toy_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def toy_guide(x):
    m = pyro.param("m", x.new_tensor(M0))
    s = pyro.param("s", x.new_tensor(S0), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(m, s).expand([x.shape[0]]))


def toy_data(batch: int, device: torch.device) -> torch.Tensor:
    return torch.full((batch,), X, device=device)


def hand_gradient(name: str, z: torch.Tensor, x: torch.Tensor, baseline: torch.Tensor | float = 0.0) -> dict:
    """One draw of each estimator, derived by hand; averaged over the batch like fit's objective."""
    m, s = z.new_tensor(M0), z.new_tensor(S0)
    eps = (z - m) / s
    log_joint = dist.Normal(z, 1.0).log_prob(x) + dist.Normal(z.new_zeros(()), 1.0).log_prob(z)
    log_q = dist.Normal(m, s).log_prob(z)
    if name == "reparam":
        dfdz = (x - z) - z
        g_m, g_log_s = dfdz, s * dfdz * eps + 1.0  # d/dm and d/dlog s of f(m + s eps) + entropy
    else:
        # per-datapoint cost scaled by 1/B as fit scales it; the baseline lives in the same units
        cost = (log_joint - log_q) / x.shape[0] - baseline
        g_m, g_log_s = cost * eps / s * x.shape[0], cost * (eps**2 - 1) * x.shape[0]
    return {"m": g_m.mean().item(), "s": g_log_s.mean().item()}


def draws_of(prepared, x, seed):
    """The z that gradient_stats's draw with this seed sees (the guide is its first RNG user)."""
    pyro.set_rng_seed(seed)
    with poutine.block():
        return poutine.trace(prepared.guide).get_trace(x).nodes["z"]["value"].detach()


@pytest.mark.parametrize("name", ["reparam", "reinforce"])
def test_single_draw_matches_hand_computed(name, device):
    x = toy_data(3, device)
    prepared = prepare(toy_guide, name, x_dim=1)
    stats = gradient_stats(toy_model, toy_guide, x, estimator=prepared, num_draws=2, seed=7,
                           groups=GROUPS, keep_samples=True)
    expected = hand_gradient(name, draws_of(prepared, x, 7), x)
    for g in GROUPS:
        assert stats[g].samples[0].item() == pytest.approx(expected[g], rel=1e-5, abs=1e-6)


def test_single_draw_with_decaying_average_baseline_matches_hand_computed(device):
    """One warm-up step moves Pyro's average from 0 to (1 - beta) * cost; the draws then use it."""
    x = toy_data(3, device)
    stale = torch.tensor([5.0, 5.0], device=device)  # left by training on another batch: set aside, then put back
    pyro.param(estimators.DECAYING_AVG_PREFIX + "z", stale.clone())
    prepared = prepare(toy_guide, "reinforce_baseline", baseline="decaying_avg", baseline_beta=0.75)
    stats = gradient_stats(toy_model, toy_guide, x, estimator=prepared, num_draws=2, seed=3, warmup=1,
                           groups=GROUPS, keep_samples=True)
    z_warm = draws_of(prepared, x, 3 + 2 + 1)  # warm-up draws follow seed + num_draws + 1
    m, s = x.new_tensor(M0), x.new_tensor(S0)
    cost = (dist.Normal(z_warm, 1.0).log_prob(x) + dist.Normal(x.new_zeros(()), 1.0).log_prob(z_warm)
            - dist.Normal(m, s).log_prob(z_warm)) / x.shape[0]
    expected = hand_gradient("reinforce_baseline", draws_of(prepared, x, 3), x, baseline=0.25 * cost)
    for g in GROUPS:
        assert stats[g].samples[0].item() == pytest.approx(expected[g], rel=1e-5, abs=1e-6)
    assert torch.equal(pyro.param(estimators.DECAYING_AVG_PREFIX + "z").detach(), stale)


def test_single_draw_with_nn_baseline_matches_hand_computed(device):
    x = torch.tensor([2.0, 1.0, 3.0], device=device)
    prepared = prepare(toy_guide, "reinforce_baseline", baseline="nn", x_dim=1, baseline_hidden=4, device=device)
    last = prepared.baseline_net.net.net[-1]
    with torch.no_grad():  # a baseline that depends on x
        last.weight.copy_(x.new_tensor([[0.5, -0.25, 1.0, 0.3]]))
        last.bias.fill_(-0.7)
    b = prepared.baseline_net(x.unsqueeze(-1)).detach()
    assert b.unique().numel() == 3
    stats = gradient_stats(toy_model, toy_guide, x, estimator=prepared, num_draws=2, seed=5,
                           groups=GROUPS, keep_samples=True)
    z = draws_of(prepared, x, 5)
    m, s = x.new_tensor(M0), x.new_tensor(S0)
    eps = (z - m) / s
    cost = (dist.Normal(z, 1.0).log_prob(x) + dist.Normal(x.new_zeros(()), 1.0).log_prob(z)
            - dist.Normal(m, s).log_prob(z)) / 3 - b
    assert stats["m"].samples[0].item() == pytest.approx((cost * eps / s).sum().item(), rel=1e-5)
    assert stats["s"].samples[0].item() == pytest.approx((cost * (eps**2 - 1)).sum().item(), rel=1e-5)


UNBIASED = [("reparam", {}), ("reinforce", {}),
            ("reinforce_baseline", {"warmup": 20}),
            (Estimator("reinforce_baseline", baseline="nn"), {"warmup": 20})]


@pytest.mark.parametrize("estimator,kw", UNBIASED, ids=["reparam", "reinforce", "decaying_avg", "nn"])
def test_mean_gradient_matches_closed_form(estimator, kw, device):
    stats = gradient_stats(toy_model, toy_guide, toy_data(50, device), estimator=estimator, num_draws=60, seed=1,
                           groups=GROUPS, **kw)
    for g, exact in EXACT.items():
        se = stats[g].stderr.item()
        assert se < 0.25 * abs(exact)  # the check has power: the tolerance is smaller than the answer
        assert abs(stats[g].mean.item() - exact) < 4 * se, (g, stats[g].mean.item(), exact, se)


def test_variance_ordering_with_paired_seeds(device):
    x = toy_data(20, device)
    var = {}
    for label, est, kw in [("reparam", "reparam", {}), ("reinforce", "reinforce", {}),
                           ("baseline", "reinforce_baseline", {"warmup": 20})]:
        stats = gradient_stats(toy_model, toy_guide, x, estimator=est, num_draws=60, seed=11, groups=GROUPS, **kw)
        var[label] = sum(s.variance for s in stats.values())
    assert var["reparam"] < var["baseline"] < var["reinforce"], var


@pytest.mark.parametrize("family", ["mean_field", "iaf", "local"])
def test_reinforce_estimator_is_the_score_function_messenger(family, device):
    """"reinforce" is the guide run under ScoreFunction (the one mechanism), for vi_lab guides too."""
    x = torch.rand(5, 6, device=device).bernoulli()
    model = vi_lab.VAE(2, [4], x_dim=6).to(device)
    guide = (make_local_guide("mean_field", num_data=5, latent_dim=2) if family == "local" else
             make_guide(family, latent_dim=2, hidden=[4], x_dim=6)).to(device)
    by_name = gradient_stats(model, guide, x, estimator="reinforce", num_draws=3, seed=2, keep_samples=True)

    def scored(*args, **kwargs):
        with ScoreFunction():
            return guide(*args, **kwargs)

    by_hand = estimators.PreparedEstimator(scored, pyro.infer.Trace_ELBO(), Estimator("reinforce"))
    by_msg = gradient_stats(model, guide, x, estimator=by_hand, num_draws=3, seed=2, keep_samples=True)
    reparam = gradient_stats(model, guide, x, estimator="reparam", num_draws=3, seed=2, keep_samples=True)
    for g in ("encoder", "decoder"):
        assert torch.equal(by_name[g].samples, by_msg[g].samples)
    # decoder gradients do not depend on how z's gradient is estimated; encoder ones do
    assert torch.allclose(by_name["decoder"].samples, reparam["decoder"].samples, atol=1e-5)
    assert not torch.allclose(by_name["encoder"].samples, reparam["encoder"].samples, atol=1e-3)
    with poutine.trace() as tr:  # the guide itself is left as it was: pathwise outside the messenger
        guide(x)
    assert tr.trace.nodes["z"]["fn"].has_rsample and tr.trace.nodes["z"]["value"].requires_grad


def test_score_function_messenger_scores_a_vi_lab_guide_site(device):
    x = torch.rand(4, 6, device=device).bernoulli()
    guide = make_guide("mean_field", latent_dim=2, hidden=[4], x_dim=6).to(device)
    with poutine.trace() as tr, ScoreFunction():
        z = guide(x)
    site = tr.trace.nodes["z"]
    assert not z.requires_grad and not site["fn"].has_rsample
    tr.trace.compute_score_parts()
    assert torch.equal(site["score_parts"].score_function, guide.get_posterior(x).log_prob(z))


def test_without_rsample_survives_plate_broadcasting(device):
    q = dist.Normal(torch.zeros(3, 2, device=device, requires_grad=True), 1.0).to_event(1)
    scored = without_rsample(q)
    assert isinstance(scored, ScoredDistribution) and not scored.has_rsample and q.has_rsample
    with poutine.trace() as tr, pyro.plate("data", 3):
        z = pyro.sample("z", scored)
    assert not z.requires_grad and not tr.trace.nodes["z"]["fn"].has_rsample
    tr.trace.compute_score_parts()
    parts = tr.trace.nodes["z"]["score_parts"]
    assert torch.equal(parts.score_function, q.log_prob(z)) and parts.entropy_term == 0


def test_discrete_reinforce_matches_enumerated_gradient(device):
    """Categorical VAE small enough to enumerate: TraceEnum_ELBO's gradient is exact."""
    x = torch.rand(4, 6, device=device).bernoulli()
    model = CategoricalVAE(3, (4,), x_dim=6).to(device)
    guide = CategoricalGuide.make(3, hidden=(4,), x_dim=6).to(device)
    exact = gradient_stats(model, guide, x, estimator="enum", num_draws=2)
    # the enumerated gradient is deterministic and equals autograd of the ELBO summed by hand
    assert all(s.variance == 0 for s in exact.values())
    assert_exact_categorical_gradient(model, guide, x, exact)
    for est, draws, kw in [("reinforce", 200, {}), ("reinforce_baseline", 80, {"warmup": 20})]:
        stats = gradient_stats(model, guide, x, estimator=est, num_draws=draws, seed=4, **kw)
        for g, s in stats.items():
            z = (s.mean - exact[g].mean).abs() / s.stderr.clamp_min(1e-12)
            assert z.max() < 4.5, (est, g, z.max())
            assert s.bias_z(exact[g].mean) < 2.0  # ||mean - exact|| is about one standard error


def assert_exact_categorical_gradient(model, guide, x, exact):
    # pyro.module registers a module's parameters in named_parameters order, as the groups list them
    params = {"encoder": list(guide.parameters()), "decoder": list(model.parameters())}
    q = guide.get_posterior(x).probs  # (B, K)
    elbo = 0.0
    for k in range(model.num_categories):
        z = torch.nn.functional.one_hot(torch.full((x.shape[0],), k, device=x.device), model.num_categories).float()
        log_w = (model.likelihood(model.decoder(z)).log_prob(x) + model.prior(x).log_prob(z)
                 - dist.OneHotCategorical(probs=q).log_prob(z))
        elbo = elbo + q[:, k] * log_w
    grads = torch.autograd.grad(elbo.mean(), params["encoder"] + params["decoder"])
    flat = torch.cat([g.reshape(-1) for g in grads]).double().cpu()  # gradient_stats reports on the CPU
    both = torch.cat([exact["encoder"].mean, exact["decoder"].mean])
    assert torch.allclose(both, flat, atol=1e-5)


def test_relaxed_gradient_is_biased_on_enumerable_model(device):
    """Straight-through draws are exact, so only the encoder's gradient is biased."""
    x = torch.rand(32, 6, device=device).bernoulli()
    model = CategoricalVAE(3, (4,), x_dim=6).to(device)
    guide = CategoricalGuide.make(3, hidden=(4,), x_dim=6).to(device)
    exact = gradient_stats(model, guide, x, estimator="enum", num_draws=2)
    relaxed = gradient_stats(model, guide, x, estimator=Estimator("relaxed", temperature=0.5), num_draws=200)
    assert not ESTIMATORS["relaxed"].unbiased and "biased" in Estimator("relaxed").label
    assert relaxed["encoder"].bias_z(exact["encoder"].mean) > 4.0
    assert relaxed["decoder"].bias_z(exact["decoder"].mean) < 2.5


def test_straight_through_draws_exact_bernoulli_and_scores_discretely(device):
    logits = torch.tensor([-1.0, 0.0, 2.0], device=device, requires_grad=True)
    q = StraightThrough(dist.Bernoulli(logits=logits).to_event(1), temperature=0.1)
    z = q.rsample((20000,))
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(z.mean(0), torch.sigmoid(logits).detach(), atol=0.02)  # any temperature
    assert torch.equal(q.log_prob(z[:5]), dist.Bernoulli(logits=logits).to_event(1).log_prob(z[:5]))
    (g,) = torch.autograd.grad(z[:, 2].sum(), logits)  # a gradient flows through the relaxation
    assert g[2] > 0


def test_estimator_errors_are_clear(device):
    with pytest.raises(ValueError, match="unknown estimator 'bogus'; valid: reparam, reinforce"):
        Estimator("bogus")
    with pytest.raises(ValueError, match="unknown baseline 'avg'; valid: decaying_avg, nn"):
        prepare(toy_guide, "reinforce_baseline", baseline="avg")
    with pytest.raises(ValueError, match="applies to estimator='reinforce_baseline' only"):
        prepare(toy_guide, "reinforce", baseline="nn")
    with pytest.raises(ValueError, match="chooses its own Pyro objective"):
        prepare(toy_guide, "reinforce", loss="meanfield")
    with pytest.raises(ValueError, match="needs x_dim"):
        prepare(toy_guide, "reinforce_baseline", baseline="nn")
    x = torch.rand(2, 6, device=device).bernoulli()
    sbn = SigmoidBeliefVAE(20, (4,), x_dim=6).to(device)
    bern = BernoulliGuide.make(20, hidden=(4,), x_dim=6).to(device)
    with pytest.raises(ValueError, match="estimator 'reparam' needs continuous latent sites"):
        gradient_stats(sbn, bern, x, estimator="reparam", num_draws=2)
    with pytest.raises(ValueError, match="enumerable support"):
        gradient_stats(sbn, bern, x, estimator="enum", num_draws=2)
    with pytest.raises(ValueError, match="Bernoulli or OneHotCategorical"):
        StraightThrough(dist.Normal(0.0, 1.0), 0.5)


def test_fit_trains_discrete_model_with_baselines_and_resumes_exactly(tmp_path, device):
    """Uneven batches (7 = 4 + 3) need the decaying average's fixed batch; the nn baseline resumes."""
    x = torch.rand(7, 6, device=device).bernoulli()
    kw = dict(estimator="reinforce_baseline", baseline="nn", batch_size=4, lr=1e-2, progress=False)

    def pair():
        pyro.set_rng_seed(0)
        return SigmoidBeliefVAE(5, (4,), x_dim=6), BernoulliGuide.make(5, hidden=(4,), x_dim=6)

    full = vi_lab.fit(*pair(), x, epochs=3, **kw)
    vi_lab.fit(*pair(), x, epochs=2, checkpoint_dir=tmp_path, **kw)
    resumed = vi_lab.fit(*pair(), x, epochs=3, checkpoint_dir=tmp_path, resume=True, **kw)
    assert [h["train_elbo"] for h in resumed.history] == [h["train_elbo"] for h in full.history]
    assert any(n.startswith(estimators.BASELINE_MODULE_NAME) for n in pyro.get_param_store().keys())


def test_fit_estimators_are_one_objective(tmp_path, device):
    """Every estimator of a continuous VAE reports the same objective: the first step's loss
    is the same single-sample ELBO whatever estimates its gradient."""
    x = torch.rand(8, 6, device=device).bernoulli()
    first = {}
    for est in ("reparam", "reinforce", "reinforce_baseline"):
        pyro.set_rng_seed(0)
        model, guide = vi_lab.VAE(2, [4], x_dim=6), make_guide("mean_field", latent_dim=2, hidden=[4], x_dim=6)
        result = vi_lab.fit(model, guide, x, estimator=est, epochs=1, batch_size=8, lr=0.0, progress=False)
        first[est] = result.train_elbo
    assert first["reinforce"] == pytest.approx(first["reparam"], abs=1e-4)
    assert first["reinforce_baseline"] == pytest.approx(first["reparam"], abs=1e-4)


def test_example_runs(tmp_path, example_args):
    cmd = [sys.executable, str(ROOT / "examples" / "reinforce_vs_reparam.py"), "--epochs", "1",
           "--train-size", "200", "--eval-size", "20", "--eval-samples", "10", "--threads", "1",
           "--no-progress", "--out", str(tmp_path), "--grad-draws", "3", "--grad-batch", "16",
           "--baseline-warmup", "2", *example_args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("estimators.json", "variance.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    import json

    table = json.loads((tmp_path / "estimators.json").read_text())
    assert {"gaussian", "sbn", "categorical"} <= set(table["models"])
    assert all(math.isfinite(r["final_test_elbo"]) for m in table["models"].values() for r in m["training"])
