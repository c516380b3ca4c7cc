"""How much does vi_lab's training step cost over a hand-written PyTorch VAE step?

In one process, alternately times blocks of

* ``vi_lab``: the step :func:`vi_lab.fit` runs (``vi_lab.infer.training_step``: VAE +
  mean-field guide, the default loss and estimator, vi_lab's Adam),
* ``pytorch``: the textbook PyTorch VAE step (as in pytorch/examples) with the same
  architecture and the same estimator (784-400-20 MLP, Bernoulli likelihood,
  single-sample Monte Carlo KL, ``torch.optim.Adam`` with its defaults),
* ``pytorch_fused``: the same hand-written step with ``torch.optim.Adam(fused=True)``,
  the fastest hand-written step torch offers without compilation,
* ``svi``: what fit ran before issue 13: ``pyro.infer.SVI`` with ``Trace_ELBO`` and
  ``pyro.optim.Adam`` (one torch optimizer per parameter tensor),

all on the same MNIST batches of 128, each step ending with the loss read as a Python
number (as fit and the textbook loop do), and prints each one's median time and its median
ratio to the textbook step. Then times one epoch of vi_lab's device-resident batching
(index slices of a device permutation, dynamic binarization) against a torchvision
``MNIST`` dataset with per-item ``ToTensor`` behind a ``DataLoader``.

Usage::

    python benchmarks/step_time.py --threads 1 --rounds 30 --out benchmarks/results/step_time_cpu.json
    python benchmarks/step_time.py --threads 1 --rounds 20 --ablation    # each change of fit's step undone in turn
    python benchmarks/step_time.py --device cuda --rounds 30    # on a GPU: every step there, and the captured ones
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
from vi_lab.guides.mean_field import MeanFieldGuide
from vi_lab.infer import training_objective, training_step
from vi_lab.nets import make_encoder


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
        p = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
        log_lik = -nn.functional.binary_cross_entropy_with_logits(self.dec(z), x, reduction="none").sum(-1)
        return -(log_lik + p.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)).mean()


def plain_step(fused: bool, device: torch.device):
    plain = PlainVAE().to(device)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3, **({"fused": True} if fused else {}))

    def step(xb):
        opt.zero_grad()
        loss = plain.loss(xb)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def make_steps(device: torch.device, ablation: bool = False) -> dict:
    """The steps compared, each a function of a batch returning the loss as a float.

    With ``ablation``, three more: fit's step with one of its changes undone each
    (``pyro.optim.Adam``; Pyro's ``Trace_ELBO``; validation on every step).
    """
    pyro.clear_param_store()
    model = vi_lab.VAE(20, [400]).to(device)
    guide = vi_lab.make_guide("mean_field", latent_dim=20, hidden=[400]).to(device)
    vi = training_step(model, guide, lr=1e-3, x_dim=784)
    # the path before issue 13, on its own copy of the networks (param-store names "old_*")
    old_model = vi_lab.VAE(20, [400], name="old_model").to(device)
    old_guide = MeanFieldGuide(make_encoder("mlp", 784, [400]), 20, name="old_guide").to(device)
    svi = SVI(training_objective(old_model), training_objective(old_guide), pyro.optim.Adam({"lr": 1e-3}),
              Trace_ELBO())
    steps = {"vi_lab": lambda xb: float(vi(xb)), "pytorch": plain_step(False, device),
             "pytorch_fused": plain_step(True, device), "svi": svi.step}
    if ablation:
        def variant(prefix, **kwargs):
            m = vi_lab.VAE(20, [400], name=f"{prefix}_model").to(device)
            g = MeanFieldGuide(make_encoder("mlp", 784, [400]), 20, name=f"{prefix}_guide").to(device)
            return training_step(m, g, lr=1e-3, x_dim=784, **kwargs)

        per_tensor = variant("a1", optimizer=pyro.optim.Adam({"lr": 1e-3}))
        pyro_elbo = variant("a2", loss=Trace_ELBO())
        validated = variant("a3")

        def always_validated(xb):
            validated.validate_next = True
            return float(validated(xb))

        steps.update({"with_pyro_optim": lambda xb: float(per_tensor(xb)),
                      "with_pyro_trace_elbo": lambda xb: float(pyro_elbo(xb)),
                      "validating_every_step": always_validated})
    if device.type == "cuda":
        steps["vi_lab_captured"] = vi_lab_captured(device)
        steps["pytorch_captured"] = plain_captured(device)
    return steps


def vi_lab_captured(device: torch.device):
    """fit(capture=True)'s step: a CaptureRun over the training step; losses kept on the device, unread."""
    from vi_lab.capture import CaptureRun

    model = vi_lab.VAE(20, [400], name="cap_model").to(device)
    guide = MeanFieldGuide(make_encoder("mlp", 784, [400]), 20, name="cap_guide").to(device)
    run = CaptureRun(training_step(model, guide, lr=1e-3, x_dim=784), device)
    losses = []

    def step(xb):
        losses.append(run(xb).clone())
        del losses[:-100]

    step.run = run
    return step


def plain_captured(device: torch.device):
    """The floor: the hand-written step captured whole (forward, backward, capturable fused Adam)."""
    plain = PlainVAE().to(device)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3, fused=True, capturable=True)
    static, graph, out, losses = None, None, None, []

    def eager(xb):
        opt.zero_grad(set_to_none=True)
        loss = plain.loss(xb)
        loss.backward()
        opt.step()
        return loss.detach()

    def step(xb):
        nonlocal static, graph, out
        if graph is None:
            static = xb.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    eager(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = eager(static)
        static.copy_(xb)
        graph.replay()
        losses.append(out.clone())
        del losses[:-100]

    return step


def time_steps(x: torch.Tensor, batch: int, rounds: int, block: int, ablation: bool = False) -> dict:
    """Alternating blocks of every step on ``x``'s device (synchronized there before each clock read)."""
    device = x.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps = make_steps(device, ablation)
    batches = [x[i:i + batch] for i in range(0, block * batch, batch)]
    for step in steps.values():  # warm-up: the validated first step, optimizer state, allocator
        for xb in batches:
            step(xb)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            for xb in batches:
                step(xb)
            sync()
            times[name].append((time.perf_counter() - t0) / block)
    out = {"rounds": rounds, "steps_per_block": block, "batch_size": batch}
    if "vi_lab_captured" in steps:
        run = steps["vi_lab_captured"].run
        out["vi_lab_captured_replays"] = run.captured.replays if run.captured is not None else 0
        out["vi_lab_capture_problem"] = run.problem
    for name, ts in times.items():
        out[name] = {"step_ms": 1e3 * statistics.median(ts),
                     "ratio_to_pytorch": statistics.median(a / b for a, b in zip(ts, times["pytorch"])),
                     "ratio_to_pytorch_fused": statistics.median(a / b for a, b in zip(ts, times["pytorch_fused"]))}
    return out


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
    p.add_argument("--ablation", action="store_true",
                   help="also time fit's step with each of its changes undone in turn")
    p.add_argument("--device", default="cpu", help="where both steps run: cpu, cuda, ... (default %(default)s)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    train = load_dataset("mnist", "train", data_dir=args.data_dir)
    device = torch.device(args.device)
    x = binarize(train.images[: args.block * args.batch_size], "static").to(device)
    steps = time_steps(x, args.batch_size, args.rounds, args.block, args.ablation)
    source_dir = Path(train.source.split(" (")[0])
    batching = time_batching(train.images.to(device), source_dir, args.batch_size)
    result = {"steps": steps, "batching": batching, "threads": args.threads, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "torch": torch.__version__,
              "pyro": pyro.__version__, "cpu": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/step_time.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)}
    print(json.dumps(result, indent=2))
    print(f"\n{'step':<22}{'ms/step':>9}{'/ pytorch':>11}{'/ pytorch_fused':>17}")
    for name in [k for k, v in steps.items() if isinstance(v, dict)]:
        r = steps[name]
        print(f"{name:<22}{r['step_ms']:>9.2f}{r['ratio_to_pytorch']:>11.3f}{r['ratio_to_pytorch_fused']:>17.3f}")
    print(f"one epoch of batches: DeviceBatches {batching['device_batches_epoch_s']:.3f} s, "
          f"torchvision DataLoader+ToTensor {batching['dataloader_epoch_s']:.2f} s ({batching['speedup']:.0f}x)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
