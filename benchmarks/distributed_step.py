"""Where a data-parallel training step spends its time: gradient, all-reduce, Adam.

Launches itself with torchrun on 1 and on N processes (one thread each) and, in each
process, times ``fit``'s step (``vi_lab.infer.training_step``, 784-400-20 VAE, Bernoulli,
mean-field guide) on its share of a global batch of ``--batch-size`` MNIST images: the
gradient, the gradient all-reduce (``vi_lab.distributed.GradientAverager``) and the Adam
update, means over ``--steps`` steps after 10 untimed ones. It also times the all-reduce of
a tensor of the same size alone (after a barrier), which separates moving the numbers from
waiting for the slower process. Example (this repository's figures)::

    python benchmarks/distributed_step.py --nproc 2 --steps 100
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(a: argparse.Namespace) -> None:
    import pyro
    import torch
    import torch.distributed as dist

    import vi_lab
    from vi_lab import distributed
    from vi_lab.data import load_dataset

    w = distributed.setup("cpu")
    torch.set_num_threads(1)
    x = load_dataset("mnist", "train").images[: a.batch_size]
    pyro.set_rng_seed(0)
    model = vi_lab.VAE(20, [400])
    guide = vi_lab.make_guide("mean_field", latent_dim=20, hidden=[400])
    step = vi_lab.infer.training_step(model, guide, lr=1e-3, x_dim=784)
    averager = distributed.GradientAverager() if w.parallel else None
    lo, hi = distributed.shard_bounds(a.batch_size)
    xb = torch.bernoulli(x[lo:hi])
    if averager is not None:
        averager.weight = (hi - lo) / a.batch_size
    spent = [0.0, 0.0, 0.0]
    for i in range(10 + a.steps):
        if i == 10:
            spent = [0.0, 0.0, 0.0]
        t0 = time.perf_counter()
        value = step.gradients(xb)
        t1 = time.perf_counter()
        if averager is not None:
            value = averager(list(zip(step.names, step.params)), value)
        t2 = time.perf_counter()
        step.update()
        t3 = time.perf_counter()
        float(value)
        spent = [spent[0] + t1 - t0, spent[1] + t2 - t1, spent[2] + t3 - t2]
    grad, reduce, update = (1e3 * s / a.steps for s in spent)
    alone = float("nan")
    numel = sum(p.numel() for p in step.params)
    if w.parallel:
        flat = torch.randn(numel)
        for _ in range(5):
            dist.all_reduce(flat)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            dist.all_reduce(flat)
        alone = 1e3 * (time.perf_counter() - t0) / a.steps
    print(f"{w.size} process(es), rank {w.rank}, {hi - lo} rows: gradient {grad:.2f} ms, all-reduce {reduce:.2f} ms "
          f"(of {numel} values; alone after a barrier {alone:.2f} ms), Adam {update:.2f} ms, "
          f"step {grad + reduce + update:.2f} ms", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    for nproc in (1, a.nproc):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={port}", __file__, "--worker", "--batch-size",
               str(a.batch_size), "--steps", str(a.steps)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        print(done.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
