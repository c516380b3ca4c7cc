"""``vi-lab estimators``: gradient estimators compared: reparameterized vs REINFORCE (with baselines), and discrete latents.

For each model family it trains the same initial model under every estimator for the
same budget (ELBO vs step and vs wall time), then, at the parameters one reference run
reached, draws ``--grad-draws`` independent gradient estimates per estimator on one fixed
batch (:func:`vi_lab.diagnostics.gradient_stats`) and reports, per parameter group
(encoder = guide, decoder = model), the norm of the mean, the variance (trace of the
covariance) and the signal-to-noise ratio.

Model families (``--models``):

* ``gaussian``: the Gaussian VAE with a mean-field guide: reparam, reinforce,
  reinforce_baseline (decaying_avg, nn); fixed point: after the reparam run, whose mean
  gradient (by far the least noisy) stands for the signal in ``SNR (ref)``.
* ``sbn``: sigmoid belief network VAE with ``--sbn-units`` binary latents: reinforce,
  reinforce_baseline (decaying_avg, nn), relaxed (biased); fixed point: after the nn
  baseline run.
* ``categorical``: one ``--categories``-way latent: enum (exact, TraceEnum_ELBO), reinforce,
  reinforce_baseline (decaying_avg, nn), relaxed; fixed point: after the decaying-average
  run; the exact (enum) gradient there gives each estimator's ``SNR (ref)`` and ``bias z``
  (about 1 when unbiased, much larger when biased).

Run ``vi-lab estimators`` (or ``python examples/reinforce_vs_reparam.py``; defaults finish
in a few minutes on a 2-core CPU) or ``vi-lab estimators --help``. ``--data PATH`` runs
on your own data (values in [0, 1]); the networks' input size follows it. Writes to
``--out DIR``: ``estimators.json`` (every number, with the command), ``variance.png`` and
``curves.png``. ELBOs are in nats per datapoint, higher is better.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import vi_lab
from vi_lab import gaps, runs
from vi_lab.data import binarize
from vi_lab.diagnostics import gradient_stats, stats_table
from vi_lab.estimators import Estimator
from vi_lab.guides import BernoulliGuide, CategoricalGuide
from vi_lab.models.discrete import CategoricalVAE, SigmoidBeliefVAE

UNITS = "nats per datapoint (higher is better)"


@dataclass(frozen=True)
class Config(runs.CommonConfig):
    """Everything one run depends on; written into estimators.json."""

    epochs: int = 8
    models: tuple[str, ...] = ("gaussian", "sbn", "categorical")
    latent_dim: int = 20
    sbn_units: int = 200
    categories: int = 10
    hidden: tuple[int, ...] = (200,)
    batch_size: int = 100
    lr: float = 1e-3
    temperature: float = 0.5
    grad_draws: int = 100
    grad_batch: int = 100
    baseline_warmup: int = 300
    baseline_lr: float = 3e-3
    train_size: int | None = 5000
    eval_samples: int = 20


def _gaussian(cfg: Config, x_dim: int):
    model = vi_lab.VAE(cfg.latent_dim, list(cfg.hidden)[::-1], x_dim=x_dim)
    return model, vi_lab.make_guide("mean_field", latent_dim=cfg.latent_dim, hidden=list(cfg.hidden), x_dim=x_dim)


def _sbn(cfg: Config, x_dim: int):
    return (SigmoidBeliefVAE(cfg.sbn_units, list(cfg.hidden)[::-1], x_dim=x_dim),
            BernoulliGuide.make(cfg.sbn_units, hidden=cfg.hidden, x_dim=x_dim))


def _categorical(cfg: Config, x_dim: int):
    return (CategoricalVAE(cfg.categories, list(cfg.hidden)[::-1], x_dim=x_dim),
            CategoricalGuide.make(cfg.categories, hidden=cfg.hidden, x_dim=x_dim))


@dataclass(frozen=True)
class Family:
    """A model family: how to build it, the estimators compared, and whose run fixes the parameters."""

    description: str
    build: Callable[[Config, int], tuple]  # (cfg, x_dim) -> (model, guide)
    estimators: Callable[[Config], list[Estimator]]
    reference: int  # index of the run whose trained parameters are the fixed point
    # index of the estimator whose mean gradient stands for E g in "SNR (ref)" and "bias z":
    # exact (enum), or unbiased with a variance far below the others' (reparam)
    signal: int | None = None


def _baselines() -> list[Estimator]:
    return [Estimator("reinforce"), Estimator("reinforce_baseline", baseline="decaying_avg"),
            Estimator("reinforce_baseline", baseline="nn")]


FAMILIES: dict[str, Family] = {
    "gaussian": Family("Gaussian VAE, mean-field guide", _gaussian,
                       lambda cfg: [Estimator("reparam"), *_baselines()], reference=0, signal=0),
    "sbn": Family("sigmoid belief network VAE (binary latents)", _sbn,
                  lambda cfg: [*_baselines(), Estimator("relaxed", temperature=cfg.temperature)], reference=2),
    # the enum run's guide ends up (almost) deterministic, where every estimator has no
    # variance; the decaying-average run's guide is not, and enum still gives the exact gradient
    "categorical": Family("categorical-latent VAE", _categorical,
                          lambda cfg: [Estimator("enum"), *_baselines(),
                                       Estimator("relaxed", temperature=cfg.temperature)],
                          reference=2, signal=0),
}

#: one colour per estimator across all panels
COLORS = {"reparam": "C0", "enum": "C0", "reinforce": "C1", "reinforce_baseline (decaying_avg)": "C2",
          "reinforce_baseline (nn)": "C3", "relaxed": "C4"}


def _color(label: str) -> str:
    return COLORS.get(label, COLORS.get(label.split(" ")[0], "C7"))


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> Config:
    """The options of ``vi-lab estimators``, declared once; ``argv`` defaults to the process's arguments."""
    p = runs.parser(__doc__, prog)
    runs.add_common_args(p, epochs=Config.epochs, eval_size=Config.eval_size, eval_samples=Config.eval_samples)
    p.set_defaults(train_size=Config.train_size)
    p.add_argument("--models", nargs="+", choices=list(FAMILIES), default=list(Config.models))
    p.add_argument("--latent-dim", type=int, default=Config.latent_dim, help="Gaussian VAE latent size")
    p.add_argument("--sbn-units", type=int, default=Config.sbn_units, help="binary latent units of the SBN")
    p.add_argument("--categories", type=int, default=Config.categories, help="K of the categorical latent")
    p.add_argument("--hidden", type=int, nargs="+", default=list(Config.hidden), help="encoder hidden widths")
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--lr", type=float, default=Config.lr)
    p.add_argument("--temperature", type=float, default=Config.temperature, help="relaxed estimator temperature")
    p.add_argument("--grad-draws", type=int, default=Config.grad_draws, help="gradient estimates per estimator")
    p.add_argument("--grad-batch", type=int, default=Config.grad_batch, help="images in the fixed gradient batch")
    p.add_argument("--baseline-warmup", type=int, default=Config.baseline_warmup,
                   help="steps baselines adapt at the fixed point (on random training batches) before "
                        "gradients are drawn")
    p.add_argument("--baseline-lr", type=float, default=Config.baseline_lr,
                   help="Adam learning rate of the nn baseline during that warm-up")
    kw = vars(p.parse_args(argv))
    kw["hidden"], kw["models"] = tuple(kw["hidden"]), tuple(dict.fromkeys(kw["models"]))
    cfg = Config(**kw)
    if cfg.grad_draws < 2:
        p.error("--grad-draws must be at least 2 (a variance needs two draws)")
    return cfg


def warm_up(family: Family, cfg: Config, data: runs.RunData, device) -> None:
    """One untimed step per estimator: one-off costs (imports, first backward) stay out of the timings."""
    x = data.x_train[: cfg.batch_size]
    for est in family.estimators(cfg):
        model, guide = family.build(cfg, x.shape[1])
        vi_lab.fit(model, guide, x, estimator=est, epochs=1, batch_size=cfg.batch_size, lr=cfg.lr, device=device,
                   progress=False, binarize=data.fit_binarize)


def train_all(name: str, family: Family, cfg: Config, data: runs.RunData, device) -> tuple[list[dict], list[tuple]]:
    """Train the same initial model under each estimator; return records and trained pairs."""
    warm_up(family, cfg, data, device)
    records, pairs = [], []
    n = len(data.x_train)
    for est in family.estimators(cfg):
        torch.manual_seed(cfg.seed)  # every estimator starts from the same parameters
        model, guide = family.build(cfg, data.x_train.shape[1])
        result = vi_lab.fit(model, guide, data.x_train, estimator=est, epochs=cfg.epochs, batch_size=cfg.batch_size,
                            lr=cfg.lr, device=device, seed=cfg.seed, progress=runs.fit_progress(cfg.progress),
                            binarize=data.fit_binarize, eval_data=data.x_test)
        # fit drops a short last batch for estimators that need batches of one size
        steps_per_epoch = n // cfg.batch_size if est.spec.fixed_batch and n >= cfg.batch_size else -(-n // cfg.batch_size)
        elapsed, history = 0.0, []
        for h in result.history:
            elapsed += h["seconds"]
            history.append({**h, "step": h["epoch"] * steps_per_epoch, "elapsed": elapsed})
        with torch.no_grad():  # the ELBO and log p(x) of the same K draws per test image
            score = gaps.score_proposal(model, guide, data.x_test, num_samples=cfg.eval_samples,
                                        batch_size=1000)  # at most 1000 datapoints a chunk; the memory budget cuts K
        records.append({
            "estimator": est.label, "name": est.name, "unbiased": est.spec.unbiased,
            "final_test_elbo": score.elbo.mean().item(),
            "final_test_log_likelihood": score.log_px.mean().item(),
            "train_seconds": elapsed, "seconds_per_step": elapsed / max(1, steps_per_epoch * cfg.epochs),
            "history": history,
        })
        pairs.append((est, model, guide))
        print(f"[{name}] {est.label}: test ELBO {records[-1]['final_test_elbo']:.2f} {UNITS} "
              f"after {cfg.epochs} epochs ({elapsed:.1f} s)", flush=True)
    return records, pairs


def gradient_rows(family: Family, pairs: list[tuple], cfg: Config, x_fixed: torch.Tensor,
                  x_warm: torch.Tensor) -> tuple[list[dict], dict]:
    """Gradient statistics of every estimator at the reference run's parameters.

    Baselines adapt first on random batches of ``x_warm``, as they would in training
    (on the fixed batch alone Pyro's per-position average would become a per-image one).
    """
    _, model, guide = pairs[family.reference]
    stats = {}
    for est, _, _ in pairs:
        warmup = cfg.baseline_warmup if est.name == "reinforce_baseline" else 0
        stats[est.label] = gradient_stats(model, guide, x_fixed, estimator=est, num_draws=cfg.grad_draws,
                                          seed=cfg.seed, warmup=warmup, warmup_data=x_warm,
                                          baseline_lr=cfg.baseline_lr)
    reference = None
    if family.signal is not None:
        reference = {g: s.mean for g, s in stats[pairs[family.signal][0].label].items()}
    rows = []
    for label, by_group in stats.items():
        for g, s in by_group.items():
            row = s.as_dict()
            if reference is not None:
                row["snr_ref"], row["bias_z"] = s.snr_given(reference[g]), s.bias_z(reference[g])
            for key in ("snr", "snr_ref"):
                if key in row and not math.isfinite(row[key]):
                    row[key] = None  # zero variance: the exact gradient (enum)
            rows.append(row)
    return rows, {"stats": stats, "reference": reference}


def save_curves(results: dict, path: Path) -> Path:
    """Test ELBO against optimizer steps and against wall time, one row of panels per family."""
    from vi_lab import viz  # matplotlib (Agg) on first use, not for --help
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        for rec in results[name]["training"]:
            hist = [h for h in rec["history"] if "test_elbo" in h]
            style = "--" if not rec["unbiased"] else "-"
            for ax, key in zip(row, ("step", "elapsed")):
                ax.plot([h[key] for h in hist], [h["test_elbo"] for h in hist], style, marker="o", ms=3,
                        color=_color(rec["estimator"]), label=rec["estimator"])
        row[0].set_xlabel("optimizer step")
        row[1].set_xlabel("training wall time (s, shared loaded CPU)")
        for ax in row:
            ax.set_ylabel("test ELBO (nats/datapoint)")
            ax.set_title(results[name]["description"], fontsize=10)
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=8)
    fig.suptitle("ELBO vs step and vs wall time, same initial model per row (higher is better)")
    return viz.save_figure(fig, path, dpi=90)


def save_variance(results: dict, path: Path) -> Path:
    """Variance and SNR of the gradient estimates per estimator, encoder and decoder bars, one column per family."""
    from vi_lab import viz
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(5.2 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        rows = results[name]["gradients"]
        labels = list(dict.fromkeys(r["estimator"] for r in rows))
        # the SNR with E g from the exact / least noisy estimate where the family has one
        snr_key = "snr_ref" if all("snr_ref" in r for r in rows) else "snr"
        for g_idx, group in enumerate(("encoder", "decoder")):
            by = {r["estimator"]: r for r in rows if r["group"] == group}
            xs = [i + (g_idx - 0.5) * 0.38 for i in range(len(labels))]
            for ax, key in zip(axes[:, col], ("variance", snr_key)):
                # an exact gradient (enum) has no variance and no finite SNR: no bar
                vals = [by[lab][key] if lab in by and by[lab][key] else float("nan") for lab in labels]
                ax.bar(xs, vals, width=0.38, label=group if key == "variance" else None, log=True,
                       color="C0" if group == "encoder" else "C1")
                for x_pos, lab in zip(xs, labels):
                    if lab in by and not by[lab][key] and group == "encoder":
                        ax.annotate("exact", (x_pos + 0.19, 0.02), xycoords=("data", "axes fraction"),
                                    ha="center", fontsize=7)
        snr_label = "SNR = ||E g|| / sqrt(tr Cov)" + (" (E g: ref.)" if snr_key == "snr_ref" else " (E g: own mean)")
        for ax, ylabel in zip(axes[:, col], ("variance: tr Cov of the gradient", snr_label)):
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels([lab.replace(" (", "\n(") for lab in labels], fontsize=7, rotation=30, ha="right")
            ax.set_ylabel(ylabel, fontsize=9)
            ax.grid(alpha=0.3, axis="y")
        axes[0, col].set_title(f"{results[name]['description']}\n(at {results[name]['fixed_point']})", fontsize=9)
        axes[0, col].legend(fontsize=8)
    fig.suptitle("Gradient estimates of the ELBO at fixed parameters (per datapoint, one fixed batch)")
    return viz.save_figure(fig, path, dpi=90)


def main(cfg: Config) -> dict:
    runs.one_process("estimators")
    device = runs.setup(cfg.threads, cfg.device)
    out = runs.out_dir(cfg.out, overwrite=cfg.overwrite)
    data = runs.load_data(cfg.data or cfg.dataset, data_dir=cfg.data_dir, device=device, train_size=cfg.train_size,
                          eval_size=cfg.eval_size, binarization="dynamic", seed=cfg.seed)
    # one fixed binary batch for every gradient estimate
    x_fixed = binarize(data.x_train[: cfg.grad_batch], "static", seed=cfg.seed + 2)
    x_warm = binarize(data.x_train, "static", seed=cfg.seed + 3)
    t0 = time.perf_counter()
    results = {}
    for name in cfg.models:
        family = FAMILIES[name]
        training, pairs = train_all(name, family, cfg, data, device)
        ref = pairs[family.reference][0].label
        gradients, raw = gradient_rows(family, pairs, cfg, x_fixed, x_warm)
        results[name] = {"description": family.description, "fixed_point": f"params after {cfg.epochs} epochs of {ref}",
                         "training": training, "gradients": gradients}
        print(f"\n{family.description}: gradient estimates at {results[name]['fixed_point']} "
              f"({cfg.grad_draws} draws, batch of {len(x_fixed)})")
        print(runs.format_table(stats_table(raw["stats"], raw["reference"])))
        print(runs.format_table([("estimator", f"test ELBO ({UNITS})", f"log p(x), K={cfg.eval_samples}", "s/step")]
                                + [(r["estimator"], f"{r['final_test_elbo']:.2f}", f"{r['final_test_log_likelihood']:.2f}",
                                    f"{r['seconds_per_step'] * 1000:.1f} ms") for r in training]))
    summary = {
        "units": UNITS,
        **runs.provenance(cfg),
        "device": str(device),
        **runs.data_record(data),
        "train_size": len(data.x_train),
        "eval_size": len(data.x_test),
        "total_seconds": time.perf_counter() - t0,
        "models": results,
    }
    runs.write_json(out / "estimators.json", summary)
    save_curves(results, out / "curves.png")
    save_variance(results, out / "variance.png")
    runs.report_end(data, out, ["estimators.json", "variance.png", "curves.png"], pictures=None,
                    extra=f" in {summary['total_seconds']:.0f} s")
    return summary


def run(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """``vi-lab estimators ARGS``: parse, train under every estimator, measure the gradients; user errors end in one line."""
    return runs.run_command(parse_args, main, argv, prog)
