"""Time per training epoch of `vi-lab train` on 1 and N processes (torchrun, data parallelism).

Configurations, run in alternating rounds in one invocation (medians reported):

* ``plain``: ``python -m vi_lab train`` in one process with ``--threads T`` (no torchrun);
* ``plain-T/N``: the same with ``T / N`` threads (one process's share of the cores below);
* ``torchrun-1``: the same under ``torchrun --nproc_per_node=1`` (the launcher's overhead);
* ``torchrun-N``: ``torchrun --nproc_per_node=N``, each process with ``--threads T / N``
  (the same cores shared out), the same global batch.

Each run trains ``--epochs`` epochs on ``--train-size`` MNIST images; the time per epoch
is the ``seconds_per_epoch`` the run's metrics.json records (training only: the
evaluation after training is not counted). Example (this repository's figures)::

    python benchmarks/distributed_epoch.py --nproc 2 --threads 2 --epochs 3 --rounds 2 \\
        --out benchmarks/results/distributed_epoch_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, nproc: int, threads: int, a: argparse.Namespace, out: Path) -> dict:
    train = ["-m", "vi_lab", "train", "--epochs", str(a.epochs), "--train-size", str(a.train_size), "--eval-size",
             "100", "--eval-samples", "10", "--threads", str(threads), "--no-progress", "--device", a.device,
             "--batch-size", str(a.batch_size), "--out", str(out)]
    if name.startswith("plain"):
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *train]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"seconds_per_epoch": m["seconds_per_epoch"], "world_size": m["world_size"], "backend": m["backend"],
            "train_elbo": m["train_elbo"], "test_elbo": m["test_elbo"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all (shared out)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=60000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    share = max(1, a.threads // a.nproc)
    configs = [("plain", 1, a.threads), (f"plain-{share}", 1, share), ("torchrun-1", 1, a.threads),
               (f"torchrun-{a.nproc}", a.nproc, share)]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, nproc, threads in configs:
                got = run(name, nproc, threads, a, Path(tmp) / f"{name}-{r}")
                results[name].append(got)
                print(f"round {r + 1}: {name:<12} {got['seconds_per_epoch']:.2f} s/epoch "
                      f"(world {got['world_size']}, train ELBO {got['train_elbo']:.2f})", flush=True)
    base = statistics.median(x["seconds_per_epoch"] for x in results["plain"])
    summary = {}
    print(f"\n{'configuration':<14} {'processes':>9} {'threads each':>12} {'s/epoch':>8} {'/ plain':>8}")
    for name, nproc, threads in configs:
        med = statistics.median(x["seconds_per_epoch"] for x in results[name])
        summary[name] = {"processes": nproc, "threads_each": threads, "seconds_per_epoch": med, "ratio": med / base}
        print(f"{name:<14} {nproc:>9} {threads:>12} {med:>8.2f} {med / base:>8.3f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({
            "summary": summary, "runs": results, "args": {k: str(v) for k, v in vars(a).items()},
            "machine": f"{platform.node()} ({os.cpu_count()} cores)", "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv])}, indent=1))


if __name__ == "__main__":
    main()
