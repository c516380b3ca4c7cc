"""Quality and epoch time at equal budget: vi_lab.fit against a hand-written PyTorch VAE loop.

Trains the flagship pair (784-400-20 MLP VAE, mean-field guide, Bernoulli likelihood,
dynamic binarization, Adam lr 1e-3, batch 128) with ``vi_lab.fit`` and the textbook
PyTorch VAE of ``benchmarks/step_time.py`` with a hand-written loop over the same
device-resident batches, for the same number of epochs and the same seed policy (the
seed fixes the initial weights and the training draws of each), alternating epochs
between the two so that both see the same machine load. Then scores both on the test set
with the *same* hand-written importance-sampling estimator (K samples from each one's
encoder, the test set binarized once with seed 1) and prints the test log-likelihoods,
their difference and the seconds per epoch.

Usage::

    python benchmarks/quality.py --epochs 10 --num-samples 500 --threads 1 --out benchmarks/results/quality.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pyro
import torch
from torch import nn

import vi_lab
from vi_lab.data import DeviceBatches, binarize, load_dataset

from step_time import PlainVAE  # noqa: E402 (benchmarks/ is the working directory's sibling)


def is_log_likelihood(encode, decode, x: torch.Tensor, k: int, chunk: int = 50) -> torch.Tensor:
    """log p(x) by importance sampling from q(z|x): encode(x) -> (loc, scale), decode(z) -> logits."""
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            xb = x[i:i + chunk]
            loc, scale = encode(xb)
            q = torch.distributions.Normal(loc, scale)
            z = q.sample((k,))  # (K, B, D)
            log_lik = -nn.functional.binary_cross_entropy_with_logits(
                decode(z), xb.expand(k, *xb.shape), reduction="none").sum(-1)
            log_w = log_lik + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
            out.append(torch.logsumexp(log_w, 0) - torch.log(torch.tensor(float(k))))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=500, help="importance samples per test image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train = load_dataset("mnist", "train", data_dir=args.data_dir).images
    test = binarize(load_dataset("mnist", "test", data_dir=args.data_dir).images, "static", seed=args.seed + 1)

    pyro.set_rng_seed(args.seed)
    model, guide = vi_lab.VAE(20, [400]), vi_lab.make_guide("mean_field", latent_dim=20, hidden=[400])
    pyro.set_rng_seed(args.seed)
    plain = PlainVAE()
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    times: dict[str, list[float]] = {"vi_lab": [], "pytorch": []}
    plain_rng = None
    run_dir = tempfile.mkdtemp()
    for epoch in range(1, args.epochs + 1):
        # vi_lab: one epoch at a time, resumed from its checkpoint (which restores its RNG state too),
        # exactly as an uninterrupted run; the epoch's seconds are fit's own, from its history
        fit = vi_lab.fit(model, guide, train, epochs=epoch, batch_size=128, lr=1e-3, seed=args.seed,
                         binarize="dynamic", progress=False, checkpoint_dir=run_dir, resume=epoch > 1)
        times["vi_lab"].append(fit.history[-1]["seconds"])
        # the hand-written loop: a fresh permutation and binarization per epoch, as fit draws them
        if plain_rng is not None:
            torch.set_rng_state(plain_rng)
        else:
            torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        for xb in DeviceBatches(train, 128, shuffle=True, transform=lambda b: binarize(b, "dynamic")):
            opt.zero_grad()
            loss = plain.loss(xb)
            loss.backward()
            opt.step()
            loss.item()
        times["pytorch"].append(time.perf_counter() - t0)
        plain_rng = torch.get_rng_state()
        print(f"epoch {epoch}: vi_lab train ELBO {fit.train_elbo:.2f} ({times['vi_lab'][-1]:.1f} s), "
              f"pytorch last batch -{loss.item():.2f} ({times['pytorch'][-1]:.1f} s)", flush=True)
    shutil.rmtree(run_dir)

    torch.manual_seed(123)
    model.eval(), guide.eval(), plain.eval()

    def vi_encode(xb):
        q = guide.get_posterior(xb).base_dist
        return q.loc, q.scale

    def plain_encode(xb):
        h = plain.enc(xb)
        return plain.loc(h), nn.functional.softplus(plain.raw_scale(h)) + 1e-4

    ll = {"vi_lab": is_log_likelihood(vi_encode, model.decoder, test, args.num_samples),
          "pytorch": is_log_likelihood(plain_encode, plain.dec, test, args.num_samples)}
    result = {name: {"test_log_likelihood": v.mean().item(), "sem": (v.std() / len(v) ** 0.5).item(),
                     "seconds_per_epoch": sum(times[name]) / len(times[name])} for name, v in ll.items()}
    result["difference_vi_lab_minus_pytorch"] = result["vi_lab"]["test_log_likelihood"] - \
        result["pytorch"]["test_log_likelihood"]
    result.update(epochs=args.epochs, num_samples=args.num_samples, test_images=len(test), threads=args.threads,
                  torch=torch.__version__, pyro=pyro.__version__, cpu=platform.processor() or platform.machine(),
                  date=time.strftime("%Y-%m-%d"),
                  command="python benchmarks/quality.py " + " ".join(
                      f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
