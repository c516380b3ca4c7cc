"""``vi-lab em``: a log-linear latent-class baseline on binarized MNIST: EM vs SVI with enumeration vs a VAE.

A mixture of Bernoullis written as a log-linear model (pixel x class indicator
features, :class:`vi_lab.models.loglinear.BernoulliMixture`) is fitted for each K in
``--classes`` twice: by exact EM (:func:`vi_lab.em.em`, best of ``--restarts``) and, as
a cross-check, by SVI on the same Pyro model with z enumerated (``TraceEnum_ELBO``, an
empty guide: its ELBO is the exact log-likelihood). A VAE (mean-field guide) is trained
on the same data. Everything sees the same statically binarized training images and is
scored on the same binarized test images: exactly for the mixtures, by importance
sampling (K = ``--eval-samples``) for the VAE.

Run ``vi-lab em --threads 1`` (or ``python examples/loglinear_em.py``; defaults finish in a
few minutes on a 2-core CPU) or ``vi-lab em --help``. ``--data PATH`` fits your own data
(values in [0, 1], binarized once). Writes to ``--out DIR`` (default ``runs/<timestamp>/``):
``em.json``, ``templates.png`` (the EM mixtures' class templates; square grey images
only) and ``em_curve.png`` (training log-likelihood per EM iteration).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

import vi_lab
from vi_lab import evaluate, runs
from vi_lab.em import INNER_OPTIMIZERS, em
from vi_lab.models.loglinear import BernoulliMixture, empty_guide, enum_elbo

METHODS = ("em", "svi", "vae")


@dataclass(frozen=True)
class Config(runs.CommonConfig):
    """Everything one run depends on; written into em.json."""

    classes: tuple[int, ...] = (10, 50)
    methods: tuple[str, ...] = METHODS
    em_iters: int = 200
    tol: float = 1e-5
    inner_steps: int = 20
    inner_optimizer: str = "lbfgs"
    restarts: int = 3
    epochs: int = 5
    svi_lr: float = 0.05
    batch_size: int = 128
    latent_dim: int = 20
    hidden: tuple[int, ...] = (400,)
    lr: float = 1e-3


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> Config:
    """The options of ``vi-lab em``, declared once; ``argv`` defaults to the process's arguments."""
    p = runs.parser(__doc__, prog)
    runs.add_common_args(p, epochs=Config.epochs, eval_size=Config.eval_size, eval_samples=Config.eval_samples)
    p.add_argument("--classes", type=int, nargs="+", default=list(Config.classes), help="mixture sizes K (default 10 50)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(Config.methods),
                   help="em: exact EM; svi: SVI with z enumerated (epochs=--epochs); vae: the VAE baseline")
    p.add_argument("--em-iters", type=int, default=Config.em_iters, help="EM iterations per restart at most")
    p.add_argument("--tol", type=float, default=Config.tol, help="EM stops below this relative log-likelihood gain")
    p.add_argument("--inner-steps", type=int, default=Config.inner_steps, help="inner optimizer steps per M-step")
    p.add_argument("--inner-optimizer", choices=sorted(INNER_OPTIMIZERS), default=Config.inner_optimizer)
    p.add_argument("--restarts", type=int, default=Config.restarts, help="EM random restarts (best kept)")
    p.add_argument("--svi-lr", type=float, default=Config.svi_lr, help="Adam learning rate of the SVI mixture")
    p.add_argument("--batch-size", type=int, default=Config.batch_size, help="SVI and VAE minibatch size")
    p.add_argument("--latent-dim", type=int, default=Config.latent_dim, help="VAE latent size")
    p.add_argument("--hidden", type=int, nargs="+", default=list(Config.hidden), help="VAE hidden widths")
    p.add_argument("--lr", type=float, default=Config.lr, help="VAE Adam learning rate")
    kw = vars(p.parse_args(argv))
    for key in ("classes", "methods", "hidden"):
        kw[key] = tuple(kw[key])
    if any(k < 1 for k in kw["classes"]):
        p.error(f"--classes must be positive integers, got {kw['classes']}")
    return Config(**kw)


def _num_params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


class _Clock:
    """Wall and CPU seconds of a block: on a shared machine the CPU time is the fairer cost."""

    def __enter__(self) -> "_Clock":
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def run_em(cfg: Config, K: int, data: runs.RunData, device: torch.device) -> tuple[dict[str, Any], BernoulliMixture, Any]:
    """The best of ``cfg.restarts`` EM fits of a K-class mixture: its row of the table, the model, the EM result."""
    model = BernoulliMixture(K, data.x_train.shape[1])
    with _Clock() as clock:
        result = em(model, data.x_train, max_iters=cfg.em_iters, tol=cfg.tol, inner_steps=cfg.inner_steps,
                    inner_optimizer=cfg.inner_optimizer, restarts=cfg.restarts, seed=cfg.seed, device=device,
                    progress=cfg.progress)
    with torch.no_grad():
        test, sem = runs.mean_sem(model.log_marginal(data.x_test))
    row = {"method": "em", "K": K, "test_log_likelihood": test, "test_log_likelihood_sem": sem,
           "estimator": "exact (enumeration)", "train_log_likelihood": result.log_likelihood,
           "fit_seconds": clock.wall, "fit_cpu_seconds": clock.cpu, "parameters": _num_params(model),
           **result.as_dict()}
    return row, model, result


def run_svi(cfg: Config, K: int, data: runs.RunData, device: torch.device) -> dict[str, Any]:
    """The same mixture fitted by SVI with z enumerated (an empty guide: the ELBO is exact)."""
    model = BernoulliMixture(K, data.x_train.shape[1])
    # the same kind of start as an EM restart, so the two optimizers are compared fairly
    model.reset_parameters(torch.Generator().manual_seed(cfg.seed), data.x_train)
    with _Clock() as clock:
        fit = vi_lab.fit(model, empty_guide, data.x_train, loss=enum_elbo(), epochs=cfg.epochs,
                         batch_size=cfg.batch_size, lr=cfg.svi_lr, device=device, seed=cfg.seed,
                         progress=runs.fit_progress(cfg.progress), binarize="none")
    with torch.no_grad():
        test, sem = runs.mean_sem(model.log_marginal(data.x_test))
        train = model.log_marginal(data.x_train).mean().item()
    return {"method": "svi", "K": K, "test_log_likelihood": test, "test_log_likelihood_sem": sem,
            "estimator": "exact (enumeration)", "train_log_likelihood": train,
            "fit_seconds": clock.wall, "fit_cpu_seconds": clock.cpu, "parameters": _num_params(model),
            "epochs": len(fit.history), "history": fit.history}


def run_vae(cfg: Config, data: runs.RunData, device: torch.device) -> dict[str, Any]:
    """The VAE baseline (mean-field guide) on the same binary images, log p(x) by importance sampling."""
    x_dim = data.x_train.shape[1]
    model = vi_lab.VAE(cfg.latent_dim, list(cfg.hidden)[::-1], x_dim=x_dim)
    guide = vi_lab.make_guide("mean_field", latent_dim=cfg.latent_dim, hidden=list(cfg.hidden), x_dim=x_dim)
    with _Clock() as clock:
        fit = vi_lab.fit(model, guide, data.x_train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                         device=device, seed=cfg.seed, progress=runs.fit_progress(cfg.progress),
                         binarize=data.fit_binarize)
    t0 = time.perf_counter()
    with torch.no_grad():
        test, sem = runs.mean_sem(evaluate.log_likelihood(model, guide, data.x_test, num_samples=cfg.eval_samples))
        test_elbo = evaluate.elbo(model, guide, data.x_test, num_samples=1).mean().item()
    return {"method": "vae", "K": None, "test_log_likelihood": test, "test_log_likelihood_sem": sem,
            "estimator": f"importance sampling, K={cfg.eval_samples}", "test_elbo": test_elbo,
            "train_elbo": fit.train_elbo, "fit_seconds": clock.wall, "fit_cpu_seconds": clock.cpu,
            "eval_seconds": time.perf_counter() - t0, "parameters": _num_params(model, guide),
            "epochs": len(fit.history), "latent_dim": cfg.latent_dim, "history": fit.history}


def table(rows: list[dict[str, Any]]) -> str:
    """The results, one row per method and K."""
    lines = [("method", "K", "test log-lik (nats/datapoint)", "estimator", "train", "fit s (wall)", "fit s (CPU)",
              "params")]
    names = {"em": "mixture, EM", "svi": "mixture, SVI + enum", "vae": "VAE (mean-field)"}
    for r in rows:
        train = r.get("train_log_likelihood", r.get("train_elbo"))
        lines.append((names[r["method"]], r["K"] if r["K"] is not None else f"D={r['latent_dim']}",
                      f"{r['test_log_likelihood']:.2f} +/- {r['test_log_likelihood_sem']:.2f}", r["estimator"],
                      f"{train:.2f}" + (" (ELBO)" if r["method"] == "vae" else ""), f"{r['fit_seconds']:.1f}",
                      f"{r['fit_cpu_seconds']:.1f}", r["parameters"]))
    return runs.format_table(lines)


def main(cfg: Config) -> dict:
    """Fit every method of ``cfg.methods`` (EM and SVI per K, one VAE); write em.json and the figures."""
    from vi_lab import viz  # matplotlib: imported when pictures are drawn, not for --help

    runs.one_process("em")
    device = runs.setup(cfg.threads, cfg.device)
    out = runs.out_dir(cfg.out, overwrite=cfg.overwrite)
    # one static binarization for everything: mixtures and VAE fit the same binary images
    data = runs.load_data(cfg.data or cfg.dataset, data_dir=cfg.data_dir, device=device, train_size=cfg.train_size,
                          eval_size=cfg.eval_size, binarization="static", seed=cfg.seed)
    rows: list[dict[str, Any]] = []
    em_models: dict[int, BernoulliMixture] = {}
    em_results: dict[int, Any] = {}
    for K in cfg.classes:
        if "em" in cfg.methods:
            row, em_models[K], em_results[K] = run_em(cfg, K, data, device)
            rows.append(row)
        if "svi" in cfg.methods:
            rows.append(run_svi(cfg, K, data, device))
    if "vae" in cfg.methods:
        rows.append(run_vae(cfg, data, device))

    report = {
        "results": rows,
        "units": "nats per datapoint (higher is better)",
        "train_size": len(data.x_train),
        "eval_size": len(data.x_test),
        "binarization": "static (train seed, test seed + 1), shared by all methods",
        **runs.data_record(data),
        "device": str(device),
        "threads": torch.get_num_threads(),
        **runs.provenance(cfg),
    }
    runs.write_json(out / "em.json", report)
    written = ["em.json"]
    if em_models:
        if data.drawable:
            viz.save_templates(em_models, out / "templates.png")
            written.append("templates.png")
        viz.save_em_curves(em_results, out / "em_curve.png")
        written.append("em_curve.png")

    print()
    print(table(rows))
    print(f"\ntest set: first {len(data.x_test)} {data.name} test images, statically binarized; "
          f"train: {len(data.x_train)} images; data: {data.source}")
    print(f"wrote {out}/ ({', '.join(written)})")
    if em_models and not data.drawable:
        print(f"no templates.png: the data are not square grey images ({data.name})")
    runs.print_fallback_banner(data)  # last, where it cannot be missed
    return report


def run(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """``vi-lab em ARGS``: parse, fit, compare; user errors end in one line (exit status 1)."""
    return runs.run_command(parse_args, main, argv, prog)
