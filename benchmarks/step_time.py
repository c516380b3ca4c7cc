"""How much does vi_lab's Pyro machinery cost over a hand-written PyTorch VAE step?

In one process, alternately times blocks of

* a vi_lab SVI step (VAE + mean-field guide, Trace_ELBO, pyro.optim.Adam), and
* a plain-PyTorch VAE step with the same architecture and the same estimator
  (784-400-20 MLP, Bernoulli likelihood, single-sample Monte Carlo KL, torch.optim.Adam),

both on the same MNIST batches of 128, and prints the median ratio vi_lab / PyTorch.
Then times one epoch of vi_lab's device-resident batching (index slices of a
device permutation, dynamic binarization) against a torchvision ``MNIST`` dataset
with per-item ``ToTensor`` behind a ``DataLoader``.

Usage::

    python benchmarks/step_time.py --threads 2 --rounds 30 --out benchmarks/results/step_time.json
    python benchmarks/step_time.py --device cuda --rounds 30    # on a GPU: both steps there
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

import vi_lab
from vi_lab.data import DeviceBatches, binarize, load_dataset
from vi_lab.infer import training_objective


class PlainVAE(nn.Module):
    """The textbook PyTorch VAE (as in pytorch/examples), with the same estimator as Trace_ELBO."""

    def __init__(self, hidden: int = 400, latent: int = 20) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(784, hidden), nn.ReLU())
        self.loc, self.raw_scale = nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, 784))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        q = torch.distributions.Normal(self.loc(h), nn.functional.softplus(self.raw_scale(h)) + 1e-4)
        z = q.rsample()
        p = torch.distributions.Normal(torch.zeros_like(z), 1.0)
        log_lik = -nn.functional.binary_cross_entropy_with_logits(self.dec(z), x, reduction="none").sum(-1)
        return -(log_lik + p.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)).mean()


def time_steps(x: torch.Tensor, batch: int, rounds: int, block: int) -> dict:
    """Alternating blocks of both steps on ``x``'s device (synchronized there before each clock read)."""
    pyro.clear_param_store()
    device = x.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = vi_lab.VAE(20, [400]).to(device)
    guide = vi_lab.make_guide("mean_field", latent_dim=20, hidden=[400]).to(device)
    svi = SVI(training_objective(model), training_objective(guide), pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    plain = PlainVAE().to(device)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)

    def plain_step(xb):
        opt.zero_grad()
        loss = plain.loss(xb)
        loss.backward()
        opt.step()
        return loss.item()

    batches = [x[i:i + batch] for i in range(0, block * batch, batch)]
    for xb in batches:  # warm-up: lazy optimizer creation, allocator
        svi.step(xb)
        plain_step(xb)
    vi, pt = [], []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for xb in batches:
            svi.step(xb)
        sync()
        t1 = time.perf_counter()
        for xb in batches:
            plain_step(xb)
        sync()
        t2 = time.perf_counter()
        vi.append((t1 - t0) / block)
        pt.append((t2 - t1) / block)
    ratios = [a / b for a, b in zip(vi, pt)]
    return {"vi_lab_step_ms": 1e3 * statistics.median(vi), "pytorch_step_ms": 1e3 * statistics.median(pt),
            "median_ratio": statistics.median(ratios), "rounds": rounds, "steps_per_block": block}


def time_batching(images: torch.Tensor, source_dir: Path, batch: int) -> dict:
    from torchvision import datasets, transforms

    batches = DeviceBatches(images, batch, transform=lambda b: binarize(b, "dynamic"))
    sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    n = sum(xb.shape[0] for xb in batches)
    sync()
    device_s = time.perf_counter() - t0

    # torchvision's MNIST reads the raw (un-gzipped) IDX files from <root>/MNIST/raw
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
            with gzip.open(source_dir / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        ds = datasets.MNIST(tmp, train=True, download=False, transform=transforms.ToTensor())
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True)
        t0 = time.perf_counter()
        m = 0
        for xb, _ in loader:
            xb = torch.bernoulli(xb.view(xb.shape[0], -1))
            m += xb.shape[0]
        loader_s = time.perf_counter() - t0
    assert n == m == images.shape[0]
    return {"device_batches_epoch_s": device_s, "dataloader_epoch_s": loader_s,
            "speedup": loader_s / device_s, "examples": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30, help="alternating timing rounds")
    p.add_argument("--block", type=int, default=20, help="steps per timed block")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu", help="where both steps run: cpu, cuda, ... (default %(default)s)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    train = load_dataset("mnist", "train", data_dir=args.data_dir)
    device = torch.device(args.device)
    x = binarize(train.images[: args.block * args.batch_size], "static").to(device)
    steps = time_steps(x, args.batch_size, args.rounds, args.block)
    source_dir = Path(train.source.split(" (")[0])
    batching = time_batching(train.images.to(device), source_dir, args.batch_size)
    result = {"steps": steps, "batching": batching, "threads": args.threads, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "torch": torch.__version__,
              "pyro": pyro.__version__, "cpu": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/step_time.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)}
    print(json.dumps(result, indent=2))
    print(f"\nSVI step: vi_lab {steps['vi_lab_step_ms']:.2f} ms, plain PyTorch {steps['pytorch_step_ms']:.2f} ms, "
          f"median ratio vi_lab/PyTorch = {steps['median_ratio']:.2f}")
    print(f"one epoch of batches: DeviceBatches {batching['device_batches_epoch_s']:.3f} s, "
          f"torchvision DataLoader+ToTensor {batching['dataloader_epoch_s']:.2f} s ({batching['speedup']:.0f}x)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
