"""The guide-family table: the same VAE trained with every guide, ELBO vs log-likelihood on the test set.

One row per guide family: the same model (MLP VAE, D = 20, hidden 400, Bernoulli
likelihood, dynamic binarization), the same epochs, batch size, learning rate and seed;
then on the test set the ELBO and the importance-sampled log-likelihood, both from the
same K draws of the trained guide per image (ELBO = mean of the K log weights, log p(x) =
their log-mean-exp), their difference, and the training seconds per epoch.

The run is long on a CPU, so it can go one guide per invocation; every invocation
merges its rows into the JSON file (``--out``/guide_table.json) and prints the table of
all rows there::

    python benchmarks/guide_table.py --guides iaf --threads 1      # one row
    python benchmarks/guide_table.py --guides all                  # every family
    python benchmarks/guide_table.py --table-only                  # print the table

Units: nats per datapoint, higher is better for ELBO and log-likelihood.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import time
from pathlib import Path

import pyro
import torch

import vi_lab
from vi_lab import evaluate, runs
from vi_lab.guides import GUIDES

RESULTS_NAME = "guide_table.json"
#: table order: the baseline, the Gaussians, the flows, the mixture
ORDER = ("mean_field", "full_cov", "low_rank", "iaf", "planar", "radial", "mixture")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    runs.add_common_args(p, epochs=10, eval_size=10000, eval_samples=1000)
    p.add_argument("--guides", nargs="+", default=["all"], help=f"families to run: all, or some of {', '.join(ORDER)}")
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--hidden", type=int, nargs="+", default=[400])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--machine", default=None, help="how to describe this machine in the JSON (default: from platform)")
    p.add_argument("--table-only", action="store_true", help="print the table of the rows already in the JSON")
    a = p.parse_args(argv)
    names = list(ORDER) if a.guides == ["all"] else a.guides
    unknown = [n for n in names if n not in GUIDES]
    if unknown:
        p.error(f"unknown guide(s) {', '.join(unknown)}; valid names: {', '.join(sorted(GUIDES))} or all")
    a.guides = names
    if a.out is None:
        a.out = str(Path(__file__).resolve().parent / "results")
    return a


def mean_sem(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()
    return v.mean().item(), (v.std() / math.sqrt(v.numel())).item() if v.numel() > 1 else float("nan")


def run_guide(name: str, a: argparse.Namespace, data: runs.RunData, device: torch.device) -> dict:
    """Train one guide family with the shared settings and score it on the test set."""
    pyro.set_rng_seed(a.seed)  # same initial model weights for every family
    model = vi_lab.VAE(a.latent_dim, list(a.hidden)[::-1])
    guide = vi_lab.make_guide(name, latent_dim=a.latent_dim, hidden=list(a.hidden))
    cpu0 = time.process_time()  # CPU seconds: less at the mercy of other jobs than wall time
    result = vi_lab.fit(model, guide, data.x_train, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                        device=device, seed=a.seed, progress=a.progress, binarize=data.fit_binarize,
                        metrics_path=Path(a.out) / f"guide_table_{name}.jsonl")  # per-epoch progress
    cpu_per_epoch = (time.process_time() - cpu0) / max(1, a.epochs)
    t0 = time.perf_counter()
    pyro.set_rng_seed(a.seed + 2)
    # the same K draws per image give both numbers, so their difference is not blurred by two noises
    lw = evaluate.log_weights(model, guide, data.x_test, num_samples=a.eval_samples, batch_size=500)  # (K, N)
    elbo = lw.mean(0)
    ll = lw.logsumexp(0) - math.log(a.eval_samples)
    eval_seconds = time.perf_counter() - t0
    (e, e_sem), (l, l_sem), (g, g_sem) = mean_sem(elbo), mean_sem(ll), mean_sem(ll - elbo)
    return {
        "guide": name,
        "guide_class": type(guide).__name__,
        "guide_parameters": sum(p.numel() for p in guide.parameters()),
        "test_elbo": e, "test_elbo_sem": e_sem,
        "test_log_likelihood": l, "test_log_likelihood_sem": l_sem,
        "gap": g, "gap_sem": g_sem,
        "train_elbo": result.train_elbo,
        "seconds_per_epoch": result.seconds_per_epoch,
        "cpu_seconds_per_epoch": cpu_per_epoch,
        "eval_seconds": eval_seconds,
        "history": result.history,
        "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed,
        "latent_dim": a.latent_dim, "hidden": list(a.hidden),
        "train_size": len(data.x_train), "eval_size": len(data.x_test), "eval_samples": a.eval_samples,
        "binarization": data.binarization, "data_source": data.source, "device": result.device,
        "threads": torch.get_num_threads(),
        "machine": a.machine or f"{platform.machine()}, {os.cpu_count()} cores ({platform.platform()})",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": runs.command_line(),
        "units": "nats per datapoint (higher is better); gap = log-likelihood - ELBO",
    }


def load_rows(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("rows", {})


def save_rows(path: Path, rows: dict[str, dict]) -> None:
    ordered = {k: rows[k] for k in sorted(rows, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))}
    tmp = path.with_suffix(".tmp")
    runs.write_json(tmp, {"units": "nats per datapoint (higher is better)", "rows": ordered})
    os.replace(tmp, path)  # atomic: a crash mid-write keeps the rows already there


def table(rows: dict[str, dict]) -> str:
    """A Markdown table of the rows, in :data:`ORDER`."""
    lines = ["| guide | test ELBO | test log-likelihood (K) | log-lik. - ELBO | seconds / epoch (wall, CPU) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in [n for n in ORDER if n in rows] + [n for n in rows if n not in ORDER]:
        r = rows[name]
        cpu = f"{r['cpu_seconds_per_epoch']:.1f}" if "cpu_seconds_per_epoch" in r else "-"
        lines.append(f"| `{name}` | {r['test_elbo']:.2f} ± {r['test_elbo_sem']:.2f} | "
                     f"{r['test_log_likelihood']:.2f} ± {r['test_log_likelihood_sem']:.2f} ({r['eval_samples']}) | "
                     f"{r['gap']:.2f} ± {r['gap_sem']:.2f} | {r['seconds_per_epoch']:.1f}, {cpu} |")
    return "\n".join(lines)


def main(a: argparse.Namespace) -> dict[str, dict]:
    out = runs.out_dir(a.out)
    path = out / RESULTS_NAME
    if a.table_only:
        print(table(load_rows(path)))
        return load_rows(path)
    device = runs.setup(a.threads, a.device)
    data = runs.load_data(a.dataset, data_dir=a.data_dir, device=device, train_size=a.train_size,
                          eval_size=a.eval_size, binarization="dynamic", seed=a.seed)
    for name in a.guides:
        row = run_guide(name, a, data, device)
        rows = load_rows(path)  # re-read: another invocation may have added rows meanwhile
        rows[name] = row
        save_rows(path, rows)
        print(f"{name}: test ELBO {row['test_elbo']:.2f}, log-likelihood {row['test_log_likelihood']:.2f} "
              f"(K={a.eval_samples}), {row['seconds_per_epoch']:.1f} s/epoch; wrote {path}", flush=True)
    rows = load_rows(path)
    print("\nnats per datapoint (higher is better)\n" + table(rows))
    return rows


if __name__ == "__main__":
    main(parse_args())
