"""Approximation gaps of the local guide families on probabilistic PCA, against exact answers.

PPCA's posterior is a correlated Gaussian with a known log p(x), so the gap
``log p(x) - ELBO`` a family leaves after per-datapoint optimization is its
approximation gap: 0 for ``full_cov``, exactly ``0.5 * (sum_i log L_ii - log det L)`` for
the best ``mean_field`` guide, somewhere in between for the others. Each local guide
starts at N(0, I) and is optimized with Adam in three stages (lr 0.05, 0.005, 0.0005),
each until the mean -ELBO over a 50-step window improves by < 0.001 nats; the ELBO is
then estimated with 4000 draws per datapoint. Same setting as tests/guides/test_local.py.

    python benchmarks/local_ppca.py --threads 1
"""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from pathlib import Path

import pyro
import torch

from vi_lab import evaluate, runs
from vi_lab.guides.local import LOCAL_GUIDES, make_local_guide, optimize_local
from vi_lab.models.ppca import PPCA

STAGES = (0.05, 0.005, 0.0005)
OPTIONS = {"low_rank": {"rank": 1}}  # rank 1 of 3: between mean-field and full covariance


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=16, help="datapoints (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = PPCA(torch.randn(8, 3), mu=torch.randn(8), sigma=0.5)
    x = model.sample(a.points)
    exact = model.log_marginal(x)
    rows = {}
    for name in LOCAL_GUIDES:
        pyro.clear_param_store()
        pyro.set_rng_seed(a.seed)
        local = make_local_guide(name, num_data=a.points, latent_dim=3, **OPTIONS.get(name, {}))
        t0 = time.perf_counter()
        steps = sum(optimize_local(model, local, x, lr=lr, num_particles=16, window=50, tol=1e-3,
                                   max_steps=1500).steps for lr in STAGES)
        with torch.no_grad():
            gap = exact - evaluate.elbo(model, local, x, num_samples=4000)
        rows[name] = {"gap": gap.mean().item(), "gap_sem": (gap.std() / a.points**0.5).item(), "steps": steps,
                      "seconds": time.perf_counter() - t0, "options": OPTIONS.get(name, {})}
    result = {"optimal_mean_field_gap": model.optimal_mean_field_gap(), "rows": rows, "points": a.points,
              "units": "nats per datapoint: log p(x) - ELBO after local optimization (smaller is better)",
              "date": _dt.datetime.now().isoformat(timespec="seconds"), "command": runs.command_line()}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    runs.write_json(Path(a.out) / "local_ppca.json", result)
    print(runs.format_table([("local guide", "log p(x) - ELBO (nats)", "steps")]
                            + [(n, f"{r['gap']:.4f} ± {r['gap_sem']:.4f}", r["steps"]) for n, r in rows.items()]))
    print(f"closed-form optimal mean-field gap: {result['optimal_mean_field_gap']:.4f}")
    return result


if __name__ == "__main__":
    main()
