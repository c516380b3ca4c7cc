"""A log-linear latent-class model that needs its normalizer: pairwise features on MNIST patches.

For each K in ``--classes`` three log-linear latent-class models are fitted by exact EM
(:func:`vi_lab.em.em`, best of ``--restarts``) to binary ``s x s`` patches of statically
binarized MNIST training images:

* ``factorized``: unary features only (:class:`~vi_lab.models.loglinear.BernoulliMixture`),
  whose normalizer is a product over pixels;
* ``grid``: unary + ``x_i x_j`` for 4-neighbour pixel pairs, and ``all``: for every pair
  (:class:`~vi_lab.models.loglinear_pairwise.PairwiseMixture`). Their normalizer does not
  factorize: every E-step and every M-step evaluation sums over all ``2^(s*s)`` patches.

All are scored exactly on patches of the (binarized) test images, in nats per patch; the
"vs factorized" column is the paired difference on the same test patches.

    python examples/loglinear_pairwise.py --threads 1 --out docs/results/loglinear_pairwise.json
"""

import argparse
import datetime
import time

import torch

from vi_lab import reporting, runs
from vi_lab.data import binarize, load_dataset
from vi_lab.em import em
from vi_lab.models.loglinear import BernoulliMixture
from vi_lab.models.loglinear_pairwise import PairwiseMixture, random_patches

FEATURES = ("factorized", "grid", "all")


def make_model(features: str, K: int, d: int) -> torch.nn.Module:
    if features == "factorized":
        return BernoulliMixture(K, d, dtype=torch.float64)
    return PairwiseMixture(K, d, edges=features)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patch", type=int, default=3, help="patch side s: |X| = 2^(s*s) (default %(default)s)")
    p.add_argument("--classes", type=int, nargs="+", default=[1, 4, 16], help="K values (default 1 4 16)")
    p.add_argument("--features", nargs="+", choices=FEATURES, default=list(FEATURES))
    p.add_argument("--train-size", type=int, default=20000, help="training patches (default %(default)s)")
    p.add_argument("--eval-size", type=int, default=5000, help="test patches (default %(default)s)")
    p.add_argument("--em-iters", type=int, default=100, help="EM iterations per restart at most")
    p.add_argument("--tol", type=float, default=1e-6, help="EM's relative tolerance")
    p.add_argument("--restarts", type=int, default=2, help="EM restarts (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    a = p.parse_args(argv)
    device = runs.setup(a.threads, a.device)

    # patches of the same static binarization for every model: train images seed 0, test seed 1
    g = torch.Generator().manual_seed(a.seed)
    train_images = binarize(load_dataset("mnist", "train", device=device).images, "static", seed=a.seed)
    test_images = binarize(load_dataset("mnist", "test", device=device).images, "static", seed=a.seed + 1)
    x_train = random_patches(train_images, a.patch, a.train_size, generator=g).double()
    x_test = random_patches(test_images, a.patch, a.eval_size, generator=g).double()
    d = a.patch ** 2

    rows, table = [], [("features", "K", "held-out log-lik (nats/patch)", "vs factorized", "train", "EM iters",
                        "s/iter", "params")]
    for K in a.classes:
        factorized = None
        for features in a.features:
            model = make_model(features, K, d)
            t0 = time.process_time()
            result = em(model, x_train, max_iters=a.em_iters, tol=a.tol, restarts=a.restarts, seed=a.seed)
            cpu = time.process_time() - t0
            with torch.no_grad():
                per_patch = model.log_marginal(x_test)  # (N,) exact, nats
            test, sem = reporting.mean_sem(per_patch)
            diff = reporting.mean_sem(per_patch - factorized) if factorized is not None else (0.0, 0.0)
            factorized = per_patch if features == "factorized" else factorized
            iters = sum(len(r.log_likelihoods) - 1 for r in result.runs)
            rows.append({"features": features, "K": K, "test_log_likelihood": test, "test_log_likelihood_sem": sem,
                         "vs_factorized": diff[0] if features != "factorized" else None,
                         "vs_factorized_sem": diff[1] if features != "factorized" else None,
                         "train_log_likelihood": result.log_likelihood, "em_iterations": result.iterations,
                         "cpu_seconds": cpu, "cpu_seconds_per_iteration": cpu / max(iters, 1),
                         "parameters": sum(q.numel() for q in model.parameters()), **result.as_dict()})
            table.append((features, K, f"{test:.4f} +/- {sem:.4f}",
                          f"{diff[0]:+.4f} +/- {diff[1]:.4f}" if features != "factorized" else "-",
                          f"{result.log_likelihood:.4f}", result.iterations, f"{cpu / max(iters, 1):.3f}",
                          rows[-1]["parameters"]))
            print(reporting.format_table(table[:1] + table[-1:]).splitlines()[-1], flush=True)

    print()
    print(reporting.format_table(table))
    print(f"\n{a.patch}x{a.patch} patches (|X| = 2^{d} = {2 ** d}): {a.train_size} from MNIST train images, "
          f"{a.eval_size} from test images; s/iter is CPU seconds per EM iteration (all restarts)")
    report = {"results": rows, "units": "nats per patch (higher is better); exact log p(x) by enumeration",
              "patch": a.patch, "observation_space": 2 ** d, "train_size": a.train_size, "eval_size": a.eval_size,
              "device": str(device), "threads": torch.get_num_threads(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": runs.command_line(),
              "config": vars(a)}
    if a.out:
        reporting.write_json(a.out, report)
        print(f"wrote {a.out}")
    return report


if __name__ == "__main__":
    main()
