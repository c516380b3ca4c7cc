"""The per-datapoint contract is checked at the door: broken pairs and bad data are errors, never numbers."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import vi_lab
from vi_lab import evaluate, fit
from vi_lab.contract import ContractError, check_pair
from vi_lab.diagnostics import gradient_stats
from vi_lab.gaps import inference_gaps, refine
from vi_lab.guides import make_guide
from vi_lab.models import VAE

D, B = 4, 16


@pytest.fixture
def pair(device):
    torch.manual_seed(0)
    return (VAE(D, [32]).to(device), make_guide("mean_field", latent_dim=D, hidden=[32]).to(device))


@pytest.fixture
def x(device):
    g = torch.Generator().manual_seed(1)
    return torch.bernoulli(torch.rand(B, 784, generator=g), generator=g).to(device)


def folded(vae, q):
    """z outside the data plate, the batch folded into the event (``.to_event(2)``)."""

    def model(x):
        pyro.module("m", vae)
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], D), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", vae.likelihood(vae.decoder(z)), obs=x)

    def guide(x):
        pyro.module("g", q)
        post = q.get_posterior(x)
        pyro.sample("z", dist.Normal(post.base_dist.loc, post.base_dist.scale).to_event(2))

    return model, guide


def renamed(vae, q):
    """The guide samples ``latent``, the model ``z``."""

    def guide(x):
        pyro.module("g", q)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("latent", q.get_posterior(x))

    return vae, guide


def shared(vae, q):
    """One z for every datapoint."""
    loc = torch.zeros(D, device=next(vae.parameters()).device)

    def model(x):
        pyro.module("m", vae)
        z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", vae.likelihood(vae.decoder(z).expand(x.shape[0], 784)), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(pyro.param("q_loc", loc.clone()), 1.0).to_event(1))

    return model, guide


BROKEN = {
    "folded": (folded, r"guide site 'z' .* holds the data batch of 16 in its event shape.*to_event\(1\)"),
    "renamed": (renamed, r"guide site 'latent' has no model site of that name; the model's latent sites the guide "
                         r"does not sample: \['z'\]"),
    "shared": (shared, r"site 'z' .* is not per datapoint.*shared by all datapoints"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_pair_is_refused_by_every_entry_point(pair, x, kind, tmp_path):
    make, message = BROKEN[kind]
    model, guide = make(*pair)
    calls = {
        "check_pair": lambda: check_pair(model, guide, x),
        "elbo": lambda: evaluate.elbo(model, guide, x),
        "log_likelihood": lambda: evaluate.log_likelihood(model, guide, x, num_samples=5),
        "log_weights": lambda: evaluate.log_weights(model, guide, x, num_samples=5),
        "fit": lambda: fit(model, guide, x, epochs=1, batch_size=B, progress=False, checkpoint_dir=tmp_path),
        "gradient_stats": lambda: gradient_stats(model, guide, x, num_draws=2),
    }
    for name, call in calls.items():
        with pytest.raises(ContractError, match=message):
            call()
    assert not (tmp_path / "last.pt").exists()  # refused before anything was trained or written


def test_the_shared_latent_is_refused_by_the_gap_tools(pair, x):
    model, _ = shared(*pair)
    with pytest.raises(ContractError, match="model site 'z' .* shared by all datapoints"):
        inference_gaps(model, pair[1], x[:4], num_samples=5, max_steps=2)
    with pytest.raises(ContractError, match="model site 'z' .* shared by all datapoints"):
        refine(model, pair[1], x[:4], steps=2)


def test_what_the_broken_pairs_would_have_reported_is_wrong(pair, x):
    """Why the check matters: bypassing it, the folded pair's ELBO is about B times the true one."""
    vae, q = pair
    good = evaluate.elbo(vae, q, x, num_samples=20).mean().item()
    model, guide = folded(vae, q)
    nesting = 1
    terms = evaluate.log_weight_terms(model, guide, x, num_samples=20, nesting=nesting)  # no door check here
    wrong = terms.log_weight.mean().item()
    assert wrong < 5 * good  # off by roughly the factor B = 16 (good is ~ -550)


def test_a_good_pair_passes_and_reports_its_sites(pair, x):
    vae, q = pair
    found = vi_lab.check_pair(vae, q, x)
    assert (found.nesting, found.latents, found.prior_latents, found.observed, found.batch_size) == \
        (1, ("z",), (), ("x",), B)


def test_prior_drawn_latents_and_auxiliary_guide_sites_are_allowed(pair, x):
    vae, q = pair

    def model(x):
        with pyro.plate("w_data", x.shape[0]):
            pyro.sample("w", dist.Normal(x.new_zeros(x.shape[0]), 1.0))  # not in the guide: a prior draw
        return vae(x)

    def guide(x):
        with pyro.plate("u_data", x.shape[0]):
            pyro.sample("u", dist.Normal(x.new_zeros(x.shape[0]), 1.0), infer={"is_auxiliary": True})
        return q(x)

    found = check_pair(model, guide, x)
    assert found.prior_latents == ("w",) and found.latents == ("z",)
    assert evaluate.elbo(model, guide, x).shape == (B,)


def test_one_datapoint_without_its_batch_dimension_is_an_error(pair, x):
    vae, q = pair
    with pytest.raises(ContractError, match=r"the VAE takes data of shape \(batch, 784\), got x of shape \(784,\); "
                                            r"it is one datapoint without its batch dimension: pass x.unsqueeze\(0\)"):
        evaluate.log_likelihood(vae, q, x[0], num_samples=5)
    assert evaluate.log_likelihood(vae, q, x[0].unsqueeze(0), num_samples=5).shape == (1,)
    with pytest.raises(ContractError, match=r"got x of shape \(16, 28, 28\); flatten each datapoint"):
        evaluate.elbo(vae, q, x.reshape(B, 28, 28))
    with pytest.raises(ContractError, match=r"its rows hold 100 values"):
        fit(vae, q, x[:, :100], epochs=1, progress=False)
    with pytest.raises(ContractError, match=r"got data of shape \(784,\); it is one datapoint .* data.unsqueeze"):
        fit(vae, q, x[0], epochs=1, batch_size=8, progress=False)


def test_a_hand_written_model_given_one_datapoint_is_told_about_the_broadcast(pair, x):
    vae, q = pair

    def model(x):
        return vae(x)  # a plain function: no x_dim to compare with, the traced shapes tell

    with pytest.raises(ContractError, match=r"observed site 'x' gets data of shape \(784,\) but its distribution has "
                                            r"shape \(784, 784\).*x.unsqueeze\(0\)"):
        evaluate.log_likelihood(model, lambda x: q(x), x[0], num_samples=5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data_is_named_at_the_door(pair, x, bad, tmp_path):
    vae, q = pair
    x = x.clone()
    x[3, 10] = bad
    kind = "NaN" if bad != bad else "infinite"
    with pytest.raises(ValueError, match=rf"^data holds 1 {kind} values in 1 of its 16 rows \(first: row 3\)"):
        fit(vae, q, x, epochs=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match=rf"^eval_data holds 1 {kind}"):
        fit(vae, q, x[4:], epochs=1, batch_size=8, progress=False, eval_data=x)
    with pytest.raises(ValueError, match=rf"^x holds 1 {kind}"):
        evaluate.elbo(vae, q, x)


@pytest.mark.parametrize("validation", [True, False])
def test_values_outside_the_bernoulli_support_are_refused_with_validation_on_or_off(pair, x, validation):
    vae, q = pair
    x = x.clone()
    x[9, 0] = 2.0  # not in {0, 1}; only row 9 (after the first batch of 8) holds it
    with pyro.validation_enabled(validation):
        with pytest.raises(ValueError, match=r"^data has values outside the support .*Boolean.* of the observed site "
                                             r"'x' in 1 of its 16 rows \(first: row 9, value 2\).*binarize"):
            fit(vae, q, x, epochs=1, batch_size=8, progress=False)
        with pytest.raises(ValueError, match=r"row 9, value 2"):
            evaluate.log_likelihood(vae, q, x, num_samples=3, batch_size=8)


def test_grey_levels_are_fine_for_a_grey_level_likelihood(x, device):
    vae = VAE(D, [32], likelihood="continuous_bernoulli").to(device)
    q = make_guide("mean_field", latent_dim=D, hidden=[32]).to(device)
    grey = torch.rand(B, 784, device=device)
    assert torch.isfinite(evaluate.elbo(vae, q, grey)).all()


def test_gradient_stats_of_a_fixed_model_reports_the_guide_only(x, device):
    q = make_guide("mean_field", latent_dim=D, hidden=[32]).to(device)
    decoder = torch.nn.Linear(D, 784).to(device).requires_grad_(False)  # a fixed generative model

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], D), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    stats = gradient_stats(model, q, x, num_draws=3)
    assert set(stats) == {"encoder"} and stats["encoder"].num_params > 0
    with pytest.raises(ValueError, match="group 'decoder' names no parameters"):
        gradient_stats(model, q, x, num_draws=3, groups={"decoder": []})


def test_support_is_checked_only_for_sites_that_observe_x_itself(x, device):
    import pyro.distributions as dist

    dec = torch.nn.Linear(D, 784).to(device)
    q = make_guide("mean_field", latent_dim=D, hidden=[32]).to(device)

    def binarizing_model(x):  # observes (x > 0.5), not x: grey x is fine
        pyro.module("dec", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], D), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=dec(z)).to_event(1), obs=(x > 0.5).float())

    grey = torch.rand(B, 784, device=device)
    assert evaluate.elbo(binarizing_model, q, grey).shape == (B,)

    def labelled(x, y):  # x of shape (B, 1) beside an observed label site of the same row size
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=x.new_zeros(x.shape[0], 3)), obs=y)
            pyro.sample("x", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1), obs=x)

    xs = torch.full((B, 1), 3.7, device=device)
    y = torch.zeros(B, dtype=torch.long, device=device)
    assert evaluate.elbo(labelled, lambda x, y: None, xs, y).shape == (B,)


def test_an_autocontinuous_guide_gets_advice_a_user_can_follow(pair, x):
    from pyro.infer.autoguide import AutoDiagonalNormal

    vae, _ = pair
    with pytest.raises(ContractError, match=r"Pyro AutoContinuous guide .* Fix: use an amortized guide"):
        check_pair(vae, AutoDiagonalNormal(vae), x)


def test_gradient_stats_takes_a_model_side_enumerated_latent_with_the_enum_estimator(device):
    import pyro.distributions as dist

    def model(x):
        logits = pyro.param("logits", torch.zeros(3, 5, device=device))
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=x.new_zeros(3)), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Bernoulli(logits=logits[c]).to_event(1), obs=x)

    def guide(x):
        pass

    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.rand(8, 5, generator=g), generator=g).to(device)
    stats = gradient_stats(model, guide, x, estimator="enum", num_draws=2)
    assert set(stats) == {"decoder"} and float(stats["decoder"].variance) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ContractError, match="marked for enumeration"):
        evaluate.elbo(model, guide, x)
