"""AIS and BDMC, checked: against PPCA's exact log p(x), as a sandwich on simulated data, against IS.

Three tables, library calls only (``vi_lab.ais``), all in nats per datapoint:

1. probabilistic PCA, whose log p(x) is exact: the mean |AIS - exact| from the prior for
   growing numbers of intermediate distributions T;
2. bidirectional Monte Carlo on data simulated from a small trained VAE (the z that made
   each x is an exact posterior draw): forward AIS (lower bound), reverse AIS (upper bound)
   and the width between them, for growing T;
3. the same VAE on MNIST test images: AIS from the guide against importance sampling with
   K = ``--is-samples`` draws from the same guide (AIS should be as high or higher).

Run ``python examples/ais_bdmc.py --threads 1`` (the defaults take under 10 minutes on a
2-core CPU) or ``--help``; ``--out FILE`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import pyro
import torch

import vi_lab
from vi_lab import ais
from vi_lab.data import binarize
from vi_lab.models.ppca import PPCA
from vi_lab.reporting import format_table, mean_sem, write_json


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ppca-steps", type=_ints, default=[1, 10, 100, 1000], help="T for table 1 (default %(default)s)")
    p.add_argument("--ppca-points", type=int, default=50)
    p.add_argument("--train-size", type=int, default=5000, help="MNIST training images for the VAE")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--latent-dim", type=int, default=10)
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--bdmc-steps", type=_ints, default=[10, 100, 500], help="T for table 2 (default %(default)s)")
    p.add_argument("--bdmc-chains", type=int, default=4, help="chains per datapoint in each direction of table 2")
    p.add_argument("--bdmc-points", type=int, default=20)
    p.add_argument("--test-points", type=int, default=100, help="MNIST test images for table 3")
    p.add_argument("--steps", type=int, default=200, help="T of table 3's AIS")
    p.add_argument("--chains", type=int, default=8, help="AIS chains per datapoint of tables 1 and 3")
    p.add_argument("--adapt-chains", type=int, default=2, help="extra chains per datapoint adapting the step size")
    p.add_argument("--leapfrog", type=int, default=5, help="leapfrog steps per HMC transition")
    p.add_argument("--is-samples", type=int, default=5000, help="K of table 3's importance sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON file for all the numbers")
    return p.parse_args(argv)


def stat(values: torch.Tensor) -> dict[str, float]:
    mean, sem = mean_sem(values)
    return {"mean": mean, "sem": sem}


def ppca_table(args, device) -> list[dict]:
    torch.manual_seed(args.seed)
    model = PPCA(torch.randn(20, 5, device=device), mu=torch.randn(20, device=device), sigma=0.5)
    guide = lambda x: None  # noqa: E731 - start="prior" needs no guide sites; the model's latents are moved
    x = model.sample(args.ppca_points)
    exact = model.log_marginal(x)
    rows = []
    for steps in args.ppca_steps:
        t0 = time.perf_counter()
        ll = ais.ais_log_likelihood(model, guide, x, num_chains=args.chains, num_steps=steps,
                                    leapfrog_steps=args.leapfrog, adapt_chains=args.adapt_chains, start="prior")
        rows.append({"num_steps": steps, "abs_error": stat((ll - exact).abs()), "error": stat(ll - exact),
                     "seconds": time.perf_counter() - t0})
    return rows


def train_vae(args, device):
    train = vi_lab.load_dataset("mnist", "train", device=device)
    model = vi_lab.VAE(latent_dim=args.latent_dim, hidden=[args.hidden])
    guide = vi_lab.make_guide("mean_field", latent_dim=args.latent_dim, hidden=[args.hidden])
    t0 = time.perf_counter()
    vi_lab.fit(model, guide, train.images[: args.train_size], epochs=args.epochs, batch_size=100, lr=1e-3,
               binarize="dynamic", device=device, seed=args.seed, progress=False)
    return model.eval(), guide.eval(), time.perf_counter() - t0, train.source


def bdmc_table(args, model, guide, device) -> list[dict]:
    pyro.set_rng_seed(args.seed)
    x, z = ais.simulate(model, torch.zeros(args.bdmc_points, model.x_dim, device=device))
    rows = []
    for steps in args.bdmc_steps:
        t0 = time.perf_counter()
        b = ais.bdmc(model, guide, x, z, num_chains=args.bdmc_chains, num_steps=steps, leapfrog_steps=args.leapfrog,
                     adapt_chains=args.adapt_chains)
        rows.append({"num_steps": steps, "lower": stat(b.lower), "upper": stat(b.upper), "width": stat(b.width),
                     "seconds": time.perf_counter() - t0})
    return rows


def vae_table(args, model, guide, device) -> dict:
    test = vi_lab.load_dataset("mnist", "test", device=device)
    x = binarize(test.images[: args.test_points], "static", seed=args.seed + 1)
    pyro.set_rng_seed(args.seed)
    t0 = time.perf_counter()
    is_ll = vi_lab.log_likelihood(model, guide, x, num_samples=args.is_samples)
    t_is = time.perf_counter() - t0
    elbo = vi_lab.elbo(model, guide, x, num_samples=100)
    t0 = time.perf_counter()
    ais_ll = ais.ais_log_likelihood(model, guide, x, num_chains=args.chains, num_steps=args.steps,
                                    leapfrog_steps=args.leapfrog, adapt_chains=args.adapt_chains)
    t_ais = time.perf_counter() - t0
    return {"points": args.test_points, "elbo": stat(elbo), "is": stat(is_ll), "is_seconds": t_is,
            "ais": stat(ais_ll), "ais_seconds": t_ais, "ais_minus_is": stat(ais_ll - is_ll),
            "ais_at_least_is_share": (ais_ll >= is_ll).double().mean().item()}


def fmt(s: dict) -> str:
    return f"{s['mean']:.2f} ± {s['sem']:.2f}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = vi_lab.pick_device(args.device)
    t_start = time.perf_counter()
    record = {"command": "python examples/ais_bdmc.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": platform.platform(), "device": str(device),
              "threads": torch.get_num_threads(), "units": "nats per datapoint",
              "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    record["ppca"] = ppca_table(args, device)
    print(format_table([("T (PPCA, from the prior)", "|AIS - exact|", "AIS - exact", "seconds"),
                        *[(r["num_steps"], fmt(r["abs_error"]), fmt(r["error"]), f"{r['seconds']:.1f}")
                          for r in record["ppca"]]]), flush=True)
    model, guide, t_train, source = train_vae(args, device)
    record["vae"] = {"train_seconds": t_train, "data_source": source}
    record["bdmc"] = bdmc_table(args, model, guide, device)
    print(format_table([("T (BDMC, simulated)", "lower (AIS)", "upper (reverse AIS)", "width", "seconds"),
                        *[(r["num_steps"], fmt(r["lower"]), fmt(r["upper"]), fmt(r["width"]), f"{r['seconds']:.1f}")
                          for r in record["bdmc"]]]), flush=True)
    v = record["mnist"] = vae_table(args, model, guide, device)
    print(format_table([(f"MNIST test, {v['points']} images", "nats per datapoint", "seconds"),
                        ("ELBO (K=100)", fmt(v["elbo"]), "-"),
                        (f"IS, K={args.is_samples}", fmt(v["is"]), f"{v['is_seconds']:.0f}"),
                        (f"AIS, {args.chains} chains x {args.steps} steps", fmt(v["ais"]), f"{v['ais_seconds']:.0f}"),
                        ("AIS - IS (paired)", fmt(v["ais_minus_is"]), "-")]))
    record["seconds_total"] = time.perf_counter() - t_start
    print(f"\ntotal {record['seconds_total'] / 60:.1f} min on {device} ({torch.get_num_threads()} threads)")
    if args.out:
        print(f"wrote {write_json(args.out, record)}")
    return record


if __name__ == "__main__":
    main()
