"""How much does vi_lab's importance-sampled log p(x) cost over a hand-written PyTorch one?

In one process, on the same weights (a 784-400-20 VAE and its mean-field encoder, untrained:
the cost does not depend on the values) and the same binarized MNIST test images, alternately
times

* ``vi_lab``: ``vi_lab.log_likelihood(model, guide, x, num_samples=K)``, chunked as its memory
  budget decides (:func:`vi_lab.evaluate.chunk_plan`; ``VI_LAB_EVAL_MEMORY`` or ``--memory``
  overrides it),
* ``floor``: plain torch, no Pyro: the encoder once per image, K reparameterized draws, the
  decoder, the Bernoulli log-likelihood, the prior and the encoder's log-densities, a
  logsumexp over K; a fixed number of images per chunk (``--floor-images``, 64),

and prints both times (the median of ``--rounds``), their ratio and the chunk sizes vi_lab
chose. A GPU is synchronized before each clock read. Before timing, it checks that the two
compute the same numbers: on 256 images with K = 1000 (at most) and the same random draws,
their log p̂(x) agree to float tolerance.

Usage::

    python benchmarks/eval_time.py --num-images 200 --num-samples 5000 --threads 2    # a small CPU run
    python benchmarks/eval_time.py --device cuda --num-images 10000 --num-samples 5000 \\
        --out benchmarks/results/eval_time_cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from torch import nn

import vi_lab
from vi_lab import evaluate
from vi_lab.contract import check_pair
from vi_lab.data import binarize, load_dataset
from vi_lab.guides.local_base import MIN_SCALE


def floor_log_weights(model: vi_lab.VAE, guide: nn.Module, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Log weights ``(K, B)`` of the draws ``z = mu(x) + sigma(x) * eps``, eps ``(K, B, D)``, in plain torch."""
    h = guide.encoder(x)  # (B, H): once per image, whatever K
    loc, scale = guide.loc(h), nn.functional.softplus(guide.raw_scale(h)) + MIN_SCALE  # (B, D)
    z = loc + scale * eps  # (K, B, D)
    logits = model.decoder(z)  # (K, B, 784)
    log_lik = -nn.functional.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    log_prior = -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * math.log(2 * math.pi))
    log_q = -0.5 * (eps.pow(2).sum(-1) + z.shape[-1] * math.log(2 * math.pi)) - scale.log().sum(-1)
    return log_lik + log_prior - log_q  # (K, B)


@torch.no_grad()
def floor_log_likelihood(model, guide, x: torch.Tensor, num_samples: int, images: int) -> torch.Tensor:
    """log p̂(x) per image ``(N,)``, ``images`` images (all their K draws) a chunk."""
    out = []
    for start in range(0, x.shape[0], images):
        xb = x[start:start + images]
        eps = torch.randn(num_samples, xb.shape[0], guide.latent_dim, device=x.device)
        out.append(floor_log_weights(model, guide, xb, eps).logsumexp(0) - math.log(num_samples))
    return torch.cat(out)


def check_agreement(model, guide, x: torch.Tensor, num_samples: int, memory_budget: str | None) -> dict:
    """vi_lab's log p̂(x) equals the floor's on the same draws, to float tolerance.

    The floor is run on vi_lab's chunks after the draws vi_lab's contract check makes, so both
    take the same numbers off the random stream in the same order (the guide's Normal draws
    its eps ``(K, B, D)`` as ``torch.randn`` does).
    """
    plan = evaluate.chunk_plan(model, guide, x, num_samples=num_samples, memory_budget=memory_budget)
    if plan.samples < num_samples:
        return {"compared": False, "why": "vi_lab cuts K, the floor does not: their draws differ"}
    pyro.set_rng_seed(2)
    ours = vi_lab.log_likelihood(model, guide, x, num_samples=num_samples, memory_budget=memory_budget)
    pyro.set_rng_seed(2)
    with torch.no_grad():
        check_pair(model, guide, x[:evaluate.CHECK_POINTS])  # the draws vi_lab makes before its chunks
    theirs = floor_log_likelihood(model, guide, x, num_samples, plan.points)
    diff = (ours - theirs).abs()
    return {"compared": True, "images": x.shape[0], "num_samples": num_samples,
            "max_abs_diff_nats": diff.max().item(), "max_rel_diff": (diff / theirs.abs()).max().item()}


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="where both run: cpu, cuda, ... (default %(default)s)")
    p.add_argument("--num-samples", type=int, default=5000, help="K draws per image (default %(default)s)")
    p.add_argument("--num-images", type=int, default=10000, help="MNIST test images (default %(default)s)")
    p.add_argument("--floor-images", type=int, default=64, help="images per chunk of the floor (default %(default)s)")
    p.add_argument("--memory", default=None, help="vi_lab's memory_budget, e.g. 2GiB (default: its own)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pyro.set_rng_seed(0)
    test = load_dataset("mnist", "test", data_dir=args.data_dir)
    x = binarize(test.images[: args.num_images], "static").to(device)
    model = vi_lab.VAE(latent_dim=20, hidden=[400]).to(device)
    guide = vi_lab.make_guide("mean_field", latent_dim=20, hidden=[400]).to(device)
    K = args.num_samples

    plan = evaluate.chunk_plan(model, guide, x, num_samples=K, memory_budget=args.memory)
    agreement = check_agreement(model, guide, x[:256], min(K, 1000), args.memory)
    runs = {
        "vi_lab": lambda: vi_lab.log_likelihood(model, guide, x, num_samples=K, memory_budget=args.memory),
        "floor": lambda: floor_log_likelihood(model, guide, x, K, args.floor_images),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    means: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            holder = {}
            times[name].append(timed(lambda: holder.setdefault("ll", fn()), device))
            means[name] = holder["ll"].mean().item()
    seconds = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "seconds": seconds, "all_seconds": times, "ratio_vi_lab_to_floor": seconds["vi_lab"] / seconds["floor"],
        "log_likelihood_nats_per_image": means, "agreement": agreement,
        "vi_lab_chunks": {"images": plan.points, "samples": plan.samples, "pair_bytes": plan.pair_bytes,
                          "image_bytes": plan.point_bytes, "budget_bytes": plan.budget},
        "floor_chunks": {"images": args.floor_images, "samples": K},
        "num_images": x.shape[0], "num_samples": K, "threads": torch.get_num_threads(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (
            platform.processor() or platform.machine()),
        "torch": torch.__version__, "pyro": pyro.__version__, "data": test.source,
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(result, indent=2))
    print(f"\nlog p(x), K = {K}, {x.shape[0]} images on {result['device_name']} ({device}):")
    print(f"  vi_lab {seconds['vi_lab']:.2f} s ({plan.points} images x {plan.samples} draws a chunk, "
          f"budget {plan.budget / 2**20:.0f} MiB, {plan.pair_bytes} B a draw)")
    print(f"  floor  {seconds['floor']:.2f} s ({args.floor_images} images x {K} draws a chunk)")
    print(f"  ratio  {result['ratio_vi_lab_to_floor']:.2f}")
    if agreement["compared"]:
        print(f"  same draws ({agreement['images']} images, K = {agreement['num_samples']}): log p(x) differs by at "
              f"most {agreement['max_abs_diff_nats']:.1e} nats ({agreement['max_rel_diff']:.1e} relative)")
    else:
        print(f"  not compared on the same draws: {agreement['why']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
