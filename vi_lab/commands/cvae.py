"""``vi-lab cvae``: a conditional VAE on MNIST labels: generate any digit on demand.

The model is p(x | z, y) p(z) with the label y given to the decoder, the guide
q(z | x, y) reads it too (:mod:`vi_lab.models.cvae`: the VAE and guide composed with a
one-hot label). After training, the command draws samples for each class and checks
that the conditioning works: a small classifier trained on real training digits
(:func:`vi_lab.metrics.train_classifier`) labels the generated digits, and the table
reports how often it agrees with the class that was asked for
(:func:`vi_lab.metrics.class_agreement`; chance is 1 / C, 10% for digits).

Run ``vi-lab cvae`` (or ``python examples/cvae_mnist.py``; defaults: D = 2, 10 epochs of
60,000 images, about 5 minutes on a 2-core CPU) or ``vi-lab cvae --help``; ``--digits 3 7``
picks the classes of ``digits.png``. ``--data PATH`` runs on your own labelled data (values
in [0, 1], at least two classes); the networks' sizes and the number of classes follow it.
Writes to ``--out DIR``: ``metrics.json``, ``class_grid.png`` (one column per class, one row
per shared z: the label sets the digit, z the style), ``digits.png`` (the requested digits,
one row each), ``latent_scatter.png`` (encoder means coloured by label: with the label
given, z need not encode it), ``curves.png``, and fit's ``metrics.jsonl`` and ``last.pt``
(the sample pictures for square grey images only, the scatter when D >= 2).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyro
import torch

import vi_lab
from vi_lab import evaluate, metrics, runs
from vi_lab.guides.conditional import make_conditional_guide
from vi_lab.models.cvae import CVAE


@dataclass(frozen=True)
class Config(runs.CommonConfig):
    """Everything one run depends on; written into metrics.json."""

    epochs: int = 10
    latent_dim: int = 2  # small: z holds the style, the label the digit (with D = 10 z carries the digit too)
    hidden: tuple[int, ...] = (400,)
    digits: tuple[int, ...] | None = None  # classes drawn into digits.png; None: all of them
    samples_per_digit: int = 10
    batch_size: int = 128
    lr: float = 1e-3


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> Config:
    """The options of ``vi-lab cvae``, declared once; ``argv`` defaults to the process's arguments."""
    p = runs.parser(__doc__, prog)
    runs.add_common_args(p, epochs=Config.epochs)
    p.add_argument("--latent-dim", type=int, default=Config.latent_dim)
    p.add_argument("--hidden", type=int, nargs="+", default=list(Config.hidden), help="hidden widths")
    p.add_argument("--digits", type=int, nargs="+", default=None,
                   help="classes to generate into digits.png (default all: 0..9 for digits)")
    p.add_argument("--samples-per-digit", type=int, default=Config.samples_per_digit)
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--lr", type=float, default=Config.lr)
    kw = vars(p.parse_args(argv))
    kw["hidden"] = tuple(kw["hidden"])
    kw["digits"] = tuple(kw["digits"]) if kw["digits"] is not None else None
    cfg = Config(**kw)
    if cfg.data is None and any(not 0 <= c <= 9 for c in cfg.digits or ()):
        p.error(f"--digits must lie in 0..9, got {list(cfg.digits)}")  # --data: checked against its labels
    return cfg


class GivenLabels:
    """Presents q(z | x, y) as q(z | x) for the picture functions, with y aligned to x by position."""

    def __init__(self, guide: torch.nn.Module, labels: torch.Tensor) -> None:
        self.guide, self.labels = guide, labels

    def get_posterior(self, x: torch.Tensor):
        return self.guide.get_posterior(x, self.labels[: x.shape[0]])


def _num_classes(data: runs.RunData, digits: tuple[int, ...] | None) -> int:
    """C: one more than the largest label; refuses data without labels and --digits beyond them."""
    c = int(max(data.y_train.max(), data.y_test.max())) + 1
    if c < 2:
        raise ValueError(f"a conditional VAE needs labels of at least two classes; {data.name} has only label 0 "
                         f"(no labels): give labels (y_train/y_test in a .npz, or class subfolders)")
    if any(not 0 <= d < c for d in digits or ()):
        raise ValueError(f"--digits must lie in 0..{c - 1} (the classes of {data.name}), got {list(digits)}")
    return c


def main(cfg: Config) -> dict:
    from vi_lab import viz  # matplotlib: imported when pictures are drawn, not for --help

    runs.one_process("cvae")
    device = runs.setup(cfg.threads, cfg.device)
    out = runs.out_dir(cfg.out, overwrite=cfg.overwrite)
    source = cfg.data or cfg.dataset
    data = runs.load_data(source, data_dir=cfg.data_dir, device=device, train_size=cfg.train_size,
                          eval_size=cfg.eval_size, binarization="dynamic", seed=cfg.seed)
    x_dim, num_classes = data.x_train.shape[1], _num_classes(data, cfg.digits)
    pyro.set_rng_seed(cfg.seed)  # initial weights too (torch seeds each process at random)
    model = CVAE(cfg.latent_dim, list(cfg.hidden)[::-1], num_classes, x_dim=x_dim)
    guide = make_conditional_guide("mean_field", latent_dim=cfg.latent_dim, hidden=list(cfg.hidden),
                                   num_classes=num_classes, x_dim=x_dim)
    result = vi_lab.fit(model, guide, (data.x_train, data.y_train), epochs=cfg.epochs, batch_size=cfg.batch_size,
                        lr=cfg.lr, device=device, seed=cfg.seed, progress=runs.fit_progress(cfg.progress),
                        binarize=data.fit_binarize, eval_data=(data.x_test, data.y_test), checkpoint_dir=out)

    t0 = time.perf_counter()
    x_test, y_test = data.x_test, data.y_test
    elbo = evaluate.elbo(model, guide, x_test, y_test, num_samples=1)
    ll = evaluate.log_likelihood(model, guide, x_test, y_test, num_samples=cfg.eval_samples)
    # the judge: an MLP trained on the real (grey-level) training digits, never on samples
    raw = vi_lab.load_dataset(source, "train", data_dir=cfg.data_dir, device=device)
    n_clf = min(len(raw), max(len(data.x_train), 1000))
    classifier = metrics.train_classifier(raw.images[:n_clf], raw.labels[:n_clf], num_classes=num_classes,
                                          epochs=5, seed=cfg.seed)
    raw_test = vi_lab.load_dataset(source, "test", data_dir=cfg.data_dir, device=device)
    with torch.no_grad():
        real_accuracy = (classifier(raw_test.images[:len(x_test)]).argmax(-1) == raw_test.labels[:len(x_test)])
    agreement = metrics.class_agreement(model, classifier, n_per_class=100)
    eval_seconds = time.perf_counter() - t0

    pictures = []
    if data.drawable:
        pictures.append(viz.save_class_grid(model, out / "class_grid.png",
                                            title=f"CVAE samples per class (D = {cfg.latent_dim})"))
        digits = cfg.digits if cfg.digits is not None else range(num_classes)
        labels = torch.tensor(list(digits), device=device).repeat_interleave(cfg.samples_per_digit)
        pictures.append(viz.save_grid(model.sample(len(labels), labels=labels), out / "digits.png",
                                      nrow=cfg.samples_per_digit))
    if cfg.latent_dim >= 2:
        pictures.append(viz.save_latent_scatter(GivenLabels(guide, y_test), x_test, y_test, out / "latent_scatter.png",
                                                title="CVAE encoder means, q(z | x, y), by class"))
    pictures.append(viz.save_curves(result.history, out / "curves.png",
                                    title=f"CVAE on {data.name}: ELBO of log p(x | y) (D = {cfg.latent_dim})"))

    ll_mean, ll_sem = runs.mean_sem(ll)
    record = {
        "train_elbo": result.train_elbo,
        "test_elbo": elbo.mean().item(),
        "test_log_likelihood": ll_mean,
        "test_log_likelihood_sem": ll_sem,
        "class_agreement": {str(c): round(a, 4) for c, a in enumerate(agreement.tolist())},
        "class_agreement_mean": agreement.mean().item(),
        "classifier_real_test_accuracy": real_accuracy.float().mean().item(),
        "classifier_train_size": n_clf,
        "num_classes": num_classes,
        "eval_samples": cfg.eval_samples,
        "eval_size": len(x_test),
        "eval_seconds": eval_seconds,
        "seconds_per_epoch": result.seconds_per_epoch,
        "train_size": len(data.x_train),
        **runs.data_record(data),
        "device": result.device,
        "units": "nats per datapoint (higher is better); the ELBO and log-likelihood are of log p(x | y)",
        **runs.provenance(cfg),
        "history": result.history,
    }
    runs.write_json(out / "metrics.json", record)
    print()
    print(runs.format_table([
        ("metric", "value"),
        ("test ELBO of log p(x | y) (nats per datapoint)", f"{record['test_elbo']:.2f}"),
        (f"test log p(x | y), K={cfg.eval_samples} (nats per datapoint)", f"{ll_mean:.2f} +/- {ll_sem:.2f}"),
        ("classifier accuracy on real test digits", f"{record['classifier_real_test_accuracy']:.3f}"),
        (f"samples recognised as the class asked for (chance {1 / num_classes:.2g})",
         f"{record['class_agreement_mean']:.3f}"),
        *[(f"  digit {c}", f"{a:.2f}") for c, a in enumerate(agreement.tolist())],
        ("seconds per epoch", f"{record['seconds_per_epoch']:.1f} ({result.device})" if result.history else "n/a"),
    ]))
    files = ["metrics.json", *(p.name for p in pictures)]
    files += ["metrics.jsonl", "last.pt"] if result.checkpoint is not None else []
    runs.report_end(data, out, files, pictures="class_grid.png or digits.png",
                    extra="" if result.checkpoint is not None else "; no checkpoint (0 epochs trained)")
    return record


def run(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """``vi-lab cvae ARGS``: parse, train, check the conditioning; user errors end in one line."""
    return runs.run_command(parse_args, main, argv, prog)
