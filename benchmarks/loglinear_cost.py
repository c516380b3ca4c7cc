"""What the exact normalizer costs: time of log Z and of one EM iteration as |X| = 2^D and |Z| = K grow.

Two sweeps in one process, side by side with the factorized model (BernoulliMixture, whose
normalizer is a product over pixels and costs O(K D)):

* ``|X|``: D pixels (the first D of 5x5 MNIST patches, row-major), all-pairs features
  (F = D + D(D-1)/2), K fixed;
* ``|Z|``: 4x4 patches (|X| = 65,536), 4-neighbour ("grid") features (F = 16 + 24), K growing.

Per setting: the median CPU time of one normalizer pass without and with its gradient
(the E-step's and the M-step's), and the CPU time per EM iteration (E-step + an M-step of
20 L-BFGS steps) over ``--iters`` iterations on ``--points`` training patches, with the
number of normalizer passes an M-step made. Beyond ``--em-max-bits`` only the normalizer
is timed.

    python benchmarks/loglinear_cost.py --threads 1 --out docs/results/loglinear_cost.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import time
from pathlib import Path

import torch

from vi_lab import reporting, runs
from vi_lab.data import binarize, load_dataset
from vi_lab.em import em
from vi_lab.models.loglinear import BernoulliMixture
from vi_lab.models.loglinear_pairwise import PairwiseMixture, random_patches


def cpu_median(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def normalizer_times(model: PairwiseMixture, reps: int) -> tuple[float, float]:
    """CPU seconds of log Z alone (E-step, scoring) and with its gradient (an M-step evaluation)."""
    def forward() -> None:
        with torch.no_grad():
            model._cache = None  # time the pass, not the cache
            model.log_normalizer()

    def with_grad() -> None:
        model.zero_grad()
        model.log_normalizer().sum().backward()

    forward()  # builds the cached feature table once, as the first EM iteration does
    return cpu_median(forward, reps), cpu_median(with_grad, reps)


def em_time(model: torch.nn.Module, x: torch.Tensor, iters: int, seed: int) -> dict:
    """CPU seconds per EM iteration, and normalizer passes per M-step (pairwise models only)."""
    passes = [0]
    if isinstance(model, PairwiseMixture):
        chunks = model.feature_chunks

        def counted():
            passes[0] += 1
            return chunks()

        model.feature_chunks = counted  # instrumentation: every log Z pass asks for the chunks once
    t0, w0 = time.process_time(), time.perf_counter()
    result = em(model, x, max_iters=iters, tol=0.0, restarts=1, seed=seed)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    return {"em_cpu_s_per_iter": cpu / iters, "em_wall_s_per_iter": wall / iters,
            "normalizer_passes_per_iter": passes[0] / iters if isinstance(model, PairwiseMixture) else None,
            "train_log_likelihood": result.log_likelihood}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8, 10, 12, 14, 16, 18, 20], help="D values")
    p.add_argument("--bits-classes", type=int, default=8, help="K of the |X| sweep")
    p.add_argument("--classes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="K values")
    p.add_argument("--em-max-bits", type=int, default=16, help="largest D whose EM iteration is timed")
    p.add_argument("--points", type=int, default=10000, help="training patches of the EM timings")
    p.add_argument("--iters", type=int, default=3, help="EM iterations timed per setting")
    p.add_argument("--reps", type=int, default=5, help="normalizer timings per setting (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file to write")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    images = binarize(load_dataset("mnist", "train").images, "static", seed=a.seed)
    g = torch.Generator().manual_seed(a.seed)
    wide = random_patches(images, 5, a.points, generator=g).double()  # (N, 25): the |X| sweep's first D pixels
    square = random_patches(images, 4, a.points, generator=g).double()  # (N, 16): the |Z| sweep

    def row(d: int, K: int, edges: str, patches: torch.Tensor) -> dict:
        model = PairwiseMixture(K, d, edges=edges)
        model.reset_parameters(torch.Generator().manual_seed(a.seed), patches[:, :d])
        with torch.no_grad():
            model.W[:, d:] = 0.1  # nonzero pairwise weights: the sum has no shortcut either way
        reps = a.reps if d <= 16 else 1
        fwd, grad = normalizer_times(model, reps)
        out = {"D": d, "X": 2 ** d, "K": K, "edges": edges, "features": model.num_features,
               "normalizer_cpu_s": fwd, "normalizer_grad_cpu_s": grad}
        if d <= a.em_max_bits:
            out["pairwise"] = em_time(model, patches[:, :d], a.iters, a.seed)
            out["factorized"] = em_time(BernoulliMixture(K, d, dtype=torch.float64), patches[:, :d], a.iters, a.seed)
        print(out, flush=True)
        return out

    row(6, 2, "all", wide)  # warm-up, discarded: the first pass of a process pays for allocation and dispatch setup
    by_bits = [row(d, a.bits_classes, "all", wide) for d in a.bits]
    by_classes = [row(16, K, "grid", square) for K in a.classes]

    def table(rows: list[dict], key: str) -> str:
        lines = [(key, "F", "log Z (ms)", "log Z + grad (ms)", "EM iter, pairwise (s)", "passes/iter",
                  "EM iter, factorized (s)")]
        for r in rows:
            em_p, em_f = r.get("pairwise"), r.get("factorized")
            lines.append((f"{r['D']} (|X|={r['X']:,})" if key == "D" else r["K"], r["features"],
                          f"{1e3 * r['normalizer_cpu_s']:.2f}", f"{1e3 * r['normalizer_grad_cpu_s']:.2f}",
                          f"{em_p['em_cpu_s_per_iter']:.3f}" if em_p else "-",
                          f"{em_p['normalizer_passes_per_iter']:.0f}" if em_p else "-",
                          f"{em_f['em_cpu_s_per_iter']:.4f}" if em_f else "-"))
        return reporting.format_table(lines)

    print(f"\n|X| sweep: K={a.bits_classes}, all pairs\n" + table(by_bits, "D"))
    print(f"\n|Z| sweep: 4x4 patches (|X|=65,536), grid pairs\n" + table(by_classes, "K"))
    result = {"by_bits": by_bits, "by_classes": by_classes, "points": a.points, "iters": a.iters,
              "units": "CPU seconds (time.process_time) of one process; normalizer: median of --reps passes",
              "threads": torch.get_num_threads(), "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "command": runs.command_line(), "config": vars(a)}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        reporting.write_json(a.out, result)
        print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
