"""What does a K-sample bound cost per training step, in vi_lab and written by hand?

In one process, alternately times blocks of training steps on the same MNIST batches
(dynamic binarization, batch 100) of the 784-200-200-50 ReLU VAE of ``examples/iwae_vs_vae.py``:

* ``vi_lab <objective> K``: the step :func:`vi_lab.fit` runs (``vi_lab.infer.training_step`` with
  ``objective="elbo"``, ``"iwae"`` or ``"dreg"``), vi_lab's Adam;
* ``pytorch iwae K``: a hand-written PyTorch IWAE step with the same networks and estimator
  (encoder -> loc and softplus scale, K reparameterized draws, Bernoulli decoder, log-sum-exp
  of the log weights per datapoint), ``torch.optim.Adam``;

each step ending with the loss read as a Python number. It prints each one's median ms per
step, its ratio to the hand-written step of the same K, and its ratio to vi_lab's ELBO step:
what one epoch of the K-sample bound costs against one epoch of the ELBO (the budget behind
"equal epochs" in docs/sections/bounds.md).

Usage::

    python benchmarks/iwae_step.py --threads 1 --rounds 10 --out benchmarks/results/iwae_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import pyro
import torch
from torch import nn

import vi_lab
from vi_lab.data import binarize, load_dataset
from vi_lab.infer import training_step

HIDDEN, LATENT = [200, 200], 50


class HandIWAE(nn.Module):
    """The K-sample importance-weighted bound written directly in PyTorch."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.enc = nn.Sequential(nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU())
        self.loc, self.raw_scale = nn.Linear(200, LATENT), nn.Linear(200, LATENT)
        self.dec = nn.Sequential(nn.Linear(LATENT, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                                 nn.Linear(200, 784))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        q = torch.distributions.Normal(self.loc(h), nn.functional.softplus(self.raw_scale(h)) + 1e-4)
        z = q.rsample((self.k,))  # (K, B, D)
        log_lik = -nn.functional.binary_cross_entropy_with_logits(self.dec(z), x.expand(self.k, *x.shape),
                                                                  reduction="none").sum(-1)
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_w = log_lik + log_prior - q.log_prob(z).sum(-1)  # (K, B)
        return -(torch.logsumexp(log_w, 0) - torch.log(torch.tensor(float(self.k)))).mean()


def hand_step(k: int):
    net = HandIWAE(k)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step(xb):
        opt.zero_grad()
        loss = net.loss(xb)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def vi_lab_step(objective: str, k: int, index: int):
    model = vi_lab.VAE(LATENT, HIDDEN[::-1], name=f"model_{index}")
    guide = vi_lab.make_guide("mean_field", latent_dim=LATENT, hidden=HIDDEN, name=f"guide_{index}")
    step = training_step(model, guide, lr=1e-3, x_dim=784, objective=objective, num_particles=k)
    return lambda xb: float(step(xb))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", type=int, nargs="+", default=[5, 50])
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds (median over them)")
    p.add_argument("--steps", type=int, default=5, help="steps per block")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pyro.clear_param_store()
    images = load_dataset("mnist", "train").images[:2000].reshape(-1, 784)
    batches = [binarize(images[i:i + 100], "dynamic", seed=i) for i in range(0, 2000, 100)]
    steps = {"vi_lab elbo 1": vi_lab_step("elbo", 1, 0)}
    for i, k in enumerate(args.ks, start=1):
        steps[f"pytorch iwae {k}"] = hand_step(k)
        steps[f"vi_lab iwae {k}"] = vi_lab_step("iwae", k, 2 * i)
        steps[f"vi_lab dreg {k}"] = vi_lab_step("dreg", k, 2 * i + 1)
    for fn in steps.values():  # first steps: Pyro's validation, parameter discovery
        for xb in batches[:3]:
            fn(xb)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for s in range(args.steps):
                fn(batches[(r * args.steps + s) % len(batches)])
            times[name].append((time.perf_counter() - t0) / args.steps * 1000)
    ms = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, value in ms.items():
        library, objective, k = name.split()
        hand = ms.get(f"pytorch iwae {k}") if library == "vi_lab" and objective != "elbo" else None
        rows.append({"step": name, "ms_per_step": value, "vs_hand_written": value / hand if hand else None,
                     "vs_vi_lab_elbo": value / ms["vi_lab elbo 1"]})
    print(f"{'step':<16} {'ms/step':>9} {'/ hand-written':>15} {'/ vi_lab ELBO':>14}")
    for r in rows:
        hand = f"{r['vs_hand_written']:.2f}" if r["vs_hand_written"] else "-"
        print(f"{r['step']:<16} {r['ms_per_step']:>9.1f} {hand:>15} {r['vs_vi_lab_elbo']:>14.2f}")
    record = {"rows": rows, "rounds": args.rounds, "steps_per_block": args.steps, "batch_size": 100,
              "threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python benchmarks/iwae_step.py " + " ".join(
                  argv if argv is not None else __import__("sys").argv[1:])}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
