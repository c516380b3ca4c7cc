"""Using the encoder downstream: a linear probe on each guide family's posterior means.

For every guide family in ``--guides`` and every size in ``--latent-dim``, the same VAE
(same decoder widths, seed, data and epochs; dynamically binarized MNIST) is trained,
and a linear probe (multinomial logistic regression with L2, :func:`vi_lab.probe.linear_probe`)
is fitted on the encoder's posterior means E_q[z | x] of the training images and scored on
the test images. The same probe reads PCA codes of the same size (fitted on the training
images) and the 784 pixels, so the table says how much of the digit's class each
representation makes linearly readable. Every representation reads the same binary images
(one static binarization of the training images, the test set's held-out one); a grey-level
pixel row is there to compare with published linear classifiers.

Run ``python examples/linear_probe.py`` (defaults: 10,000 training images, latent sizes 20
and 2, 10 epochs, five families; 11 minutes with ``--threads 1`` on a 2-core CPU shared with other jobs)
or ``--help``. It prints a Markdown table and writes every number, with the command, the
date and the machine, to ``--out`` (a JSON file, default ``runs/probe-<timestamp>.json``).

What it does, in the library's own calls::

    import vi_lab
    from vi_lab import evaluate, probe

    model = vi_lab.VAE(latent_dim=20, hidden=[400])
    guide = vi_lab.make_guide("iaf", latent_dim=20, hidden=[400])
    vi_lab.fit(model, guide, x_train, epochs=10, binarize="dynamic")
    evaluate.elbo(model, guide, x_test_bin, num_samples=10).mean()          # nats per image
    z_train, z_test = probe.encode(guide, x_train_bin), probe.encode(guide, x_test_bin)
    probe.linear_probe(z_train, y_train, z_test, y_test).accuracy
    c_train, c_test = probe.pca_codes(x_train_bin, x_test_bin, 20)         # fitted on the training images
    probe.linear_probe(c_train, y_train, c_test, y_test).accuracy              # the same probe on PCA codes
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import time
from pathlib import Path

import pyro
import torch

import vi_lab
from vi_lab import evaluate, probe, runs
from vi_lab.data import binarize
from vi_lab.infer import heldout_binarized
from vi_lab.reporting import mean_sem, write_json

FAMILIES = ("mean_field", "full_cov", "low_rank", "iaf", "mixture")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guides", nargs="+", default=list(FAMILIES), help="guide families (default %(default)s)")
    p.add_argument("--latent-dim", type=int, nargs="+", default=[20, 2], help="latent sizes, one column each")
    p.add_argument("--hidden", type=int, nargs="+", default=[400])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-size", type=int, default=10000, help="first N training images (VAE and probe)")
    p.add_argument("--eval-size", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--eval-samples", type=int, default=10, help="draws per image for the test ELBO")
    p.add_argument("--mean-samples", type=int, default=probe.MEAN_SAMPLES,
                   help="draws of the Monte Carlo mean for the flows (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--machine", default=None, help="how to describe this machine in the JSON")
    p.add_argument("--out", default=None, help="JSON file (default runs/probe-<timestamp>.json)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    unknown = [g for g in a.guides if g not in vi_lab.GUIDES]
    if unknown:
        p.error(f"unknown guide(s) {', '.join(unknown)}; valid names: {', '.join(sorted(vi_lab.GUIDES))}")
    return a


def probe_row(name: str, d: int | None, train: torch.Tensor, test: torch.Tensor, y_train: torch.Tensor,
              y_test: torch.Tensor, a: argparse.Namespace, **extra) -> dict:
    r = probe.linear_probe(train, y_train, test, y_test, seed=a.seed)
    print(f"{name} (d={d or train.shape[1]}): probe accuracy {r.accuracy:.4f} (l2 {r.l2:g})", flush=True)
    return {"representation": name, "latent_dim": d, "features": r.num_features, "accuracy": r.accuracy,
            "train_accuracy": r.train_accuracy, "l2": r.l2, "validation": r.validation, **extra}


def train_family(name: str, d: int, grey, x_train: torch.Tensor, x_test: torch.Tensor, device, a) -> dict:
    pyro.set_rng_seed(a.seed)  # the same initial decoder for every family
    model = vi_lab.VAE(d, a.hidden[::-1])
    guide = vi_lab.make_guide(name, latent_dim=d, hidden=a.hidden)
    t0 = time.perf_counter()
    vi_lab.fit(model, guide, grey.x_train, epochs=a.epochs, device=device, seed=a.seed, binarize="dynamic",
               progress=runs.fit_progress(a.progress))
    train_seconds = time.perf_counter() - t0
    pyro.set_rng_seed(a.seed + 2)
    with torch.no_grad():
        elbo, elbo_sem = mean_sem(evaluate.elbo(model, guide, x_test, num_samples=a.eval_samples))
        exact = probe.has_exact_mean(guide.get_posterior(x_test[:1]))
    z_train = probe.encode(guide, x_train, num_samples=a.mean_samples, seed=a.seed)  # (N, d)
    z_test = probe.encode(guide, x_test, num_samples=a.mean_samples, seed=a.seed + 1)
    return probe_row(name, d, z_train, z_test, grey.y_train, grey.y_test, a, test_elbo=elbo, test_elbo_sem=elbo_sem,
                     mean="exact" if exact else f"Monte Carlo, {a.mean_samples} draws", train_seconds=train_seconds)


def table(rows: list[dict]) -> str:
    """Markdown, one line per measurement: representation, its size, test ELBO (VAEs), probe accuracy."""
    lines = ["| representation | size | test ELBO | probe accuracy |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        elbo = f"{r['test_elbo']:.2f} ± {r['test_elbo_sem']:.2f}" if "test_elbo" in r else "-"
        lines.append(f"| {r['representation']} | {r['features']} | {elbo} | {100 * r['accuracy']:.2f}% |")
    return "\n".join(lines)


def main(a: argparse.Namespace) -> dict:
    start = time.perf_counter()
    device = runs.setup(a.threads, a.device)
    out = Path(a.out or Path("runs") / f"probe-{_dt.datetime.now():%Y%m%d-%H%M%S}.json")
    grey = runs.load_data("mnist", device=device, train_size=a.train_size, eval_size=a.eval_size,
                          binarization="none", seed=a.seed)
    # what every representation reads: the binary images the VAE's encoder was trained on, fixed once
    x_train = binarize(grey.x_train, "static", seed=a.seed)
    x_test = heldout_binarized(grey.x_test, "dynamic", a.seed)  # the test set every vi_lab run scores
    y_train, y_test = grey.y_train, grey.y_test
    rows = []
    for d in a.latent_dim:
        rows += [train_family(name, d, grey, x_train, x_test, device, a) for name in a.guides]
        rows.append(probe_row("PCA of binary pixels", d, *probe.pca_codes(x_train, x_test, d), y_train, y_test, a))
    rows.append(probe_row("binary pixels", None, x_train, x_test, y_train, y_test, a))
    rows.append(probe_row("grey-level pixels", None, grey.x_train, grey.x_test, y_train, y_test, a))
    md = table(rows)
    print("\ntest ELBO in nats per image (higher is better); probe accuracy on the test images\n" + md)
    record = {
        "rows": rows, "table": md, "units": "test ELBO: nats per datapoint (higher is better); accuracy: fraction",
        "train_size": len(x_train), "eval_size": len(x_test), "epochs": a.epochs, "hidden": a.hidden,
        "latent_dims": a.latent_dim, "eval_samples": a.eval_samples, "mean_samples": a.mean_samples,
        "seed": a.seed, "l2_grid": list(probe.L2_GRID), "device": str(device), "threads": torch.get_num_threads(),
        "machine": a.machine or f"{platform.machine()}, {os.cpu_count()} cores ({platform.platform()})",
        "wall_seconds": time.perf_counter() - start, "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": runs.command_line(), **runs.data_record(grey),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, record)
    print(f"\ndata: {grey.source}; wrote {out} in {record['wall_seconds']:.0f} s")
    runs.print_fallback_banner(grey)
    return record


if __name__ == "__main__":
    with runs.user_errors():
        main(parse_args())
