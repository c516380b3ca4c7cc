"""IWAE against VAE at equal epochs: test log-likelihood of the same model trained by the ELBO and by the K-sample bound.

Burda, Grosse & Salakhutdinov (2016, Table 1) trained one stochastic layer of 50 latents
(two deterministic layers of 200 tanh units each side) on MNIST for 3,280 epochs and report
test log p(x) (importance sampling, K = 5000): VAE -86.76, IWAE k=5 -85.54, IWAE k=50 -84.78.
This script trains the same shape of model (vi_lab's MLP: 784-200-200-50 and back, its own
activation and Adam at lr 1e-3 instead of Burda's schedule) with each objective in ``--runs``
for the same ``--epochs`` on the same data and seed, and measures on ``--eval-size`` test images
log p̂(x) with K = ``--eval-samples`` importance draws (± its standard error), the ELBO, and the
active units (latent dimensions whose encoder mean varies across the test images: Cov > 0.01,
Burda's criterion). Trained runs are kept under ``--out`` and reused when the script runs again.

Run ``python examples/iwae_vs_vae.py --threads 1`` (the defaults are docs/sections/bounds.md's
budget) or with ``--help``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

import vi_lab
from vi_lab import evaluate, runs

#: Burda et al. (2016), Table 1, MNIST, one stochastic layer, k = training samples, 3,280 epochs
PUBLISHED = {("elbo", 1): -86.76, ("iwae", 5): -85.54, ("iwae", 50): -84.78}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python examples/iwae_vs_vae.py")
    p.add_argument("--runs", nargs="+", default=["elbo:1", "iwae:5", "iwae:50"],
                   help="objective:K[:epochs] (elbo:1, iwae:K, dreg:K; epochs default --epochs), e.g. elbo:1:20 "
                        "for a VAE given more epochs; default %(default)s")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-size", type=int, default=None, help="first N training images (default: all 60,000)")
    p.add_argument("--eval-size", type=int, default=1000, help="first N test images (default %(default)s)")
    p.add_argument("--eval-samples", type=int, default=5000, help="K of the test log-likelihood (default %(default)s)")
    p.add_argument("--latent-dim", type=int, default=50)
    p.add_argument("--hidden", type=int, nargs="+", default=[200, 200])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/iwae_vs_vae", help="run directories and results.json (default %(default)s)")
    args = p.parse_args(argv)
    try:
        args.runs = [run_spec(spec, args.epochs) for spec in args.runs]
    except ValueError as err:
        p.error(str(err))
    return args


def run_spec(spec: str, epochs: int) -> tuple[str, int, int]:
    """``"iwae:50"`` -> ``("iwae", 50, epochs)``; ``"elbo:1:20"`` -> ``("elbo", 1, 20)``."""
    objective, *numbers = spec.split(":")
    if (objective not in ("elbo", *vi_lab.importance.OBJECTIVES) or len(numbers) not in (1, 2)
            or not all(n.isdigit() and int(n) >= 1 for n in numbers)):
        raise ValueError(f"--runs takes objective:K[:epochs] with objective elbo, iwae or dreg and K, epochs >= 1, "
                         f"got {spec!r}")
    return objective, int(numbers[0]), int(numbers[1]) if len(numbers) == 2 else epochs


def active_units(guide, x: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies across datapoints (Burda et al., 2016, section 5.2)."""
    with torch.no_grad():
        means = guide.get_posterior(x).mean  # (N, D)
    return int((means.var(0) > threshold).sum())


def train_and_measure(args: argparse.Namespace, objective: str, k: int, epochs: int, data, device) -> dict:
    run_dir = Path(args.out) / (f"{objective}_k{k}" if epochs == args.epochs else f"{objective}_k{k}_e{epochs}")
    done = run_dir / "result.json"
    if done.is_file() and "log_likelihood_per_point" in (record := json.loads(done.read_text())):
        return record
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)  # the same initial weights for every objective
    model = vi_lab.VAE(latent_dim=args.latent_dim, hidden=args.hidden[::-1])
    guide = vi_lab.make_guide("mean_field", latent_dim=args.latent_dim, hidden=args.hidden)
    result = vi_lab.fit(model, guide, data.x_train, objective=objective, num_particles=k, epochs=epochs,
                        batch_size=args.batch_size, lr=args.lr, binarize=data.fit_binarize, device=device,
                        seed=args.seed, checkpoint_dir=run_dir, resume=(run_dir / "last.pt").is_file(),
                        progress="epochs")
    train_seconds = sum(h["seconds"] for h in result.history)  # every epoch's, a resumed run's too
    t0 = time.perf_counter()
    ll = evaluate.log_likelihood(model, guide, data.x_test, num_samples=args.eval_samples)
    elbo = evaluate.elbo(model, guide, data.x_test, num_samples=100)
    mean, sem = runs.mean_sem(ll)
    record = {"objective": objective, "k": k, "epochs": epochs, "train_size": len(data.x_train),
              "train_bound": result.history[-1].get("train_bound", result.train_elbo),
              "test_elbo": elbo.mean().item(), "test_log_likelihood": mean, "test_log_likelihood_sem": sem,
              "active_units": active_units(guide, data.x_test), "train_seconds": train_seconds,
              "eval_seconds": time.perf_counter() - t0,
              "published": PUBLISHED.get((objective, k)) if objective != "dreg" else None,
              "log_likelihood_per_point": ll.tolist()}
    done.write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = runs.setup(args.threads, args.device)
    data = runs.load_data("mnist", data_dir=args.data_dir, device=device, train_size=args.train_size,
                          eval_size=args.eval_size, binarization="dynamic", seed=args.seed)
    records = []
    for objective, k, epochs in args.runs:
        records.append(train_and_measure(args, objective, k, epochs, data, device))
    rows = [("objective", "K", "epochs", "train bound", "test ELBO", f"test log p(x), K={args.eval_samples}",
             f"minus {records[0]['objective']} K={records[0]['k']} (paired)", "active units", "train min",
             "Burda et al. (3,280 epochs)")]
    first = torch.tensor(records[0]["log_likelihood_per_point"])
    for r in records:
        # the same test images under every model: the per-image difference has a far smaller error than either mean
        r["paired_difference"], r["paired_difference_sem"] = runs.mean_sem(
            torch.tensor(r["log_likelihood_per_point"]) - first)
        published = f"{r['published']:.2f}" if r["published"] is not None else "-"
        rows.append((r["objective"], str(r["k"]), str(r["epochs"]), f"{r['train_bound']:.2f}",
                     f"{r['test_elbo']:.2f}", f"{r['test_log_likelihood']:.2f} +/- {r['test_log_likelihood_sem']:.2f}",
                     f"{r['paired_difference']:+.2f} +/- {r['paired_difference_sem']:.2f}", str(r["active_units"]),
                     f"{r['train_seconds'] / 60:.1f}", published))
    print(f"\nMNIST, {len(data.x_train)} training images (dynamic binarization), {len(data.x_test)} test images; "
          f"nats per datapoint (higher is better)")
    print(runs.format_table(rows))
    out = Path(args.out) / "results.json"
    out.write_text(json.dumps({"runs": records, "units": "nats per datapoint (higher is better)",
                               "date": time.strftime("%Y-%m-%d"), "command": runs.command_line(),
                               "device": str(device), "threads": torch.get_num_threads()}, indent=1))
    print(f"wrote {out}")
    return records


if __name__ == "__main__":
    with runs.user_errors():
        main()
