"""``vi-lab gaps``: train the same VAE with several guide families and split each one's inference gap.

For every family in ``--guides`` (default: mean_field, full_cov and iaf, those that are
registered) this trains the same VAE (same decoder, seed, data and epochs; the model
``vi-lab train --guide <family>`` builds) or loads its checkpoint, then on
``--num-points`` test images measures log p̂(x) (K = ``--eval-samples`` importance draws),
L[q*_rich], L[q*] and L[q], the approximation and amortization gaps (Cremer, Li &
Duvenaud, 2018, Table 2), the PSIS k-hat of the importance weights, and how much
semi-amortized refinement closes the amortization gap after t steps. Under
``torchrun --nproc_per_node=N -m vi_lab gaps`` the processes train together and split the
test images among them; process 0 prints and writes.

Run ``vi-lab gaps`` (or ``python examples/guide_swap_gaps.py``; defaults finish in under
20 minutes on a 2-core CPU with ``--threads 1``) or ``vi-lab gaps --help``. Writes to
``--out DIR`` (default ``runs/<timestamp>/``): ``gaps.json`` (everything, per datapoint
too), ``gaps.png`` (stacked gap bars per guide), ``refinement.png`` (gap against
refinement steps) and one checkpoint directory per guide (``<guide>/last.pt``,
``<guide>/metrics.jsonl``). A checkpoint found there (or under ``--checkpoints``) is
reused: restored as it is when it has ``--epochs`` epochs, continued when it has fewer;
:func:`vi_lab.fit` refuses one trained on other data or settings, and this command one
trained with another ``--seed``, more epochs, or (reused as it is) another ``--lr``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

import vi_lab
from vi_lab import checkpoint, distributed, gaps, runs
from vi_lab.commands import train
from vi_lab.guides import GUIDES
from vi_lab.guides.local import LOCAL_GUIDES
from vi_lab.nets import ARCHS

#: the families the comparison is about, in table order; the default keeps those registered
PREFERRED_GUIDES = ("mean_field", "full_cov", "iaf")


def default_guides() -> tuple[str, ...]:
    return tuple(name for name in PREFERRED_GUIDES if name in GUIDES)


@dataclass(frozen=True)
class Config(runs.CommonConfig):
    """Everything one run depends on; written into gaps.json."""

    guides: tuple[str, ...] = default_guides()
    epochs: int = 5
    latent_dim: int = 20
    hidden: tuple[int, ...] = (400,)
    arch: str = "mlp"
    batch_size: int = 128
    lr: float = 1e-3
    num_points: int = 50
    rich_family: str | None = "full_cov"
    local_steps: int = 3000
    local_lr: tuple[float, ...] = (1e-2, 1e-3)
    local_particles: int = 16
    refine_steps: tuple[int, ...] = (0, 10, 30, 100, 300)
    refine_samples: int = 100
    refine_lr: float | None = None  # None: the first --local-lr
    checkpoints: str | None = None
    eval_samples: int = 5000


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> Config:
    """The options of ``vi-lab gaps``, declared once; ``argv`` defaults to the process's arguments."""
    p = runs.parser(__doc__, prog)
    runs.add_common_args(p, epochs=Config.epochs, eval_size=Config.eval_size, eval_samples=Config.eval_samples)
    p.add_argument("--guides", type=_names, default=Config.guides,
                   help=f"comma-separated guide families (default {','.join(Config.guides)}; "
                        f"registered: {', '.join(sorted(GUIDES))})")
    p.add_argument("--num-points", type=int, default=Config.num_points,
                   help="test images whose gaps are measured (default %(default)s; at most --eval-size)")
    p.add_argument("--latent-dim", type=int, default=Config.latent_dim)
    p.add_argument("--hidden", type=int, nargs="+", default=list(Config.hidden), help="hidden widths, e.g. 400 or 200 200")
    p.add_argument("--arch", choices=ARCHS, default=Config.arch)
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--lr", type=float, default=Config.lr, help="training learning rate")
    p.add_argument("--rich-family", default=Config.rich_family,
                   help=f"local family for L[q*_rich], or 'none' (default %(default)s; valid: {', '.join(sorted(LOCAL_GUIDES))})")
    p.add_argument("--local-steps", type=int, default=Config.local_steps,
                   help="step budget of each per-datapoint optimization (default %(default)s)")
    p.add_argument("--local-lr", type=float, nargs="+", default=list(Config.local_lr),
                   help="Adam learning rates of the per-datapoint optimization, one stage each (default %(default)s)")
    p.add_argument("--local-particles", type=int, default=Config.local_particles)
    p.add_argument("--refine-steps", type=lambda s: tuple(int(v) for v in s.split(",")), default=Config.refine_steps,
                   help="refinement budgets for the curve, e.g. 0,10,100 (default %(default)s)")
    p.add_argument("--refine-samples", type=int, default=Config.refine_samples,
                   help="draws per datapoint for each point of the refinement curve")
    p.add_argument("--refine-lr", type=float, default=None,
                   help="Adam learning rate of the refinement curve (default: the first --local-lr)")
    p.add_argument("--checkpoints", default=None,
                   help="directory of <guide>/last.pt checkpoints to load or continue (default: --out)")
    kw = vars(p.parse_args(argv))
    kw["hidden"] = tuple(kw["hidden"])
    kw["local_lr"] = tuple(kw["local_lr"])
    if kw["rich_family"] in ("none", ""):
        kw["rich_family"] = None
    cfg = Config(**kw)
    problems = _check(cfg)
    if problems:
        p.error("; ".join(problems))
    return cfg


def _check(cfg: Config) -> list[str]:
    """What is wrong with a config, before any data is loaded or any family trained."""
    problems = []
    if not cfg.guides:
        problems.append("--guides is empty")
    families = [(name, "guide") for name in cfg.guides if name in GUIDES]
    problems += [f"unknown guide {name!r}; valid names: {', '.join(sorted(GUIDES))}"
                 for name in cfg.guides if name not in GUIDES]
    if cfg.rich_family is not None:
        families.append((cfg.rich_family, "--rich-family"))
    for name, what in families:  # L[q*] needs the family's local (per-datapoint) guide
        try:
            gaps.check_family(name, what)
        except ValueError as err:
            problems.append(str(err))
    for flag, value in (("--num-points", cfg.num_points), ("--local-steps", cfg.local_steps),
                        ("--local-particles", cfg.local_particles), ("--refine-samples", cfg.refine_samples),
                        ("--eval-samples", cfg.eval_samples)):
        if value < 1:
            problems.append(f"{flag} must be >= 1, got {value}")
    if not cfg.local_lr or any(not lr > 0 for lr in cfg.local_lr) or (cfg.refine_lr is not None and not cfg.refine_lr > 0):
        problems.append(f"learning rates must be > 0, got --local-lr {list(cfg.local_lr)}, --refine-lr {cfg.refine_lr}")
    if any(t < 0 for t in cfg.refine_steps):
        problems.append(f"--refine-steps must be >= 0, got {cfg.refine_steps}")
    if cfg.overwrite and cfg.checkpoints:
        problems.append("--overwrite retrains the checkpoints in --out; it does not touch those of --checkpoints "
                        f"{cfg.checkpoints} (delete them yourself, or drop --checkpoints)")
    return problems


def _epochs_reused(cfg: Config, path: Path) -> int | None:
    """Epochs of the checkpoint at ``path`` (None: there is none), refused when it is not this comparison's.

    fit() checks on resume what it cannot continue from (data, loss, batch size, ...) and lets
    the seed and lr change; here the families must share the seed (the same decoder start),
    and a checkpoint restored as it is must have the lr and at most the epochs asked for.
    """
    if not path.is_file():
        return None
    state = checkpoint.load(path)
    saved = state.get("settings") or {}
    asked = {"seed": cfg.seed, **({"lr": cfg.lr} if state["epoch"] >= cfg.epochs else {})}
    differ = {k: (saved[k], v) for k, v in asked.items() if k in saved and saved[k] != v}
    if state["epoch"] > cfg.epochs:
        differ["epochs"] = (state["epoch"], cfg.epochs)
    if differ:
        what = ", ".join(f"--{k} {then} (this run: {now})" for k, (then, now) in differ.items())
        raise ValueError(f"checkpoint {path} was trained with {what}; pass the same to reuse it, or --overwrite "
                         f"(without --checkpoints) to train afresh")
    return state["epoch"]


def train_or_load(cfg: Config, name: str, data: runs.RunData, device: torch.device,
                  run_dir: Path) -> tuple[vi_lab.VAE, torch.nn.Module, dict]:
    """The trained pair for one family: a checkpoint in ``run_dir`` is resumed by fit() (restored as
    it is when it has ``cfg.epochs`` epochs, continued when it has fewer), else (or with
    --overwrite) the pair trains afresh."""
    path = run_dir / vi_lab.infer.CHECKPOINT_NAME

    def forget_or_check() -> int | None:
        if cfg.overwrite:  # train afresh: the family's earlier checkpoint and log go
            for stale in runs.RUN_FILES:
                (run_dir / stale).unlink(missing_ok=True)
        return _epochs_reused(cfg, path)

    before = distributed.main_decides(forget_or_check, "checking the family's checkpoint")  # one answer for all
    pyro.set_rng_seed(cfg.seed)  # every family starts from the same decoder
    family = train.Config(latent_dim=cfg.latent_dim, hidden=cfg.hidden, arch=cfg.arch, guide=name)
    model, guide = train.build(family, data.x_train.shape[1])
    result = vi_lab.fit(
        model, guide, data.x_train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, device=device,
        seed=cfg.seed, checkpoint_dir=run_dir, resume=before is not None, progress=runs.fit_progress(cfg.progress),
        binarize=data.fit_binarize, eval_data=data.x_test, eval_samples=1,
    )
    history = result.history
    info = {"epochs": len(history),
            "checkpoint": "trained" if before is None else "loaded" if before >= cfg.epochs else "continued",
            "checkpoint_path": str(path), "seconds_per_epoch": result.seconds_per_epoch,
            "train_elbo": history[-1]["train_elbo"] if history else None,
            "test_elbo": history[-1].get("test_elbo") if history else None}
    return model, guide, info


def main(cfg: Config) -> dict:
    """Train (or load) each family, measure its gaps and refinement curve; write gaps.json and the figures."""
    from vi_lab import viz  # matplotlib: imported when pictures are drawn, not for --help

    t_start = time.perf_counter()
    problems = _check(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    device = runs.setup(cfg.threads, cfg.device)
    world, device = runs.setup_world(device)  # under torchrun: the processes share the work, rank 0 speaks
    out = runs.claim_out_dir(cfg.out, reuse=True)  # its checkpoints are reused by design (train_or_load)
    ckpt_root = Path(cfg.checkpoints) if cfg.checkpoints else out
    data = runs.load_data(cfg.data or cfg.dataset, data_dir=cfg.data_dir, device=device, train_size=cfg.train_size,
                          eval_size=cfg.eval_size, binarization="dynamic", seed=cfg.seed)
    num_points = min(cfg.num_points, len(data.x_test))
    x_gap = data.x_test[:num_points]  # statically binarized test images

    reports, curves, training = [], [], {}
    for name in cfg.guides:
        model, guide, training[name] = train_or_load(cfg, name, data, device, ckpt_root / name)
        print(f"[{name}] gaps on {num_points} test images, K={cfg.eval_samples} ...", flush=True)
        report = gaps.inference_gaps(
            model, guide, x_gap, family=name, rich_family=cfg.rich_family, num_samples=cfg.eval_samples,
            max_steps=cfg.local_steps, lr=cfg.local_lr, num_particles=cfg.local_particles, label=name,
        )
        curve = gaps.refinement_curve(
            model, guide, x_gap, steps=cfg.refine_steps, report=report, num_samples=cfg.refine_samples,
            lr=cfg.refine_lr or cfg.local_lr[0], num_particles=cfg.local_particles, label=name,
        )
        reports.append(report)
        curves.append(curve)
        print(f"[{name}] done in {report.seconds + sum(curve.seconds):.0f} s; L[q*] after "
              f"{report.fits['q_star'].steps} steps (converged: {report.fits['q_star'].converged})", flush=True)

    seconds = time.perf_counter() - t_start
    record = {
        "units": "nats per datapoint (ELBO and log p(x): higher is better; gaps: smaller is better)",
        "reports": [r.to_dict() for r in reports],
        "refinement": [c.to_dict(per_datapoint=True) for c in curves],
        "training": training,
        "num_points": num_points,
        "eval_samples": cfg.eval_samples,
        **runs.data_record(data),
        "binarization": "dynamic (training), static with seed+1 (test)",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seconds_total": seconds,
        **runs.provenance(cfg),
    }
    if not world.main:
        return record  # rank 0 writes and draws
    runs.write_json(out / "gaps.json", record)
    viz.save_gap_bars(reports, out / "gaps.png",
                      title=f"Inference gaps on {num_points} {data.name} test images ({cfg.epochs} epochs)")
    viz.save_refinement_curve(curves, out / "refinement.png",
                              title=f"Amortization gap left after t refinement steps ({num_points} images)")

    print()
    print(gaps.gap_table(reports))
    print()
    print(runs.format_table([
        ("L[q*] - L[q_t] after t steps", *[c.label for c in curves]),
        *[(f"t = {t}", *[f"{c.to_dict()['amortization_gap'][i]['mean']:.2f}" for c in curves])
          for i, t in enumerate(curves[0].steps)],
    ]))
    print()
    print(runs.format_table([
        ("guide", "epochs", "s/epoch", "test ELBO", "q* steps", "q*_rich steps", "gap seconds"),
        *[(r.label, training[r.label]["epochs"], f"{training[r.label]['seconds_per_epoch']:.1f}",
           f"{training[r.label]['test_elbo']:.2f}" if training[r.label]["test_elbo"] is not None else "-",
           r.fits["q_star"].steps, r.fits["q_star_rich"].steps if "q_star_rich" in r.fits else "-",
           f"{r.seconds:.0f}") for r in reports],
    ]))
    print(f"\nnats per datapoint; K={cfg.eval_samples}; {num_points} test images; data: {data.source}; "
          f"total {seconds / 60:.1f} min on {device} ({torch.get_num_threads()} threads)")
    print(f"wrote {out}/ (gaps.json, gaps.png, refinement.png, <guide>/last.pt)")
    runs.print_fallback_banner(data)  # last, where it cannot be missed
    return record


def run(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """``vi-lab gaps ARGS``: parse, train or load, measure; user errors end in one line (exit status 1)."""
    return runs.run_command(parse_args, main, argv, prog)
