"""``vi-lab train``: train a VAE and measure it: ELBO, importance-sampled log p(x), pictures.

Run ``vi-lab train`` (or ``python examples/vae_mnist.py``; defaults finish in a few minutes
on a 2-core CPU) or ``vi-lab train --help`` for the options. ``--data PATH`` trains on your
own arrays or images; the model's input size follows the data. Writes to ``--out DIR``
(default ``runs/<timestamp>/``): ``metrics.json``, ``samples.png``,
``reconstructions.png``, ``curves.png``, ``manifold.png`` (when ``--latent-dim 2``),
the latent-space pictures ``interpolation.png``, ``traversals.png``, ``edits.png`` and
``latent_scatter.png`` (encoder means by label, PCA when D > 2; pictures need square grey images),
``metrics.jsonl``, ``config.json`` (the options, checked on ``--resume``) and the checkpoint
``last.pt``. An ``--out`` that already holds files is refused unless ``--resume`` (continue
that run; ``--lr`` and ``--epochs`` may change) or ``--overwrite`` (replace it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

import vi_lab
from vi_lab import distributed, evaluate, runs
from vi_lab.data import BINARIZATIONS
from vi_lab.estimators import BASELINES, ESTIMATORS
from vi_lab.guides import GUIDES, guide_options
from vi_lab.models import LIKELIHOODS
from vi_lab.nets import ARCHS


@dataclass(frozen=True)
class Config(runs.CommonConfig):
    """Everything one run depends on; written into metrics.json."""

    epochs: int = 10
    latent_dim: int = 20
    hidden: tuple[int, ...] = (400,)
    arch: str = "mlp"
    likelihood: str = "bernoulli"
    binarize: str | None = None  # None: dynamic for bernoulli, none otherwise
    beta: float = 1.0
    guide: str = "mean_field"
    flow_steps: int | None = None  # iaf / planar / radial (None: the family's default)
    rank: int | None = None  # low_rank
    components: int | None = None  # mixture
    loss: str = "trace"
    objective: str = "elbo"  # or a tighter bound: iwae, dreg (vi_lab.importance.OBJECTIVES)
    kl_warmup: float = 0.0  # epochs of linear KL warm-up (0: none)
    num_particles: int = 1  # ELBO particles per step (K of iwae/dreg, wake particles for rws)
    estimator: str = "reparam"  # gradient estimator (vi_lab.estimators.ESTIMATORS)
    baseline: str | None = None  # reinforce_baseline: decaying_avg (default) or nn
    batch_size: int = 128
    lr: float = 1e-3
    capture: bool = False  # replay each training step from a CUDA graph (fit(capture=True))
    resume: str | None = None


#: guide family options settable from the command line (see vi_lab.guides.guide_options)
FAMILY_FLAGS = {"flow_steps": "--flow-steps", "rank": "--rank", "components": "--components"}


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> Config:
    """The options of ``vi-lab train``, declared once; ``argv`` defaults to the process's arguments."""
    p = runs.parser(__doc__, prog)
    runs.add_common_args(p)
    p.add_argument("--latent-dim", type=int, default=Config.latent_dim)
    p.add_argument("--hidden", type=int, nargs="+", default=list(Config.hidden), help="hidden widths, e.g. 400 or 500 500")
    p.add_argument("--arch", choices=ARCHS, default=Config.arch)
    p.add_argument("--likelihood", choices=sorted(LIKELIHOODS), default=Config.likelihood)
    p.add_argument("--binarize", choices=BINARIZATIONS, default=None,
                   help="default: dynamic for the bernoulli likelihood, none otherwise")
    p.add_argument("--beta", type=float, default=Config.beta, help="weight of the KL term (beta-VAE)")
    p.add_argument("--guide", default=Config.guide, help=f"guide family: {', '.join(sorted(GUIDES))}")
    p.add_argument("--flow-steps", type=int, default=None, help="flow steps of iaf/planar/radial (default 2/8/8)")
    p.add_argument("--rank", type=int, default=None, help="rank of the low_rank guide's factor (default 2)")
    p.add_argument("--components", type=int, default=None, help="components of the mixture guide (default 5)")
    p.add_argument("--loss", choices=sorted(vi_lab.infer.LOSSES), default=Config.loss)
    p.add_argument("--objective", choices=("elbo", *vi_lab.importance.OBJECTIVES), default=Config.objective,
                   help="elbo (with --loss), or the K-sample importance-weighted bound: iwae, or dreg (its "
                        "doubly-reparameterized gradient); K is --num-particles")
    p.add_argument("--kl-warmup", type=float, default=Config.kl_warmup, metavar="EPOCHS",
                   help="raise the KL term's weight linearly from 0 to 1 over this many epochs (default: none)")
    p.add_argument("--num-particles", type=int, default=Config.num_particles,
                   help="Monte Carlo particles per step: K of --objective iwae/dreg, wake particles of --loss rws "
                        "(which needs >= 2)")
    p.add_argument("--estimator", choices=list(ESTIMATORS), default=Config.estimator,
                   help="gradient estimator: pathwise (reparam) or score function (reinforce, reinforce_baseline)")
    p.add_argument("--baseline", choices=list(BASELINES), default=None,
                   help="baseline of reinforce_baseline (default decaying_avg)")
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--lr", type=float, default=Config.lr)
    p.add_argument("--capture", action="store_true",
                   help="on a GPU, record one training step as a CUDA graph and replay it (falls back to eager "
                        "with a warning where it cannot apply)")
    p.add_argument("--resume", default=None, help="a run directory (or its last.pt) to continue")
    a = p.parse_args(argv)
    kw = vars(a)
    kw["hidden"] = tuple(kw["hidden"])
    cfg = Config(**kw)
    if cfg.guide not in GUIDES:
        p.error(f"unknown guide {cfg.guide!r}; valid names: {', '.join(sorted(GUIDES))}")
    takes = [o for o in guide_options(cfg.guide) if o in FAMILY_FLAGS]
    for option in guide_kwargs(cfg):
        if option not in takes:
            flags = ", ".join(FAMILY_FLAGS[o] for o in takes) or "no family options"
            p.error(f"{FAMILY_FLAGS[option]} does not apply to the {cfg.guide} guide (it takes {flags})")
    return cfg


def guide_kwargs(cfg: Config) -> dict:
    """The family options given on the command line (make_guide checks they apply)."""
    return {k: getattr(cfg, k) for k in FAMILY_FLAGS if getattr(cfg, k) is not None}


def build(cfg: Config, x_dim: int = 784) -> tuple[vi_lab.VAE, torch.nn.Module]:
    """The model/guide pair a config describes, for data of ``x_dim`` values per datapoint."""
    model = vi_lab.VAE(cfg.latent_dim, list(cfg.hidden)[::-1], arch=cfg.arch, likelihood=cfg.likelihood, beta=cfg.beta,
                       x_dim=x_dim)
    guide = vi_lab.make_guide(cfg.guide, latent_dim=cfg.latent_dim, hidden=list(cfg.hidden), arch=cfg.arch,
                              x_dim=x_dim, **guide_kwargs(cfg))
    return model, guide


def main(cfg: Config) -> dict:
    from vi_lab import viz  # matplotlib: imported when pictures are drawn, not for --help

    device = runs.setup(cfg.threads, cfg.device)
    world, device = runs.setup_world(device)  # under torchrun: rank 0 prints and writes, every rank trains
    out = runs.claim_out_dir(cfg.out, cfg.resume, overwrite=cfg.overwrite)
    distributed.main_decides(lambda: runs.record_config(out, cfg, cfg.resume), "checking the run's options")
    mode = cfg.binarize or runs.default_binarization(cfg.likelihood)
    data = distributed.main_first(  # rank 0 first: a download into a shared cache happens once
        lambda: runs.load_data(cfg.data or cfg.dataset, data_dir=cfg.data_dir, device=device,
                               train_size=cfg.train_size, eval_size=cfg.eval_size, binarization=mode, seed=cfg.seed),
        "loading the data")
    x_train, x_test, source = data.x_train, data.x_test, data.source
    pyro.set_rng_seed(cfg.seed)  # --seed fixes the initial weights too, not only training
    model, guide = build(cfg, x_train.shape[1])

    result = vi_lab.fit(
        model, guide, x_train, loss=cfg.loss, objective=cfg.objective, kl_warmup=cfg.kl_warmup,
        num_particles=cfg.num_particles, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, estimator=cfg.estimator, baseline=cfg.baseline,
        device=device, seed=cfg.seed, checkpoint_dir=out, resume=_resume_path(cfg) if cfg.resume else False,
        progress=runs.fit_progress(cfg.progress), binarize=data.fit_binarize, eval_data=x_test,
        capture=cfg.capture,
    )

    print(f"evaluating {len(x_test)} test images: ELBO, and log p(x) with K={cfg.eval_samples} importance "
          f"samples each ...", flush=True)
    t0 = time.perf_counter()
    terms = evaluate.elbo_terms(model, guide, x_test, num_samples=1)
    ll = evaluate.log_likelihood(model, guide, x_test, num_samples=cfg.eval_samples,
                                 progress="log p(x)" if cfg.progress else False)
    eval_seconds = time.perf_counter() - t0
    print(f"evaluated in {eval_seconds:.1f} s", flush=True)
    ll_mean, sem = runs.mean_sem(ll)
    metrics = {
        "train_elbo": result.train_elbo,
        "test_elbo": terms["elbo"].mean().item(),
        "test_log_likelihood": ll_mean,
        "test_log_likelihood_sem": sem,
        "test_reconstruction": terms["reconstruction"].mean().item(),
        "test_kl": terms["kl"].mean().item(),
        "eval_samples": cfg.eval_samples,
        "eval_size": len(x_test),
        "eval_seconds": eval_seconds,
        "epochs": len(result.history),
        "seconds_per_epoch": result.seconds_per_epoch,
        "captured_steps": result.captured_steps,
        "world_size": result.world_size,
        "backend": result.backend,
        "train_size": len(x_train),
        "binarization": mode,
        **runs.data_record(data),
        "device": result.device,
        "guide": cfg.guide,
        "guide_options": guide_kwargs(cfg),
        "units": "nats per datapoint (higher is better)",
        **runs.provenance(cfg),
        "history": result.history,
    }
    if not world.main:
        return metrics  # every number above is the run's (gathered); rank 0 writes and draws
    runs.write_json(out / "metrics.json", metrics)
    viz.save_curves(result.history, out / "curves.png",
                    title=f"VAE on {data.name} ({cfg.guide} guide, D={cfg.latent_dim})")
    pictures = save_pictures(model, guide, x_test, data.y_test, out) if data.drawable else []

    print()
    trained = f"{metrics['train_elbo']:.2f}" if result.history else "n/a (0 epochs)"
    bound = [(f"train {cfg.objective} bound, K={cfg.num_particles} (last epoch)",
              f"{result.history[-1]['train_bound']:.2f}")] if result.history and cfg.objective != "elbo" else []
    print(runs.format_table([
        ("metric (nats per datapoint)", "value"),
        ("train ELBO (last epoch)", trained),
        *bound,
        (f"test ELBO ({len(x_test)} images)", f"{metrics['test_elbo']:.2f}"),
        (f"test log-likelihood (K={cfg.eval_samples})", f"{metrics['test_log_likelihood']:.2f} +/- {sem:.2f}"),
        ("test reconstruction E_q[log p(x|z)]", f"{metrics['test_reconstruction']:.2f}"),
        ("test KL(q(z|x) || p(z))", f"{metrics['test_kl']:.2f}"),
        ("seconds per epoch", f"{metrics['seconds_per_epoch']:.1f} ({_where(result)})" if result.history else "n/a"),
        ("data", f"{data.name}, {len(x_train)} train / {len(x_test)} test"
                 f"{' (EMBEDDED FALLBACK)' if data.fallback else ''}"),
    ]))
    files = ["metrics.json", "config.json", "curves.png", *(p.name for p in pictures)]
    files += ["metrics.jsonl", "last.pt"] if result.checkpoint is not None else []
    print(f"\ndata: {source}; wrote {out}/ ({', '.join(files)})"
          f"{'' if result.checkpoint is not None else '; no checkpoint (0 epochs trained)'}")
    unstable = [h["epoch"] for h in result.history if h.get("unstable")]
    if unstable:
        print(f"WARNING: the training ELBO exploded in epoch(s) {unstable} (see the warning above): lower --lr; "
              f"these numbers are not trustworthy.")
    if not data.drawable:
        print(f"no sample or reconstruction pictures: the data are not square grey images ({data.name})")
    runs.print_fallback_banner(data)  # last, where it cannot be missed
    return metrics


def _where(result: vi_lab.infer.FitResult) -> str:
    """The device, and the processes when more than one trained together."""
    return result.device if result.world_size == 1 else \
        f"{result.world_size} processes, {result.backend}, rank 0 on {result.device}"


def save_pictures(model, guide, x_test: torch.Tensor, y_test: torch.Tensor, out: Path) -> list[Path]:
    """Samples, reconstructions, the manifold (D = 2), interpolation, traversals, editing and the
    scatter of encoder means, from test images."""
    from vi_lab import viz

    pairs = min(4, len(x_test) // 2)
    paths = [viz.save_samples(model, out / "samples.png"),
             viz.save_reconstructions(model, guide, x_test, out / "reconstructions.png")]
    if model.latent_dim == 2:
        paths.append(viz.save_manifold(model, out / "manifold.png"))
    paths += [viz.save_traversals(model, guide, x_test[:500], out / "traversals.png"),
             viz.save_edits(model, guide, x_test[:500], out / "edits.png")]
    if pairs:
        paths.append(viz.save_interpolation(model, guide, x_test[:pairs], x_test[pairs:2 * pairs],
                                            out / "interpolation.png"))
    if model.latent_dim >= 2:
        paths.append(viz.save_latent_scatter(guide, x_test[:2000], y_test[:2000], out / "latent_scatter.png"))
    return paths


def _resume_path(cfg: Config) -> Path:
    r = Path(cfg.resume)
    return r if r.is_file() else r / vi_lab.infer.CHECKPOINT_NAME


def run(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """``vi-lab train ARGS``: parse, train, measure; user errors end in one line (exit status 1)."""
    return runs.run_command(parse_args, main, argv, prog)
