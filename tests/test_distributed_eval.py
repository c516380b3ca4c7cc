"""Sharded evaluation under torchrun: the evaluators and the gap analysis split the datapoints
across processes and gather per-datapoint results in data order.

Each process draws from its own generator, so "the same draws" means: process r seeded
with ``100 + r`` before a distributed call draws what one process seeded alike draws for
process r's rows alone. The launched script computes both (the reference inside
:func:`vi_lab.distributed.alone`, in the same process, so thread counts cannot move a bit)
and saves them; the tests join the references of every share and compare exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from ranks import rank_results, torchrun
from vi_lab import distributed, evaluate

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

NPROC = 2

SCRIPT = r'''
import os, sys
import torch
from vi_lab import distributed, evaluate, gaps
from vi_lab.guides import make_guide
from vi_lab.guides.conditional import make_conditional_guide
from vi_lab.models.cvae import CVAE
from vi_lab.models.ppca import PPCA

out, rank = sys.argv[1], int(os.environ["RANK"])
torch.manual_seed(0)  # the same networks and data in every process
model = CVAE(2, [8], num_classes=3, x_dim=6)
guide = make_conditional_guide("mean_field", latent_dim=2, hidden=[8], num_classes=3, x_dim=6)
N = 7  # odd: shares of 4 and 3 rows
x, y = torch.bernoulli(torch.rand(N, 6)), torch.arange(N) % 3

CALLS = {  # each takes (x, y): the labels are cut with the data
    "log_likelihood": lambda x, y: evaluate.log_likelihood(model, guide, x, y, num_samples=50),
    "elbo": lambda x, y: evaluate.elbo(model, guide, x, y, num_samples=5),
    "elbo_terms": lambda x, y: torch.stack(list(evaluate.elbo_terms(model, guide, x, y, num_samples=3).values())),
    "log_weights": lambda x, y: evaluate.log_weights(model, guide, x, y, num_samples=4, batch_size=2),
    "score_proposal": lambda x, y: torch.stack(
        list(vars(gaps.score_proposal(model, guide, x, y, num_samples=30)).values())),
}

def seeded(seed, fn, *args, **kwargs):
    torch.manual_seed(seed)
    return fn(*args, **kwargs)

# the evaluators join torchrun's process group themselves: nothing was set up before this call
got = {name: seeded(100 + rank, call, x, y) for name, call in CALLS.items()}
world = distributed.world()
lo, hi = distributed.shard_bounds(N)
got["few"] = seeded(100 + rank, CALLS["log_likelihood"], x[:1], y[:1])  # 1 datapoint, 2 processes
bad = x.clone()
bad[N - 1, 0] = 0.5  # outside the Bernoulli support, in the last process's rows
try:
    evaluate.elbo(model, guide, bad, y)
    refused = None
except ValueError as err:
    refused = str(err)

ppca = PPCA(torch.randn(4, 2), sigma=0.7)
amortized = make_guide("mean_field", latent_dim=2, hidden=[8], x_dim=4)
xp = ppca.sample(5)  # shares of 3 and 2
settings = dict(num_samples=40, max_steps=40, lr=(0.02, 0.002), window=10, num_particles=4)
report = seeded(200 + rank, gaps.inference_gaps, ppca, amortized, xp, **settings)
curve = seeded(300 + rank, lambda: gaps.refinement_curve(ppca, amortized, xp, steps=(0, 3), num_samples=5,
                                                         report=report))
few_gaps = seeded(200 + rank, gaps.inference_gaps, ppca, amortized, xp[:1], **settings)

with distributed.alone():  # one process, this process's rows: the reference
    mine = {name: seeded(100 + rank, call, x[lo:hi], y[lo:hi]) for name, call in CALLS.items()}
    mine["few"] = seeded(100, CALLS["log_likelihood"], x[:1], y[:1])  # what process 0 computed for all
    plo, phi = distributed.shard_bounds(5, distributed.World(rank, world.size))
    my_report = seeded(200 + rank, gaps.inference_gaps, ppca, amortized, xp[plo:phi], **settings)
    my_curve = seeded(300 + rank, lambda: gaps.refinement_curve(ppca, amortized, xp[plo:phi], steps=(0, 3),
                                                                num_samples=5))
    few_alone = seeded(200, gaps.inference_gaps, ppca, amortized, xp[:1], **settings)

torch.save({"world": (world.rank, world.size), "got": got, "mine": mine, "refused": refused,
            "report": report.to_dict(), "per_datapoint": report.per_datapoint(), "proposal": report.proposal,
            "fits": report.fits, "shard_fits": report.shard_fits,
            "my_per_datapoint": my_report.per_datapoint(), "my_fits": my_report.fits,
            "my_elbo_by_proposal": {"q": my_report.elbo_amortized, "q_star": my_report.elbo_optimal,
                                    "q_star_rich": my_report.elbo_rich},
            "guides": {k: g.num_data for k, g in report.local_guides.items()},
            "curve": curve.elbo, "curve_gap": curve.remaining_gap(), "my_curve": my_curve.elbo,
            "few_gaps": few_gaps.to_dict(), "few_alone": few_alone.to_dict(),
            "few_guides": len(few_gaps.local_guides)},
           f"{out}/rank{rank}.pt")
'''


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of 2 processes computed (distributed) and computed alone on its own rows (the reference)."""
    out = tmp_path_factory.mktemp("sharded")
    script = out / "sharded_eval.py"
    script.write_text(SCRIPT)
    torchrun(NPROC, str(script), str(out))
    return rank_results(out, NPROC)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.nan_to_num(-9.0), b.nan_to_num(-9.0)))


def test_evaluators_on_two_processes_equal_one_process_on_each_share_with_its_draws(ranks):
    assert [r["world"] for r in ranks] == [(0, 2), (1, 2)]
    for name in ("log_likelihood", "elbo", "elbo_terms", "log_weights", "score_proposal"):
        whole = ranks[0]["got"][name]
        assert whole.shape[-1] == 7, name
        # every process holds the same result, bit for bit ...
        assert _same(ranks[1]["got"][name], whole), name
        # ... the shares of 4 and 3 rows in data order, each what one process draws for those rows
        reference = torch.cat([r["mine"][name] for r in ranks], dim=-1)
        assert _same(whole, reference), name


def test_fewer_datapoints_than_processes_are_evaluated_by_process_0_for_all(ranks):
    for r in ranks:
        assert r["got"]["few"].shape == (1,)
        assert _same(r["got"]["few"], ranks[0]["mine"]["few"])  # process 0's draws, seeded 100


def test_an_error_in_one_share_is_raised_in_every_process_naming_its_rows(ranks):
    messages = [r["refused"] for r in ranks]
    assert messages[0] is not None and messages[0] == messages[1]
    assert messages[0].startswith("datapoints 4-6 (process 1 of 2): ") and "outside the support" in messages[0]


def test_gaps_on_two_processes_equal_one_process_on_each_share_and_agree(ranks):
    first = ranks[0]
    # the same report in every process (the slowest process's seconds included)
    assert json.dumps(ranks[1]["report"], sort_keys=True) == json.dumps(first["report"], sort_keys=True)
    assert first["report"]["num_points"] == 5
    for key, value in first["per_datapoint"].items():
        assert _same(value, torch.cat([r["my_per_datapoint"][key] for r in ranks])), key
    # "auto": the highest mean ELBO over all five datapoints, whatever each share would pick
    elbos = {k: torch.cat([r["my_elbo_by_proposal"][k] for r in ranks]) for k in ("q", "q_star", "q_star_rich")}
    assert first["proposal"] == max(elbos, key=lambda k: elbos[k].mean().item())
    # each process's own fits, in rank order; fits: the most steps, converged only if every share did
    for r, share in zip(ranks, first["shard_fits"]):
        assert {k: (f.steps, f.losses) for k, f in share.items()} == \
               {k: (f.steps, f.losses) for k, f in r["my_fits"].items()}
    for name, fit in first["fits"].items():
        assert fit.steps == max(s[name].steps for s in first["shard_fits"])
        assert fit.converged == all(s[name].converged for s in first["shard_fits"])
        record = first["report"]["local_fits"][name]
        assert [s["datapoints"] for s in record["shares"]] == [3, 2]
        assert math.isclose(record["final_loss"], (3 * first["shard_fits"][0][name].losses[-1]
                                                   + 2 * first["shard_fits"][1][name].losses[-1]) / 5)
    # the local guides are the process's own, for its rows
    assert [r["guides"]["q_star"] for r in ranks] == [3, 2]


def test_refinement_curve_on_two_processes_equals_one_process_on_each_share(ranks):
    for r in ranks:
        for t, elbo in enumerate(r["curve"]):
            assert _same(elbo, torch.cat([s["my_curve"][t] for s in ranks]))
        assert _same(r["curve_gap"][0], ranks[0]["per_datapoint"]["elbo_optimal"] - ranks[0]["curve"][0])


def test_gaps_of_fewer_datapoints_than_processes_are_process_0s(ranks):
    for r in ranks:
        assert r["few_gaps"]["per_datapoint"] == ranks[0]["few_alone"]["per_datapoint"]
        assert r["few_gaps"]["num_points"] == 1 and "shares" not in r["few_gaps"]["local_fits"]["q_star"]
    assert [r["few_guides"] for r in ranks] == [2, 0]  # process 0 keeps its guides; they are not sent


def test_only_process_0_shows_progress_and_names_its_share():
    assert evaluate.share_progress(True, "weights", distributed.World(0, 2)) == "weights [process 0 of 2]"
    assert evaluate.share_progress("log weights", "weights", distributed.World(0, 2)) == "log weights [process 0 of 2]"
    assert evaluate.share_progress(True, "weights", distributed.World(1, 2)) is False
    assert evaluate.share_progress("bar", "weights", distributed.World()) == "bar"


def test_eval_command_on_two_processes_writes_once_and_prints_once(tmp_path, tiny_args):
    from vi_lab.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", *tiny_args, "--latent-dim", "2", "--hidden", "16", "--out", str(run_dir)]) is not None
    before = set(run_dir.iterdir())
    proc = torchrun(NPROC, "-m", "vi_lab", "eval", str(run_dir), "--eval-size", "9", "--eval-samples", "10",
                    "--threads", "1", "--no-progress", "--device", "cpu")
    written = set(run_dir.iterdir()) - before
    assert [p.name for p in written] == ["eval_mnist_test_N9_K10_s0.json"]
    assert proc.stdout.count("wrote ") == 1 and proc.stdout.count("log p(x), K=10") == 1
    scored = json.loads(next(iter(written)).read_text())
    assert scored["world_size"] == 2 and scored["eval_size"] == 9
    assert scored["log_likelihood"]["mean"] >= scored["elbo"]["mean"] - 1e-6
