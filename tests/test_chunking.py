"""The evaluators' chunks are sized by a memory budget measured by a probe, and never change the estimates."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import is_validation_enabled

import vi_lab
from vi_lab import evaluate
from vi_lab.contract import check_pair
from vi_lab.guides import make_local_guide

X_DIM, N, K = 20, 8, 24


@pytest.fixture
def pair(device):
    torch.manual_seed(0)
    model = vi_lab.VAE(latent_dim=4, hidden=[16], x_dim=X_DIM).to(device)
    guide = vi_lab.make_guide("mean_field", latent_dim=4, hidden=[16], x_dim=X_DIM).to(device)
    x = torch.bernoulli(torch.rand(N, X_DIM, device=device))
    return model, guide, x


@pytest.fixture
def chunks(monkeypatch):
    """The ``(samples, points)`` of every chunk the evaluators run (the probe's runs left out)."""
    seen, probing = [], []
    run, probe = evaluate.log_weight_terms, evaluate._probe

    def spy(model, guide, x, *args, num_samples=1, **kwargs):
        if not probing:
            seen.append((num_samples, x.shape[0]))
        return run(model, guide, x, *args, num_samples=num_samples, **kwargs)

    def quiet_probe(*args, **kwargs):
        probing.append(True)
        try:
            return probe(*args, **kwargs)
        finally:
            probing.pop()

    monkeypatch.setattr(evaluate, "log_weight_terms", spy)
    monkeypatch.setattr(evaluate, "_probe", quiet_probe)
    return lambda: seen


def test_plan_follows_the_budget():
    cost = dict(pair_bytes=100, point_bytes=50)
    # everything fits: one chunk of all points and all draws
    assert evaluate.plan_chunks(1000, 50, **cost, budget=10**9)[:2] == (1000, 50)
    # all K draws of as many points as fit: 5000 * 100 + 50 bytes a point
    assert evaluate.plan_chunks(1000, 5000, **cost, budget=2 * 500_050)[:2] == (2, 5000)
    # less than one point's K draws: one point, K cut to what fits
    assert evaluate.plan_chunks(1000, 5000, **cost, budget=100_050)[:2] == (1, 1000)
    # a smaller budget never gives larger chunks
    sizes = [evaluate.plan_chunks(1000, 5000, **cost, budget=b) for b in (10**4, 10**6, 10**8, 10**10)]
    assert [p.points * p.samples for p in sizes] == sorted(p.points * p.samples for p in sizes)
    assert all(p.points * (p.samples * 100 + 50) <= p.budget for p in sizes)
    # below one pair: still one draw of one point
    assert evaluate.plan_chunks(1000, 5000, **cost, budget=1)[:2] == (1, 1)
    # the caller's batch_size fixes the points, the budget cuts K; a local guide gets all points
    assert evaluate.plan_chunks(1000, 5000, **cost, budget=10**6, batch_size=100)[:2] == (100, 99)
    assert evaluate.plan_chunks(1000, 5000, **cost, budget=10**6, whole_batch=True)[:2] == (1000, 9)


def test_chunks_follow_the_budget_and_stay_within_it(pair, chunks):
    model, guide, x = pair
    runs = {}
    for budget in (2**14, 2**17, 2**30):
        start = len(chunks())
        evaluate.log_likelihood(model, guide, x, num_samples=K, memory_budget=budget)
        runs[budget] = chunks()[start:]
    sizes = {b: len(c) for b, c in runs.items()}
    assert sizes[2**14] > sizes[2**17] > sizes[2**30] == 1  # smaller budget, more (and smaller) chunks
    assert runs[2**30] == [(K, N)]
    for budget, cut in runs.items():
        assert sum(k * b for k, b in cut) == K * N  # every (draw, point) pair once


def test_a_chunk_allocates_no_more_than_its_budget(pair, monkeypatch):
    model, guide, x = pair
    budget, allocated = 2**15, []
    run = evaluate.log_weight_terms

    def measured(*args, **kwargs):
        with evaluate._AllocatedBytes() as counter:
            out = run(*args, **kwargs)
        allocated.append(counter.bytes)
        return out

    monkeypatch.setattr(evaluate, "log_weight_terms", measured)
    evaluate.elbo(model, guide, x, num_samples=K, memory_budget=budget)
    assert len(allocated) > 3 and max(allocated[2:]) <= budget  # after the probe's two runs


def test_tiny_and_huge_budgets_give_the_same_numbers(pair, device):
    if device.type != "cpu":
        pytest.skip("cutting K reproduces the draws only on the CPU generator (a GPU's depends on the cut)")
    model, guide, x = pair
    for fn in (evaluate.log_likelihood, evaluate.elbo, evaluate.log_weights):
        results = []
        for budget in (1, 2**12, 2**30):  # K draws one at a time, a few at a time, all at once
            pyro.set_rng_seed(3)
            # all points in each chunk: the draws then come off the random stream in the same order
            results.append(fn(model, guide, x, num_samples=K, batch_size=N, memory_budget=budget))
        for other in results[1:]:
            assert torch.allclose(results[0], other, atol=1e-5), fn.__name__
    terms = []
    for budget in (1, 2**30):
        pyro.set_rng_seed(3)
        terms.append(evaluate.elbo_terms(model, guide, x, num_samples=K, batch_size=N, memory_budget=budget))
    for key in terms[0]:
        assert torch.allclose(terms[0][key], terms[1][key], atol=1e-5)


def test_cutting_points_agrees_exactly_on_fixed_draws_and_within_noise_on_random_ones(pair):
    model, guide, x = pair

    def at_the_mean(x):  # deterministic draws: every weight is fixed, whatever the chunks
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(guide.get_posterior(x).mean, event_dim=1))

    tiny = evaluate.log_likelihood(model, at_the_mean, x, num_samples=5, memory_budget=1)
    huge = evaluate.log_likelihood(model, at_the_mean, x, num_samples=5, memory_budget=2**30)
    assert torch.allclose(tiny, huge, atol=1e-5)
    assert torch.allclose(evaluate.elbo(model, at_the_mean, x, num_samples=5, memory_budget=1), huge, atol=1e-5)
    # random draws cut differently: the same estimator, equal within Monte Carlo noise
    lw = [evaluate.log_weights(model, guide, x, num_samples=2000, memory_budget=b) for b in (2**16, 2**30)]
    se = lw[1].std(0) / 2000**0.5
    assert ((lw[0].mean(0) - lw[1].mean(0)).abs() < 5 * se + 1e-4).all()


def test_the_probe_leaves_the_random_stream_as_it_was(pair):
    model, guide, x = pair
    pyro.set_rng_seed(7)
    got = evaluate.log_weights(model, guide, x, num_samples=K, memory_budget=2**30)
    pyro.set_rng_seed(7)
    with torch.no_grad():
        nesting = check_pair(model, guide, x).nesting  # what the evaluator draws before its chunks
        want = evaluate.log_weight_terms(model, guide, x, num_samples=K, nesting=nesting).log_weight
    assert torch.allclose(got, want, atol=1e-6)


def test_a_budget_below_one_pair_still_runs(pair, chunks):
    model, guide, x = pair
    ll = evaluate.log_likelihood(model, guide, x, num_samples=3, memory_budget=1)
    assert ll.shape == (N,) and torch.isfinite(ll).all()
    assert set(chunks()) == {(1, 1)} and len(chunks()) == 3 * N


def test_validation_runs_on_the_first_chunk_and_is_restored(pair, monkeypatch):
    model, guide, x = pair
    states = []
    run = evaluate.log_weight_terms

    def spy(*args, **kwargs):
        states.append(is_validation_enabled())
        return run(*args, **kwargs)

    monkeypatch.setattr(evaluate, "log_weight_terms", spy)
    evaluate.elbo(model, guide, x, num_samples=K, memory_budget=1)
    assert states[:3] == [True, True, True] and not any(states[3:])  # probe x 2, first chunk; then off
    assert is_validation_enabled()


def test_a_local_guide_keeps_its_whole_batch(pair, chunks):
    model, guide, x = pair
    local = make_local_guide("mean_field", init_from=guide, x=x)
    ll = evaluate.log_likelihood(model, local, x, num_samples=K, memory_budget=2**12)
    assert torch.isfinite(ll).all()
    assert len(chunks()) > 1 and all(b == N for _, b in chunks())


def test_the_environment_sets_the_budget(pair, chunks, monkeypatch):
    model, guide, x = pair
    evaluate.elbo(model, guide, x, num_samples=K, memory_budget="16KiB")
    by_keyword = list(chunks())
    monkeypatch.setenv(evaluate.MEMORY_ENV, "16KiB")
    evaluate.elbo(model, guide, x, num_samples=K)
    assert chunks()[len(by_keyword):] == by_keyword
    assert evaluate.chunk_budget("cpu") == 2**14
    assert evaluate.chunk_budget("cpu", override=4096) == 4096  # the keyword wins


@pytest.mark.parametrize("text, size", [("2GiB", 2 * 2**30), ("1.5 GB", 1_500_000_000), ("4096", 4096),
                                        ("1e6", 10**6), ("64kib", 2**16)])
def test_memory_sizes_parse(text, size):
    assert evaluate.parse_memory(text) == size


@pytest.mark.parametrize("bad", ["lots", "-1", "0", "2 parsecs"])
def test_a_bad_environment_budget_is_refused_clearly(pair, monkeypatch, bad):
    model, guide, x = pair
    monkeypatch.setenv(evaluate.MEMORY_ENV, bad)
    with pytest.raises(ValueError, match=rf"^VI_LAB_EVAL_MEMORY='{bad}' is not a memory size: .*e\.g\. 2GiB\)$"):
        evaluate.log_likelihood(model, guide, x, num_samples=2)


@pytest.mark.parametrize("bad", [0, -5, 2.5, "two gigs", True])
def test_a_bad_memory_budget_keyword_is_refused_clearly(pair, bad):
    model, guide, x = pair
    with pytest.raises(ValueError, match="memory_budget=.* is not a memory size"):
        evaluate.elbo(model, guide, x, memory_budget=bad)


def test_a_bad_batch_size_is_refused_clearly(pair):
    model, guide, x = pair
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None"):
        evaluate.elbo(model, guide, x, batch_size=0)
