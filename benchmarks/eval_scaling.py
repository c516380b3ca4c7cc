"""Does sharded evaluation scale? Importance-sampled log p(x) on 1 process against N under torchrun.

One run, side by side. This process trains a 784-400-20 VAE and its mean-field encoder for
``--train-epochs`` epochs on binarized MNIST (0: random weights; the cost does not depend on
the values) and saves them; then it launches the same timing script twice with torchrun,
``--nproc_per_node=1`` and ``--nproc_per_node=N`` (``--procs``), one thread per process. In
each launch every process loads the weights and the first ``--num-images`` test images
(binarized once, the same in every process), seeds Pyro with ``seed + rank``, waits at a
barrier and times ``vi_lab.log_likelihood(model, guide, x, num_samples=K)`` (after an untimed
call on a few images, which pays the one-off costs of a first trace): the call splits
the images across the processes and gathers the result on every process. Process 0 reports.
Printed: both wall times (the median of ``--rounds``), the speed-up, and both mean log p̂(x)
(different draws: equal within their standard errors).

Usage::

    python benchmarks/eval_scaling.py                       # K = 1000 on 2000 images, 1 and 2 processes
    python benchmarks/eval_scaling.py --procs 4 --num-samples 5000 --num-images 10000 \\
        --out benchmarks/results/eval_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch

import vi_lab
from vi_lab import distributed, evaluate
from vi_lab.data import binarize, load_dataset
from vi_lab.reporting import write_json

LATENT, HIDDEN = 20, [400]


def build() -> tuple[vi_lab.VAE, torch.nn.Module]:
    return vi_lab.VAE(latent_dim=LATENT, hidden=HIDDEN), vi_lab.make_guide("mean_field", latent_dim=LATENT,
                                                                          hidden=HIDDEN)


def test_images(args: argparse.Namespace) -> tuple[torch.Tensor, str]:
    test = load_dataset("mnist", "test", data_dir=args.data_dir)
    return binarize(test.images[: args.num_images], "static", seed=1), test.source


def worker(args: argparse.Namespace) -> None:
    """One process of a launch: time log_likelihood, process 0 writes what it saw to ``args.report``."""
    torch.set_num_threads(1)
    world = distributed.setup("cpu")
    state = torch.load(args.state, weights_only=False)
    model, guide = build()
    model.load_state_dict(state["model"])
    guide.load_state_dict(state["guide"])
    model.eval(), guide.eval()
    x, _ = test_images(args)
    evaluate.log_likelihood(model, guide, x[: 2 * world.size], num_samples=2)  # one-off costs (first traces), untimed
    pyro.set_rng_seed(args.seed + world.rank)  # the processes draw apart
    times = []
    for _ in range(args.rounds):
        distributed.barrier("the start line")
        t0 = time.perf_counter()
        ll = evaluate.log_likelihood(model, guide, x, num_samples=args.num_samples)
        times.append(time.perf_counter() - t0)  # ends when every process holds all N results
    if world.main:
        plan = evaluate.chunk_plan(model, guide, x[: distributed.shard_sizes(len(x), world.size)[0]],
                                   num_samples=args.num_samples)
        Path(args.report).write_text(json.dumps({
            "processes": world.size, "seconds": statistics.median(times), "all_seconds": times,
            "log_likelihood": {"mean": ll.mean().item(), "sem": (ll.std() / len(ll) ** 0.5).item()},
            "chunk_of_process_0": {"images": plan.points, "samples": plan.samples},
            "threads_per_process": torch.get_num_threads()}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(procs: int, args: argparse.Namespace, state: Path, report: Path) -> dict:
    """``torchrun --nproc_per_node=procs`` of this script's worker; what its process 0 reported."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, "--worker",
               "--state", str(state), "--report", str(report), "--num-images", str(args.num_images),
               "--num-samples", str(args.num_samples), "--rounds", str(args.rounds), "--seed", str(args.seed),
               *(["--data-dir", args.data_dir] if args.data_dir else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    print(f"$ OMP_NUM_THREADS=1 {' '.join(['torchrun', *command[3:]])}", flush=True)
    subprocess.run(command, env=env, check=True)
    return {**json.loads(report.read_text()), "command": " ".join(["torchrun", *command[3:]])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=2, help="processes of the parallel launch (default %(default)s)")
    p.add_argument("--num-samples", type=int, default=1000, help="K draws per image (default %(default)s)")
    p.add_argument("--num-images", type=int, default=2000, help="MNIST test images (default %(default)s)")
    p.add_argument("--train-epochs", type=int, default=1, help="epochs of training first; 0: random weights")
    p.add_argument("--rounds", type=int, default=1, help="timed calls per launch (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--state", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # before minutes of work, not after

    pyro.set_rng_seed(args.seed)
    model, guide = build()
    t0 = time.perf_counter()
    if args.train_epochs:
        train = load_dataset("mnist", "train", data_dir=args.data_dir)
        vi_lab.fit(model, guide, train.images, epochs=args.train_epochs, batch_size=128, lr=1e-3,
                   binarize="dynamic", seed=args.seed, progress=False)
    trained = time.perf_counter() - t0
    _, source = test_images(args)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "pair.pt"
        torch.save({"model": model.state_dict(), "guide": guide.state_dict()}, state)
        one = launch(1, args, state, Path(tmp) / "one.json")
        many = launch(args.procs, args, state, Path(tmp) / "many.json")
    result = {
        "one_process": one, f"{args.procs}_processes": many, "speedup": one["seconds"] / many["seconds"],
        "num_images": args.num_images, "num_samples": args.num_samples, "train_epochs": args.train_epochs,
        "train_seconds": trained, "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "pyro": pyro.__version__, "data": source,
        "units": "seconds of wall time; log p(x) in nats per image (higher is better)",
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(result, indent=2))
    print(f"\nlog p(x), K = {args.num_samples}, {args.num_images} MNIST test images, "
          f"{args.train_epochs}-epoch VAE, 1 thread per process, {os.cpu_count()} cores:")
    for label, r in (("1 process", one), (f"{args.procs} processes", many)):
        print(f"  {label:<12} {r['seconds']:7.1f} s   log p(x) {r['log_likelihood']['mean']:.2f} "
              f"+/- {r['log_likelihood']['sem']:.2f} nats")
    print(f"  speed-up     {result['speedup']:.2f}x")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
