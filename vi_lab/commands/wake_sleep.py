"""``vi-lab wake-sleep``: wake-sleep versus AEVB, by training samples seen (Kingma & Welling, 2014, Figure 2).

The same VAE model/guide pair (MLP encoder and decoder, Bernoulli likelihood, dynamic
binarization) is trained with AEVB (SVI with reparameterized gradients, one ELBO for
both networks), with wake-sleep (generator on z ~ q(z|x), recognition network on
dreams) and, on request, with reweighted wake-sleep (5 wake particles), for several
latent sizes. All of them train in the one loop, :func:`vi_lab.fit`, with its ``loss``
set per algorithm (:data:`ALGORITHMS`). The test ELBO is recorded at log-spaced numbers
of training samples seen (``fit(record_at=...)``), and the algorithms are drawn on one
plot per latent size.

Run ``vi-lab wake-sleep`` (or ``python examples/wake_sleep_vs_aevb.py``; the defaults:
latent sizes 3, 5, 10, 20, 3 epochs of 60,000 images = 180,000 training samples per run,
8 runs; about 190 CPU-seconds, under 5 minutes with ``--threads 1`` on a shared 2-core
CPU) or ``vi-lab wake-sleep --help``. ``--data PATH`` runs on your own data (values in
[0, 1]); the networks' input size follows it. Writes to ``--out DIR``:
``wake_sleep_vs_aevb.png`` (the figure), ``wake_sleep_vs_aevb.json`` (every curve, final
test ELBO and importance-sampled log-likelihood, timings, the command),
``samples_by_latent_dim.png`` (prior samples of the AEVB models side by side, Kingma &
Welling's Figure 5) and ``samples_by_latent_dim_wake_sleep.png`` (the sample pictures
for square grey images only).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import pyro
import torch

import vi_lab
from vi_lab import evaluate, runs
from vi_lab.infer import adam

#: algorithm -> (the loss of :func:`vi_lab.fit`, its particles per datapoint)
ALGORITHMS: dict[str, tuple[str, int]] = {
    "aevb": ("trace", 1),  # one ELBO, reparameterized gradients for both networks
    "wake_sleep": ("wake_sleep", 1),  # one wake draw; the guide learns from dreams only
    "rws": ("rws", 5),  # reweighted wake-sleep: 5 wake particles, the guide learns from them too
}

#: how each algorithm is named in the table and the figure, and its colour
LABELS = {"aevb": "AEVB", "wake_sleep": "wake-sleep", "rws": "reweighted wake-sleep"}
COLOURS = {"aevb": "C0", "wake_sleep": "C3", "rws": "C2"}


@dataclass(frozen=True)
class Config(runs.CommonConfig):
    """Everything one comparison depends on; written into the JSON."""

    epochs: int = 3
    latent_dims: tuple[int, ...] = (3, 5, 10, 20)
    algorithms: tuple[str, ...] = ("aevb", "wake_sleep")
    hidden: tuple[int, ...] = (400,)
    batch_size: int = 100
    lr: float = 1e-3
    guide_lr: float | None = None  # None: --lr
    eval_points: int = 12
    eval_samples: int = 100


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> Config:
    """The options of ``vi-lab wake-sleep``, declared once; ``argv`` defaults to the process's arguments."""
    p = runs.parser(__doc__, prog)
    runs.add_common_args(p, epochs=Config.epochs, eval_size=Config.eval_size, eval_samples=Config.eval_samples)
    p.add_argument("--latent-dims", type=int, nargs="+", default=list(Config.latent_dims),
                   help="latent sizes, one panel each (default %(default)s)")
    p.add_argument("--algorithms", nargs="+", choices=list(ALGORITHMS), default=list(Config.algorithms),
                   help="training algorithms compared (default %(default)s)")
    p.add_argument("--hidden", type=int, nargs="+", default=list(Config.hidden), help="hidden widths of both networks")
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--lr", type=float, default=Config.lr, help="Adam learning rate of the generator (and of the "
                   "recognition network unless --guide-lr)")
    p.add_argument("--guide-lr", type=float, default=None, help="Adam learning rate of the recognition network "
                   "(default: --lr)")
    p.add_argument("--eval-points", type=int, default=Config.eval_points,
                   help="log-spaced points at which the test ELBO is measured (default %(default)s)")
    kw = vars(p.parse_args(argv))
    for key in ("latent_dims", "algorithms", "hidden"):
        kw[key] = tuple(kw[key])
    cfg = Config(**kw)
    if cfg.epochs < 1 or any(d < 1 for d in cfg.latent_dims) or cfg.eval_points < 1:
        p.error("--epochs, --latent-dims and --eval-points must be positive")
    return cfg


def eval_schedule(total: int, batch_size: int, points: int) -> list[int]:
    """Log-spaced sample counts from ten batches to ``total`` (the last point is the end)."""
    start = min(10 * batch_size, total)
    if points == 1 or start >= total:
        return [total]
    ratio = (total / start) ** (1 / (points - 1))
    return sorted({int(round(start * ratio**i)) for i in range(points)})


def main(cfg: Config) -> dict:
    from vi_lab import viz  # matplotlib: imported when pictures are drawn, not for --help

    runs.one_process("wake-sleep")
    device = runs.setup(cfg.threads, cfg.device)
    out = runs.out_dir(cfg.out, overwrite=cfg.overwrite)
    data = runs.load_data(cfg.data or cfg.dataset, data_dir=cfg.data_dir, device=device, train_size=cfg.train_size,
                          eval_size=cfg.eval_size, binarization="dynamic", seed=cfg.seed)
    x_dim = data.x_train.shape[1]
    total = cfg.epochs * len(data.x_train)
    marks = eval_schedule(total, cfg.batch_size, cfg.eval_points)
    guide_lr = cfg.lr if cfg.guide_lr is None else cfg.guide_lr
    results, models = [], {algo: {} for algo in cfg.algorithms}
    t_all = time.perf_counter()
    for d in cfg.latent_dims:
        for algo in cfg.algorithms:
            loss, particles = ALGORITHMS[algo]
            pyro.set_rng_seed(cfg.seed)  # every algorithm starts from the same weights
            model = vi_lab.VAE(d, list(cfg.hidden)[::-1], x_dim=x_dim)
            guide = vi_lab.make_guide("mean_field", latent_dim=d, hidden=list(cfg.hidden), x_dim=x_dim)
            print(f"--- {LABELS[algo]}, D = {d}")  # heads the lines of this run, bar or no bar
            fit = vi_lab.fit(model, guide, data.x_train, loss=loss, num_particles=particles, epochs=cfg.epochs,
                             batch_size=cfg.batch_size, optimizer=adam(cfg.lr, guide=guide_lr), device=device,
                             seed=cfg.seed, progress=runs.fit_progress(cfg.progress), binarize=data.fit_binarize,
                             eval_data=data.x_test, record_at=marks)
            t0 = time.perf_counter()
            ll = evaluate.log_likelihood(model, guide, data.x_test, num_samples=cfg.eval_samples)
            ll_mean, ll_sem = runs.mean_sem(ll)
            train_seconds = sum(h["seconds"] for h in fit.history)
            results.append({
                "algorithm": algo, "latent_dim": d,
                "test_elbo": fit.history[-1]["test_elbo"],
                "test_log_likelihood": ll_mean,
                "test_log_likelihood_sem": ll_sem,
                "train_seconds": train_seconds,
                "samples_per_second": total / train_seconds if train_seconds > 0 else float("nan"),
                "eval_seconds": time.perf_counter() - t0,
                "history": fit.history,
            })
            models[algo][d] = model

    panels, styles = {}, {}
    for d in cfg.latent_dims:
        series = {}
        for r in (r for r in results if r["latent_dim"] == d):
            name = LABELS[r["algorithm"]]
            colour = COLOURS[r["algorithm"]]
            series[f"{name}, test"] = [(h["samples_seen"], h["test_elbo"]) for h in r["history"]]
            series[f"{name}, train"] = [(h["samples_seen"], h["train_elbo"]) for h in r["history"]]
            styles[f"{name}, test"] = {"color": colour, "lw": 1.8}
            styles[f"{name}, train"] = {"color": colour, "lw": 1.0, "ls": "--"}
        panels[f"D = {d}"] = series
    finals = [r["test_elbo"] for r in results]
    # the first evaluations (hundreds of nats below the end) would squash the part that differs
    ylim = (min(finals) - 100, max(finals) + 10)
    viz.save_bound_curves(panels, out / "wake_sleep_vs_aevb.png", styles=styles, ylim=ylim,
                          title=f"Wake-sleep vs AEVB on {data.name}: lower bound during training "
                                f"({len(data.x_test)} test images)")
    pictures = []
    for algo, suffix in (("aevb", ""), ("wake_sleep", "_wake_sleep")):
        if algo in models and data.drawable:
            pictures.append(viz.save_sample_grids({f"D = {d}": m for d, m in models[algo].items()},
                                                  out / f"samples_by_latent_dim{suffix}.png",
                                                  title=f"Prior samples, {LABELS[algo]} (decoder means)").name)

    summary = {
        "units": "nats per datapoint (higher is better)",
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "device": str(device),
        **runs.data_record(data),
        "train_size": len(data.x_train),
        "eval_size": len(data.x_test),
        "samples_per_run": total,
        "eval_at": marks,
        "total_seconds": time.perf_counter() - t_all,
        **runs.provenance(cfg),
        "results": results,
    }
    runs.write_json(out / "wake_sleep_vs_aevb.json", summary)

    rows = [("algorithm", "D", "test ELBO", f"test log p(x) (K={cfg.eval_samples})", "train s", "samples/s")]
    for r in results:
        rows.append((LABELS[r["algorithm"]], r["latent_dim"], f"{r['test_elbo']:.2f}",
                     f"{r['test_log_likelihood']:.2f} +/- {r['test_log_likelihood_sem']:.2f}",
                     f"{r['train_seconds']:.0f}", f"{r['samples_per_second']:.0f}"))
    print()
    print(f"{total} training samples per run; nats per datapoint on {len(data.x_test)} test images")
    print(runs.format_table(rows))
    runs.report_end(data, out, ["wake_sleep_vs_aevb.png", "wake_sleep_vs_aevb.json", *pictures],
                    pictures="sample pictures", extra=f"; {summary['total_seconds']:.0f} s in all")
    return summary


def run(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """``vi-lab wake-sleep ARGS``: parse, train every algorithm, compare; user errors end in one line."""
    return runs.run_command(parse_args, main, argv, prog)
